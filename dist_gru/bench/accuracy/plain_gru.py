"""An independent GRU written with plain PyTorch, no dist-gru code: the "what a user would write"
baseline, at the size and budget of dist-gru's recipe (hidden size, layers, optimizer steps,
batch, learning rate, given as numbers).

Forecasting: windows of `window` steps drawn uniformly from every series, normalised by the
window's last value (subtracted) and its standard deviation (divided), an L1 loss, a linear head
to the `horizon` next steps. Classification: a last-state head (per sequence) or a head on every
step (per step), cross-entropy, inputs standardised with training statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence


@dataclass
class Budget:
    steps: int
    batch: int
    lr: float
    hidden: int
    layers: int


class PlainGRU(nn.Module):
    def __init__(self, inputs: int, hidden: int, layers: int, outputs: int):
        super().__init__()
        self.gru = nn.GRU(inputs, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None, every_step: bool = False) -> torch.Tensor:
        if lengths is None:
            out, _ = self.gru(x)
        else:
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out = pad_packed_sequence(self.gru(packed)[0], batch_first=True)[0]
        if every_step:
            return self.head(out)
        last = (lengths - 1) if lengths is not None else torch.full((len(x),), x.shape[1] - 1)
        return self.head(out[torch.arange(len(x)), last])


def _normalise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    last = x[:, -1:]
    scale = x.std(dim=1, keepdim=True) + 1e-6 * (last.abs() + 1)
    return (x - last) / scale, last, scale


def _optimise(model: nn.Module, budget: Budget, loss_of_step) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=budget.lr)
    for step in range(budget.steps):
        loss = loss_of_step(step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def fit_forecaster(histories: list[np.ndarray], window: int, horizon: int, budget: Budget, seed: int) -> PlainGRU:
    torch.manual_seed(seed)
    span = window + horizon
    series = [torch.tensor(h, dtype=torch.float32) for h in histories if len(h) >= span]
    starts = [(i, t) for i, s in enumerate(series) for t in range(len(s) - span + 1)]
    if not starts:
        raise ValueError(f"no series holds window + horizon = {span} steps")
    windows = torch.stack([series[i][t : t + span] for i, t in starts])
    model = PlainGRU(1, budget.hidden, budget.layers, horizon)
    generator = torch.Generator().manual_seed(seed)

    def loss_of_step(step: int) -> torch.Tensor:
        batch = windows[torch.randint(len(windows), (budget.batch,), generator=generator)]
        z, last, scale = _normalise(batch[:, :window])
        target = (batch[:, window:] - last) / scale
        return nn.functional.l1_loss(model(z[..., None]), target)

    _optimise(model, budget, loss_of_step)
    return model


@torch.no_grad()
def forecast(model: PlainGRU, contexts: np.ndarray) -> np.ndarray:
    """[N, window] contexts -> [N, horizon] forecasts in the data's units."""
    z, last, scale = _normalise(torch.tensor(contexts, dtype=torch.float32))
    return (model(z[..., None]) * scale + last).numpy()


def _padded(sequences: list[np.ndarray], mean: np.ndarray, std: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = pad_sequence([torch.tensor((s - mean) / std, dtype=torch.float32) for s in sequences], batch_first=True)
    return x, torch.tensor([len(s) for s in sequences])


def fit_classifier(x: list[np.ndarray], y, classes: int, per_step: bool, budget: Budget, seed: int):
    """The trained model and the input statistics `predict_classes` needs."""
    torch.manual_seed(seed)
    stacked = np.concatenate(x)
    stats = (stacked.mean(0), stacked.std(0) + 1e-6)
    model = PlainGRU(stacked.shape[1], budget.hidden, budget.layers, classes)
    generator = torch.Generator().manual_seed(seed)

    def loss_of_step(step: int) -> torch.Tensor:
        rows = torch.randint(len(x), (budget.batch,), generator=generator).tolist()
        inputs, lengths = _padded([x[r] for r in rows], *stats)
        if not per_step:
            return nn.functional.cross_entropy(model(inputs, lengths), torch.as_tensor(y[rows]))
        labels = pad_sequence([torch.as_tensor(y[r]) for r in rows], batch_first=True, padding_value=-100)
        return nn.functional.cross_entropy(model(inputs, lengths, True).transpose(1, 2), labels, ignore_index=-100)

    _optimise(model, budget, loss_of_step)
    return model, stats


@torch.no_grad()
def predict_classes(model: PlainGRU, stats, x: list[np.ndarray], per_step: bool) -> np.ndarray:
    """Labels [N], or per step all sequences' steps concatenated."""
    inputs, lengths = _padded(x, *stats)
    out = model(inputs, lengths, per_step).argmax(-1)
    return torch.cat([out[i, :n] for i, n in enumerate(lengths)]).numpy() if per_step else out.numpy()
