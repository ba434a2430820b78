"""GRU sequence models: ``GRUModel`` (a GRU encoder + a small head) and ``SeedGRU``.

    python -c "import torch; from dist_gru.model import GRUModel; \
print(GRUModel(3, 16, cell='seed')(torch.randn(2, 5, 3)).shape)"

Two GRU forms live here, and they compute different functions:

* ``cell="torch"``: ``torch.nn.GRU`` (the cuDNN form), the reset gate applied *after* the
  recurrent product: ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``,
  ``h' = (1 - z) n + z h``.
* ``cell="seed"``: :class:`SeedGRU`, the equations of the tutorial this project started from
  (Cho et al. 2014), the reset gate applied *before* the recurrent product, and ``z`` weighting
  the candidate where ``nn.GRU``'s weights the old state (seed ``z`` = torch ``1 - z``)::

      r_t  = sigmoid(W_r x_t + U_r h_{t-1} + b_r)
      z_t  = sigmoid(W_z x_t + U_z h_{t-1} + b_z)
      h~_t = tanh(W_h x_t + U_h (r_t * h_{t-1}) + b_h)
      h_t  = (1 - z_t) * h_{t-1} + z_t * h~_t

``GRUModel`` = input scaling, the encoder (either form, one or both directions), and a head from
``dist_gru.model.heads`` (``last``, ``step``, ``forecast``) with a point, gaussian or quantile output.
Variable-length batches are exact in every mode: a padded batch gives each sequence the outputs it
gets alone. ``initial_state`` and ``step`` run a unidirectional model over a stream, chunk
by chunk, with the state carried between calls. The module holds no training logic (losses: ``dist_gru.losses``).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from dist_gru.config import ConfigError, quantile_problems
from dist_gru.data.files import follow_umask
from dist_gru.losses import DEFAULT_QUANTILES, OutputSpec, point_forecast, step_mask
from dist_gru.model.heads import HEADS, OUTPUTS, build_head, shape_output, units_per_output
from dist_gru.model.recurrence import gru_direction, gru_layers

log = logging.getLogger(__name__)

TASKS = ("regression", "classification")
CELLS = ("torch", "seed")
SCALINGS = ("none", "global", "window")
# Smallest std set_normalization keeps: a constant feature must not divide by zero.
MIN_STD = 1e-6


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
    ) -> tuple[Tensor, Tensor]:
        """``x`` [B, T, I] -> ``(out [B, T, D*H], h_n [num_layers * D, B, H])``, D = 2 if bidirectional.

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
            if index > 0 and self.dropout > 0:
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


def _check_lengths(lengths: Tensor, batch: int, steps: int) -> Tensor:
    """``lengths`` as CPU int64, checked against a [batch, steps, F] input."""
    lengths = torch.as_tensor(lengths).cpu()
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.shape != (batch,):
        raise ValueError(
            f"lengths must be an integer tensor of shape ({batch},), got {lengths.dtype} {tuple(lengths.shape)}"
        )
    lengths = lengths.to(torch.int64)
    if batch and (int(lengths.min()) < 1 or int(lengths.max()) > steps):
        raise ValueError(f"lengths must lie in [1, {steps}] (the padded length), got {lengths.tolist()}")
    return lengths


class GRUModel(nn.Module, PyTorchModelHubMixin):
    """Input scaling, a GRU encoder and a head (``dist_gru.model.heads``).

    ``forward(x [B, T, F], lengths [B] | None) ->`` regression values or class logits (then
    ``output_size`` is the number of classes) in the layout of ``head`` and ``output``:
    ``[B, O]`` (last), ``[B, T, O]`` (step: every step; padded steps hold values nobody should
    read), ``[B, horizon, O]`` (forecast); gaussian outputs add a last axis (mean, scale), quantile
    outputs one of ``len(quantiles)``. Bidirectionally, ``last`` and ``forecast`` read the forward
    direction's last valid state next to the backward direction's state at step 0.

    Scaling lives in the model, so training, evaluation, prediction and an exported graph apply one
    transform and every checkpoint carries it: the ``input_mean`` / ``input_std`` buffers always
    (identity unless ``set_normalization`` filled them: ``scaling="global"``), then with
    ``scaling="window"`` each sample is centred and scaled per channel by the mean and std of its
    own valid steps. A forecast head predicts in the scaled units of the first ``output_size``
    input channels (the target history, by the forecast data contract), and its outputs are mapped
    back through both transforms.

    ``save_pretrained(dir)`` writes ``config.json`` (the init arguments) and
    ``model.safetensors``; ``GRUModel.from_pretrained(dir)`` reads them back (a local
    directory never touches the network), strictly, and returns the model in eval mode.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int = 128,
        num_layers: int = 1,
        dropout: float = 0.0,
        task: str = "regression",
        output_size: int = 1,
        cell: str = "torch",
        head: str = "last",
        bidirectional: bool = False,
        output: str = "point",
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        horizon: int = 0,
        scaling: str = "none",
        vocab_size: int | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        problems = []

        def integer(name: str, value: Any, minimum: int = 1) -> Any:
            # Integral admits numpy integers (an array's shape, say); they come back
            # as plain ints, which config.json can hold.
            ok = isinstance(value, Integral) and not isinstance(value, bool)
            if not (ok and value >= minimum):
                problems.append(f"{name}={value!r}: expected an integer >= {minimum}")
                return value
            return int(value)

        def choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                problems.append(f"{name}={value!r}: expected one of {', '.join(allowed)}")

        input_size = integer("input_size", input_size)
        hidden_size = integer("hidden_size", hidden_size)
        num_layers = integer("num_layers", num_layers)
        choice("task", task, TASKS)
        min_outputs = 2 if task == "classification" else 1
        output_size = integer("output_size", output_size, min_outputs)
        choice("cell", cell, CELLS)
        number = isinstance(dropout, Real) and not isinstance(dropout, bool)
        if not (number and 0 <= dropout < 1):
            problems.append(f"dropout={dropout!r}: expected a number in [0, 1)")
        choice("head", head, HEADS)
        choice("output", output, OUTPUTS)
        choice("scaling", scaling, SCALINGS)
        if not isinstance(bidirectional, bool):
            problems.append(f"bidirectional={bidirectional!r}: expected true or false")
        problems += quantile_problems("quantiles", quantiles)
        if task == "classification" and output != "point":
            problems.append(
                f"output={output!r} with task='classification': gaussian and quantile outputs are for "
                "regression; classification outputs class logits (output='point', cross-entropy)"
            )
        if head == "forecast":
            horizon = integer("horizon", horizon)
            if task == "classification":
                problems.append("head='forecast' with task='classification': forecasts are regression values")
            if isinstance(input_size, int) and isinstance(output_size, int) and input_size < output_size:
                problems.append(
                    f"head='forecast' with input_size={input_size} < output_size={output_size}: the first "
                    "output_size input channels must be the target history"
                )
        elif horizon != 0:
            problems.append(f"horizon={horizon!r} with head={head!r}: only head='forecast' has a horizon (use 0)")
        if vocab_size is not None:
            vocab_size = integer("vocab_size", vocab_size, 2)
        if data is not None and not isinstance(data, dict):
            problems.append(f"data={data!r}: expected a dict (what inference needs to know of the data) or None")
        if problems:
            raise ValueError("invalid GRUModel arguments: " + "; ".join(problems))

        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = float(dropout)
        self.task = task
        self.output_size = output_size
        self.cell = cell
        self.head_kind = head
        self.bidirectional = bidirectional
        self.output_kind = output
        self.quantiles = tuple(float(q) for q in quantiles)
        self.horizon = int(horizon)
        self.scaling = scaling
        # What inference needs to know of the data the model was trained on (window, season, names):
        # carried in config.json so that a copied model folder is all `evaluate` and `forecast` need.
        self.data = dict(data) if data is not None else None
        # What save_pretrained writes to config.json. The mixin records the raw call
        # arguments and silently drops any json cannot encode (a numpy int, say).
        self._hub_mixin_config = {
            "input_size": input_size,
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "dropout": self.dropout,
            "task": task,
            "output_size": output_size,
            "cell": cell,
        }
        # The newer arguments only where they differ from their defaults: a model that uses none of
        # them keeps the config.json it always had, which older releases can still load.
        extra = {
            "head": head,
            "bidirectional": bidirectional,
            "output": output,
            "quantiles": list(self.quantiles),
            "horizon": self.horizon,
            "scaling": scaling,
            "vocab_size": vocab_size,
            "data": data,
        }
        signature = inspect.signature(GRUModel.__init__).parameters
        for name, value in extra.items():
            default = signature[name].default
            if value != (list(default) if name == "quantiles" else default):
                self._hub_mixin_config[name] = value

        # Persistent buffers: saved in model.safetensors, loaded back with the weights.
        # Token inputs: ids [B, T] through an embedding of input_size (= model.embedding_dim) units.
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, input_size) if vocab_size is not None else None
        self.register_buffer("input_mean", torch.zeros(input_size))
        self.register_buffer("input_std", torch.ones(input_size))
        if cell == "torch":
            self.rnn: nn.Module = nn.GRU(
                input_size,
                hidden_size,
                num_layers,
                batch_first=True,
                dropout=self.dropout,
                bidirectional=bidirectional,
            )
        else:
            self.rnn = SeedGRU(input_size, hidden_size, num_layers, dropout=self.dropout, bidirectional=bidirectional)
        directions = 2 if bidirectional else 1
        units = output_size * units_per_output(output, self.quantiles) if task == "regression" else output_size
        self.head = build_head(head, directions * hidden_size, units, self.horizon)
        # Compute dtype of the recurrence, None = the input's. The trainer sets bfloat16 for
        # train.precision=bf16 on CPU, where autocast leaves nn.GRU in fp32 although this
        # CPU's bf16 matmuls (AMX) are faster. Not part of the saved config.
        self.rnn_dtype: torch.dtype | None = None
        # How nn.GRU's weights are trained on the CPU: "fused" runs dist_gru.model.recurrence (the same
        # function, one autograd node per layer, several times fewer ops per step), "native" runs
        # nn.GRU itself. Inference, GPUs and packed batches always run nn.GRU. Not saved either.
        self.recurrence = "fused"

    @property
    def config(self) -> dict[str, Any]:
        """The arguments this model was built with, as ``save_pretrained`` writes them to config.json
        (arguments left at their defaults are omitted)."""
        return dict(self._hub_mixin_config)

    @property
    def spec(self) -> OutputSpec:
        """What the outputs mean, for ``dist_gru.losses`` and ``dist_gru.metrics``."""
        return OutputSpec(self.task, self.head_kind, self.output_kind, self.quantiles)

    @property
    def num_parameters(self) -> int:
        """Number of trainable parameters (the normalisation buffers are not)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

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

    def flatten_parameters(self) -> None:
        """Re-pack ``nn.GRU`` weights for cuDNN after a move or load; seed: no-op."""
        if isinstance(self.rnn, nn.GRU):
            self.rnn.flatten_parameters()

    def point_forecast(self, output: Tensor) -> Tensor:
        """One value per channel from ``forward``'s output: the mean (gaussian), the median quantile."""
        return point_forecast(self.spec, output)

    def forward(
        self, x: Tensor, lengths: Tensor | None = None, packed: bool | None = None, state: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``x`` [B, T, F] (token ids [B, T] with ``vocab_size``), ``lengths`` [B] (None: all T) ->
        outputs (see the class docstring).

        ``packed`` chooses how ``nn.GRU`` runs a padded batch: packed (cuDNN's native form), or
        padded on the fused kernel with the backward direction run over each sequence reversed
        within its length. None: packed on a GPU, padded elsewhere. Both are exact; the choice
        exists so the packed path can be checked on a machine without a GPU.

        ``state`` [num_layers, B, H] (stream mode: the trainer calls the model through DDP, so
        through ``forward``): the same as :meth:`step`, ``(outputs, state after each sequence's
        last valid step)``.
        """
        if state is not None:
            return self.step(x, state, lengths)
        x, lengths, moments = self._scale_inputs(x, lengths)
        if packed is None:
            packed = x.device.type == "cuda"
        steps_out, summary = self._encode(x, lengths, packed)
        return self._head_outputs(steps_out, summary, moments)

    def initial_state(self, batch: int, device: torch.device | str | None = None) -> Tensor:
        """The state :meth:`step` starts a sequence from: zeros ``[num_layers, batch, hidden_size]``."""
        if device is None:
            device = self.input_mean.device
        return torch.zeros(self.num_layers, batch, self.hidden_size, device=device, dtype=self.input_mean.dtype)

    def step(self, x: Tensor, state: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Streaming inference: the next chunk ``x`` [B, T, F] of every sequence -> ``(outputs, state)``.

        Feeding a sequence chunk by chunk from :meth:`initial_state` gives what ``forward`` gives for
        the whole sequence: ``step`` heads the outputs of the chunk's steps ``[B, T, ...]``, ``last``
        and ``forecast`` heads the output of the sequence so far (after each sequence's last valid
        step of the chunk). ``lengths`` [B] are the valid steps of each sequence in this chunk
        (at least 1); the returned state is each sequence's state after its last valid step.
        Unidirectional models only, and not with ``scaling="window"`` (both need the whole sequence).
        """
        if self.bidirectional:
            raise ValueError("step() needs a unidirectional model: a backward direction reads the sequence's end first")
        if self.scaling == "window":
            raise ValueError('step() cannot scale per window (scaling="window" needs the whole sequence)')
        expected = (self.num_layers, x.shape[0], self.hidden_size)
        if state.shape != expected:
            raise ValueError(f"state has shape {tuple(state.shape)}, expected {expected} (see initial_state)")
        x, lengths, moments = self._scale_inputs(x, lengths)
        state = state.to(x.dtype)
        if isinstance(self.rnn, SeedGRU):
            out, state = self._run_rnn(x, state, **({} if lengths is None else {"lengths": lengths}))
        elif lengths is None:
            out, state = self._run_rnn(x, state)
        else:
            # Every layer's state at each sequence's last valid step: packing gives all of them.
            packed_x = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            packed_out, state = self._run_rnn(packed_x, state)
            out = pad_packed_sequence(packed_out, batch_first=True, total_length=x.shape[1])[0]
        return self._head_outputs(out, state[-1], moments), state

    def _scale_inputs(self, x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None, tuple]:
        """Checked and scaled inputs: ``(x, lengths or None when nothing is padded, window moments)``."""
        if self.embedding is not None:
            if x.dim() != 2 or x.dtype.is_floating_point:
                raise ValueError(f"x must be integer token ids of shape [batch, time], got {x.dtype} {tuple(x.shape)}")
            x = self.embedding(x)
        elif x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"x must have shape [batch, time, {self.input_size}], got {tuple(x.shape)}")
        batch, steps, _ = x.shape
        if self.embedding is None:  # learned token embeddings need no input scaling
            # Padding is scaled too; harmless, as packing/masking never passes it on.
            x = (x - self.input_mean) / self.input_std
        if lengths is not None:
            lengths = _check_lengths(lengths, batch, steps)
            if bool((lengths == steps).all()):
                lengths = None  # nothing padded: skip the packing overhead
        moments: tuple = (None, None)
        if self.scaling == "window":
            moments = _window_moments(x, lengths)
            x = (x - moments[0]) / moments[1]
        if self.rnn_dtype is not None:
            x = x.to(self.rnn_dtype)
        return x, lengths, moments

    def _head_outputs(self, steps_out: Tensor | None, summary: Tensor, moments: tuple) -> Tensor:
        """The head over the encoder's outputs, in the output kind's layout and the data's units."""
        dtype = self.head.weight.dtype
        raw = self.head(None if steps_out is None else steps_out.to(dtype), summary.to(dtype))
        out = shape_output(raw, self.output_kind, self.output_size) if self.task == "regression" else raw
        if self.head_kind == "forecast":
            out = self._target_units(out, *moments)
        return out

    def _target_units(self, out: Tensor, loc: Tensor | None, scale: Tensor | None) -> Tensor:
        """Map forecast outputs from the scaled units of the target history back to raw units."""
        channels = self.output_size
        mean, std = self.input_mean[:channels], self.input_std[:channels]
        if loc is not None and scale is not None:
            # [B, 1, F] window moments -> [B, 1, O]: broadcast over the horizon.
            mean = loc[..., :channels] * std + mean
            std = scale[..., :channels] * std
        if self.output_kind == "point":
            return out * std + mean
        # [..., O, K]: the extra axis is gaussian (mean, scale) or the quantile levels.
        mean, std = mean.unsqueeze(-1), std.unsqueeze(-1)
        if self.output_kind == "quantile":
            return out * std + mean
        centre, spread = out.unbind(-1)
        return torch.stack([centre * std[..., 0] + mean[..., 0], spread * std[..., 0]], dim=-1)

    def _encode(self, x: Tensor, lengths: Tensor | None, packed: bool) -> tuple[Tensor | None, Tensor]:
        """``(top layer's outputs [B, T, D*H] or None, summary [B, D*H])``, exact for padded batches."""
        batch = x.shape[0]
        wants_steps = self.head_kind == "step"
        hidden = self.hidden_size
        if isinstance(self.rnn, SeedGRU) or lengths is None:
            # SeedGRU masks padded steps itself (both directions), so it needs no packing.
            extra = {"lengths": lengths} if isinstance(self.rnn, SeedGRU) and lengths is not None else {}
            out, h_n = self._run_rnn(x, **extra)
            return out, self._summary_from_states(h_n)
        if packed:
            # cuDNN runs packed batches natively; h_n comes back in the input's order.
            packed_x = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            packed_out, h_n = self._run_rnn(packed_x)
            out = pad_packed_sequence(packed_out, batch_first=True, total_length=x.shape[1])[0] if wants_steps else None
            return out, self._summary_from_states(h_n)
        last = torch.arange(batch, device=x.device), lengths.to(x.device) - 1
        if not self.bidirectional:
            # On the CPU a packed nn.GRU leaves the fused oneDNN kernel and ran ~10x slower per valid
            # step here. The recurrence is causal, so the top layer's output at step length - 1 of a
            # padded run equals the packed result: run padded, gather each sequence's last valid
            # step (length bucketing keeps the wasted padded steps few).
            out, _ = self._run_rnn(x)
            return out, out[last]
        out = self._bidirectional_padded(x, lengths)
        return out, torch.cat([out[last][:, :hidden], out[:, 0, hidden:]], dim=-1)

    def _summary_from_states(self, h_n: Tensor) -> Tensor:
        if self.bidirectional:
            return torch.cat([h_n[-2], h_n[-1]], dim=-1)
        return h_n[-1]

    def _bidirectional_padded(self, x: Tensor, lengths: Tensor) -> Tensor:
        """A bidirectional ``nn.GRU`` over a padded batch on the fused kernel, exact per sequence.

        Reading the backward direction of a padded run would start it in the padding. Instead
        each layer runs its backward weights as a unidirectional pass over every sequence reversed
        within its own length (one gather), reversed back, then concatenated with the forward
        pass: the same result as packing, which ran 2x slower on the CPU.
        """
        batch = x.shape[0]
        layer_input = x
        h0 = x.new_zeros(1, batch, self.hidden_size)
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0:
                layer_input = F.dropout(layer_input, self.dropout, self.training)
            directions = []
            for suffix in ("", "_reverse"):
                weights = [
                    self._rnn_weight(f"{name}_l{layer}{suffix}")
                    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                ]
                inputs = layer_input if not suffix else reverse_within_lengths(layer_input, lengths)
                if self._fused(inputs):
                    out = gru_direction(inputs, h0[0], *weights)
                else:  # torch.gru is the op nn.GRU itself dispatches to (one layer, one direction here)
                    out, _ = torch.gru(inputs, h0, weights, True, 1, 0.0, self.training, False, True)
                directions.append(out if not suffix else reverse_within_lengths(out, lengths))
            layer_input = torch.cat(directions, dim=-1)
        return layer_input

    def _rnn_weight(self, name: str) -> Tensor:
        weight = getattr(self.rnn, name)
        return weight if self.rnn_dtype is None else weight.to(self.rnn_dtype)

    def _fused(self, inputs: Tensor | PackedSequence) -> bool:
        """Whether this call trains nn.GRU's weights through dist_gru.model.recurrence (see ``recurrence``)."""
        if self.recurrence != "fused" or not isinstance(self.rnn, nn.GRU) or not isinstance(inputs, Tensor):
            return False
        if inputs.device.type != "cpu" or not torch.is_grad_enabled():
            return False
        # A traced or exported graph must hold nn.GRU's own op, which runtimes know.
        return not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export())

    def _run_rnn(self, inputs: Tensor | PackedSequence, *args: Any, **kwargs: Any) -> tuple[Any, Tensor]:
        if self._fused(inputs) and not self.bidirectional:
            return gru_layers(self.rnn, inputs, *args, weight=self._rnn_weight)
        if self.rnn_dtype is None:
            return self.rnn(inputs, *args, **kwargs)
        # Low-precision compute on fp32 master weights: the cast is part of the graph, so
        # gradients (and the optimizer state) stay fp32.
        params = {name: p.to(self.rnn_dtype) for name, p in self.rnn.named_parameters()}
        return functional_call(self.rnn, params, (inputs, *args), kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        # On a GPU, flatten_parameters() makes the GRU weights views into one cuDNN buffer, which
        # safetensors' save_model refuses ("None is covering the entire storage"): save
        # independent CPU copies instead (config.json is written by the mixin).
        state = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in self.state_dict().items()}
        save_file(state, str(Path(save_directory) / "model.safetensors"))
        follow_umask(Path(save_directory) / "model.safetensors")  # safetensors writes it 0600

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> str | None:
        """The mixin's save (config.json, model.safetensors, README.md), then SHA256SUMS of the two
        files a load reads, so a corrupt or edited copy is refused (`verify_model_folder`)."""
        result = super().save_pretrained(save_directory, **kwargs)
        write_checksums(Path(save_directory))
        return result

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs: Any) -> GRUModel:
        # The mixin loads with strict=False, which silently keeps random weights for any
        # key a checkpoint lacks; a checkpoint must match the model its config names.
        model = super()._from_pretrained(strict=strict, **kwargs)
        model.flatten_parameters()
        return model


CHECKSUMS = "SHA256SUMS"
CHECKSUMMED = ("config.json", "model.safetensors")


def write_checksums(folder: Path) -> None:
    """`<folder>/SHA256SUMS` in `sha256sum` format (`sha256sum -c SHA256SUMS` checks it by hand)."""
    from dist_gru.checkpoint import sha256_file

    lines = "".join(f"{sha256_file(folder / name)}  {name}\n" for name in CHECKSUMMED)
    tmp = folder / f".{CHECKSUMS}.{os.getpid()}"
    tmp.write_text(lines)
    os.replace(tmp, folder / CHECKSUMS)


def verify_model_folder(folder: Path, label: str) -> None:
    """Check a saved model folder against its SHA256SUMS before it is loaded; `label` names it in
    errors (`--model DIR`, `train.init_from=DIR`). A folder saved before SHA256SUMS existed loads
    with a warning."""
    from dist_gru.checkpoint import sha256_file

    sums_file = Path(folder) / CHECKSUMS
    if not sums_file.is_file():
        log.warning("%s: no %s (saved by an older release): its files cannot be checked for corruption", label, CHECKSUMS)
        return
    try:
        lines = sums_file.read_text().splitlines()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{label}: {CHECKSUMS} is unreadable ({exc}); expected `sha256  name` lines") from None
    expected = {}
    for line in lines:
        digest, _, name = line.partition(" ")
        expected[name.strip().lstrip("*")] = digest  # `sha256sum -b` marks names with a `*`
    for name in CHECKSUMMED:
        file = Path(folder) / name
        try:
            actual = sha256_file(file)
        except OSError as exc:
            raise ConfigError(f"{label}: {name} is unreadable ({exc.strerror or exc})") from None
        if actual != expected.get(name):
            raise ConfigError(
                f"{label}: {name} does not match its sha256 in {CHECKSUMS} (corrupt or edited); restore the "
                "folder from a copy, or save the model again (train.init_from can start from a checkpoint)"
            )


def _window_moments(x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
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
