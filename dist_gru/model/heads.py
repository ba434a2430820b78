"""Heads over the GRU encoder, chosen by ``model.head``, and the shape of their outputs.

    python -c "import torch; from dist_gru.model.heads import build_head; \
print(build_head('forecast', 16, 3, horizon=4)(None, torch.randn(2, 16)).shape)"

Every head is one linear map; the encoder hands each head the same two things, the top layer's
outputs at every step ``[B, T, D*H]`` and a per-sequence summary ``[B, D*H]`` (the last valid
state; bidirectionally the forward last valid state next to the backward state at step 0), and the
head picks what it reads. A head never knows the data; ``shape_output`` turns its raw units into
the output kind's layout:

* point: regression values ``[..., O]`` or class logits ``[..., C]``;
* gaussian: ``[..., O, 2]`` = (mean, scale), scale > 0 through a softplus;
* quantile: ``[..., O, Q]``, one value per quantile level.

``...`` is ``[B]`` (head ``last``), ``[B, T]`` (``step``) or ``[B, horizon]`` (``forecast``).
The heads subclass ``nn.Linear`` so a checkpoint names their weights ``head.weight`` and
``head.bias``, as the models saved before there were several heads do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEADS = ("last", "step", "forecast")
OUTPUTS = ("point", "gaussian", "quantile")
# Floor of a gaussian scale: a softplus can underflow to 0, and the NLL divides by the scale.
MIN_SCALE = 1e-4


def units_per_output(output: str, quantiles: Sequence[float]) -> int:
    """Raw head units per output channel: 1 (point), 2 (gaussian mean, scale), Q (quantile)."""
    return {"point": 1, "gaussian": 2, "quantile": len(quantiles)}[output]


class LastHead(nn.Linear):
    """One output per sequence, from the encoder's summary."""

    def forward(self, steps: Tensor | None, summary: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(summary)


class StepHead(nn.Linear):
    """One output at every step, from the top layer's output at that step."""

    def forward(self, steps: Tensor | None, summary: Tensor) -> Tensor:  # type: ignore[override]
        if steps is None:
            raise ValueError("the step head needs the encoder's per-step outputs")
        return super().forward(steps)


class ForecastHead(nn.Linear):
    """Direct multi-horizon forecast: all ``horizon`` steps at once from the context's summary."""

    def __init__(self, in_features: int, units_per_step: int, horizon: int) -> None:
        super().__init__(in_features, horizon * units_per_step)
        self.horizon = horizon

    def forward(self, steps: Tensor | None, summary: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(summary).unflatten(-1, (self.horizon, -1))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, horizon={self.horizon}"


def build_head(head: str, in_features: int, units_per_step: int, horizon: int = 0) -> nn.Linear:
    """The head module named by ``model.head``; ``units_per_step`` raw units per step (or sequence)."""
    if head == "last":
        return LastHead(in_features, units_per_step)
    if head == "step":
        return StepHead(in_features, units_per_step)
    if head == "forecast":
        return ForecastHead(in_features, units_per_step, horizon)
    raise ValueError(f"head={head!r}: expected one of {', '.join(HEADS)}")


def shape_output(raw: Tensor, output: str, output_size: int) -> Tensor:
    """A head's raw units ``[..., O * K]`` in the layout of ``output`` (see the module docstring)."""
    if output == "point":
        return raw
    shaped = raw.unflatten(-1, (output_size, -1))
    if output == "gaussian":
        mean, raw_scale = shaped.unbind(-1)
        return torch.stack([mean, F.softplus(raw_scale) + MIN_SCALE], dim=-1)
    return shaped
