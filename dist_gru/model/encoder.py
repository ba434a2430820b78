"""The GRU encoder: ``nn.GRU`` or ``SeedGRU``, one or both directions, over padded batches.

    python -c "import torch; from dist_gru.model.encoder import Encoder; \
e = Encoder(3, 8, bidirectional=True); print(e.path(torch.randn(2, 5, 3), None), e(torch.randn(2, 5, 3))[1].shape)"

``forward(x [B, T, F], lengths [B] | None, state [L*D, B, H] | None) -> (out [B, T, D*H], h_n
[L*D, B, H])``: the top layer's outputs at every step (values at padded steps mean nothing) and
every layer's and direction's state after each sequence's last valid step (a backward direction:
after step 0), ordered like ``nn.GRU``'s. A padded batch gives each sequence what it gets alone.

``path`` chooses how a call runs, in one place:

* ``seed``: ``SeedGRU``, which masks padded steps itself (both directions);
* ``packed``: ``nn.GRU`` over a packed batch (cuDNN's native form): padded batches on a GPU, or
  wherever ``configure(packed=True)`` asks for it;
* ``fused``: training on the CPU (``recurrence="fused"``): each layer runs
  ``dist_gru.model.recurrence`` (one autograd node, several times fewer ops per step than
  ``nn.GRU``'s CPU backward), both directions in one loop, the backward one over each sequence
  reversed within its length;
* ``native``: ``nn.GRU`` itself on an unpadded batch (inference, GPUs, ``recurrence="native"``, and
  traced or exported graphs, which must hold ``nn.GRU``'s own op);
* ``padded``: a padded batch on the CPU outside training: ``nn.GRU``'s op per layer and direction,
  arranged like ``fused`` (packing ran 2x slower on the CPU); also any training call with keyed
  dropout that ``fused`` does not take (the masks must be applied between the layers).

Training calls that pass ``keys`` (the trainer does: ``dropout.sample_keys``) draw the dropout
between layers per sample (``dropout.KeyedDropout``), so N processes train what 1 process trains;
without keys it is ``F.dropout`` (or ``nn.GRU``'s own) on the process's RNG.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dist_gru.model.dropout import KeyedDropout
from dist_gru.model.recurrence import gru_recurrences, gru_time_major
from dist_gru.model.seed import SeedGRU, reverse_within_lengths

CELLS = ("torch", "seed")
RECURRENCES = ("fused", "native")
PATHS = ("seed", "packed", "fused", "native", "padded")
# A layer: (x [T, B, I], h0 [D, B, H], each direction's [w_ih, w_hh, b_ih, b_hh], lengths)
#   -> (out [T, B, D*H], final states [D, B, H]).
Layer = Callable[[Tensor, Tensor, list[list[Tensor]], Tensor | None], tuple[Tensor, Tensor]]


def last_valid(out: Tensor, lengths: Tensor | None) -> Tensor:
    """Time-major ``out`` [T, B, H] at each sequence's last valid step -> [B, H]."""
    if lengths is None:
        return out[-1]
    return out[lengths.to(out.device) - 1, torch.arange(out.shape[1], device=out.device)]


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


class Encoder(nn.Module):
    """A GRU stack (``cell`` "torch": ``nn.GRU``, "seed": ``SeedGRU``) that runs exact on padded
    batches; its execution settings (``configure``) are not part of any saved file."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        cell: str = "torch",
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        rnn = SeedGRU if cell == "seed" else partial(nn.GRU, batch_first=True)
        self.rnn: nn.Module = rnn(input_size, hidden_size, num_layers, dropout=dropout, bidirectional=bidirectional)
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.directions = 2 if bidirectional else 1
        self.output_size = self.directions * hidden_size
        self.compute_dtype: torch.dtype | None = None
        self.recurrence = "fused"
        self.packed: bool | None = None

    def configure(
        self, dtype: torch.dtype | None = None, recurrence: str = "fused", packed: bool | None = None
    ) -> None:
        """How calls run (not saved). ``dtype``: compute dtype of the recurrence (None: the input's;
        the trainer sets bfloat16 for bf16 on the CPU, where autocast leaves ``nn.GRU`` in fp32;
        gradients and weights stay in their own dtype). ``recurrence``: "fused" trains ``nn.GRU``'s
        weights on the CPU through ``dist_gru.model.recurrence``, "native" through ``nn.GRU``.
        ``packed``: run padded batches packed (None: on a GPU only); both ways are exact."""
        if recurrence not in RECURRENCES:
            raise ValueError(f"recurrence={recurrence!r}: expected one of {', '.join(RECURRENCES)}")
        self.compute_dtype, self.recurrence, self.packed = dtype, recurrence, packed

    def path(self, x: Tensor, lengths: Tensor | None, keyed: bool = False) -> str:
        """Which of ``PATHS`` a call on ``x`` with ``lengths`` (None: unpadded) takes (see the module
        doc); ``keyed``: the call applies keyed dropout between the layers."""
        if isinstance(self.rnn, SeedGRU):
            return "seed"
        packed = x.device.type == "cuda" if self.packed is None else self.packed
        if lengths is not None and packed and not keyed:
            return "packed"
        if self.recurrence == "fused" and x.device.type == "cpu" and torch.is_grad_enabled() and not _tracing():
            return "fused"
        return "native" if lengths is None and not keyed else "padded"

    def forward(
        self, x: Tensor, lengths: Tensor | None = None, state: Tensor | None = None, keys: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(out [B, T, D*H], h_n [L*D, B, H])``; ``lengths`` on the CPU, None when nothing is
        padded; ``keys`` int64 [B]: each sequence's dropout key (``dropout.sample_keys``)."""
        drop = self.keyed_dropout(keys, lengths)
        path = self.path(x, lengths, keyed=drop is not None)
        x = x if self.compute_dtype is None else x.to(self.compute_dtype)
        h0 = None if state is None else state.to(x.dtype)
        if path == "seed":
            return self._call_rnn(x, h0, lengths=lengths, drop=drop)
        if path == "native":
            return self._call_rnn(x, h0)
        if path == "packed":
            packed_out, h_n = self._call_rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False), h0)
            return pad_packed_sequence(packed_out, batch_first=True, total_length=x.shape[1])[0], h_n
        layer = fused_layer if path == "fused" else partial(native_layer, train=self.training)
        return self._by_layer(x, lengths, h0, layer, drop)

    def keyed_dropout(self, keys: Tensor | None, lengths: Tensor | None) -> KeyedDropout | None:
        """The per-sample dropout of a training call with ``keys`` (None: no dropout to key)."""
        if keys is None or not self.training or self.num_layers < 2 or self.rnn.dropout == 0:
            return None
        return KeyedDropout(self.rnn.dropout, keys, lengths)

    def summary(self, h_n: Tensor) -> Tensor:
        """Per sequence ``[B, D*H]``: the top layer's final states of its directions side by side."""
        return h_n[-self.directions :].transpose(0, 1).flatten(1)

    def initial_state(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> Tensor:
        """Zeros ``[num_layers, batch, hidden_size]``: the state a stream starts from."""
        return torch.zeros(self.num_layers, batch, self.hidden_size, device=device, dtype=dtype)

    def check_state(self, state: Tensor, batch: int) -> None:
        """Refuse a carried state a stream cannot continue from (ValueError naming it)."""
        if self.directions == 2:
            raise ValueError("step() needs a unidirectional model: a backward direction reads the sequence's end first")
        expected = (self.num_layers, batch, self.hidden_size)
        if state.shape != expected:
            raise ValueError(f"state has shape {tuple(state.shape)}, expected {expected} (see initial_state)")

    def flatten_parameters(self) -> None:
        """Re-pack ``nn.GRU`` weights for cuDNN after a move or load (``SeedGRU``: no-op)."""
        self.rnn.flatten_parameters()

    def _call_rnn(self, inputs: Any, *args: Any, **kwargs: Any) -> tuple[Any, Tensor]:
        if self.compute_dtype is None:
            return self.rnn(inputs, *args, **kwargs)
        # Low-precision compute on full-precision master weights: the cast is part of the graph,
        # so gradients (and the optimizer state) keep the weights' dtype.
        params = {name: p.to(self.compute_dtype) for name, p in self.rnn.named_parameters()}
        return functional_call(self.rnn, params, (inputs, *args), kwargs)

    def _weights(self, layer: int, reverse: bool) -> list[Tensor]:
        suffix = f"_l{layer}" + ("_reverse" if reverse else "")
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        weights = [getattr(self.rnn, name + suffix) for name in names]
        return weights if self.compute_dtype is None else [w.to(self.compute_dtype) for w in weights]

    def _by_layer(
        self, x: Tensor, lengths: Tensor | None, h0: Tensor | None, layer_fn: Layer, drop: KeyedDropout | None
    ) -> tuple[Tensor, Tensor]:
        """Every layer through ``layer_fn`` (``fused_layer`` or ``native_layer``), unpacked."""
        # Time major inside: every step's slice is contiguous for the recurrence.
        layer_input, finals = x.transpose(0, 1), []
        zeros = x.new_zeros(self.directions, x.shape[0], self.hidden_size)
        for layer in range(self.num_layers):
            if layer > 0 and drop is not None:
                layer_input = drop(layer, layer_input)
            elif layer > 0 and self.rnn.dropout > 0:
                layer_input = F.dropout(layer_input, self.rnn.dropout, self.training)
            weights = [self._weights(layer, reverse=direction == 1) for direction in range(self.directions)]
            start = zeros if h0 is None else h0[layer * self.directions : (layer + 1) * self.directions]
            layer_input, final = layer_fn(layer_input, start, weights, lengths)
            finals.append(final)
        return layer_input.transpose(0, 1), torch.cat(finals)


def fused_layer(x: Tensor, h0: Tensor, weights: list[list[Tensor]], lengths: Tensor | None) -> tuple[Tensor, Tensor]:
    """One layer's directions through one fused recurrence (``Layer``). Both input projections
    are one product; the backward direction runs forward over each sequence reversed within its
    length (one gather each way), so it starts at the sequence's last valid step, not in the
    padding; reversed back, that is what packing gives."""
    if len(weights) == 1:
        out = gru_time_major(x, h0[0], *weights[0])
        return out, last_valid(out, lengths)[None]
    w_ih, w_hh, b_ih, b_hh = (torch.stack(pair) for pair in zip(*weights, strict=True))
    gi = F.linear(x, w_ih.flatten(0, 1), b_ih.flatten())
    reverse = partial(reverse_within_lengths, lengths=lengths, time_dim=0)
    forward_gi, backward_gi = gi.chunk(2, dim=-1)
    out = gru_recurrences(torch.stack([forward_gi, reverse(backward_gi)], dim=1), h0, w_hh, b_hh)
    forward, backward = out.unbind(1)  # the backward direction in its reversed frame
    finals = torch.stack([last_valid(forward, lengths), last_valid(backward, lengths)])
    return torch.cat([forward, reverse(backward)], dim=-1), finals


def native_layer(
    x: Tensor, h0: Tensor, weights: list[list[Tensor]], lengths: Tensor | None, train: bool
) -> tuple[Tensor, Tensor]:
    """One layer's directions through ``torch.gru`` (``Layer``), each over unpacked sequences, the
    backward one forward over each sequence reversed within its length (as ``fused_layer``)."""
    reverse = partial(reverse_within_lengths, lengths=lengths, time_dim=0)
    outputs, finals = [], []
    for direction, direction_weights in enumerate(weights):
        inputs = reverse(x) if direction == 1 else x
        out = torch.gru(inputs, h0[direction][None], direction_weights, True, 1, 0.0, train, False, False)[0]
        finals.append(last_valid(out, lengths))
        outputs.append(reverse(out) if direction == 1 else out)
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)), torch.stack(finals)
