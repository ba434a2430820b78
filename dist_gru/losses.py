"""Training losses of every head and output kind, as (sum of per-unit losses, number of units).

    python -c "import torch; from dist_gru.losses import OutputSpec, loss_sum; \
print(loss_sum(OutputSpec(head='step'), torch.zeros(2, 3, 1), torch.ones(2, 3, 1), torch.tensor([3, 1])))"

A *unit* is what one loss term averages over: a sequence (head ``last``), a forecast window
(``forecast``), or one valid step (``step``; padded steps past a sequence's length are masked
out). The loss of a unit is the mean over its output values (output channels, forecast steps and
quantile levels), or the cross-entropy of its label. Returning the sum and the count instead of a
mean lets the trainer divide by the count of the whole global batch: with per-step units ranks hold
different numbers of steps, and a per-rank mean would weight the ranks with short sequences more.

Losses: point regression MSE, classification cross-entropy, gaussian negative log-likelihood (the
full one, constant included, so its value is comparable across runs), quantile pinball loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_QUANTILES = (0.1, 0.5, 0.9)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class OutputSpec:
    """What a model's output means: enough to compute its loss, point forecast and metrics."""

    task: str = "regression"
    head: str = "last"
    output: str = "point"
    quantiles: tuple[float, ...] = DEFAULT_QUANTILES


def step_mask(lengths: Tensor | None, batch: int, steps: int, device: torch.device) -> Tensor:
    """bool [B, T]: step t lies inside sequence b (all True without lengths)."""
    if lengths is None:
        return torch.ones(batch, steps, dtype=torch.bool, device=device)
    time = torch.arange(steps, device=device)
    return time[None, :] < torch.as_tensor(lengths).to(device)[:, None]


def pinball(prediction: Tensor, target: Tensor, quantiles: Sequence[float]) -> Tensor:
    """Pinball loss of every quantile: ``prediction`` [..., O, Q], ``target`` [..., O] -> [..., O, Q]."""
    levels = torch.as_tensor(quantiles, dtype=prediction.dtype, device=prediction.device)
    diff = target.unsqueeze(-1) - prediction
    return torch.maximum(levels * diff, (levels - 1) * diff)


def gaussian_nll(output: Tensor, target: Tensor) -> Tensor:
    """Negative log-likelihood of ``target`` [..., O] under ``output`` [..., O, 2] = (mean, scale)."""
    mean, scale = output.unbind(-1)
    return torch.log(scale) + 0.5 * ((target - mean) / scale) ** 2 + _HALF_LOG_2PI


def unit_losses(spec: OutputSpec, output: Tensor, target: Tensor) -> Tensor:
    """The loss of every unit: [B] (last, forecast) or [B, T] (step), before any masking."""
    # fp32 at least (autocast may hand over bf16); float64 stays float64, for metric sums.
    output = output if output.dtype == torch.float64 else output.float()
    if spec.task == "classification":
        flat = F.cross_entropy(output.flatten(0, -2), target.flatten(), reduction="none")
        return flat.view(target.shape)
    target = target.to(output.dtype)
    if spec.output == "gaussian":
        per_value = gaussian_nll(output, target)
    elif spec.output == "quantile":
        per_value = pinball(output, target, spec.quantiles).mean(-1)
    else:
        per_value = (output - target) ** 2
    per_value = per_value.mean(-1)  # over the output channels
    if spec.head == "forecast":
        per_value = per_value.mean(-1)  # over the horizon: one unit per window
    return per_value


def loss_sum(spec: OutputSpec, output: Tensor, target: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, int]:
    """(sum of the per-unit losses, number of units) of one batch; see the module docstring.

    ``lengths`` [B] matters for head ``step`` only: steps at ``t >= length`` count nowhere, whatever
    the padded targets hold there.
    """
    if spec.head != "step":
        return unit_losses(spec, output, target).sum(), int(target.shape[0])
    batch, steps = target.shape[:2]
    mask = step_mask(lengths, batch, steps, output.device)
    if spec.task == "classification":
        target = torch.where(mask, target, 0)  # a padded label may lie outside [0, C)
    per_step = unit_losses(spec, output, target)
    count = batch * steps if lengths is None else int(torch.as_tensor(lengths).sum())
    return torch.where(mask, per_step, 0.0).sum(), count


def median_index(quantiles: Sequence[float]) -> int:
    """Index of the quantile level closest to 0.5 (the lower one on a tie): the point forecast."""
    return min(range(len(quantiles)), key=lambda k: (abs(quantiles[k] - 0.5), quantiles[k]))


def point_forecast(spec: OutputSpec, output: Tensor) -> Tensor:
    """One value per output channel: the output itself (point), the mean (gaussian), or the
    median quantile (the level closest to 0.5). For classification: the logits, unchanged."""
    if spec.output == "gaussian":
        return output[..., 0]
    if spec.output == "quantile":
        return output[..., median_index(spec.quantiles)]
    return output
