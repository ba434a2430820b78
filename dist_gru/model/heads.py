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
history) and maps its outputs back through the scaler's transform (``Affine``); with
``naive_season`` it also reads the scaled context itself (``NaiveTerms``: seasonal naive and
drifts, weighted per step) and adds those terms to its forecast. The other heads predict in the
data's units directly. The heads subclass ``nn.Linear`` so a checkpoint names their
weights ``head.weight`` and ``head.bias``, as the models saved before there were several heads do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_gru.model.scaler import Affine, last_values, valid_counts

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

    def shift(self, out: Tensor, base: Tensor) -> Tensor:
        """``out`` moved by ``base`` [..., O] (the naive terms), all in the same scaled units."""
        return out + base

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

    def shift(self, out: Tensor, base: Tensor) -> Tensor:
        return out + base.unsqueeze(-1)

    def to_data_units(self, out: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        return out * std.unsqueeze(-1) + mean.unsqueeze(-1)


class GaussianLayout(QuantileLayout):
    """``[..., O, 2]``: (mean, scale) per channel, the scale positive."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, 2)

    def shape(self, raw: Tensor) -> Tensor:
        mean, raw_scale = super().shape(raw).unbind(-1)
        return torch.stack([mean, F.softplus(raw_scale) + MIN_SCALE], dim=-1)

    def shift(self, out: Tensor, base: Tensor) -> Tensor:
        centre, spread = out.unbind(-1)  # a shift moves the mean and leaves the scale
        return torch.stack([centre + base, spread], dim=-1)

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

    def check_stream(self) -> None:
        """A state carried from a previous call is fine for every head that reads only the encoder."""


class LastHead(Head):
    """One output per sequence, from the encoder's summary."""

    def forward(  # type: ignore[override]
        self, steps: Tensor | None, summary: Tensor, affine: Affine | None, x: Tensor | None = None,
        lengths: Tensor | None = None,
    ) -> Tensor:
        return self.layout.shape(self.project(summary))


class StepHead(Head):
    """One output at every step, from the top layer's output at that step."""

    def forward(  # type: ignore[override]
        self, steps: Tensor | None, summary: Tensor, affine: Affine | None, x: Tensor | None = None,
        lengths: Tensor | None = None,
    ) -> Tensor:
        if steps is None:
            raise ValueError("the step head needs the encoder's per-step outputs")
        return self.layout.shape(self.project(steps))


class NaiveTerms(nn.Module):
    """Three classical forecasts of a context, each weighted per horizon step and target channel by
    learned weights that start at 0: seasonal naive (the context's last season repeated), drift (the
    context's mean change per step, times the steps ahead) and recent drift (the change over the
    context's last season per step, times the steps ahead: the trend with the season taken out;
    season 1: the last step's change). The GRU's forecast is added to them, so it learns what they
    leave; all in the scaler's units (``data.scaling: last`` puts the last observed value at 0).

    Why: a forecast head that reads only the GRU's last state has to carry a season and a trend
    through the state; these terms hand it both for ``3 * horizon * channels`` weights (5 seeds:
    airline's MASE 1.06 -> 0.96, taylor's 0.59 -> 0.51, M1 yearly's 3.151 -> 3.135).
    """

    def __init__(self, horizon: int, channels: int, season: int) -> None:
        super().__init__()
        self.season = season
        self.seasonal = nn.Parameter(torch.zeros(horizon, channels))
        self.drift = nn.Parameter(torch.zeros(horizon, channels))
        self.recent_drift = nn.Parameter(torch.zeros(horizon, channels))

    def forward(self, x: Tensor, lengths: Tensor | None) -> Tensor:
        """``x`` [B, T, F] (scaled; the first ``channels`` are the target history), ``lengths`` [B]
        (None: all T) -> the weighted terms [B, horizon, channels]. A context shorter than a season
        reads from its first step."""
        horizon, channels = self.seasonal.shape
        target = x[..., :channels].to(self.seasonal.dtype)
        last = valid_counts(target, lengths)[:, 0, 0] - 1
        final = last_values(target, lengths)
        ahead = torch.arange(horizon, device=x.device)
        # Step h repeats the value at last + 1 - season + (h mod season).
        seasonal = (last[:, None] + 1 - self.season + ahead % self.season).clamp(min=0)
        copies = target.gather(1, seasonal.unsqueeze(-1).expand(-1, -1, channels))
        steps_ahead = (ahead + 1).to(target.dtype).view(1, -1, 1)
        drift = _change_per_step(target, final, last, torch.zeros_like(last))
        recent = _change_per_step(target, final, last, (last - self.season).clamp(min=0))
        return self.seasonal * copies + steps_ahead * (self.drift * drift + self.recent_drift * recent)

    def extra_repr(self) -> str:
        return f"season={self.season}"


def _change_per_step(target: Tensor, final: Tensor, last: Tensor, first: Tensor) -> Tensor:
    """(``final`` - target[first]) / (last - first) per sequence, [B, 1, O] (``final``: the values
    at ``last``); 0 where last == first."""
    start = target.gather(1, first.view(-1, 1, 1).expand(-1, 1, target.shape[-1]))
    return (final - start) / (last - first).clamp(min=1).view(-1, 1, 1).to(target.dtype)


class ForecastHead(Head):
    """Direct multi-horizon forecast: all ``horizon`` steps at once from the context's summary, in
    the data's units (``affine``: how the scaler transformed the inputs; None: identity).
    ``naive_season`` > 0 adds ``NaiveTerms`` of that season, read from the scaled context ``x``."""

    def __init__(self, in_features: int, layout: PointLayout, horizon: int, naive_season: int = 0) -> None:
        super().__init__(in_features, layout, horizon)
        self.horizon = horizon
        self.naive = NaiveTerms(horizon, layout.channels, naive_season) if naive_season else None

    def forward(  # type: ignore[override]
        self, steps: Tensor | None, summary: Tensor, affine: Affine | None, x: Tensor | None = None,
        lengths: Tensor | None = None,
    ) -> Tensor:
        out = self.layout.shape(self.project(summary).unflatten(-1, (self.horizon, -1)))
        if self.naive is not None:
            if x is None:
                raise ValueError("a forecast head with naive terms needs the scaled context x")
            out = self.layout.shift(out, self.naive(x, lengths))
        if affine is None:
            return out
        mean, std = affine.channels(self.layout.channels)
        return self.layout.to_data_units(out, mean, std)

    def check_stream(self) -> None:
        if self.naive is not None:
            raise ValueError(
                "a carried state with naive terms: they read the whole context, and a stream call sees one chunk"
            )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, horizon={self.horizon}"


def build_head(head: str, in_features: int, layout: PointLayout, horizon: int = 0, naive_season: int = 0) -> Head:
    """The head module named by ``model.head``, over ``in_features`` encoder units (``naive_season``:
    the forecast head's ``NaiveTerms``, 0 = none)."""
    if head == "last":
        return LastHead(in_features, layout)
    if head == "step":
        return StepHead(in_features, layout)
    if head == "forecast":
        return ForecastHead(in_features, layout, horizon, naive_season)
    raise ValueError(f"head={head!r}: expected one of {', '.join(HEADS)}")
