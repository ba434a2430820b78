"""The model's input stage: checked inputs, global scaling, per-window scaling, token embeddings.

    python -c "import torch; from dist_gru.model.scaler import Scaler; \
print(Scaler(3, window=True)(torch.randn(2, 5, 3), None)[0].shape)"

Scaling lives in the model, so training, evaluation, prediction and an exported graph apply one
transform and every checkpoint carries it: the ``input_mean`` / ``input_std`` buffers always
(identity unless ``set_normalization`` filled them: ``scaling="global"``), then with
``window=True`` each sample is centred and scaled per channel by the mean and std of its own valid
steps. The scaler returns what it did as an ``Affine`` (raw = scaled * scale + shift), which a
forecast head uses to map its outputs back to the data's units. ``TokenScaler`` reads token ids
through an embedding instead (learned embeddings need no global scaling).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dist_gru.tasks.functional import step_mask

# Smallest std set_normalization keeps: a constant feature must not divide by zero.
MIN_STD = 1e-6


class Affine(NamedTuple):
    """How scaled inputs map back to raw ones, per channel: ``raw = scaled * scale + shift``
    (``[F]`` for global scaling, ``[B, 1, F]`` per window)."""

    shift: Tensor
    scale: Tensor

    def channels(self, count: int) -> tuple[Tensor, Tensor]:
        """``(shift, scale)`` of the first ``count`` channels (the target history of a forecast)."""
        return self.shift[..., :count], self.scale[..., :count]


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


class Scaler(nn.Module):
    """Feature inputs ``[B, T, F]``: ``(x - input_mean) / input_std``, then per window if asked."""

    def __init__(self, input_size: int, window: bool = False) -> None:
        super().__init__()
        self.input_size = input_size
        self.window = window
        # Persistent buffers: saved with the weights, so every checkpoint carries its scaling.
        self.register_buffer("input_mean", torch.zeros(input_size))
        self.register_buffer("input_std", torch.ones(input_size))

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
        if self.window:
            raise ValueError('step() cannot scale per window (scaling="window" needs the whole sequence)')

    def forward(self, x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None, Affine]:
        """``(scaled x [B, T, F], lengths or None when nothing is padded, the transform applied)``."""
        x = self.read(x)
        lengths = None if lengths is None else check_lengths(lengths, x.shape[0], x.shape[1])
        affine = Affine(self.input_mean, self.input_std)
        if self.window:
            loc, scale = window_moments(x, lengths)
            x = (x - loc) / scale
            affine = Affine(loc * self.input_std + self.input_mean, scale * self.input_std)
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

    def __init__(self, input_size: int, vocab_size: int, window: bool = False) -> None:
        super().__init__(input_size, window)
        self.embedding = nn.Embedding(vocab_size, input_size)

    def read(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.dtype.is_floating_point:
            raise ValueError(f"x must be integer token ids of shape [batch, time], got {x.dtype} {tuple(x.shape)}")
        return self.embedding(x)
