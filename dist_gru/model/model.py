"""``GRUModel``: a scaler, a GRU encoder and a head, saved and loaded as one model folder.

    python -c "import torch; from dist_gru.model import GRUModel; \
print(GRUModel(3, 16, cell='seed')(torch.randn(2, 5, 3))[0].shape)"

The parts (each its own module of this package): ``scaler`` (``Scaler``: checked inputs, global
and per-window scaling, token embeddings), ``encoder`` (``Encoder``: ``nn.GRU`` or the seed
equations' ``SeedGRU``, one or both directions, exact on padded batches) and ``head``
(``dist_gru.model.heads``: ``last``, ``step``, ``forecast``, with a point, gaussian or quantile
output layout), and for series with static covariates ``statics`` (``StaticEncoder``: their
initial state). Construction picks them from the arguments; ``forward`` composes them. The module
holds no training logic (losses and metrics: ``dist_gru.tasks``).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import save_file
from torch import Tensor, nn

from dist_gru.config import quantile_problems
from dist_gru.data.files import follow_umask
from dist_gru.model.encoder import CELLS, Encoder
from dist_gru.model.heads import HEADS, OUTPUTS, build_head, build_layout
from dist_gru.model.scaler import SCALINGS, Affine, Scaler, TokenScaler
from dist_gru.model.static import StaticEncoder
from dist_gru.tasks.functional import DEFAULT_QUANTILES

log = logging.getLogger(__name__)

TASKS = ("regression", "classification")
# How the forecast loss is computed (`model.loss_units`, `model.point_loss`): read by the task.
LOSS_UNITS = ("raw", "scaled")
POINT_LOSSES = ("mse", "mae")
# Where the parts' state lived before the model was split into scaler, encoder and head. Saved
# files keep these names, so model folders and checkpoints load across releases both ways.
SAVED_NAMES = {
    "scaler.input_mean": "input_mean",
    "scaler.input_std": "input_std",
    "scaler.embedding.": "embedding.",
    "encoder.rnn.": "rnn.",
}


def checked_arguments(args: dict[str, Any]) -> dict[str, Any]:
    """``GRUModel``'s init arguments checked, integers made plain ``int`` (numpy integers, say, which
    config.json cannot hold); ValueError naming every problem at once."""
    args, problems = dict(args), []

    def integer(name: str, minimum: int = 1) -> None:
        value = args[name]
        if not (isinstance(value, Integral) and not isinstance(value, bool) and value >= minimum):
            problems.append(f"{name}={value!r}: expected an integer >= {minimum}")
        else:
            args[name] = int(value)

    def choice(name: str, allowed: tuple[str, ...]) -> None:
        if args[name] not in allowed:
            problems.append(f"{name}={args[name]!r}: expected one of {', '.join(allowed)}")

    task, head, output, dropout = args["task"], args["head"], args["output"], args["dropout"]
    args["future_channels"] = args["future_channels"] or None  # none is None: config.json omits it
    for name in ("input_size", "hidden_size", "num_layers"):
        integer(name)
    choice("task", TASKS)
    integer("output_size", 2 if task == "classification" else 1)
    choice("cell", CELLS)
    if not (isinstance(dropout, Real) and not isinstance(dropout, bool) and 0 <= dropout < 1):
        problems.append(f"dropout={dropout!r}: expected a number in [0, 1)")
    choice("head", HEADS)
    choice("output", OUTPUTS)
    choice("scaling", SCALINGS)
    choice("loss_units", LOSS_UNITS)
    choice("point_loss", POINT_LOSSES)
    if not isinstance(args["bidirectional"], bool):
        problems.append(f"bidirectional={args['bidirectional']!r}: expected true or false")
    problems += quantile_problems("quantiles", args["quantiles"])
    if task == "classification" and output != "point":
        problems.append(
            f"output={output!r} with task='classification': gaussian and quantile outputs are for "
            "regression; classification outputs class logits (output='point', cross-entropy)"
        )
    if head == "forecast":
        problems += _forecast_problems(args, integer)
    elif args["horizon"] != 0:
        problems.append(f"horizon={args['horizon']!r} with head={head!r}: only head='forecast' has a horizon (use 0)")
    elif args["future_channels"]:
        problems.append(f"future_channels with head={head!r}: only head='forecast' reads future covariates")
    if args["vocab_size"] is not None:
        integer("vocab_size", 2)
    integer("naive_season", 0)
    if args["naive_season"] and (head != "forecast" or args["vocab_size"] is not None):
        problems.append(
            f"naive_season={args['naive_season']!r} with head={head!r}, vocab_size={args['vocab_size']!r}: the naive "
            "terms extend a forecast's target history (head='forecast', float inputs)"
        )
    problems += _static_problems(args) + _loss_problems(args)
    if args["data"] is not None and not isinstance(args["data"], dict):
        problems.append(f"data={args['data']!r}: expected a dict (what inference needs to know of the data) or None")
    if problems:
        raise ValueError("invalid GRUModel arguments: " + "; ".join(problems))
    return args


def _static_problems(args: dict[str, Any]) -> list[str]:
    """``static_categories`` (a vocabulary size >= 1 per category column, or None) and
    ``static_values`` (numeric columns, >= 0), made plain; none of either is None and 0."""
    problems, sizes, values = [], args["static_categories"], args["static_values"]
    if sizes is not None:
        plain = isinstance(sizes, Sequence) and not isinstance(sizes, str)
        if not plain or not all(isinstance(v, Integral) and not isinstance(v, bool) and v >= 1 for v in sizes):
            problems.append(f"static_categories={sizes!r}: expected a list of vocabulary sizes >= 1 (or None)")
        else:
            args["static_categories"] = [int(v) for v in sizes] or None
    if not (isinstance(values, Integral) and not isinstance(values, bool) and values >= 0):
        problems.append(f"static_values={values!r}: expected an integer >= 0 (numeric static columns)")
    else:
        args["static_values"] = int(values)
    return problems


def _loss_problems(args: dict[str, Any]) -> list[str]:
    """``loss_units='scaled'`` needs a forecast head and a scaling to take its units from; the
    point loss applies to point outputs only (the others have their own: NLL, pinball)."""
    problems = []
    if args["loss_units"] == "scaled" and (args["head"] != "forecast" or args["scaling"] == "none"):
        problems.append(
            f"loss_units='scaled' with head={args['head']!r}, scaling={args['scaling']!r}: the loss in the scaler's "
            "units needs head='forecast' and a scaling other than 'none'"
        )
    if args["point_loss"] != "mse" and args["output"] != "point":
        problems.append(f"point_loss={args['point_loss']!r} with output={args['output']!r}: applies to output='point'")
    return problems


def _forecast_problems(args: dict[str, Any], integer: Any) -> list[str]:
    integer("horizon")
    problems = []
    if args["task"] == "classification":
        problems.append("head='forecast' with task='classification': forecasts are regression values")
    input_size, output_size = args["input_size"], args["output_size"]
    if isinstance(input_size, int) and isinstance(output_size, int) and input_size < output_size:
        problems.append(
            f"head='forecast' with input_size={input_size} < output_size={output_size}: the first "
            "output_size input channels must be the target history"
        )
    channels = args["future_channels"]
    if channels is not None:
        plain = all(isinstance(c, Integral) and not isinstance(c, bool) for c in channels)
        top = input_size if isinstance(input_size, int) else 0
        if not plain or list(channels) != sorted(set(channels)) or not all(output_size <= c < top for c in channels):
            problems.append(
                f"future_channels={list(channels)!r}: expected increasing covariate channels of x, in "
                f"[output_size, input_size) = [{output_size}, {input_size})"
            )
        else:
            args["future_channels"] = [int(c) for c in channels]
    return problems


def saved_config(args: dict[str, Any]) -> dict[str, Any]:
    """What ``save_pretrained`` writes to config.json: the original arguments always, the newer ones
    only where they differ from their defaults, so a model that uses none of them keeps the
    config.json it always had, which older releases can still load."""
    first = ("input_size", "hidden_size", "num_layers", "dropout", "task", "output_size", "cell")
    config = {name: args[name] for name in first}
    signature = inspect.signature(GRUModel.__init__).parameters
    later = ("head", "bidirectional", "output", "quantiles", "horizon", "scaling", "vocab_size", "future_channels")
    later += ("static_categories", "static_values", "loss_units", "point_loss", "naive_season")
    for name in (*later, "data"):
        default = signature[name].default
        if args[name] != (list(default) if name == "quantiles" else default):
            config[name] = args[name]
    return config


def _renamed(state_dict: dict[str, Any], prefix: str, names: dict[str, str]) -> None:
    """Rename, in place and in order, the keys under ``prefix`` that start with a key of ``names``."""
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        local = key[len(prefix) :] if key.startswith(prefix) else None
        old = next((old for old in names if local is not None and local.startswith(old)), None)
        state_dict[key if old is None else prefix + names[old] + local[len(old) :]] = value


def _to_saved_names(module: nn.Module, state_dict: dict[str, Any], prefix: str, metadata: Any) -> None:
    _renamed(state_dict, prefix, SAVED_NAMES)


def _from_saved_names(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    _renamed(state_dict, prefix, {saved: name for name, saved in SAVED_NAMES.items()})


class GRUModel(nn.Module, PyTorchModelHubMixin):
    """``scaler`` + ``encoder`` + ``head``: ``forward(x, lengths, state) -> (out, state)``.

    ``out`` holds regression values or class logits (then ``output_size`` is the number of classes)
    in the layout of ``head`` and ``output``: ``[B, O]`` (last), ``[B, T, O]`` (step: every step;
    padded steps hold values nobody should read), ``[B, horizon, O]`` (forecast); gaussian outputs
    add a last axis (mean, scale), quantile outputs one of ``len(quantiles)``. Bidirectionally,
    ``last`` and ``forecast`` read the forward direction's last valid state next to the backward
    direction's state at step 0. A forecast head predicts in the scaled units of the first
    ``output_size`` input channels (the target history, by the forecast data contract), and its
    outputs are mapped back through the scaler's transforms (``scaling``: "global" uses the
    ``set_normalization`` buffers, which apply always; "window", "last", "robust" and "revin" also
    scale each sample by statistics of its own valid steps: see ``dist_gru.model.scaler``).
    ``loss_units`` and ``point_loss`` change no output: they say how the task computes the loss.
    ``naive_season`` > 0 adds the forecast head's learned seasonal-naive and drift terms of that
    season (``heads.NaiveTerms``) to its forecast.

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
        future_channels: Sequence[int] | None = None,
        static_categories: Sequence[int] | None = None,
        static_values: int = 0,
        loss_units: str = "raw",
        point_loss: str = "mse",
        data: dict[str, Any] | None = None,
        naive_season: int = 0,
    ) -> None:
        super().__init__()
        args = checked_arguments({
            "input_size": input_size, "hidden_size": hidden_size, "num_layers": num_layers, "dropout": dropout,
            "task": task, "output_size": output_size, "cell": cell, "head": head, "bidirectional": bidirectional,
            "output": output, "quantiles": quantiles, "horizon": horizon, "scaling": scaling,
            "vocab_size": vocab_size, "future_channels": future_channels, "static_categories": static_categories,
            "static_values": static_values, "loss_units": loss_units, "point_loss": point_loss, "data": data,
            "naive_season": naive_season,
        })
        args.update(dropout=float(dropout), horizon=int(args["horizon"]), quantiles=[float(q) for q in quantiles])
        # What save_pretrained writes to config.json. The mixin records the raw call
        # arguments and silently drops any json cannot encode (a numpy int, say).
        self._hub_mixin_config = saved_config(args)
        # The arguments, as attributes: what the model is, for its users (the parts hold their own).
        self.input_size, self.hidden_size, self.num_layers = args["input_size"], args["hidden_size"], args["num_layers"]
        self.dropout, self.task, self.output_size, self.cell = args["dropout"], task, args["output_size"], cell
        self.head_kind, self.bidirectional, self.output_kind = head, bidirectional, output
        self.quantiles, self.horizon, self.scaling = tuple(args["quantiles"]), args["horizon"], scaling
        self.vocab_size = args["vocab_size"]
        # Channels of x (after the target history) whose values over the horizon the forecast reads.
        self.future_channels: list[int] = list(args["future_channels"] or [])
        # What inference needs to know of the data the model was trained on (window, season, names):
        # carried in config.json so that a copied model folder is all `evaluate` and `forecast` need.
        self.data = dict(data) if data is not None else None

        # Built in this order so that parameters (and an optimizer's state) keep the order they had.
        if vocab_size is None:
            self.scaler: Scaler = Scaler(self.input_size, scaling)
        else:
            self.scaler = TokenScaler(self.input_size, self.vocab_size, scaling)
        self.encoder = Encoder(self.input_size, self.hidden_size, self.num_layers, self.dropout, cell, bidirectional)
        layout = build_layout(output, self.output_size, self.quantiles)
        head_inputs = self.encoder.output_size + self.horizon * len(self.future_channels)
        self.naive_season: int = args["naive_season"]
        self.head = build_head(head, head_inputs, layout, self.horizon, self.naive_season)
        # Static covariates set the initial state; a model without them has no such module (and
        # the state-dict keys it always had).
        self.static_categories: list[int] = list(args["static_categories"] or [])
        self.static_values: int = args["static_values"]
        self.statics: StaticEncoder | None = None
        if self.static_categories or self.static_values:
            states = self.num_layers * self.encoder.directions
            self.statics = StaticEncoder(self.static_categories, self.static_values, self.hidden_size, states)
        self.register_state_dict_post_hook(_to_saved_names)
        self.register_load_state_dict_pre_hook(_from_saved_names)

    @property
    def config(self) -> dict[str, Any]:
        """The arguments this model was built with, as ``save_pretrained`` writes them to config.json
        (arguments left at their defaults are omitted)."""
        return dict(self._hub_mixin_config)

    @property
    def rnn(self) -> nn.Module:
        """The GRU stack (``nn.GRU`` or ``SeedGRU``); ``train.freeze=[rnn]`` names it."""
        return self.encoder.rnn

    @property
    def num_parameters(self) -> int:
        """Number of trainable parameters (the normalisation buffers are not)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def set_normalization(self, mean: Tensor | Any, std: Tensor | Any) -> None:
        """Per-feature mean and std of the inputs (see ``Scaler.set_normalization``)."""
        self.scaler.set_normalization(mean, std)

    def flatten_parameters(self) -> None:
        """Re-pack ``nn.GRU`` weights for cuDNN after a move or load; seed: no-op."""
        self.encoder.flatten_parameters()

    @property
    def static_columns(self) -> list[dict] | None:
        """The static columns of the training data (names, kinds, vocabularies), which inference
        aligns its data's to; None for a model without static covariates."""
        if self.statics is None:
            return None
        return (self.data or {}).get("static")

    def forward(
        self,
        x: Tensor,
        lengths: Tensor | None = None,
        state: Tensor | None = None,
        future: Tensor | None = None,
        static_categories: Tensor | None = None,
        static_values: Tensor | None = None,
        dropout_keys: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``x`` [B, T, F] (token ids [B, T] with ``vocab_size``), ``lengths`` [B] (None: all T),
        ``state`` (None: zeros) -> ``(outputs, state)``; outputs as the class docstring says, state
        ``[num_layers * D, B, H]`` after each sequence's last valid step. ``future`` [B, horizon,
        len(future_channels)]: the horizon's values of the future-known covariates, in the units of
        their channels of ``x`` (a model with ``future_channels`` needs them, any other takes none).
        ``static_categories`` [B, Sc] (codes into the training vocabularies; -1: unseen) and
        ``static_values`` [B, Sn]: each sequence's static columns, which set its initial state (a
        model built with ``static_categories`` / ``static_values`` needs them, any other takes none).
        ``dropout_keys`` int64 [B] (``dropout.sample_keys``; the trainer passes them): in training,
        each sequence's dropout between layers is drawn from its key, not from the process's RNG.

        Streams: a ``state`` from ``initial_state`` or a previous call continues each sequence where
        that call left it, so feeding a sequence chunk by chunk gives what one call on the whole
        sequence gives (``step`` heads: the chunk's steps; ``last`` and ``forecast``: the sequence so
        far). Unidirectional models only, and not with a per-window scaling (both need the whole
        sequence). The trainer calls the model through DDP, so through ``forward``.
        """
        if state is not None:
            self.encoder.check_state(state, x.shape[0])
            self.scaler.check_stream()
            self.head.check_stream()
        state = self._static_state(state, static_categories, static_values)
        x, lengths, affine = self.scaler(x, lengths)
        out, state = self.encoder(x, lengths, state, dropout_keys)
        summary = self.encoder.summary(state)
        if self.future_channels or future is not None:  # the forecast also reads the planned values
            planned = self.scaler.future(future, self.future_channels, self.horizon)
            summary = torch.cat([summary, planned.to(summary.dtype)], -1)
        return self.head(out, summary, affine, x, lengths), state

    @torch.no_grad()
    def target_scale(self, x: Tensor, lengths: Tensor | None = None) -> Affine:
        """How the target channels of the inputs ``x`` were standardised, per window (global and
        per-window statistics, not RevIN's learned affine, and no gradient): the units in which
        ``loss_units='scaled'`` computes the forecast loss. The learned affine stays out of it, or
        the model could shrink its loss by shrinking the weight instead of the error."""
        _, _, affine = self.scaler.standardise(x, lengths)
        return Affine(*affine.channels(self.output_size))

    def _static_state(self, state: Tensor | None, categories: Tensor | None, values: Tensor | None) -> Tensor | None:
        """The encoder's initial state: ``state`` (a stream's), or the statics' (None: zeros)."""
        given = categories is not None or values is not None
        if self.statics is None:
            if given:
                raise ValueError("static_categories/static_values: this model reads no static covariates")
            return state
        if state is not None:  # a stream's state already holds what its statics would set
            raise ValueError("a model with static covariates does not run in stream mode (a carried state)")
        return self.statics(categories, values)

    def initial_state(self, batch: int, device: torch.device | str | None = None) -> Tensor:
        """The state a stream starts from: zeros ``[num_layers, batch, hidden_size]``."""
        buffer = self.scaler.input_mean
        return self.encoder.initial_state(batch, buffer.device if device is None else device, buffer.dtype)

    def step(self, x: Tensor, state: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The next chunk ``x`` of every stream: ``forward(x, lengths, state)``."""
        return self(x, lengths, state)

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
    from dist_gru.train.checkpoint import sha256_file

    lines = "".join(f"{sha256_file(folder / name)}  {name}\n" for name in CHECKSUMMED)
    tmp = folder / f".{CHECKSUMS}.{os.getpid()}"
    tmp.write_text(lines)
    os.replace(tmp, folder / CHECKSUMS)


def verify_model_folder(folder: Path, label: str) -> None:
    """Check a saved model folder against its SHA256SUMS before it is loaded; `label` names it in
    errors (`--model DIR`, `train.init_from=DIR`). A folder saved before SHA256SUMS existed loads
    with a warning."""
    from dist_gru.train.checkpoint import ModelFolderError, sha256_file

    sums_file = Path(folder) / CHECKSUMS
    if not sums_file.is_file():
        log.warning("%s: no %s (saved by an older release): its files cannot be checked for corruption", label, CHECKSUMS)
        return
    try:
        lines = sums_file.read_text().splitlines()
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"{label}: {CHECKSUMS} is unreadable ({exc}); expected `sha256  name` lines") from None
    expected = {}
    for line in lines:
        digest, _, name = line.partition(" ")
        expected[name.strip().lstrip("*")] = digest  # `sha256sum -b` marks names with a `*`
    for name in CHECKSUMMED:
        file = Path(folder) / name
        try:
            actual = sha256_file(file)
        except OSError as exc:
            raise ModelFolderError(f"{label}: {name} is unreadable ({exc.strerror or exc})") from None
        if actual != expected.get(name):
            raise ModelFolderError(
                f"{label}: {name} does not match its sha256 in {CHECKSUMS} (corrupt or edited); restore the "
                "folder from a copy, or save the model again (train.init_from can start from a checkpoint)"
            )
