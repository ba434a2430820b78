"""`dist-gru export`: a saved model as one ONNX or TorchScript file, checked against its runtime.

    dist-gru export --model runs/adding/model --format onnx --out adding.onnx
    dist-gru export --model runs/adding/model --format torchscript --out adding.pt
    dist-gru export --model runs/adding/model --format onnx --stateful --out adding-step.onnx

The graph takes what a user feeds and returns what a user wants: raw inputs ``x`` [batch, time,
features] and ``lengths`` [batch] (int64, each in [1, time]; padding after each sequence's end)
in, the model's outputs in the data's units out: input scaling (global, per window, RevIN), the GRU,
the head and the inverse scaling are all inside, for every head and both cells. Batch size and
length are dynamic. A model with static covariates also takes ``static_categories`` [batch, Sc]
(int64 codes into the vocabularies its metadata's ``data.static`` lists; -1 for a category it
never saw) and/or ``static_values`` [batch, Sn], which set the GRU's initial state. ``--stateful`` exports ``GRUModel.step`` instead: ``state`` [num_layers,
batch, hidden] is a third input and ``state_out`` a second output, for online use.

ONNX runs the recurrence as ONNX ``GRU`` nodes, one per layer, with ``sequence_lens``: PyTorch's
form is ``linear_before_reset=1``; the seed cell applies the reset gate before the recurrent
product (``linear_before_reset=0``) and its ``z`` weighs the candidate, so its update-gate weights
go in negated (``sigmoid(-a) = 1 - sigmoid(a)``). TorchScript traces the model itself, with the
seed cell's time loop compiled by ``torch.jit.script`` so the length stays dynamic.

Before the file appears at ``--out``, the command runs it (onnxruntime / ``torch.jit.load``) on
random batches of several sizes and lengths, padded ones included, and compares it with the
PyTorch model; it prints one JSON line: path, format, max difference. The file holds its metadata
(input and output names and shapes, the model config, and `data`: what inference needs to know of
the data, such as the context window and the season): ONNX ``metadata_props["dist_gru"]``,
TorchScript the extra file ``meta.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dist_gru.config import ConfigError
from dist_gru.data.files import follow_umask
from dist_gru.infer.load import load_model, output_inside_input
from dist_gru.model import GRUModel, SeedGRU, seed_scan
from dist_gru.model.scaler import PER_WINDOW
from dist_gru.tasks import task_for
from dist_gru.train.checkpoint import NonFiniteError, require_finite

FORMATS = ("onnx", "torchscript")
# The legacy (TorchScript-based) ONNX exporter's range; GRU with sequence_lens exists in all of them.
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 14, 20, 17
TOLERANCE = 1e-5
META_KEY = "dist_gru"
# (batch, time) of the verification batches: batch 1, odd sizes, length 1 and a long one.
CHECK_SHAPES = ((1, 9), (3, 1), (4, 17), (7, 40))


def export_problems(model: GRUModel, fmt: str, opset: int | None, stateful: bool) -> list[str]:
    """Everything wrong with the requested export, each naming the bad value and what is allowed."""
    problems = []
    if fmt not in FORMATS:
        problems.append(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if opset is not None:
        if fmt == "torchscript":
            problems.append(f"--opset {opset}: applies to --format onnx only")
        elif not MIN_OPSET <= opset <= MAX_OPSET:
            problems.append(f"--opset {opset}: unsupported; expected an ONNX opset in {MIN_OPSET}..{MAX_OPSET}")
    if stateful and model.bidirectional:
        problems.append("--stateful with a bidirectional model: a backward direction needs the whole sequence")
    if stateful and model.scaling in PER_WINDOW:
        problems.append(f"--stateful with data.scaling={model.scaling}: per-window scaling needs the whole sequence")
    if model.future_channels:  # the exported graphs take (x, lengths[, state]) only
        problems.append(
            "the model reads future-known covariates over the horizon, which exported graphs do not take yet; "
            "forecast with `dist-gru forecast --future`"
        )
    if stateful and model.statics is not None:
        problems.append("--stateful with static covariates: they set a sequence's first state, a stream carries its own")
    if stateful and model.naive_season:
        problems.append("--stateful with naive terms (model.naive_terms): they read the whole context, a stream one chunk")
    return problems


def io_spec(model: GRUModel, stateful: bool) -> dict[str, Any]:
    """Names and shapes of the graph's inputs and outputs (symbolic dimensions as names)."""
    task = task_for(model.config)
    inputs = {"x": ["batch", "time", model.input_size], "lengths": ["batch"]}
    outputs = {"output": [*task.unit_axes, *task.output_shape()]}
    if stateful:
        inputs["state"] = outputs["state_out"] = [model.num_layers, "batch", model.hidden_size]
    if model.static_categories:
        inputs["static_categories"] = ["batch", len(model.static_categories)]
    if model.static_values:
        inputs["static_values"] = ["batch", model.static_values]
    return {"inputs": inputs, "outputs": outputs}


def static_inputs(model: GRUModel) -> list[str]:
    """The graph's static covariate inputs, in order (after x and lengths): none, or either or both."""
    return [name for name, width in (("static_categories", model.static_categories), ("static_values", model.static_values)) if width]


def metadata(model: GRUModel, fmt: str, opset: int | None, stateful: bool) -> dict[str, Any]:
    spec = io_spec(model, stateful)
    return {
        "format": fmt,
        "opset": opset,
        "stateful": stateful,
        "inputs": spec["inputs"],
        "outputs": spec["outputs"],
        "lengths": "int64, valid steps of each sequence, in [1, time]; padding follows each sequence's end",
        "static": "static_categories: int64 codes into the vocabularies of data.static (-1: a category the model "
        "never saw); static_values: float32, in the data's units",
        "model_config": model.config,
        # What inference needs to know of the data (window, season ...): None for a model saved without it.
        "data": model.data,
    }


class _OnnxGRULayer(torch.autograd.Function):
    """One GRU layer (one or both directions) recorded as an ONNX ``GRU`` node.

    ``forward`` returns zeros of the right shapes: the exporter only traces through it and
    records ``symbolic``; the graph's values come from onnxruntime.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, recurrence: Tensor, bias: Tensor, lengths: Tensor,
                h0: Tensor, hidden_size: int, linear_before_reset: int) -> tuple[Tensor, Tensor]:
        directions = weight.shape[0]
        return x.new_zeros(x.shape[0], directions, x.shape[1], hidden_size), h0.clone()

    @staticmethod
    def symbolic(g: Any, x: Any, weight: Any, recurrence: Any, bias: Any, lengths: Any, h0: Any,
                 hidden_size: int, linear_before_reset: int) -> tuple[Any, Any]:
        directions = weight.type().sizes()[0]
        seq_lens = g.op("Cast", lengths, to_i=6)  # ONNX GRU wants int32 sequence_lens
        return g.op(
            "GRU", x, weight, recurrence, bias, seq_lens, h0,
            hidden_size_i=hidden_size, linear_before_reset_i=linear_before_reset,
            direction_s="bidirectional" if directions == 2 else "forward", outputs=2,
        )


def _onnx_gru_weights(model: GRUModel, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """ONNX ``W`` [D, 3H, I], ``R`` [D, 3H, H], ``B`` [D, 6H] of one layer, gates in ONNX order (z, r, h)."""
    hidden = model.hidden_size
    per_direction = []
    for reverse in ([False, True] if model.bidirectional else [False]):
        rnn = model.encoder.rnn
        if isinstance(rnn, SeedGRU):
            cell = (rnn.reverse_cells if reverse else rnn.cells)[layer]
            # Seed h' = (1 - z) h + z h~; ONNX h' = (1 - z') h~ + z' h, so z' = 1 - z = sigmoid(-a_z).
            w = torch.cat([-cell.W_z, cell.W_r, cell.W_h])
            r = torch.cat([-cell.U_z, cell.U_r, cell.U_h])
            b = torch.cat([-cell.b_z, cell.b_r, cell.b_h, torch.zeros(3 * hidden)])
        else:
            suffix = f"_l{layer}" + ("_reverse" if reverse else "")

            def zrh(t: Tensor) -> Tensor:  # PyTorch stacks (r, z, n)
                return torch.cat([t[hidden : 2 * hidden], t[:hidden], t[2 * hidden :]])

            w = zrh(getattr(rnn, "weight_ih" + suffix))
            r = zrh(getattr(rnn, "weight_hh" + suffix))
            b = torch.cat([zrh(getattr(rnn, "bias_ih" + suffix)), zrh(getattr(rnn, "bias_hh" + suffix))])
        per_direction.append((w, r, b))
    return tuple(torch.stack(parts).detach().clone() for parts in zip(*per_direction, strict=True))


class OnnxGraph(nn.Module):
    """``GRUModel`` with its encoder as ONNX ``GRU`` nodes; the model's own scaler and head around them."""

    def __init__(self, model: GRUModel, stateful: bool) -> None:
        super().__init__()
        self.model = model
        self.stateful = stateful
        self.linear_before_reset = 0 if isinstance(model.encoder.rnn, SeedGRU) else 1
        for layer in range(model.num_layers):
            for name, value in zip("WRB", _onnx_gru_weights(model, layer), strict=True):
                self.register_buffer(f"{name}{layer}", value)

    def forward(self, x: Tensor, lengths: Tensor, *rest: Tensor) -> Any:
        """``rest``: ``state`` (stateful), or the static inputs (``static_inputs``), or nothing."""
        model = self.model
        directions = model.encoder.directions
        state = rest[0] if self.stateful else None
        if model.statics is not None:  # their state starts every layer and direction
            state = model.statics(*_static_pair(model, rest))
        x, lengths, affine = model.scaler(x, lengths)
        layer_input = x.transpose(0, 1)  # ONNX GRU is time-major
        states = []
        for layer in range(model.num_layers):
            h0 = (
                state[layer * directions : (layer + 1) * directions]
                if state is not None
                else x.new_zeros(directions, x.shape[0], model.hidden_size)
            )
            y, h_n = _OnnxGRULayer.apply(
                layer_input, getattr(self, f"W{layer}"), getattr(self, f"R{layer}"), getattr(self, f"B{layer}"),
                lengths, h0, model.hidden_size, self.linear_before_reset,
            )
            states.append(h_n)
            layer_input = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], directions * model.hidden_size)
        # h_n holds the forward direction's last valid state and the backward one's at step 0.
        h_n = torch.cat(states)
        out = model.head(layer_input.transpose(0, 1), model.encoder.summary(h_n), affine, x, lengths)
        return (out, h_n) if self.stateful else out


class TorchGraph(nn.Module):
    """What ``torch.jit.trace`` records: the model's outputs, and its state when stateful."""

    def __init__(self, model: GRUModel, stateful: bool) -> None:
        super().__init__()
        self.model = model
        self.stateful = stateful
        if isinstance(model.encoder.rnn, SeedGRU):
            model.encoder.rnn.scan = torch.jit.script(seed_scan)

    def forward(self, x: Tensor, lengths: Tensor, *rest: Tensor) -> Any:
        if self.model.statics is not None:
            categories, values = _static_pair(self.model, rest)
            return self.model(x, lengths, static_categories=categories, static_values=values)[0]
        out, state = self.model(x, lengths, *rest)
        return (out, state) if self.stateful else out


def _static_pair(model: GRUModel, given: tuple[Tensor, ...]) -> tuple[Tensor | None, Tensor | None]:
    """(static_categories, static_values) of the graph's static inputs (``static_inputs`` order)."""
    named = dict(zip(static_inputs(model), given, strict=True))
    return named.get("static_categories"), named.get("static_values")


def random_statics(model: GRUModel, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Static inputs of a verification batch: every code of each vocabulary and -1 (unseen), values
    on the scale of the training data; empty for a model without static covariates."""
    if model.statics is None:
        return {}
    statics = {}
    if model.static_categories:
        sizes = torch.tensor(model.static_categories)
        codes = (torch.rand(batch, len(sizes), generator=generator) * (sizes + 1)).long() - 1
        statics["static_categories"] = codes
    if model.static_values:
        encoder = model.statics
        noise = torch.randn(batch, model.static_values, generator=generator)
        statics["static_values"] = (encoder.value_mean + encoder.value_std * noise).float()
    return statics


def random_batch(model: GRUModel, batch: int, steps: int, generator: torch.Generator, padded: bool = True
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs on the scale of the training data, lengths in [1, steps] (the first at full length),
    and a random state: one verification (or benchmark) batch."""
    x = model.scaler.input_mean + model.scaler.input_std * torch.randn(batch, steps, model.input_size, generator=generator)
    lengths = torch.randint(1, steps + 1, (batch,), generator=generator) if padded else torch.full((batch,), steps)
    lengths[0] = steps
    state = torch.randn(model.num_layers, batch, model.hidden_size, generator=generator) * 0.5
    return x, lengths, state


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' warnings (legacy exporter, tracer) are about code paths we check right after."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def _example(model: GRUModel, stateful: bool) -> tuple[Tensor, ...]:
    # A padded example, so that tracing records the padded path (exact for full lengths as well).
    generator = torch.Generator().manual_seed(0)
    x, _, state = random_batch(model, 3, 5, generator)
    lengths = torch.tensor([5, 3, 2])
    return (x, lengths, state) if stateful else (x, lengths, *random_statics(model, 3, generator).values())


def write_export(model_dir: str | Path, fmt: str, out: Path, opset: int, stateful: bool) -> dict[str, Any]:
    """Export the model at ``model_dir`` to ``out`` (any file there is replaced); returns the metadata."""
    model = load_model(Path(model_dir))
    meta = metadata(model, fmt, opset if fmt == "onnx" else None, stateful)
    names = list(meta["inputs"])
    example = _example(model, stateful)
    with torch.no_grad(), _quiet():
        if fmt == "onnx":
            import onnx

            units = dict(enumerate(task_for(model.config).unit_axes))
            dynamic = {"x": {0: "batch", 1: "time"}, "lengths": {0: "batch"}, "output": units}
            if stateful:
                dynamic.update(state={1: "batch"}, state_out={1: "batch"})
            dynamic.update({name: {0: "batch"} for name in static_inputs(model)})
            buffer = io.BytesIO()
            torch.onnx.export(
                OnnxGraph(model, stateful), example, buffer, dynamo=False, opset_version=opset,
                input_names=names, output_names=list(meta["outputs"]), dynamic_axes=dynamic,
            )
            proto = onnx.load_from_string(buffer.getvalue())
            proto.metadata_props.add(key=META_KEY, value=json.dumps(meta))
            onnx.checker.check_model(proto)
            onnx.save(proto, str(out))
        else:
            traced = torch.jit.trace(TorchGraph(model, stateful), example, check_trace=False)
            torch.jit.save(traced, str(out), _extra_files={"meta.json": json.dumps(meta)})
    return meta


def load_runner(path: str | Path, fmt: str, threads: int | None = None) -> Callable[..., list[np.ndarray]]:
    """The exported file as a function of numpy inputs (x, lengths[, state]) -> list of outputs."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda *arrays: session.run(None, dict(zip(names, arrays, strict=True)))
    module = torch.jit.load(str(path))

    def run(*arrays: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(*(torch.from_numpy(a) for a in arrays))
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]

    return run


def read_metadata(path: str | Path, fmt: str) -> dict[str, Any]:
    """The metadata an exported file carries (see ``metadata``)."""
    if fmt == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props[META_KEY])
    extra = {"meta.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra["meta.json"])


def max_difference(got: np.ndarray, want: np.ndarray) -> float:
    """Max |got - want|; infinity when either holds a NaN or infinity (a running `max` would take a
    NaN difference for 0.0, since every comparison with NaN is false)."""
    got, want = got.astype(np.float64), want.astype(np.float64)
    if not (np.isfinite(got).all() and np.isfinite(want).all()):
        return float("inf")
    return float(np.abs(got - want).max()) if got.size else 0.0


def _valid_difference(model: GRUModel, got: np.ndarray, want: Tensor, lengths: Tensor) -> float:
    """`max_difference` over the units the batch really has (not the padded steps of step heads)."""
    task = task_for(model.config)
    return max_difference(task.valid_units(got, lengths), task.valid_units(want.double().numpy(), lengths))


def verify(path: str | Path, fmt: str, model: GRUModel, stateful: bool, seed: int = 0) -> float:
    """Max difference between the exported file and ``model`` over the verification batches
    (infinity if an output holds NaN or infinity). NonFiniteError if the model's own outputs do:
    then nothing can be checked, and the model is not fit to deploy."""
    runner = load_runner(path, fmt)
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    with torch.no_grad():
        for batch, steps in CHECK_SHAPES:
            for padded in (False, True):
                x, lengths, state = random_batch(model, batch, steps, generator, padded)
                if stateful:
                    want, want_state = model.step(x, state, lengths)
                    got, got_state = runner(x.numpy(), lengths.numpy(), state.numpy())
                    worst = max(worst, max_difference(got_state, want_state.numpy()))
                else:
                    statics = random_statics(model, batch, generator)
                    want, _ = model(x, lengths, **statics)
                    (got,) = runner(x.numpy(), lengths.numpy(), *(t.numpy() for t in statics.values()))
                if not bool(torch.isfinite(want).all()):
                    raise NonFiniteError(
                        f"the model's own outputs hold NaN or infinity on a batch of {batch} x {steps} inputs on the "
                        "scale of its training data (its weights overflow): nothing to export; nothing written"
                    )
                if got.shape != tuple(want.shape):
                    raise RuntimeError(f"exported output has shape {got.shape}, the model's is {tuple(want.shape)}")
                worst = max(worst, _valid_difference(model, got, want, lengths))
    return worst


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dist-gru export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved model folder (config.json + model.safetensors)")
    parser.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--out", required=True, help="the file to write (.onnx / .pt)")
    parser.add_argument("--opset", type=int, help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")
    parser.add_argument("--stateful", action="store_true", help="export step(): state in, state out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = load_model(Path(args.model))
    require_finite(model.state_dict(), f"--model {args.model}: cannot export a model whose weights are not finite")
    problems = export_problems(model, args.format, args.opset, args.stateful)
    out = Path(args.out)
    if not out.parent.is_dir():
        problems.append(f"--out {out}: the folder {out.parent} does not exist")
    elif out.is_dir():
        problems.append(f"--out {out}: is a folder; expected a file path")
    elif inside := output_inside_input(out, {"--model": args.model}):
        problems.append(inside)
    if problems:
        raise ConfigError("cannot export:\n  " + "\n  ".join(problems))
    if args.format == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"--format onnx needs onnx and onnxruntime: pip install 'dist-gru[export]' ({exc})") from exc
    opset = args.opset or DEFAULT_OPSET
    # Written next to --out and moved there only once it has passed the check.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_export(args.model, args.format, tmp, opset, args.stateful)
        try:
            difference = verify(tmp, args.format, model, args.stateful)
        except NonFiniteError as exc:
            raise NonFiniteError(f"--model {args.model}: {exc}") from None
        if not difference <= TOLERANCE:
            raise RuntimeError(
                f"the exported graph differs from the PyTorch model by {difference:.3g} (> {TOLERANCE}); nothing written"
            )
        follow_umask(tmp)  # mkstemp makes the file private; the export gets what any new file would
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    report = {"path": str(out), "format": args.format, "stateful": args.stateful, "max_difference": difference,
              "checked_batches": [list(s) for s in CHECK_SHAPES], "tolerance": TOLERANCE}
    if args.format == "onnx":
        report["opset"] = opset
    print(json.dumps(report), flush=True)
    return 0
