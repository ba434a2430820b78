"""Classification tasks: a label per sequence or per step (``ClassificationTask``), and token
streams, which predict the next token at every step (``TokenTask``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dist_gru.tasks.base import Task
from dist_gru.tasks.metrics import MetricSums, SumsView, ratio


class ClassificationTask(Task):
    """Class logits over ``output_size`` classes; cross-entropy loss.

    Metrics: ``accuracy`` and ``macro_f1`` (per class F1 = 2TP / (2TP + FP + FN) from summed
    TP / FP / FN, averaged over the classes that occur in the targets or the predictions, as
    scikit-learn's ``f1_score(average="macro")`` does), per valid step for head ``step``."""

    kind = "classification"
    main_metric = "accuracy"

    def unit_losses(self, output: Tensor, target: Tensor) -> Tensor:
        flat = F.cross_entropy(output.flatten(0, -2), target.flatten(), reduction="none")
        return flat.view(target.shape)

    def fill_padding(self, target: Tensor, mask: Tensor) -> Tensor:
        return torch.where(mask, target, 0)  # a padded label may lie outside [0, C)

    def sum_sizes(self) -> dict[str, int]:
        classes = self.output_size
        return super().sum_sizes() | {"correct": 1, "labels": 1, "tp": classes, "fp": classes, "fn": classes}

    def update_values(
        self, sums: MetricSums, output: Tensor, target: Tensor, lengths: Tensor | None, x: Tensor | None
    ) -> None:
        predicted, labels, classes = output.argmax(-1).flatten(), target.flatten(), self.output_size
        sums.add("correct", (predicted == labels).sum())
        sums.add("labels", float(labels.numel()))
        hit = predicted == labels
        # bincount with minlength=C: per-class counts without a Python loop over classes.
        sums.add("tp", torch.bincount(labels[hit], minlength=classes)[:classes])
        sums.add("fp", torch.bincount(predicted[~hit], minlength=classes)[:classes])
        sums.add("fn", torch.bincount(labels[~hit], minlength=classes)[:classes])

    def results(self, sums: SumsView) -> dict[str, float]:
        metrics = super().results(sums)
        metrics["accuracy"] = ratio(sums.scalar("correct"), sums.scalar("labels"))
        tp, fp, fn = sums["tp"], sums["fp"], sums["fn"]
        denominator = 2 * tp + fp + fn
        present = denominator > 0
        f1 = 2 * tp[present] / denominator[present]
        metrics["macro_f1"] = float(f1.mean()) if bool(present.any()) else math.nan
        return metrics

    def summary_lines(self, final: dict[str, float], mse_baseline: str | None = None) -> list[str]:
        lines = []
        if "accuracy" in final:
            lines.append(f"  final eval accuracy: {final['accuracy']:.4f}")
        if "macro_f1" in final:
            lines.append(f"  final eval macro-F1: {final['macro_f1']:.4f}")
        return lines

    def output_shape(self) -> tuple[int, ...]:
        return (self.output_size,)

    def row_layout(self, probabilities: bool) -> tuple[tuple[int, ...], np.dtype, dict[str, Any]]:
        if probabilities:
            return self.output_shape(), np.dtype(np.float32), {"values": "class probabilities"}
        return (), np.dtype(np.int64), {"values": "predicted class labels"}

    def row_values(self, out: Tensor, probabilities: bool) -> Tensor:
        return out.softmax(-1) if probabilities else out.argmax(-1)

    def table_columns(self, rows: np.ndarray, names: list[str], classes: list[str] | None = None) -> dict[str, np.ndarray]:
        """Labels as their class names (ids without names), or one ``p_<class>`` column per class."""
        classes = classes or [str(c) for c in range(self.output_size)]
        if rows.dtype.kind == "f":  # probabilities [..., C]
            return {f"p_{name}": rows[..., c] for c, name in enumerate(classes)}
        return {names[0] if names else "label": np.asarray(classes, dtype=object)[rows]}


class TokenTask(ClassificationTask):
    """The next token of a stream at every step (``output_size`` = vocabulary size). Adds
    ``bits_per_token`` (the loss in bits) and ``unigram_bits_per_token``: the entropy of the
    evaluated tokens' own frequencies, the baseline of a model that knows no context."""

    main_metric = "loss"  # next-token cross-entropy (bits_per_token is the same in bits)

    def sum_sizes(self) -> dict[str, int]:
        return super().sum_sizes() | {"tokens": self.output_size}

    def update_values(
        self, sums: MetricSums, output: Tensor, target: Tensor, lengths: Tensor | None, x: Tensor | None
    ) -> None:
        super().update_values(sums, output, target, lengths, x)
        sums.add("tokens", torch.bincount(target.flatten(), minlength=self.output_size))

    def results(self, sums: SumsView) -> dict[str, float]:
        metrics = super().results(sums)
        frequency = sums["tokens"]
        p = frequency[frequency > 0] / frequency.sum()
        metrics["bits_per_token"] = metrics["loss"] / math.log(2)
        metrics["unigram_bits_per_token"] = float(-(p * torch.log2(p)).sum())
        return metrics

    def summary_lines(self, final: dict[str, float], mse_baseline: str | None = None) -> list[str]:
        lines = super().summary_lines(final, mse_baseline)
        if "bits_per_token" in final:
            lines.append(
                f"  final eval bits per token: {final['bits_per_token']:.4f} "
                f"(unigram baseline: {final['unigram_bits_per_token']:.4f})"
            )
        return lines
