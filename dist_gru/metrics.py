"""Evaluation metrics of every head and output kind, as float64 sums that reduce exactly.

    python -c "import torch; from dist_gru.losses import OutputSpec; from dist_gru.metrics import MetricSums; \
m = MetricSums(OutputSpec(), 1); m.update(torch.zeros(2, 1), torch.ones(2, 1), torch.tensor([3, 3])); print(m.results())"

Every rank adds its batches into one float64 vector (``MetricSums.sums``); one all-reduce (sum) of
that vector gives the sums of the whole evaluation set, and ``results(reduced)`` divides them.
Sums of float64 values reduce to the same totals on any number of ranks (up to float64 rounding),
so the metrics equal the 1-process ones.

What is computed, by head and output (``O`` output channels; a forecast window's ``H x O`` values
and a step's ``O`` values are its elements):

* every head: ``loss`` (the training loss: mean over units, see ``dist_gru.losses``),
  ``num_samples``; head ``step`` adds ``num_steps`` (valid steps);
* classification: ``accuracy`` and ``macro_f1`` (per class F1 = 2TP / (2TP + FP + FN) from summed
  TP / FP / FN, averaged over the classes that occur in the targets or the predictions, as
  scikit-learn's ``f1_score(average="macro")`` does), per valid step for head ``step``;
* regression: ``mse`` and ``mae`` over all elements of the point forecast (gaussian: the mean,
  quantile: the median level);
* head ``forecast`` adds ``rmse``, ``smape`` (in percent, 0..200: the mean of
  ``200 |y - f| / (|y| + |f|)``, 0 where both are 0), ``naive_mae`` (the last observed value
  repeated), ``seasonal_naive_mae`` (the last ``data.season`` observed values repeated; season 1
  is the naive forecast) and ``mase`` = ``mae / seasonal_naive_mae`` on the same windows. The
  history is the first ``O`` input channels of ``x``, in raw units (the forecast data contract);
* quantile outputs add ``pinball`` (mean pinball loss over elements and levels) and
  ``coverage_<q>`` for each level q: the fraction of elements with ``y <= prediction_q``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dist_gru.losses import OutputSpec, loss_sum, pinball, point_forecast, step_mask


def seasonal_naive(history: Tensor, lengths: Tensor, horizon: int, season: int) -> Tensor:
    """The seasonal-naive forecast ``[B, horizon, O]`` from ``history`` [B, T, O] of valid lengths [B].

    Step h repeats the value one season before it in the last observed season: the value at
    ``length - season + (h mod season)``; season 1 repeats the last observed value (naive).
    """
    lengths = lengths.to(history.device)
    if bool((lengths < season).any()):
        raise ValueError(f"season={season} is longer than a context of {int(lengths.min())} steps")
    step = torch.arange(horizon, device=history.device) % season
    index = lengths[:, None] - season + step[None, :]  # [B, H]
    return history.gather(1, index.unsqueeze(-1).expand(-1, -1, history.shape[-1]))


class MetricSums:
    """Float64 sums of one evaluation of a model whose outputs ``spec`` describes.

    ``num_outputs`` is O (regression channels) or C (classes); ``season`` the seasonal-naive
    baseline's season (head ``forecast``). Call ``update`` per batch, reduce ``sums`` across ranks
    (sum), then ``results(reduced)``.
    """

    def __init__(self, spec: OutputSpec, num_outputs: int, season: int = 1, device: torch.device | None = None):
        self.spec, self.num_outputs, self.season = spec, num_outputs, season
        sizes = {"loss": 1, "units": 1, "samples": 1}
        if spec.head == "step":
            sizes["steps"] = 1
        if spec.task == "classification":
            sizes.update(correct=1, labels=1, tp=num_outputs, fp=num_outputs, fn=num_outputs)
        else:
            sizes.update(squared=1, absolute=1, elements=1)
            if spec.head == "forecast":
                sizes.update(smape=1, naive=1, seasonal_naive=1)
            if spec.output == "quantile":
                sizes.update(pinball=1, covered=len(spec.quantiles))
        self._slots: dict[str, slice] = {}
        start = 0
        for name, size in sizes.items():
            self._slots[name] = slice(start, start + size)
            start += size
        self.sums = torch.zeros(start, dtype=torch.float64, device=device)

    def _add(self, name: str, value: Tensor | float) -> None:
        self.sums[self._slots[name]] += torch.as_tensor(value, dtype=torch.float64, device=self.sums.device)

    @torch.no_grad()
    def update(self, output: Tensor, target: Tensor, lengths: Tensor | None, x: Tensor | None = None) -> None:
        """Add one batch: model ``output``, ``target`` and ``lengths`` as the batch holds them;
        ``x`` (the raw model input) is needed for head ``forecast``'s naive baselines."""
        spec = self.spec
        # float64 from here on: sums of float64 terms reduce to the same totals on any world size.
        output, device = output.double(), self.sums.device
        total, units = loss_sum(spec, output, target, lengths)
        self._add("loss", total)
        self._add("units", float(units))
        self._add("samples", float(target.shape[0]))
        if spec.head == "step":
            self._add("steps", float(units))
            mask = step_mask(lengths, target.shape[0], target.shape[1], output.device)
            output, target = output[mask], target[mask]  # valid steps only: [N, ...]
        if spec.task == "classification":
            self._update_classes(output.argmax(-1).flatten(), target.flatten())
            return
        if spec.head == "forecast":
            if x is None:
                raise ValueError("forecast metrics need the model input x (its first channels are the history)")
            self._update_baselines(x, lengths, target)
        point = point_forecast(spec, output)
        target = target.double()
        error = point - target
        self._add("squared", error.square().sum())
        self._add("absolute", error.abs().sum())
        self._add("elements", float(target.numel()))
        if spec.head == "forecast":
            denominator = point.abs() + target.abs()
            ratio = torch.where(denominator > 0, error.abs() / denominator.clamp_min(1e-300), 0.0)
            self._add("smape", 200.0 * ratio.sum())
        if spec.output == "quantile":
            self._add("pinball", pinball(output, target, spec.quantiles).mean(-1).sum())
            covered = (target.unsqueeze(-1) <= output).flatten(0, -2).sum(0)
            self._add("covered", covered.to(device))

    def _update_classes(self, predicted: Tensor, labels: Tensor) -> None:
        classes = self.num_outputs
        self._add("correct", (predicted == labels).sum())
        self._add("labels", float(labels.numel()))
        hit = predicted == labels
        # bincount with minlength=C: per-class counts without a Python loop over classes.
        self._add("tp", torch.bincount(labels[hit], minlength=classes)[:classes])
        self._add("fp", torch.bincount(predicted[~hit], minlength=classes)[:classes])
        self._add("fn", torch.bincount(labels[~hit], minlength=classes)[:classes])

    def _update_baselines(self, x: Tensor, lengths: Tensor | None, target: Tensor) -> None:
        batch, horizon, channels = target.shape
        history = x[..., :channels].double()
        if lengths is None:
            lengths = torch.full((batch,), x.shape[1], dtype=torch.int64)
        target = target.double()
        naive = seasonal_naive(history, lengths, horizon, 1)
        seasonal = seasonal_naive(history, lengths, horizon, self.season)
        self._add("naive", (naive - target).abs().sum())
        self._add("seasonal_naive", (seasonal - target).abs().sum())

    def results(self, sums: Tensor | None = None) -> dict[str, float]:
        """The metrics from (reduced) sums; ``sums`` defaults to this rank's own."""
        values = (self.sums if sums is None else sums).double().cpu()

        def get(name: str) -> Tensor:
            return values[self._slots[name]]

        def scalar(name: str) -> float:
            return float(get(name)[0])

        def ratio(a: float, b: float) -> float:
            return a / b if b else math.nan

        spec = self.spec
        metrics: dict[str, float] = {
            "loss": ratio(scalar("loss"), scalar("units")),
            "num_samples": int(scalar("samples")),
        }
        if spec.head == "step":
            metrics["num_steps"] = int(scalar("steps"))
        if spec.task == "classification":
            metrics["accuracy"] = ratio(scalar("correct"), scalar("labels"))
            tp, fp, fn = get("tp"), get("fp"), get("fn")
            denominator = 2 * tp + fp + fn
            present = denominator > 0
            f1 = 2 * tp[present] / denominator[present]
            metrics["macro_f1"] = float(f1.mean()) if bool(present.any()) else math.nan
            return metrics
        elements = scalar("elements")
        metrics["mse"] = ratio(scalar("squared"), elements)
        metrics["mae"] = ratio(scalar("absolute"), elements)
        if spec.head == "forecast":
            metrics["rmse"] = math.sqrt(metrics["mse"])
            metrics["smape"] = ratio(scalar("smape"), elements)
            metrics["naive_mae"] = ratio(scalar("naive"), elements)
            metrics["seasonal_naive_mae"] = ratio(scalar("seasonal_naive"), elements)
            metrics["mase"] = ratio(scalar("absolute"), scalar("seasonal_naive"))
        if spec.output == "quantile":
            metrics["pinball"] = ratio(scalar("pinball"), elements)
            for level, covered in zip(spec.quantiles, get("covered").tolist(), strict=True):
                metrics[f"coverage_{level:g}"] = ratio(covered, elements)
        return metrics
