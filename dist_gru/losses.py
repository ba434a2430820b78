"""Training losses: the pure functions, and the ``OutputSpec`` interface that ``GRUModel.spec``
and the trainer still use; every loss itself lives in the tasks (``dist_gru.tasks``).

    python -c "import torch; from dist_gru.losses import OutputSpec, loss_sum; \
print(loss_sum(OutputSpec(head='step'), torch.zeros(2, 3, 1), torch.ones(2, 3, 1), torch.tensor([3, 1])))"

Losses: point regression MSE, classification cross-entropy, gaussian negative log-likelihood (the
full one, constant included, so its value is comparable across runs), quantile pinball loss; see
``dist_gru.tasks.base`` for the units they average over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from dist_gru.tasks import task_for
from dist_gru.tasks.functional import DEFAULT_QUANTILES, gaussian_nll, median_index, pinball, step_mask

__all__ = [
    "DEFAULT_QUANTILES",
    "OutputSpec",
    "gaussian_nll",
    "loss_sum",
    "median_index",
    "pinball",
    "point_forecast",
    "step_mask",
]


@dataclass(frozen=True)
class OutputSpec:
    """What a model's output means: enough to compute its loss and point forecast."""

    task: str = "regression"
    head: str = "last"
    output: str = "point"
    quantiles: tuple[float, ...] = DEFAULT_QUANTILES

    def config(self) -> dict[str, Any]:
        """The ``GRUModel`` arguments this spec stands for (what ``task_for`` reads)."""
        return {"task": self.task, "head": self.head, "output": self.output, "quantiles": self.quantiles}


def loss_sum(spec: OutputSpec, output: Tensor, target: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, int]:
    """(sum of the per-unit losses, number of units) of one batch: ``Task.loss_sum`` of ``spec``'s task."""
    return task_for(spec.config()).loss_sum(output, target, lengths)


def point_forecast(spec: OutputSpec, output: Tensor) -> Tensor:
    """One value per output channel: ``Task.point_forecast`` of ``spec``'s task."""
    return task_for(spec.config()).point_forecast(output)
