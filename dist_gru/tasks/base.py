"""What every task shares: the unit a loss averages over (by head), the sums every evaluation
keeps, the rows of `dist-gru predict`, and the rules a head sets for the data it is trained on.

A *unit* is what one loss term averages over: a sequence (head ``last``), a forecast window
(``forecast``), or one valid step (``step``; padded steps past a sequence's length are masked
out). The loss of a unit is the mean over its output values (output channels, forecast steps and
quantile levels), or the cross-entropy of its label. ``loss_sum`` returns the sum and the count
instead of a mean so that the trainer divides by the count of the whole global batch: with
per-step units ranks hold different numbers of steps, and a per-rank mean would weight the ranks
with short sequences more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from dist_gru.config import ConfigError
from dist_gru.tasks.functional import at_least_fp32, step_mask
from dist_gru.tasks.metrics import MetricSums, SumsView, ratio


@dataclass(frozen=True)
class DataInfo:
    """What a task needs to know of its training data to check that it fits (``check_fits``)."""

    source: str  # how the config names the data, for messages: a path or "data.name=adding"
    task: str  # regression | classification
    target_kind: str  # sequence (one target per sequence) | step (a target at every step)
    output_size: int  # target channels or classes
    horizon: int = 0  # data.horizon
    # Stream mode only (`data_info` leaves them None elsewhere): the model's `model.vocab_size`, and
    # the data's token vocabulary (None: float features), largest token id, dtype and `data.targets`.
    model_vocab: int | None = None
    vocab_size: int | None = None
    max_token: int | None = None
    feature_dtype: str = "float32"
    targets: str = "stored"
    # The training split of a job only (None elsewhere): its samples per epoch (sequences or
    # windows; in stream mode, chunks of `tbptt` steps) against one global batch.
    epoch_samples: int | None = None
    global_batch: int = 0
    tbptt: int | None = None


# (shift, scale) of the target channels, [B, 1, O] or [O]: a loss in the units (value - shift) / scale.
Units = tuple[Tensor, Tensor]


class StepCounter(Protocol):
    """A training sampler that knows the valid steps of every global batch (head ``step``)."""

    def valid_steps(self, step: int) -> int: ...


class Task:
    """The loss, metrics, point forecast and predicted rows of one kind of model output.

    ``head`` is ``last``, ``step`` or ``forecast``; ``output_size`` O (regression channels) or C
    (classes). Subclasses: ``RegressionTask``, ``ForecastTask``, ``ClassificationTask``,
    ``TokenTask``; build one with ``dist_gru.tasks.task_for(model.config)``.
    """

    kind = ""  # the data's task this one trains on: regression | classification
    # The evaluation metric a search optimises unless told otherwise (``dist-gru tune``).
    main_metric = "loss"

    def __init__(self, head: str, output_size: int):
        self.head, self.output_size = head, output_size
        self.per_step = head == "step"  # one unit per valid step, not per sequence
        # The output's leading axes, before `output_shape()`: a unit per sequence or per step.
        self.unit_axes = ("batch", "time") if self.per_step else ("batch",)

    # --- the loss -----------------------------------------------------------------------------

    def unit_losses(self, output: Tensor, target: Tensor) -> Tensor:
        """The loss of every unit: [B] (last, forecast) or [B, T] (step), before any masking."""
        raise NotImplementedError

    def fill_padding(self, target: Tensor, mask: Tensor) -> Tensor:
        """``target`` with its padded steps (``mask`` False) made harmless for the loss."""
        return target

    def loss_units(self, model: Any, x: Tensor, lengths: Tensor | None) -> Units | None:
        """The units the loss is computed in, from the model and its input batch: None for the
        data's own (every task but a forecast with ``loss_units='scaled'``)."""
        return None

    def loss_sum(
        self, output: Tensor, target: Tensor, lengths: Tensor | None = None, units: Units | None = None
    ) -> tuple[Tensor, int]:
        """(sum of the per-unit losses, number of units) of one batch; see the module docstring.

        ``lengths`` [B] matters for head ``step`` only: steps at ``t >= length`` count nowhere,
        whatever the padded targets hold there. ``units``: what ``loss_units`` returned."""
        output = at_least_fp32(output)
        if not self.per_step:
            return self.unit_losses(output, target).sum(), int(target.shape[0])
        batch, steps = target.shape[:2]
        mask = step_mask(lengths, batch, steps, output.device)
        per_step = self.unit_losses(output, self.fill_padding(target, mask))
        count = batch * steps if lengths is None else int(torch.as_tensor(lengths).sum())
        return torch.where(mask, per_step, 0.0).sum(), count

    def units(self, sampler: StepCounter, step: int, global_batch_size: int) -> int:
        """The units the loss of optimizer step ``step`` averages over, in the whole global batch.

        Head ``step``: every valid time step of every sequence of the global batch (all ranks, all
        micro-batches), which every rank knows from the sampling contract without a collective.
        Other heads: the samples."""
        return sampler.valid_steps(step) if self.per_step else global_batch_size

    def point_forecast(self, output: Tensor) -> Tensor:
        """One value per output channel (regression); classification: the logits, unchanged."""
        return output

    # --- metrics ------------------------------------------------------------------------------

    def metric_sums(self, season: int = 1, device: torch.device | None = None) -> MetricSums:
        """Empty float64 sums of one evaluation (``season``: head ``forecast``'s seasonal naive)."""
        return MetricSums(self, season, device)

    def metric_names(self) -> list[str]:
        """The metrics an evaluation of this task returns (without the ``eval/`` prefix)."""
        return list(self.metric_sums().results())

    def sum_sizes(self) -> dict[str, int]:
        """The named slots of the sums vector, in order (every task: loss, units, samples)."""
        return {"loss": 1, "units": 1, "samples": 1, **({"steps": 1} if self.per_step else {})}

    def update_sums(
        self,
        sums: MetricSums,
        output: Tensor,
        target: Tensor,
        lengths: Tensor | None,
        x: Tensor | None,
        loss_units: Units | None = None,
    ) -> None:
        """Add one batch to ``sums`` (the loss and counts here, the rest in ``update_values``)."""
        # float64 from here on: sums of float64 terms reduce to the same totals on any world size.
        output = output.double()
        total, units = self.loss_sum(output, target, lengths, loss_units)
        sums.add("loss", total)
        sums.add("units", float(units))
        sums.add("samples", float(target.shape[0]))
        if self.per_step:
            sums.add("steps", float(units))
            mask = step_mask(lengths, target.shape[0], target.shape[1], output.device)
            output, target = output[mask], target[mask]  # valid steps only: [N, ...]
        self.update_values(sums, output, target, lengths, x)

    def update_values(
        self, sums: MetricSums, output: Tensor, target: Tensor, lengths: Tensor | None, x: Tensor | None
    ) -> None:
        """Add the task's own sums of one batch (valid steps only for head ``step``)."""
        raise NotImplementedError

    def results(self, sums: SumsView) -> dict[str, float]:
        """The metrics from (reduced) sums: ``loss`` (mean over units), ``num_samples``, head
        ``step``: ``num_steps``, then the task's own."""
        metrics: dict[str, float] = {
            "loss": ratio(sums.scalar("loss"), sums.scalar("units")),
            "num_samples": int(sums.scalar("samples")),
        }
        if self.per_step:
            metrics["num_steps"] = int(sums.scalar("steps"))
        return metrics

    def breakdowns(self, sums: SumsView) -> dict[str, list[float]]:
        """Metrics that are lists (a forecast's error per horizon step), from (reduced) sums: for
        the reports of evaluate and backtest, not logged in training, where a metric is one number."""
        return {}

    def summary_lines(self, final: dict[str, float], mse_baseline: str | None = None) -> list[str]:
        """The metric lines of the end-of-training summary, from the final evaluation's metrics
        (none if it has not got them); ``mse_baseline`` describes a known MSE to beat."""
        return []

    # --- predict ------------------------------------------------------------------------------

    def output_shape(self) -> tuple[int, ...]:
        """The axes of one unit's output, after the batch (and time, head ``step``) axes."""
        raise NotImplementedError

    def row_layout(self, probabilities: bool) -> tuple[tuple[int, ...], np.dtype, dict[str, Any]]:
        """(shape of one row, dtype, description of the last axes) of `dist-gru predict`'s file."""
        raise NotImplementedError

    def row_values(self, out: Tensor, probabilities: bool) -> Tensor:
        """A batch's outputs as the values `dist-gru predict` writes."""
        return out

    def table_columns(self, rows: np.ndarray, names: list[str], classes: list[str] | None = None) -> dict[str, np.ndarray]:
        """Predict's rows as named table columns (``names``: the targets; ``classes``: class names)."""
        raise NotImplementedError

    def row_offsets(self, lengths: np.ndarray) -> np.ndarray:
        """Where each sample's rows start in predict's file, with the total last: one row per
        sample, or one per valid step (head ``step``)."""
        counts = np.asarray(lengths, dtype=np.int64) if self.per_step else np.ones(len(lengths), dtype=np.int64)
        return np.concatenate([[0], np.cumsum(counts)])

    def valid_units(self, values: np.ndarray, lengths: Tensor) -> np.ndarray:
        """The values of the units a batch really has: every step up to each sequence's length (head
        ``step``, whose padded steps hold values nobody should read), else all of them."""
        if not self.per_step:
            return values
        return values[(torch.arange(values.shape[1])[None, :] < lengths[:, None]).numpy()]

    def rows(self, out: Tensor, lengths: Tensor, probabilities: bool) -> np.ndarray:
        """A batch's outputs as rows of the file: valid steps only, concatenated (head step)."""
        out = self.row_values(out.float(), probabilities).cpu()
        if self.per_step:
            out = torch.cat([out[i, :length] for i, length in enumerate(lengths.tolist())])
        return out.numpy()

    # --- the data it trains on ----------------------------------------------------------------

    def target_problems(self, data: DataInfo) -> list[str]:
        """Why the data's task (regression, classification) does not fit this one."""
        return []

    def check_fits(self, data: DataInfo) -> None:
        """A ConfigError listing every way the training data cannot train this task."""
        if data.target_kind == "none" and data.vocab_size is None:
            raise ConfigError(
                f"{data.source} holds no targets (unlabelled data): dist-gru predict reads it; training and "
                "evaluation need data with targets"
            )
        problems = token_problems(data) + self.target_problems(data)
        if self.per_step and data.target_kind != "step":
            problems.append(
                f"model.head=step needs a target at every step, but {data.source} has one target per sequence: "
                "use model.head=last, or data with per-step targets"
            )
        if self.head == "last" and data.target_kind == "step" and data.horizon == 0:
            problems.append(
                f"model.head=last needs one target per sequence, but {data.source} has a target at every step: "
                "use model.head=step (or model.head=forecast with data.window and data.horizon)"
            )
        batch = batch_problems(data)  # a rule of the training config, whatever the model: its own line
        if problems:
            raise ConfigError("the model does not fit the data:\n  " + "\n  ".join(problems + batch))
        if batch:
            raise ConfigError(batch[0])


def batch_problems(data: DataInfo) -> list[str]:
    """An epoch of the training split must hold at least one global batch."""
    samples, batch = data.epoch_samples, data.global_batch
    if samples is None or samples >= batch:
        return []
    if data.tbptt is not None:
        return [
            f"train.global_batch_size={batch} lanes, but an epoch of the training streams has only {samples} "
            f"chunks of train.tbptt={data.tbptt} steps: use at most {samples} lanes, a shorter train.tbptt, or more data"
        ]
    return [
        f"the training split has {samples} samples, fewer than one global batch of {batch}: lower "
        "train.global_batch_size or use more data"
    ]


def token_problems(data: DataInfo) -> list[str]:
    """Stream mode: token ids need an embedding covering every id, float features none."""
    vocab, top = data.model_vocab, data.max_token
    if data.vocab_size is None:
        if vocab is None:
            return []
        return [
            f"model.vocab_size={vocab} reads token ids, but {data.source} holds float features "
            f"(feature_dtype {data.feature_dtype}): unset model.vocab_size"
        ]
    if vocab is None:
        return [
            f"{data.source} is a token stream (vocabulary {data.vocab_size}): set model.vocab_size (>= the "
            "largest token id + 1) so the model embeds its ids"
        ]
    if top is not None and top >= vocab:
        return [
            f"{data.source}: token id {top} is outside the model's vocabulary, model.vocab_size={vocab}; "
            f"expected ids in [0, {vocab}) (set model.vocab_size >= {top + 1})"
        ]
    if data.targets != "next":
        return [f"{data.source} is a token stream without stored targets: use data.targets=next"]
    return []
