"""Regression tasks: values per sequence or per step (``RegressionTask``) and forecasts of the
``horizon`` steps after a context window (``ForecastTask``, with its naive baselines)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dist_gru.tasks.base import DataInfo, Task, Units
from dist_gru.tasks.distributions import PointOutput
from dist_gru.tasks.functional import at_least_fp32, seasonal_naive
from dist_gru.tasks.metrics import MetricSums, SumsView, ratio


class RegressionTask(Task):
    """Values in ``output_size`` channels, output as ``distribution`` says (point, gaussian, quantile).

    Metrics: ``mse`` and ``mae`` over all elements of the point forecast (gaussian: the mean,
    quantile: the median level), then the distribution's own (quantile: pinball, coverage)."""

    kind = "regression"

    def __init__(self, head: str, output_size: int, distribution: PointOutput):
        super().__init__(head, output_size)
        self.distribution = distribution

    def unit_losses(self, output: Tensor, target: Tensor) -> Tensor:
        per_value = self.distribution.loss(output, target.to(output.dtype))
        return per_value.mean(-1)  # over the output channels

    def point_forecast(self, output: Tensor) -> Tensor:
        return self.distribution.point(output)

    def interval(self, output: Tensor) -> tuple[Tensor, Tensor, str] | None:
        """(low, high, label) of the output's widest interval (gaussian, quantile), else None."""
        return self.distribution.interval(output)

    def table_columns(self, output: np.ndarray, names: list[str], classes: list[str] | None = None) -> dict[str, np.ndarray]:
        """Outputs ``[..., O(, K)]`` as named table columns: per target its point value (named as the
        target) and what the output kind adds (gaussian: the scale; quantile: each level)."""
        point = self.distribution.point(torch.from_numpy(np.asarray(output))).numpy()
        columns = {}
        for channel, name in enumerate(names):
            columns[name] = point[..., channel]
            for column, index in self.distribution.columns(name):
                columns[column] = output[..., channel, index]
        return columns

    def sum_sizes(self) -> dict[str, int]:
        sizes = super().sum_sizes() | {"squared": 1, "absolute": 1, "elements": 1}
        return sizes | self.baseline_sizes() | self.distribution.sum_sizes()

    def baseline_sizes(self) -> dict[str, int]:
        """Slots of the baselines' sums (none here; see ``ForecastTask``)."""
        return {}

    def update_values(
        self, sums: MetricSums, output: Tensor, target: Tensor, lengths: Tensor | None, x: Tensor | None
    ) -> None:
        target = target.double()
        self.update_baselines(sums, target, lengths, x)
        point = self.distribution.point(output)
        error = point - target
        sums.add("squared", error.square().sum())
        sums.add("absolute", error.abs().sum())
        sums.add("elements", float(target.numel()))
        self.update_errors(sums, point, target)
        self.distribution.update_sums(sums, output, target)

    def update_baselines(self, sums: MetricSums, target: Tensor, lengths: Tensor | None, x: Tensor | None) -> None:
        """Add the baselines' errors of one batch (none here)."""

    def update_errors(self, sums: MetricSums, point: Tensor, target: Tensor) -> None:
        """Add further errors of the point forecast (none here)."""

    def results(self, sums: SumsView) -> dict[str, float]:
        metrics = super().results(sums)
        elements = sums.scalar("elements")
        metrics["mse"] = ratio(sums.scalar("squared"), elements)
        metrics["mae"] = ratio(sums.scalar("absolute"), elements)
        metrics |= self.baseline_results(sums, metrics)
        return metrics | self.distribution.results(sums, elements)

    def baseline_results(self, sums: SumsView, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics of the baselines, beside ``metrics`` so far (none here)."""
        return {}

    def summary_lines(self, final: dict[str, float], mse_baseline: str | None = None) -> list[str]:
        if "mse" not in final:
            return []
        baseline = f" ({mse_baseline})" if mse_baseline else ""
        return [f"  final eval mse: {final['mse']:.6g}{baseline}"]

    def output_shape(self) -> tuple[int, ...]:
        return (self.output_size, *self.distribution.extra_shape)

    def row_layout(self, probabilities: bool) -> tuple[tuple[int, ...], np.dtype, dict[str, Any]]:
        return self.output_shape(), np.dtype(np.float32), self.distribution.about()

    def target_problems(self, data: DataInfo) -> list[str]:
        if data.task != "classification":
            return []
        if self.distribution.name == "point":
            if self.distribution.point_loss == "mse":
                return []
            return [
                f"model.point_loss={self.distribution.point_loss} needs a regression task, but {data.source} is a "
                f"classification task with {data.output_size} classes: classification trains with cross-entropy "
                "(model.point_loss=mse)"
            ]
        return [
            f"model.output={self.distribution.name} needs a regression task, but {data.source} is a classification "
            f"task with {data.output_size} classes: use model.output=point (class logits, cross-entropy)"
        ]


class ForecastTask(RegressionTask):
    """The ``horizon`` steps after a context window; a unit is a window.

    Adds ``rmse``, ``smape`` (in percent, 0..200: the mean of ``200 |y - f| / (|y| + |f|)``, 0
    where both are 0), ``naive_mae`` (the last observed value repeated), ``seasonal_naive_mae``
    (the last ``season`` observed values repeated; season 1 is the naive forecast), ``mase`` =
    ``mae / seasonal_naive_mae`` on the same windows, and ``bias``, the mean signed error
    (forecast - actual: positive when it over-shoots); ``breakdowns``: ``mae_by_step``, the MAE at
    each horizon step. The history is the first ``O`` input channels of ``x``, in raw units (the
    forecast data contract). With ``scaled_loss`` the loss of a window is computed in its scaler's
    units (``GRUModel.target_scale``), so that every window weighs the same, whatever its spread."""

    main_metric = "mase"  # unit-free: comparable across series and scalings

    def __init__(self, output_size: int, distribution: PointOutput, horizon: int, scaled_loss: bool = False):
        super().__init__("forecast", output_size, distribution)
        self.horizon, self.scaled_loss = horizon, scaled_loss

    def loss_units(self, model: Any, x: Tensor, lengths: Tensor | None) -> Units | None:
        return model.target_scale(x, lengths) if self.scaled_loss else None

    def loss_sum(
        self, output: Tensor, target: Tensor, lengths: Tensor | None = None, units: Units | None = None
    ) -> tuple[Tensor, int]:
        if self.scaled_loss:
            if units is None:
                raise ValueError("loss_units='scaled': the loss needs the units of every window (Task.loss_units)")
            output = at_least_fp32(output)
            shift, scale = (t.to(output.device, output.dtype) for t in units)
            output = self.distribution.to_units(output, shift, scale)
            target = (target.to(output.dtype) - shift) / scale
        return super().loss_sum(output, target, lengths)

    def unit_losses(self, output: Tensor, target: Tensor) -> Tensor:
        return super().unit_losses(output, target).mean(-1)  # over the horizon: one unit per window

    def baseline_sizes(self) -> dict[str, int]:
        return {"smape": 1, "naive": 1, "seasonal_naive": 1, "signed": 1, "step_absolute": self.horizon}

    def baseline_forecasts(self, x: Tensor | None, lengths: Tensor | None, season: int) -> dict[str, Tensor]:
        """The baselines' forecasts [B, horizon, O] (float64) from the model input ``x``, whose first
        ``O`` channels are the history: ``naive`` and ``seasonal_naive`` (``season`` steps)."""
        if x is None:
            raise ValueError("forecast metrics need the model input x (its first channels are the history)")
        history = x[..., : self.output_size].double()
        if lengths is None:
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.int64)
        return {
            "naive": seasonal_naive(history, lengths, self.horizon, 1),
            "seasonal_naive": seasonal_naive(history, lengths, self.horizon, season),
        }

    def update_baselines(self, sums: MetricSums, target: Tensor, lengths: Tensor | None, x: Tensor | None) -> None:
        for name, forecast in self.baseline_forecasts(x, lengths, sums.season).items():
            sums.add(name, (forecast - target).abs().sum())

    def update_errors(self, sums: MetricSums, point: Tensor, target: Tensor) -> None:
        signed = point - target  # [B, horizon, O]
        error, denominator = signed.abs(), point.abs() + target.abs()
        ratios = torch.where(denominator > 0, error / denominator.clamp_min(1e-300), 0.0)
        sums.add("smape", 200.0 * ratios.sum())
        sums.add("signed", signed.sum())
        sums.add("step_absolute", error.sum((0, 2)))

    def baseline_results(self, sums: SumsView, metrics: dict[str, float]) -> dict[str, float]:
        elements = sums.scalar("elements")
        return {
            "rmse": math.sqrt(metrics["mse"]),
            "smape": ratio(sums.scalar("smape"), elements),
            "naive_mae": ratio(sums.scalar("naive"), elements),
            "seasonal_naive_mae": ratio(sums.scalar("seasonal_naive"), elements),
            "mase": ratio(sums.scalar("absolute"), sums.scalar("seasonal_naive")),
            "bias": ratio(sums.scalar("signed"), elements),
        }

    def breakdowns(self, sums: SumsView) -> dict[str, list[float]]:
        per_step = sums.scalar("elements") / self.horizon  # every window has every step
        return {"mae_by_step": [ratio(float(total), per_step) for total in sums["step_absolute"]]}

    def summary_lines(self, final: dict[str, float], mse_baseline: str | None = None) -> list[str]:
        lines = super().summary_lines(final, mse_baseline)
        if "mase" in final:
            lines.append(
                f"  final eval forecast mae: {final['mae']:.6g} (naive: {final['naive_mae']:.6g}, seasonal naive: "
                f"{final['seasonal_naive_mae']:.6g}), mase {final['mase']:.4g}"
            )
        return lines

    def output_shape(self) -> tuple[int, ...]:
        return (self.horizon, *super().output_shape())

    def target_problems(self, data: DataInfo) -> list[str]:
        problems = super().target_problems(data)
        if data.task == "classification":
            problems.append(
                f"model.head=forecast needs a regression task (values to forecast); {data.source} holds class labels"
            )
        return problems
