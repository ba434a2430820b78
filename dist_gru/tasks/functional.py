"""The pure tensor functions of the tasks: masks, per-value losses, the median level, baselines."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_QUANTILES = (0.1, 0.5, 0.9)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


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


def median_index(quantiles: Sequence[float]) -> int:
    """Index of the quantile level closest to 0.5 (the lower one on a tie): the point forecast."""
    return min(range(len(quantiles)), key=lambda k: (abs(quantiles[k] - 0.5), quantiles[k]))


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


def at_least_fp32(output: Tensor) -> Tensor:
    """fp32 at least (autocast may hand over bf16); float64 stays float64, for metric sums."""
    return output if output.dtype == torch.float64 else output.float()
