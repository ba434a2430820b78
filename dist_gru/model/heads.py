"""Heads over the GRU encoder, chosen by ``model.head``, and the layout of their outputs.

    python -c "import torch; from dist_gru.model.heads import build_head, build_layout; \
print(build_head('forecast', 16, build_layout('point', 3), horizon=4)(None, torch.randn(2, 16), None).shape)"

Every head is one linear map; the encoder hands each head the same two things, the top layer's
outputs at every step ``[B, T, D*H]`` and a per-sequence summary ``[B, D*H]`` (the last valid
state; bidirectionally the forward last valid state next to the backward state at step 0), and the
head picks what it reads. Its output layout (chosen once, at construction) turns the raw units into
what the output kind means:

* point: regression values ``[..., O]`` or class logits ``[..., C]``;
* gaussian: ``[..., O, 2]`` = (mean, scale), scale > 0 through a softplus;
* quantile: ``[..., O, Q]``, one value per quantile level.

``...`` is ``[B]`` (head ``last``), ``[B, T]`` (``step``) or ``[B, horizon]`` (``forecast``).
A forecast head predicts in the scaled units of the first ``O`` input channels (the target
history) and maps its outputs back through the scaler's transform (``Affine``); the other heads
predict in the data's units directly. The heads subclass ``nn.Linear`` so a checkpoint names their
weights ``head.weight`` and ``head.bias``, as the models saved before there were several heads do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_gru.model.scaler import Affine

HEADS = ("last", "step", "forecast")
OUTPUTS = ("point", "gaussian", "quantile")
# Floor of a gaussian scale: a softplus can underflow to 0, and the NLL divides by the scale.
MIN_SCALE = 1e-4


class PointLayout:
    """One raw unit per channel, the output as it is (regression values or class logits)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.units = channels

    def shape(self, raw: Tensor) -> Tensor:
        return raw

    def to_data_units(self, out: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """``out`` in the scaled units of its channels -> the data's (``mean``, ``std``: [..., O])."""
        return out * std + mean


class QuantileLayout(PointLayout):
    """``[..., O, Q]``: one value per channel and quantile level."""

    def __init__(self, channels: int, levels: int) -> None:
        super().__init__(channels)
        self.units = channels * levels

    def shape(self, raw: Tensor) -> Tensor:
        return raw.unflatten(-1, (self.channels, -1))

    def to_data_units(self, out: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        return out * std.unsqueeze(-1) + mean.unsqueeze(-1)


class GaussianLayout(QuantileLayout):
    """``[..., O, 2]``: (mean, scale) per channel, the scale positive."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, 2)

    def shape(self, raw: Tensor) -> Tensor:
        mean, raw_scale = super().shape(raw).unbind(-1)
        return torch.stack([mean, F.softplus(raw_scale) + MIN_SCALE], dim=-1)

    def to_data_units(self, out: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        centre, spread = out.unbind(-1)
        return torch.stack([centre * std + mean, spread * std], dim=-1)


def build_layout(output: str, channels: int, quantiles: Sequence[float] = ()) -> PointLayout:
    """The layout of ``model.output`` over ``channels`` outputs (classes, for class logits)."""
    if output == "gaussian":
        return GaussianLayout(channels)
    if output == "quantile":
        return QuantileLayout(channels, len(quantiles))
    return PointLayout(channels)


class Head(nn.Linear):
    """A linear map from encoder units to raw output units, and the layout that reads them."""

    def __init__(self, in_features: int, layout: PointLayout, horizon: int = 1) -> None:
        super().__init__(in_features, horizon * layout.units)
        self.layout = layout

    def project(self, features: Tensor) -> Tensor:
        """The linear map in the head's own dtype (the encoder may compute in a lower one)."""
        return super().forward(features.to(self.weight.dtype))


class LastHead(Head):
    """One output per sequence, from the encoder's summary."""

    def forward(self, steps: Tensor | None, summary: Tensor, affine: Affine | None) -> Tensor:  # type: ignore[override]
        return self.layout.shape(self.project(summary))


class StepHead(Head):
    """One output at every step, from the top layer's output at that step."""

    def forward(self, steps: Tensor | None, summary: Tensor, affine: Affine | None) -> Tensor:  # type: ignore[override]
        if steps is None:
            raise ValueError("the step head needs the encoder's per-step outputs")
        return self.layout.shape(self.project(steps))


class ForecastHead(Head):
    """Direct multi-horizon forecast: all ``horizon`` steps at once from the context's summary, in
    the data's units (``affine``: how the scaler transformed the inputs; None: identity)."""

    def __init__(self, in_features: int, layout: PointLayout, horizon: int) -> None:
        super().__init__(in_features, layout, horizon)
        self.horizon = horizon

    def forward(self, steps: Tensor | None, summary: Tensor, affine: Affine | None) -> Tensor:  # type: ignore[override]
        out = self.layout.shape(self.project(summary).unflatten(-1, (self.horizon, -1)))
        if affine is None:
            return out
        mean, std = affine.channels(self.layout.channels)
        return self.layout.to_data_units(out, mean, std)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, horizon={self.horizon}"


def build_head(head: str, in_features: int, layout: PointLayout, horizon: int = 0) -> Head:
    """The head module named by ``model.head``, over ``in_features`` encoder units."""
    if head == "last":
        return LastHead(in_features, layout)
    if head == "step":
        return StepHead(in_features, layout)
    if head == "forecast":
        return ForecastHead(in_features, layout, horizon)
    raise ValueError(f"head={head!r}: expected one of {', '.join(HEADS)}")
