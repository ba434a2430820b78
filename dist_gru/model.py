"""GRU sequence models: ``GRUModel`` (recurrent stack + linear head) and ``SeedGRU``.

Two GRU variants live here, and they compute different functions (see
``/work/shared/seed/README.md``):

* ``cell="torch"``: ``torch.nn.GRU`` (cuDNN form), the reset gate applied *after* the
  recurrent product: ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``,
  ``h' = (1 - z) n + z h``.
* ``cell="seed"``: :class:`SeedGRU`, the seed document's equations (Cho et al. 2014
  form), the reset gate applied *before* the recurrent product::

      r_t  = sigmoid(W_r x_t + U_r h_{t-1} + b_r)
      z_t  = sigmoid(W_z x_t + U_z h_{t-1} + b_z)
      h~_t = tanh(W_h x_t + U_h (r_t * h_{t-1}) + b_h)
      h_t  = (1 - z_t) * h_{t-1} + z_t * h~_t

The module holds no training logic. Quick check::

    python -c "import torch; from dist_gru.model import GRUModel; \
print(GRUModel(3, 16, cell='seed')(torch.randn(2, 5, 3)).shape)"
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

TASKS = ("regression", "classification")
CELLS = ("torch", "seed")
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


class SeedGRU(nn.Module):
    """A batch-first stack of :class:`SeedGRUCell` layers, called like ``nn.GRU``.

    ``dropout`` applies between layers (not after the last), as in ``nn.GRU``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = dropout
        self.batch_first = True
        self.cells = nn.ModuleList(
            SeedGRUCell(input_size if layer == 0 else hidden_size, hidden_size) for layer in range(num_layers)
        )

    def flatten_parameters(self) -> None:
        """No-op, so callers can treat it like ``nn.GRU`` (only cuDNN needs it)."""

    def forward(
        self,
        x: Tensor,
        h0: Tensor | None = None,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``x`` [B, T, I] -> ``(out [B, T, H], h_n [num_layers, B, H])``.

        With ``lengths`` [B], steps at ``t >= length`` leave the state unchanged, so
        ``h_n`` is each sequence's state after its last valid step, and ``out`` is zero
        at padded positions (what ``pad_packed_sequence`` gives for ``nn.GRU``).
        """
        batch, steps, _ = x.shape
        if h0 is None:
            # On the input's device and dtype (the seed example made CPU fp32 zeros).
            h0 = x.new_zeros(self.num_layers, batch, self.hidden_size)
        elif h0.shape != (self.num_layers, batch, self.hidden_size):
            expected = (self.num_layers, batch, self.hidden_size)
            raise ValueError(f"h0 has shape {tuple(h0.shape)}, expected {expected}")
        valid = None
        if lengths is not None and bool((lengths < steps).any()):
            # valid[t, b]: step t lies inside sequence b; [T, B, 1] broadcasts over H.
            time = torch.arange(steps, device=lengths.device)
            valid = (time[:, None] < lengths[None, :]).unsqueeze(-1).to(x.device)

        # Time-major inside: a layer's projection is [T, B, 3H], so xproj[t] is one
        # contiguous [B, 3H] block that addmm reads without a copy.
        layer_input = x.transpose(0, 1)
        last_states = []
        for index, cell in enumerate(self.cells):
            if index > 0 and self.dropout > 0:
                layer_input = F.dropout(layer_input, self.dropout, self.training)
            xproj = cell.input_projection(layer_input)
            # Concatenate the recurrent weights once per layer, not once per step.
            u_rz_t, u_h_t = cell.recurrent_weights()
            h = h0[index]
            outputs = []
            for t, xproj_t in enumerate(xproj.unbind(0)):
                h_new = _seed_step(xproj_t, h, u_rz_t, u_h_t)
                h = h_new if valid is None else torch.where(valid[t], h_new, h)
                outputs.append(h)
            layer_input = torch.stack(outputs)
            last_states.append(h)

        out = layer_input if valid is None else torch.where(valid, layer_input, 0.0)
        return out.transpose(0, 1), torch.stack(last_states)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, dropout={self.dropout}"


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
    """A GRU stack whose top layer's last valid state feeds a linear head.

    ``forward(x [B, T, F], lengths [B] | None) -> [B, output_size]``: regression
    outputs, or class logits when ``task="classification"`` (then ``output_size`` is
    the number of classes). Inputs are standardised inside the model with the
    ``input_mean`` / ``input_std`` buffers, so training, evaluation and prediction apply
    one transform and every checkpoint carries it.

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

        input_size = integer("input_size", input_size)
        hidden_size = integer("hidden_size", hidden_size)
        num_layers = integer("num_layers", num_layers)
        if task not in TASKS:
            problems.append(f"task={task!r}: expected one of {', '.join(TASKS)}")
        min_outputs = 2 if task == "classification" else 1
        output_size = integer("output_size", output_size, min_outputs)
        if cell not in CELLS:
            problems.append(f"cell={cell!r}: expected one of {', '.join(CELLS)}")
        number = isinstance(dropout, Real) and not isinstance(dropout, bool)
        if not (number and 0 <= dropout < 1):
            problems.append(f"dropout={dropout!r}: expected a number in [0, 1)")
        if problems:
            raise ValueError("invalid GRUModel arguments: " + "; ".join(problems))

        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = float(dropout)
        self.task = task
        self.output_size = output_size
        self.cell = cell
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

        # Persistent buffers: saved in model.safetensors, loaded back with the weights.
        self.register_buffer("input_mean", torch.zeros(input_size))
        self.register_buffer("input_std", torch.ones(input_size))
        if cell == "torch":
            self.rnn: nn.Module = nn.GRU(
                input_size,
                hidden_size,
                num_layers,
                batch_first=True,
                dropout=self.dropout,
            )
        else:
            self.rnn = SeedGRU(input_size, hidden_size, num_layers, dropout=self.dropout)
        self.head = nn.Linear(hidden_size, output_size)
        # Compute dtype of the recurrence, None = the input's. The trainer sets bfloat16 for
        # train.precision=bf16 on CPU, where autocast leaves nn.GRU in fp32 although this
        # CPU's bf16 matmuls (AMX) are faster. Not part of the saved config.
        self.rnn_dtype: torch.dtype | None = None

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

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``x`` [B, T, F], ``lengths`` [B] (None: all T) -> [B, output_size]."""
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"x must have shape [batch, time, {self.input_size}], got {tuple(x.shape)}")
        batch, steps, _ = x.shape
        # Padding is standardised too; harmless, as packing/masking never passes it on.
        x = (x - self.input_mean) / self.input_std
        if lengths is not None:
            lengths = _check_lengths(lengths, batch, steps)
            if bool((lengths == steps).all()):
                lengths = None  # nothing padded: skip the packing overhead

        if self.rnn_dtype is not None:
            x = x.to(self.rnn_dtype)
        if lengths is None:
            # h_0 = None: the rnn builds zeros on x's device and dtype.
            _, h_n = self._run_rnn(x)
            last = h_n[-1]
        elif isinstance(self.rnn, nn.GRU) and x.device.type == "cuda":
            # cuDNN runs packed batches natively; h_n comes back in the input's order.
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            _, h_n = self._run_rnn(packed)
            last = h_n[-1]
        elif isinstance(self.rnn, nn.GRU):
            # On the CPU a packed nn.GRU leaves the fused oneDNN kernel and ran ~10x slower per valid
            # step here. The recurrence is causal, so the top layer's output at step length - 1 of a
            # padded run equals the packed result: run padded, gather each sequence's last valid
            # step (length bucketing keeps the wasted padded steps few).
            out, _ = self._run_rnn(x)
            last = out[torch.arange(batch, device=out.device), lengths.to(out.device) - 1]
        else:
            _, h_n = self._run_rnn(x, lengths=lengths)
            last = h_n[-1]
        return self.head(last.to(self.head.weight.dtype))

    def _run_rnn(self, inputs: Tensor | PackedSequence, **kwargs: Any) -> tuple[Any, Tensor]:
        if self.rnn_dtype is None:
            return self.rnn(inputs, **kwargs)
        # Low-precision compute on fp32 master weights: the cast is part of the graph, so
        # gradients (and the optimizer state) stay fp32.
        params = {name: p.to(self.rnn_dtype) for name, p in self.rnn.named_parameters()}
        return functional_call(self.rnn, params, (inputs,), kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        # On a GPU, flatten_parameters() makes the GRU weights views into one cuDNN buffer, which
        # safetensors' save_model refuses ("None is covering the entire storage"): save
        # independent CPU copies instead (config.json is written by the mixin).
        state = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in self.state_dict().items()}
        save_file(state, str(Path(save_directory) / "model.safetensors"))

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs: Any) -> GRUModel:
        # The mixin loads with strict=False, which silently keeps random weights for any
        # key a checkpoint lacks; a checkpoint must match the model its config names.
        model = super()._from_pretrained(strict=strict, **kwargs)
        model.flatten_parameters()
        return model
