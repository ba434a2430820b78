"""What a regression output holds per target value (as GluonTS's ``DistributionOutput``): a point,
a gaussian (mean, scale) or quantile levels. Each owns its per-value loss, its point forecast, its
description in `dist-gru predict`'s JSON line, and the metrics only it has (quantiles: pinball loss
and coverage)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dist_gru.tasks.functional import gaussian_nll, median_index, pinball
from dist_gru.tasks.metrics import MetricSums, SumsView, ratio

Z_95 = 1.959964  # the standard normal's 97.5% quantile: mean +- Z_95 scale holds 95%


class PointOutput:
    """One value per target value; squared-error loss (MSE), or absolute error with ``loss="mae"``
    (its best point forecast is the median, not the mean: robust to outliers and spikes)."""

    name = "point"
    extra_shape: tuple[int, ...] = ()  # output axes after the O channels

    def __init__(self, loss: str = "mse"):
        self.point_loss = loss

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Loss of every target value: ``target`` [..., O] -> [..., O]."""
        error = output - target
        return error.abs() if self.point_loss == "mae" else error**2

    def to_units(self, output: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        """``output`` in the units ``(value - shift) / scale`` (``shift``, ``scale``: [..., O])."""
        return (output - shift) / scale

    def point(self, output: Tensor) -> Tensor:
        """One value per output channel."""
        return output

    def about(self) -> dict[str, Any]:
        """What the last axes of a predicted row mean."""
        return {"values": "values"}

    def columns(self, name: str) -> list[tuple[str, int]]:
        """The table columns of target ``name`` beside its point forecast: (column, index on the
        output's last axis)."""
        return []

    def interval(self, output: Tensor) -> tuple[Tensor, Tensor, str] | None:
        """(low, high, label) of the widest interval the output describes, per value; None for a point."""
        return None

    def sum_sizes(self) -> dict[str, int]:
        return {}

    def update_sums(self, sums: MetricSums, output: Tensor, target: Tensor) -> None:
        pass

    def results(self, sums: SumsView, elements: float) -> dict[str, float]:
        return {}


class GaussianOutput(PointOutput):
    """(mean, scale) per target value; the full gaussian negative log-likelihood, constant included,
    so that its value is comparable across runs. The point forecast is the mean."""

    name = "gaussian"
    extra_shape = (2,)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return gaussian_nll(output, target)

    def point(self, output: Tensor) -> Tensor:
        return output[..., 0]

    def to_units(self, output: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        mean, spread = output.unbind(-1)
        return torch.stack([(mean - shift) / scale, spread / scale], dim=-1)

    def about(self) -> dict[str, Any]:
        return {"values": "mean, scale"}

    def columns(self, name: str) -> list[tuple[str, int]]:
        return [(f"{name}_scale", 1)]

    def interval(self, output: Tensor) -> tuple[Tensor, Tensor, str] | None:
        mean, scale = output.unbind(-1)
        return mean - Z_95 * scale, mean + Z_95 * scale, "95% interval"

    def sum_sizes(self) -> dict[str, int]:
        return {"covered": 1}

    def update_sums(self, sums: MetricSums, output: Tensor, target: Tensor) -> None:
        low, high, _ = self.interval(output)
        sums.add("covered", ((low <= target) & (target <= high)).sum().to(sums.sums.device))

    def results(self, sums: SumsView, elements: float) -> dict[str, float]:
        """``coverage_95``: the fraction of values inside mean +- 1.96 scale (0.95 when calibrated)."""
        return {"coverage_95": ratio(sums.scalar("covered"), elements)}


class QuantileOutput(PointOutput):
    """One value per quantile level; the pinball loss averaged over the levels. The point forecast
    is the level closest to 0.5. Adds ``pinball`` and ``coverage_<q>`` (fraction of values at or
    below the level-q prediction) to the metrics."""

    name = "quantile"

    def __init__(self, quantiles: Sequence[float]):
        super().__init__()
        self.quantiles = tuple(float(q) for q in quantiles)
        self.extra_shape = (len(self.quantiles),)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return pinball(output, target, self.quantiles).mean(-1)

    def point(self, output: Tensor) -> Tensor:
        return output[..., median_index(self.quantiles)]

    def to_units(self, output: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return (output - shift.unsqueeze(-1)) / scale.unsqueeze(-1)

    def about(self) -> dict[str, Any]:
        return {"values": "quantiles", "quantiles": list(self.quantiles)}

    def columns(self, name: str) -> list[tuple[str, int]]:
        return [(f"{name}_q{q:g}", i) for i, q in enumerate(self.quantiles)]

    def interval(self, output: Tensor) -> tuple[Tensor, Tensor, str] | None:
        order = sorted(range(len(self.quantiles)), key=self.quantiles.__getitem__)
        low, high = order[0], order[-1]
        return output[..., low], output[..., high], f"q{self.quantiles[low]:g} to q{self.quantiles[high]:g}"

    def sum_sizes(self) -> dict[str, int]:
        return {"pinball": 1, "covered": len(self.quantiles)}

    def update_sums(self, sums: MetricSums, output: Tensor, target: Tensor) -> None:
        sums.add("pinball", pinball(output, target, self.quantiles).mean(-1).sum())
        covered = (target.unsqueeze(-1) <= output).flatten(0, -2).sum(0)
        sums.add("covered", covered.to(sums.sums.device))

    def results(self, sums: SumsView, elements: float) -> dict[str, float]:
        metrics = {"pinball": ratio(sums.scalar("pinball"), elements)}
        for level, covered in zip(self.quantiles, sums["covered"].tolist(), strict=True):
            metrics[f"coverage_{level:g}"] = ratio(covered, elements)
        return metrics


def distribution(output: str, quantiles: Sequence[float], point_loss: str = "mse") -> PointOutput:
    """The distribution of ``GRUModel(output=...)``: point (``point_loss``: mse | mae) | gaussian |
    quantile (at ``quantiles``)."""
    if output == "gaussian":
        return GaussianOutput()
    return QuantileOutput(quantiles) if output == "quantile" else PointOutput(point_loss)
