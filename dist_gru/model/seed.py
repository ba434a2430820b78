"""The seed GRU: the reference equations of the tutorial this project started from.

    python -c "import torch; from dist_gru.model import SeedGRU; print(SeedGRU(3, 8)(torch.randn(2, 5, 3))[0].shape)"

Cho et al. 2014, the reset gate applied *before* the recurrent product, and ``z`` weighting the
candidate where ``nn.GRU``'s weights the old state (seed ``z`` = torch ``1 - z``)::

    r_t  = sigmoid(W_r x_t + U_r h_{t-1} + b_r)
    z_t  = sigmoid(W_z x_t + U_z h_{t-1} + b_z)
    h~_t = tanh(W_h x_t + U_h (r_t * h_{t-1}) + b_h)
    h_t  = (1 - z_t) * h_{t-1} + z_t * h~_t

``nn.GRU`` (the cuDNN form) applies the reset gate *after* the recurrent product:
``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``, ``h' = (1 - z) n + z h``; the two compute
different functions. ``SeedGRU`` is called like ``nn.GRU`` and masks padded steps itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _seed_step(xproj_t: Tensor, h_prev: Tensor, u_rz_t: Tensor, u_h_t: Tensor) -> Tensor:
    """The recurrent half of one seed GRU step: the only copy of the seed equations.

    ``xproj_t`` is ``[W_r x + b_r | W_z x + b_z | W_h x + b_h]`` ([B, 3H]),
    ``u_rz_t`` is ``cat([U_r, U_z]).T`` ([H, 2H]) and ``u_h_t`` is ``U_h.T`` ([H, H]).
    """
    hidden = h_prev.shape[-1]
    # addmm fuses "input projection + recurrent product" into one kernel and r, z share
    # one matmul: in a Python time loop the number of ops per step is the cost.
    rz = torch.sigmoid(torch.addmm(xproj_t[:, : 2 * hidden], h_prev, u_rz_t))
    r, z = rz.split(hidden, dim=1)
    candidate = torch.tanh(torch.addmm(xproj_t[:, 2 * hidden :], r * h_prev, u_h_t))
    # lerp(h, h~, z) = h + z (h~ - h) = (1 - z) h + z h~: one op instead of three.
    return torch.lerp(h_prev, candidate, z)


class SeedGRUCell(nn.Module):
    """One step of the seed document's GRU, with one named parameter per symbol."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        # One parameter per symbol (not one packed matrix), so a state dict reads like
        # the equations; the fused matrices are built with torch.cat at call time.
        self.W_r = nn.Parameter(torch.empty(hidden_size, input_size))
        self.W_z = nn.Parameter(torch.empty(hidden_size, input_size))
        self.W_h = nn.Parameter(torch.empty(hidden_size, input_size))
        self.U_r = nn.Parameter(torch.empty(hidden_size, hidden_size))
        self.U_z = nn.Parameter(torch.empty(hidden_size, hidden_size))
        self.U_h = nn.Parameter(torch.empty(hidden_size, hidden_size))
        self.b_r = nn.Parameter(torch.empty(hidden_size))
        self.b_z = nn.Parameter(torch.empty(hidden_size))
        self.b_h = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like ``nn.GRU``: all uniform in ``±1/sqrt(hidden_size)``."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for param in self.parameters():
            nn.init.uniform_(param, -bound, bound)

    def input_projection(self, x: Tensor) -> Tensor:
        """``[W_r x + b_r | W_z x + b_z | W_h x + b_h]``: ``[..., I] -> [..., 3H]``.

        One matrix product for all time steps at once; only the recurrence loops.
        """
        weight = torch.cat([self.W_r, self.W_z, self.W_h])
        bias = torch.cat([self.b_r, self.b_z, self.b_h])
        return F.linear(x, weight, bias)

    def recurrent_weights(self) -> tuple[Tensor, Tensor]:
        """``(cat([U_r, U_z]).T, U_h.T)``: build once per sequence for :meth:`step`."""
        return torch.cat([self.U_r, self.U_z]).t(), self.U_h.t()

    def step(
        self,
        xproj_t: Tensor,
        h_prev: Tensor,
        weights: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """The recurrent part: ``xproj_t`` [B, 3H], ``h_prev`` [B, H] -> ``h_t`` [B, H].

        ``xproj_t`` comes from :meth:`input_projection`. Passing ``weights`` from
        :meth:`recurrent_weights` saves re-concatenating U_r and U_z at every step.
        """
        u_rz_t, u_h_t = self.recurrent_weights() if weights is None else weights
        return _seed_step(xproj_t, h_prev, u_rz_t, u_h_t)

    def forward(self, x_t: Tensor, h_prev: Tensor) -> Tensor:
        """``x_t`` [B, I], ``h_prev`` [B, H] -> ``h_t`` [B, H]."""
        return self.step(self.input_projection(x_t), h_prev)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"


def reverse_within_lengths(x: Tensor, lengths: Tensor | None, time_dim: int = 1) -> Tensor:
    """Each sequence reversed within its own length; padded steps stay where they are.

    ``x`` is [B, T, F] (``time_dim=1``) or [T, B, F] (``time_dim=0``). Step t of sequence b gets
    step ``length_b - 1 - t`` for ``t < length_b``: one gather, and its own inverse. A backward
    pass over the result starts at each sequence's last valid step, not in the padding.
    """
    if lengths is None:
        return x.flip(time_dim)
    steps = x.shape[time_dim]
    time = torch.arange(steps, device=x.device)[None, :]
    lengths = lengths.to(x.device)[:, None]
    index = torch.where(time < lengths, lengths - 1 - time, time)  # [B, T]
    if time_dim == 0:
        index = index.t()
    return x.gather(time_dim, index.unsqueeze(-1).expand_as(x))


class SeedGRU(nn.Module):
    """A batch-first stack of :class:`SeedGRUCell` layers, called like ``nn.GRU``.

    ``dropout`` applies between layers (not after the last), as in ``nn.GRU``. With
    ``bidirectional=True`` every layer has a second stack of cells (``reverse_cells``) that reads
    each sequence backwards from its last valid step; a layer's output is the two directions
    concatenated, and ``h_n`` is ordered like ``nn.GRU``'s (layer 0 forward, layer 0 backward, ...).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = dropout
        self.bidirectional = bidirectional
        self.batch_first = True
        directions = 2 if bidirectional else 1

        def layer_cells() -> nn.ModuleList:
            return nn.ModuleList(
                SeedGRUCell(input_size if layer == 0 else directions * hidden_size, hidden_size)
                for layer in range(num_layers)
            )

        self.cells = layer_cells()
        # The time loop; an export swaps in torch.jit.script(seed_scan) so the loop survives tracing.
        self.scan: Callable = seed_scan
        # Only when bidirectional, so a unidirectional state dict is what it always was.
        if bidirectional:
            self.reverse_cells = layer_cells()

    def flatten_parameters(self) -> None:
        """No-op, so callers can treat it like ``nn.GRU`` (only cuDNN needs it)."""

    def forward(
        self,
        x: Tensor,
        h0: Tensor | None = None,
        lengths: Tensor | None = None,
        drop: Callable[[int, Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``x`` [B, T, I] -> ``(out [B, T, D*H], h_n [num_layers * D, B, H])``, D = 2 if bidirectional.
        ``drop(layer, x)``: the dropout of a time-major layer input in place of ``F.dropout`` (the
        encoder passes a ``KeyedDropout``).

        With ``lengths`` [B], steps at ``t >= length`` leave the state unchanged, so
        ``h_n`` is each sequence's state after its last valid step (backwards: after step 0), and
        ``out`` is zero at padded positions (what ``pad_packed_sequence`` gives for ``nn.GRU``).
        """
        batch, steps, _ = x.shape
        directions = 2 if self.bidirectional else 1
        expected = (self.num_layers * directions, batch, self.hidden_size)
        if h0 is None:
            # On the input's device and dtype (the seed example made CPU fp32 zeros).
            h0 = x.new_zeros(expected)
        elif h0.shape != expected:
            raise ValueError(f"h0 has shape {tuple(h0.shape)}, expected {expected}")
        valid = None
        if lengths is not None and bool((lengths < steps).any()):
            # valid[t, b]: step t lies inside sequence b; [T, B, 1] broadcasts over H.
            time = torch.arange(steps, device=lengths.device)
            valid = (time[:, None] < lengths[None, :]).unsqueeze(-1).to(x.device)
        reverse_lengths = None if valid is None else lengths

        # Time-major inside: a layer's projection is [T, B, 3H], so xproj[t] is one
        # contiguous [B, 3H] block that addmm reads without a copy.
        layer_input = x.transpose(0, 1)
        last_states = []
        for index in range(self.num_layers):
            if index > 0 and drop is not None:
                layer_input = drop(index, layer_input)
            elif index > 0 and self.dropout > 0:
                layer_input = F.dropout(layer_input, self.dropout, self.training)
            out, h = _seed_layer(self.cells[index], layer_input, h0[directions * index], valid, self.scan)
            last_states.append(h)
            if self.bidirectional:
                backward_input = reverse_within_lengths(layer_input, reverse_lengths, time_dim=0)
                out_b, h_b = _seed_layer(self.reverse_cells[index], backward_input, h0[2 * index + 1], valid, self.scan)
                out = torch.cat([out, reverse_within_lengths(out_b, reverse_lengths, time_dim=0)], dim=-1)
                last_states.append(h_b)
            layer_input = out

        out = layer_input if valid is None else torch.where(valid, layer_input, 0.0)
        return out.transpose(0, 1), torch.stack(last_states)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, dropout={self.dropout}" + (
            ", bidirectional=True" if self.bidirectional else ""
        )


def _seed_layer(
    cell: SeedGRUCell, layer_input: Tensor, h: Tensor, valid: Tensor | None, scan: Callable | None = None
) -> tuple[Tensor, Tensor]:
    """One direction of one layer over time-major ``layer_input`` [T, B, I] -> ([T, B, H], h_last)."""
    xproj = cell.input_projection(layer_input)
    # Concatenate the recurrent weights once per layer, not once per step.
    u_rz_t, u_h_t = cell.recurrent_weights()
    return (scan or seed_scan)(xproj, h, u_rz_t, u_h_t, valid)


def seed_scan(
    xproj: Tensor, h: Tensor, u_rz_t: Tensor, u_h_t: Tensor, valid: Optional[Tensor]  # noqa: UP045
) -> tuple[Tensor, Tensor]:
    """The seed recurrence over time: ``xproj`` [T, B, 3H], ``h`` [B, H] -> ([T, B, H], h_last).

    Where ``valid[t]`` ([B, 1]) is False the state stays. TorchScript can compile this function
    (``torch.jit.script``), which keeps the time loop in a traced graph instead of unrolling it.
    """
    outputs = []
    for t in range(xproj.shape[0]):
        h_new = _seed_step(xproj[t], h, u_rz_t, u_h_t)
        h = h_new if valid is None else torch.where(valid[t], h_new, h)
        outputs.append(h)
    return torch.stack(outputs), h
