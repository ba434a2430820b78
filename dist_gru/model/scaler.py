"""The model's input stage: checked inputs, global scaling, per-window scaling, token embeddings.

    python -c "import torch; from dist_gru.model.scaler import Scaler; \
print(Scaler(3, 'last')(torch.randn(2, 5, 3), None)[0].shape)"

Scaling lives in the model, so training, evaluation, prediction and an exported graph apply one
transform and every checkpoint carries it: the ``input_mean`` / ``input_std`` buffers always
(identity unless ``set_normalization`` filled them: ``scaling="global"``), then per window, each
sample per channel over its own valid steps (``PER_WINDOW``):

* ``window``: centred on its mean, scaled by its std;
* ``last``: centred on its last valid value (the forecast origin), scaled by its std;
* ``robust``: centred on its median, scaled by its interquartile range;
* ``revin``: as ``window``, then a learned per-channel affine ``x * weight + bias`` (RevIN, Kim et
  al., ICLR 2022), undone on the outputs before the moments.

The scaler returns what it did as an ``Affine`` (raw = scaled * scale + shift), which a forecast
head uses to map its outputs back to the data's units. ``TokenScaler`` reads token ids through an
embedding instead (learned embeddings need no global scaling).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_gru.tasks.functional import step_mask

# Smallest std set_normalization keeps: a constant feature must not divide by zero.
MIN_STD = 1e-6
SCALINGS = ("none", "global", "window", "last", "robust", "revin")
# The scalings that read each window's own valid steps: they need the whole window, not a stream.
PER_WINDOW = ("window", "last", "robust", "revin")
# Floor of RevIN's learned weight: its inverse divides by it (see Scaler.revin_weight).
MIN_REVIN_WEIGHT = 1e-3


class Affine(NamedTuple):
    """How scaled inputs map back to raw ones, per channel: ``raw = scaled * scale + shift``
    (``[F]`` for global scaling, ``[B, 1, F]`` per window)."""

    shift: Tensor
    scale: Tensor

    def channels(self, count: int) -> tuple[Tensor, Tensor]:
        """``(shift, scale)`` of the first ``count`` channels (the target history of a forecast)."""
        return self.shift[..., :count], self.scale[..., :count]

    def then(self, inner: Affine) -> Affine:
        """One transform for this one followed by ``inner`` (which scales what this one output):
        raw = (scaled * inner.scale + inner.shift) * scale + shift."""
        return Affine(self.shift + self.scale * inner.shift, self.scale * inner.scale)


def check_lengths(lengths: Tensor | Any, batch: int, steps: int) -> Tensor | None:
    """``lengths`` as CPU int64 checked against a [batch, steps, F] input; None when nothing is
    padded (the encoders skip their padding work then)."""
    lengths = torch.as_tensor(lengths).cpu()
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.shape != (batch,):
        raise ValueError(
            f"lengths must be an integer tensor of shape ({batch},), got {lengths.dtype} {tuple(lengths.shape)}"
        )
    lengths = lengths.to(torch.int64)
    if batch and (int(lengths.min()) < 1 or int(lengths.max()) > steps):
        raise ValueError(f"lengths must lie in [1, {steps}] (the padded length), got {lengths.tolist()}")
    return None if bool((lengths == steps).all()) else lengths


def window_moments(x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel mean and std over the valid steps: ([B, 1, F], [B, 1, F])."""
    if lengths is None:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).square().mean(1, keepdim=True)
    else:
        mask = step_mask(lengths, x.shape[0], x.shape[1], x.device).unsqueeze(-1)
        count = lengths.to(x.device, x.dtype)[:, None, None]
        mean = torch.where(mask, x, 0.0).sum(1, keepdim=True) / count
        var = torch.where(mask, (x - mean).square(), 0.0).sum(1, keepdim=True) / count
    # A constant channel (a flat stretch of a series) must not divide by zero.
    return mean, var.sqrt().clamp_min(MIN_STD)


def valid_counts(x: Tensor, lengths: Tensor | None) -> Tensor:
    """int64 [B, 1, 1]: the valid steps of every sample."""
    if lengths is None:
        return torch.full((x.shape[0], 1, 1), x.shape[1], dtype=torch.int64, device=x.device)
    return lengths.to(x.device)[:, None, None]


def last_values(x: Tensor, lengths: Tensor | None) -> Tensor:
    """[B, 1, F]: each sample's value at its last valid step (not the last padded one)."""
    index = (valid_counts(x, lengths) - 1).expand(-1, 1, x.shape[-1])
    return x.gather(1, index)


def window_quantiles(x: Tensor, lengths: Tensor | None, levels: tuple[float, ...]) -> list[Tensor]:
    """Per-sample, per-channel quantiles [B, 1, F] over the valid steps, interpolated linearly as
    ``torch.quantile`` does. Written with a sort and gathers, which ONNX has (``quantile`` is not
    exported), padded steps sorted last as +inf and never read."""
    if lengths is not None:
        mask = step_mask(lengths, x.shape[0], x.shape[1], x.device).unsqueeze(-1)
        x = torch.where(mask, x, math.inf)
    ordered = x.sort(dim=1).values
    count = valid_counts(x, lengths)
    found = []
    for level in levels:
        position = level * (count - 1).to(x.dtype)
        low = position.floor()
        below = low.to(torch.int64)
        above = torch.minimum(below + 1, count - 1)  # never a padded step, even with no weight on it
        a = ordered.gather(1, below.expand(-1, 1, x.shape[-1]))
        b = ordered.gather(1, above.expand(-1, 1, x.shape[-1]))
        found.append(a + (b - a) * (position - low))
    return found


def window_statistics(x: Tensor, lengths: Tensor | None, scaling: str) -> tuple[Tensor, Tensor]:
    """(location, scale) [B, 1, F] of every sample's valid steps for a ``PER_WINDOW`` scaling."""
    if scaling == "robust":
        low, median, high = window_quantiles(x, lengths, (0.25, 0.5, 0.75))
        return median, (high - low).clamp_min(MIN_STD)
    mean, std = window_moments(x, lengths)
    if scaling == "last":
        # The scale is the window's std, not the mean absolute step: a window holding one level
        # shift (a promotion, a step change) has tiny steps but a std of the jump's size, and
        # would otherwise put its values at ~window length; and a std keeps `last` in the units
        # `window` scales to, the spread the GRU has seen its inputs in.
        return last_values(x, lengths), std
    return mean, std


class Scaler(nn.Module):
    """Feature inputs ``[B, T, F]``: ``(x - input_mean) / input_std``, then per window as
    ``scaling`` says (see the module docstring)."""

    def __init__(self, input_size: int, scaling: str = "none") -> None:
        super().__init__()
        if scaling not in SCALINGS:
            raise ValueError(f"scaling={scaling!r}: expected one of {', '.join(SCALINGS)}")
        self.input_size = input_size
        self.scaling = scaling
        # Persistent buffers: saved with the weights, so every checkpoint carries its scaling.
        self.register_buffer("input_mean", torch.zeros(input_size))
        self.register_buffer("input_std", torch.ones(input_size))
        if scaling == "revin":  # weight 1, bias 0 at the start: RevIN's own initialisation
            one = math.log(math.expm1(1.0 - MIN_REVIN_WEIGHT))
            self.revin_raw_weight = nn.Parameter(torch.full((input_size,), one))
            self.revin_bias = nn.Parameter(torch.zeros(input_size))

    def revin_weight(self) -> Tensor:
        """RevIN's per-channel weight, ``softplus(raw) + MIN_REVIN_WEIGHT``: positive, so that the
        inverse keeps the order of quantile levels and a gaussian scale positive (a negative weight
        would swap q0.1 and q0.9), and at least ``MIN_REVIN_WEIGHT``, so that the outputs' inverse
        (a division by it) stays finite and exact; softplus, not abs, has no kink at 0."""
        return F.softplus(self.revin_raw_weight) + MIN_REVIN_WEIGHT

    @torch.no_grad()
    def set_normalization(self, mean: Tensor | Any, std: Tensor | Any) -> None:
        """Copy per-feature mean and std into the buffers (std at least ``MIN_STD``)."""
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float64).reshape(-1)
        for name, value in (("mean", mean), ("std", std)):
            if value.numel() != self.input_size:
                raise ValueError(f"{name} has {value.numel()} values, expected input_size={self.input_size}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} contains non-finite values")
        self.input_mean.copy_(mean)
        self.input_std.copy_(std.clamp_min(MIN_STD))

    def read(self, x: Tensor) -> Tensor:
        """Checked, globally scaled features (padding is scaled too: nothing passes it on)."""
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"x must have shape [batch, time, {self.input_size}], got {tuple(x.shape)}")
        return (x - self.input_mean) / self.input_std

    def check_stream(self) -> None:
        """Refuse a stream (carried state): per-window scaling needs the whole sequence."""
        if self.scaling in PER_WINDOW:
            raise ValueError(
                f'step() cannot scale per window (scaling="{self.scaling}" needs the whole sequence)'
            )

    def standardise(self, x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None, Affine]:
        """Global then per-window scaling, without RevIN's learned affine: ``forward``'s first part,
        and the units of ``GRUModel.target_scale``."""
        x = self.read(x)
        lengths = None if lengths is None else check_lengths(lengths, x.shape[0], x.shape[1])
        affine = Affine(self.input_mean, self.input_std)
        if self.scaling in PER_WINDOW:
            loc, scale = window_statistics(x, lengths, self.scaling)
            x = (x - loc) / scale
            affine = affine.then(Affine(loc, scale))
        return x, lengths, affine

    def forward(self, x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None, Affine]:
        """``(scaled x [B, T, F], lengths or None when nothing is padded, the transform applied)``."""
        x, lengths, affine = self.standardise(x, lengths)
        if self.scaling == "revin":
            weight, bias = self.revin_weight(), self.revin_bias
            x = x * weight + bias
            # Undone first on the way back, then the moments: raw = ((out - bias) / weight) * std + mean.
            affine = affine.then(Affine(-bias / weight, 1.0 / weight))
        return x, lengths, affine

    def future(self, future: Tensor | None, channels: list[int], horizon: int) -> Tensor:
        """``future`` [B, horizon, len(channels)] with the global scaling of ``x``'s ``channels``
        (the ``set_normalization`` buffers), flattened to ``[B, horizon * len(channels)]`` for the
        forecast head. Never per window: a covariate that is constant over a window (a promotion
        flag that is 0 throughout) has no scale of its own, and its planned values would explode."""
        expected = f"[batch, {horizon}, {len(channels)}]"
        if not channels:
            raise ValueError("future: this model reads no future covariates (it has no future_channels)")
        if future is None:
            raise ValueError(f"future: this model reads the horizon's future covariates {expected}; none given")
        if future.dim() != 3 or tuple(future.shape[1:]) != (horizon, len(channels)):
            raise ValueError(f"future must have shape {expected}, got {tuple(future.shape)}")
        shift, scale = self.input_mean[channels], self.input_std[channels]
        return ((future.to(shift.dtype) - shift) / scale).flatten(1)


class TokenScaler(Scaler):
    """Token ids ``[B, T]`` through an embedding of ``input_size`` units (then per window if asked)."""

    def __init__(self, input_size: int, vocab_size: int, scaling: str = "none") -> None:
        super().__init__(input_size, scaling)
        self.embedding = nn.Embedding(vocab_size, input_size)

    def read(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.dtype.is_floating_point:
            raise ValueError(f"x must be integer token ids of shape [batch, time], got {x.dtype} {tuple(x.shape)}")
        return self.embedding(x)
