"""Evaluation metrics as float64 sums that reduce exactly: the vector, not what goes into it.

    python -c "import torch; from dist_gru.tasks import task_for; \
m = task_for({'task': 'regression'}).metric_sums(); m.update(torch.zeros(2, 1), torch.ones(2, 1), None); print(m.results())"

Every rank adds its batches into one float64 vector (``MetricSums.sums``); one all-reduce (sum) of
that vector gives the sums of the whole evaluation set, and ``results(reduced)`` divides them.
Sums of float64 values reduce to the same totals on any number of ranks (up to float64 rounding),
so the metrics equal the 1-process ones. Which sums and which metrics: the model's task
(``dist_gru.tasks``), which lays out the vector, adds a batch into it and turns it into metrics.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN for an empty denominator (a metric over no elements)."""
    return a / b if b else math.nan


class SumsView:
    """Named slices of one (reduced) sums vector, read by a task's ``results``."""

    def __init__(self, values: Tensor, slots: dict[str, slice]):
        self.values, self.slots = values, slots

    def __getitem__(self, name: str) -> Tensor:
        return self.values[self.slots[name]]

    def scalar(self, name: str) -> float:
        return float(self[name][0])


class SumsLayout(Protocol):
    """What a task tells ``MetricSums``: the named sums, how a batch adds to them, the metrics."""

    def sum_sizes(self) -> dict[str, int]: ...

    def update_sums(
        self,
        sums: MetricSums,
        output: Tensor,
        target: Tensor,
        lengths: Tensor | None,
        x: Tensor | None,
        loss_units: tuple[Tensor, Tensor] | None = None,
    ) -> None: ...

    def results(self, sums: SumsView) -> dict[str, float]: ...

    def breakdowns(self, sums: SumsView) -> dict[str, list[float]]: ...


class MetricSums:
    """Float64 sums of one evaluation, laid out by ``layout`` (a task; see the module docstring).

    ``season`` is the seasonal-naive baseline's season (head ``forecast``). Call ``update`` per
    batch, reduce ``sums`` across ranks (sum), then ``results(reduced)``.
    """

    def __init__(self, layout: SumsLayout, season: int = 1, device: torch.device | None = None):
        self.layout, self.season = layout, season
        self.slots: dict[str, slice] = {}
        start = 0
        for name, size in layout.sum_sizes().items():
            self.slots[name] = slice(start, start + size)
            start += size
        self.sums = torch.zeros(start, dtype=torch.float64, device=device)

    def add(self, name: str, value: Tensor | float) -> None:
        self.sums[self.slots[name]] += torch.as_tensor(value, dtype=torch.float64, device=self.sums.device)

    @torch.no_grad()
    def update(
        self,
        output: Tensor,
        target: Tensor,
        lengths: Tensor | None,
        x: Tensor | None = None,
        loss_units: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Add one batch: model ``output``, ``target`` and ``lengths`` as the batch holds them;
        ``x`` (the raw model input) is needed for head ``forecast``'s naive baselines, and
        ``loss_units`` (``Task.loss_units``) for a loss in the scaler's units."""
        self.layout.update_sums(self, output, target, lengths, x, loss_units)

    def results(self, sums: Tensor | None = None, breakdowns: bool = False) -> dict[str, Any]:
        """The metrics from (reduced) sums; ``sums`` defaults to this rank's own. ``breakdowns``:
        also the list-valued ones (per horizon step), after the numbers."""
        view = SumsView((self.sums if sums is None else sums).double().cpu(), self.slots)
        return self.layout.results(view) | (self.layout.breakdowns(view) if breakdowns else {})
