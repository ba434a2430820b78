"""``StaticEncoder``: a series' static covariates (one value per series) as the GRU's initial state.

    python -c "import torch; from dist_gru.model.static import StaticEncoder; \
print(StaticEncoder([3], 1, 8, 2)(torch.tensor([[0], [-1]]), torch.ones(2, 1)).shape)"

Each category column has an embedding whose row 0 stands for a category the model never saw
(code -1, or any code outside its vocabulary) and row c + 1 for code c; numeric columns are
standardised with the training split's mean and std (buffers, set by ``set_normalization``). The
pieces side by side go through Linear + tanh (the GRU's state range) to the initial state of every
layer and direction, ``[num_states, B, H]``, so the encoder starts each series from what it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dist_gru.model.scaler import MIN_STD


def embedding_size(categories: int) -> int:
    """Units of a category column's embedding: enough to tell its categories apart, at most 16."""
    return min(16, categories + 1)


class StaticEncoder(nn.Module):
    """``forward(categories [B, Sc] int, values [B, Sn]) -> state [num_states, B, hidden_size]``."""

    def __init__(self, category_sizes: Sequence[int], num_values: int, hidden_size: int, num_states: int) -> None:
        super().__init__()
        self.category_sizes, self.num_values = list(category_sizes), num_values
        self.hidden_size, self.num_states = hidden_size, num_states
        self.embeddings = nn.ModuleList(nn.Embedding(size + 1, embedding_size(size)) for size in self.category_sizes)
        self.register_buffer("value_mean", torch.zeros(num_values))
        self.register_buffer("value_std", torch.ones(num_values))
        width = sum(embedding_size(size) for size in self.category_sizes) + num_values
        self.project = nn.Linear(width, num_states * hidden_size)

    @torch.no_grad()
    def set_normalization(self, mean: Tensor | Any, std: Tensor | Any) -> None:
        """The numeric columns' training mean and std (std at least ``MIN_STD``)."""
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float64).reshape(-1)
        if mean.numel() != self.num_values or std.numel() != self.num_values:
            raise ValueError(f"static value mean and std need {self.num_values} values each")
        self.value_mean.copy_(mean)
        self.value_std.copy_(std.clamp_min(MIN_STD))

    def check(self, categories: Tensor | None, values: Tensor | None) -> None:
        """ValueError unless the inputs are the columns this encoder reads."""
        for name, given, width in (
            ("static_categories", categories, len(self.category_sizes)),
            ("static_values", values, self.num_values),
        ):
            if width and given is None:
                raise ValueError(f"{name}: this model reads {width} static column(s) [batch, {width}]; none given")
            if given is not None and (given.dim() != 2 or given.shape[1] != width):
                raise ValueError(f"{name} must have shape [batch, {width}], got {tuple(given.shape)}")

    def forward(self, categories: Tensor | None, values: Tensor | None) -> Tensor:
        self.check(categories, values)
        parts = []
        for j, (embedding, size) in enumerate(zip(self.embeddings, self.category_sizes, strict=True)):
            codes = categories[:, j].long()
            # Row 0: unseen (the data's code -1, or anything outside the vocabulary); row c + 1: code c.
            parts.append(embedding(torch.where((codes >= 0) & (codes < size), codes + 1, 0)))
        if self.num_values:
            parts.append((values.to(self.value_mean.dtype) - self.value_mean) / self.value_std)
        state = torch.tanh(self.project(torch.cat(parts, dim=-1)))
        return state.view(-1, self.num_states, self.hidden_size).transpose(0, 1).contiguous()
