"""The typed config tree: defaults < YAML file < dotted command-line overrides.

    dist-gru train --config configs/adding.yaml train.max_steps=500 optim.lr=3e-3

One pydantic model per concern (model, data, optim, train, checkpoint, log). Every field carries a
one-line description that doubles as `dist-gru train --help`. Validation happens once, before any
work starts, and reports every problem at once: unknown keys (with the valid ones), wrong types and
out-of-range values, each naming the dotted key, the value given and what is allowed.

Derived values (per-rank batch size, micro-batch size) are computed by functions, never written
back into the config: the saved config is exactly what the user asked for.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import reprlib
from collections.abc import Sequence
from numbers import Real
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config problem a user must fix; the message lists every problem, one per line."""


# Seeds reach torch.manual_seed (which takes [-2**63, 2**64)) and numpy uint64 hashing: the
# non-negative int64 range fits both.
MAX_SEED = 2**63 - 1


def quantile_problems(name: str, quantiles: Any) -> list[str]:
    """Why ``quantiles`` is not a non-empty, strictly increasing list of levels in (0, 1); [] if it is."""
    if isinstance(quantiles, str) or not isinstance(quantiles, Sequence) or not quantiles:
        return [f"{name}={short_repr(quantiles)}: expected a non-empty list of quantile levels in (0, 1)"]
    if not all(isinstance(q, Real) and not isinstance(q, bool) and math.isfinite(q) for q in quantiles):
        return [f"{name}={short_repr(list(quantiles))}: expected numbers (quantile levels in (0, 1))"]
    outside = [q for q in quantiles if not 0 < q < 1]
    if outside:
        return [
            f"{name}={short_repr(list(quantiles))}: {short_repr(outside)} outside (0, 1); a quantile level is a "
            "probability strictly between 0 and 1"
        ]
    if any(b <= a for a, b in zip(quantiles, quantiles[1:], strict=False)):
        return [
            f"{name}={short_repr(list(quantiles))}: expected strictly increasing levels (no repeats), "
            "e.g. [0.1, 0.5, 0.9]"
        ]
    return []


class _Section(BaseModel):
    # strict: "3" is not an int, 1 is not a bool; extra keys are errors, not silently ignored.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class ModelConfig(_Section):
    cell: Literal["torch", "seed"] = Field(
        "torch", description="GRU implementation: torch (nn.GRU, cuDNN/oneDNN) or seed (the seed document's equations)"
    )
    hidden_size: int = Field(128, ge=1, le=65536, description="GRU hidden state size")
    num_layers: int = Field(2, ge=1, le=64, description="stacked GRU layers")
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="dropout between GRU layers (needs num_layers > 1); masks keyed by (seed, step, sample), "
        "so N processes train like 1",
    )
    head: Literal["last", "step", "forecast"] = Field(
        "last",
        description="last (one output per sequence) | step (one per valid step) | forecast (data.horizon steps ahead)",
    )
    bidirectional: bool = Field(
        False, description="also read each sequence backwards from its last valid step (heads last, step, forecast)"
    )
    output: Literal["point", "gaussian", "quantile"] = Field(
        "point",
        description="point (MSE or MAE: model.point_loss / cross-entropy) | gaussian (mean, scale; NLL) | quantile "
        "(pinball loss)",
    )
    quantiles: list[float] = Field(
        default_factory=lambda: [0.1, 0.5, 0.9],
        description="quantile levels of output=quantile: strictly increasing, each in (0, 1)",
    )
    vocab_size: int | None = Field(
        None,
        ge=2,
        le=1 << 24,
        description="inputs are integer token ids in [0, vocab_size) read through an embedding (token streams); "
        "null = float features",
    )
    embedding_dim: int = Field(64, ge=1, le=65536, description="token embedding size (with model.vocab_size)")
    point_loss: Literal["mse", "mae"] = Field(
        "mse", description="loss of regression with output=point: mse (squared error) | mae (absolute error)"
    )
    loss_units: Literal["raw", "scaled"] = Field(
        "raw",
        description="forecast loss units: raw (the data's: windows of large spread weigh more) | scaled (each "
        "window's own scaler units, data.scaling: every window weighs the same; model.head=forecast)",
    )
    naive_terms: bool = Field(
        False,
        description="forecast head: add the context's seasonal-naive forecast (season data.season), drift and drift "
        "over the last season, each weighted per step by learned weights starting at 0, to the GRU's forecast",
    )

    @model_validator(mode="after")
    def _quantile_levels(self) -> ModelConfig:
        problems = quantile_problems("model.quantiles", self.quantiles)
        if problems:
            raise ValueError(problems[0])
        return self


class DataConfig(_Section):
    name: Literal["adding", "sine", "seed_example", "running_count", "seasonal", "promo", "stores", "files"] = Field(
        "adding",
        description="dataset: adding | sine | seed_example | running_count (per-step labels) | seasonal (series "
        "to forecast) | promo (series with a future-known covariate) | stores (series with static covariates) (synthetic) | files (dist_gru.seq/v1 folders)",
    )
    seq_len: int = Field(
        50, ge=1, le=1_000_000, description="sequence length of synthetic data (max length if variable)"
    )
    num_features: int = Field(10, ge=1, le=65536, description="seed_example only: input features per time step")
    variable_length: bool = Field(
        False, description="synthetic data only: draw each sequence length uniformly from [seq_len // 2, seq_len]"
    )
    train_size: int = Field(50_000, ge=1, description="number of synthetic training sequences")
    val_size: int = Field(2_000, ge=1, description="number of synthetic validation sequences")
    seed: int = Field(
        1234,
        ge=0,
        le=MAX_SEED,
        description="seed of the synthetic data generator (sample i is a function of (seed, i))",
    )
    train_path: str | None = Field(None, description="files: training split folder (dist_gru.seq/v1)")
    val_path: str | None = Field(None, description="files: validation split folder (dist_gru.seq/v1)")
    normalize: bool = Field(
        False, description="alias of scaling=global: standardise inputs with training-split statistics"
    )
    scaling: Literal["none", "global", "window", "last", "robust", "revin"] = Field(
        "none",
        description="none | global (training-split statistics, saved with the model) | per context window, outputs "
        "mapped back: window (its mean and std) | last (its last value and std) | robust (its median and "
        "interquartile range) | revin (mean and std, then a learned per-channel affine)",
    )
    window: int | None = Field(
        None,
        ge=1,
        description="context length: samples are windows (sequence i, start t) drawn on the fly from stored "
        "sequences with per-step targets; null = whole sequences",
    )
    horizon: int = Field(0, ge=0, description="forecast steps after each window (> 0 only with model.head=forecast)")
    window_stride: int = Field(1, ge=1, description="steps between the starts of consecutive windows of a sequence")
    future_covariates: bool = Field(
        True,
        description="forecast: feed the horizon's values of future-known covariates (feature role future) to the "
        "forecast; false treats them as past covariates only",
    )
    static_covariates: bool = Field(
        True,
        description="feed each series' static columns (one value per series: meta.json static) to the model, "
        "as its initial state; false ignores them",
    )
    season: int = Field(
        1, ge=1, description="season length of the series (seasonal task; seasonal-naive baseline; 1 = naive)"
    )
    num_workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="DataLoader workers per rank; null = auto (2 on a GPU, 0 on CPU: cores go to compute)",
    )
    bucket_by_length: bool = Field(
        False, description="group sequences of similar length into the same global batch (less padding; deterministic)"
    )
    targets: Literal["dataset", "next"] = Field(
        "dataset",
        description="stream mode (train.tbptt): dataset (the stored per-step targets) | next (predict the next "
        "step's features or token)",
    )

    @model_validator(mode="after")
    def _files_need_paths(self) -> DataConfig:
        if self.name == "files" and not self.train_path:
            raise ValueError("data.name is 'files', so data.train_path must name a dist_gru.seq/v1 folder")
        return self

    @model_validator(mode="after")
    def _scaling_alias(self) -> DataConfig:
        # normalize=true is the old spelling of scaling=global; the two are kept equal so code and
        # saved configs reading either key agree.
        if self.normalize:
            if self.scaling not in ("none", "global") or (self.scaling == "none" and "scaling" in self.model_fields_set):
                raise ValueError(
                    f"data.normalize=true means data.scaling=global, but data.scaling={self.scaling!r} was given: "
                    "set only data.scaling"
                )
            self.scaling = "global"
        elif self.scaling == "global":
            self.normalize = True
        return self

    @model_validator(mode="after")
    def _horizon_needs_window(self) -> DataConfig:
        if self.horizon > 0 and self.window is None:
            raise ValueError(
                f"data.horizon={self.horizon} forecasts the steps after a context window, so data.window must "
                "be set (the context length)"
            )
        return self


class OptimConfig(_Section):
    name: Literal["adamw", "adam"] = Field("adamw", description="optimizer")
    lr: float = Field(3e-3, gt=0.0, le=10.0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="decoupled weight decay (adamw) or L2 penalty (adam)")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Adam beta1")
    beta2: float = Field(0.999, ge=0.0, lt=1.0, description="Adam beta2")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="LR schedule after warm-up")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps from 0 to lr")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cosine floor as a fraction of lr")
    grad_clip: float = Field(1.0, ge=0.0, description="clip the global gradient norm to this (0 = no clipping)")


class EarlyStoppingConfig(_Section):
    metric: str | None = Field(
        None, description="logged eval metric to watch, e.g. eval/loss or eval/accuracy; null = never stop early"
    )
    patience: int = Field(3, ge=1, description="evaluations in a row without improvement before all ranks stop")
    mode: Literal["auto", "min", "max"] = Field(
        "auto", description="min | max | auto (max for accuracy and macro_f1, min for every other metric)"
    )
    min_delta: float = Field(0.0, ge=0.0, description="an evaluation improves only by more than this")


class TrainConfig(_Section):
    global_batch_size: int = Field(
        64, ge=1, description="samples per optimizer step, summed over all ranks and micro-batches"
    )
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step (each rank)")
    max_steps: int = Field(1000, ge=1, description="optimizer steps to train")
    seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        description="seed of model init, dropout and the sample order (order depends on (seed, epoch))",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="fp32 | bf16 | fp16 (fp16 needs a GPU)")
    cpu_bf16: Literal["auto", "gru", "autocast"] = Field(
        "auto",
        description="bf16 on CPU: gru = run the GRU itself in bf16 (fp32 master weights), autocast = autocast only, "
        "auto = gru on a CPU with bf16 instructions (AVX512-BF16, AMX), else fp32 (emulated bf16 is ~8x slower)",
    )
    recurrence: Literal["fused", "native"] = Field(
        "fused",
        description="training nn.GRU on CPU: fused = dist-gru's recurrence (one autograd node per layer, hand-written "
        "backward: the same function, fewer ops), native = nn.GRU's own; GPUs always run cuDNN",
    )
    keep_freed_memory: bool = Field(
        True,
        description="glibc: keep freed memory for the next step instead of returning it to the OS (each fresh page "
        "is a page fault; a step reuses the same buffers)",
    )
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0 = only at the end)")
    eval_batch_size: int = Field(256, ge=1, description="evaluation batch size per rank")
    log_every: int = Field(10, ge=1, description="log training metrics every N steps")
    run_dir: str = Field("runs/default", description="run folder: config, metrics, checkpoints, model, W&B files")
    resume: str = Field(
        "auto",
        description="auto (continue run_dir's run, if any) | none (fresh; refuses a run_dir with checkpoints) | "
        "overwrite (remove run_dir's run, then start fresh) | PATH to a checkpoint (docs/run-folder.md)",
    )
    init_from: str | None = Field(
        None,
        description="fine-tune: start from the weights of a model folder (RUN/model) or a checkpoint folder; "
        "weights only (fresh optimizer, schedule and step), a head of another shape starts anew; not a resume",
    )
    freeze: list[Literal["rnn"]] = Field(
        default_factory=list, description="parts left untrained: [rnn] trains only the head (with train.init_from)"
    )
    early_stopping: EarlyStoppingConfig = Field(
        default_factory=EarlyStoppingConfig,
        description="stop when early_stopping.metric has not improved for early_stopping.patience evaluations",
    )
    threads: int = Field(
        0,
        ge=0,
        le=1024,
        description="intra-op threads per process (0 = $OMP_NUM_THREADS if set, else cores / processes on this node)",
    )
    deterministic: bool = Field(False, description="use deterministic kernels (bit-exact reruns, slower on GPU)")
    record_samples: bool = Field(
        False, description="write the sample ids of every step to run_dir/samples/rank-R.jsonl (audits sharding/resume)"
    )
    run_lock: bool = Field(
        True,
        description="hold an exclusive lock on train.run_dir for the whole run, so a second job there refuses to "
        "start; false only on a file system without flock (Lustre without -o flock)",
    )
    nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="a step whose loss or gradient norm is NaN or infinite (any rank): stop = exit with code 3 before "
        "the optimizer step, saving nothing; skip = drop that step's update and train on",
    )
    nonfinite_max_skips: int = Field(
        10,
        ge=0,
        description="train.nonfinite=skip: skip at most this many non-finite steps in a row; the next one stops the "
        "run as with stop",
    )
    tbptt: int | None = Field(
        None,
        ge=1,
        description="stream mode: chunk length of truncated BPTT; every stored sequence is a stream walked by "
        "train.global_batch_size lanes whose hidden state carries across chunks; null = off",
    )

    @model_validator(mode="after")
    def _accum_divides_batch(self) -> TrainConfig:
        if self.global_batch_size % self.grad_accum_steps:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} must be divisible by "
                f"train.grad_accum_steps={self.grad_accum_steps}"
            )
        return self


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0, description="save a checkpoint every N steps (0 = by time only, see every_minutes)")
    every_minutes: float = Field(
        30.0,
        ge=0.0,
        allow_inf_nan=False,
        description="also save a checkpoint when this many minutes passed since the last one (rank 0's clock; "
        "0 = off): a crash or power cut loses at most this much work",
    )
    keep: int = Field(3, ge=1, description="keep the newest K complete checkpoints")
    best: str | None = Field(
        None,
        description="keep the model of the best evaluation by this logged eval metric (e.g. eval/loss) in "
        "run_dir/best/, besides model/; null = no best/",
    )
    best_mode: Literal["auto", "min", "max"] = Field(
        "auto", description="min | max | auto (max for accuracy and macro_f1, min for every other metric)"
    )
    signals: list[Literal["SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP"]] = Field(
        default_factory=lambda: ["SIGUSR1", "SIGTERM", "SIGINT"],
        description="signals that make all ranks checkpoint and exit with the preemption code (a second SIGINT, "
        "Ctrl-C twice, aborts at once)",
    )


class LogConfig(_Section):
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="W&B mode: auto = online if an API key is configured, else offline"
    )
    trackers: list[Literal["wandb", "tensorboard"]] = Field(
        default_factory=lambda: ["wandb"], description="experiment trackers (metrics.jsonl is always written)"
    )
    project: str = Field("dist-gru", description="W&B project")
    entity: str | None = Field(None, description="W&B entity (team or user)")
    name: str | None = Field(None, description="W&B run name")
    group: str | None = Field(None, description="W&B run group")
    tags: list[str] = Field(default_factory=list, description="W&B tags")
    notes: str | None = Field(None, description="W&B notes")
    quiet: bool = Field(False, description="no progress bar; periodic one-line summaries instead (batch jobs)")


class TuneConfig(_Section):
    # Written by `dist-gru tune` into each trial's command line; a trial is otherwise an ordinary run.
    study: str | None = Field(
        None, description="the study folder of `dist-gru tune` this run is a trial of (set by tune; null = no study)"
    )
    trial: int | None = Field(None, ge=0, description="this run's trial number in tune.study (set by tune)")

    @model_validator(mode="after")
    def _both_or_neither(self) -> TuneConfig:
        if (self.study is None) != (self.trial is None):
            raise ValueError(f"tune.study={self.study!r} and tune.trial={self.trial!r}: set both or neither")
        return self


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="after")
    def _model_fits_data(self) -> Config:
        # Checks that need both sections; every problem at once, like the field checks.
        model, data = self.model, self.data
        problems = []
        if data.horizon > 0 and model.head != "forecast":
            problems.append(
                f"data.horizon={data.horizon} with model.head={model.head!r}: only model.head=forecast predicts "
                "steps after the context window (set data.horizon=0, or model.head=forecast)"
                + (
                    "; a bidirectional step head would even read the steps it is asked to forecast"
                    if model.bidirectional
                    else ""
                )
            )
        if model.head == "forecast" and (data.window is None or data.horizon < 1):
            problems.append(
                f"model.head=forecast needs data.window (the context length) and data.horizon >= 1 (the steps to "
                f"forecast); got data.window={data.window}, data.horizon={data.horizon}"
            )
        if model.naive_terms and model.head != "forecast":
            problems.append(
                f"model.naive_terms=true with model.head={model.head}: the naive terms extend a forecast "
                "(model.head=forecast)"
            )
        problems += loss_problems(self)
        if model.head == "forecast" and data.window is not None and data.season > data.window:
            problems.append(
                f"data.season={data.season} is longer than data.window={data.window}: the seasonal-naive forecast "
                "(the MASE baseline) repeats the context's last season, so the context must hold one"
            )
        problems += stream_problems(self)
        stopping = self.train.early_stopping
        if stopping.metric is not None and not self.train.eval_every:
            problems.append(
                f"train.early_stopping.metric={stopping.metric!r} decides at evaluations, but train.eval_every=0 "
                "evaluates only at the end: set train.eval_every (e.g. 100)"
            )
        for key, metric in (
            ("train.early_stopping.metric", stopping.metric),
            ("checkpoint.best", self.checkpoint.best),
        ):
            if metric is not None and not metric.startswith("eval/"):
                problems.append(f"{key}={metric!r}: expected a logged eval metric, e.g. eval/loss or eval/accuracy")
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """A short hash of the trajectory-defining keys (`trajectory`): equal digests, the same run."""
        blob = json.dumps(trajectory(self.to_dict()), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def loss_problems(cfg: Config) -> list[str]:
    """What `model.loss_units` and `model.point_loss` need of the model and the data's scaling."""
    model, data = cfg.model, cfg.data
    problems = []
    if model.loss_units == "scaled" and model.head != "forecast":
        problems.append(
            f"model.loss_units=scaled with model.head={model.head}: the loss in the scaler's units is a forecast's "
            "(model.head=forecast)"
        )
    elif model.loss_units == "scaled" and data.scaling == "none":
        problems.append(
            "model.loss_units=scaled with data.scaling=none: there are no scaler units to compute the loss in "
            "(set data.scaling, e.g. window or last)"
        )
    if model.point_loss != "mse" and model.output != "point":
        problems.append(
            f"model.point_loss={model.point_loss} with model.output={model.output}: the point loss is for "
            f"model.output=point ({model.output} outputs have their own loss)"
        )
    return problems


def stream_problems(cfg: Config) -> list[str]:
    """What stream mode (`train.tbptt`) and token inputs cannot combine with, one message each."""
    model, data, train = cfg.model, cfg.data, cfg.train
    problems = []
    if train.tbptt is None:
        if data.targets == "next":
            problems.append("data.targets=next predicts each stream's next step: it needs stream mode (set train.tbptt)")
        if model.vocab_size is not None:
            problems.append(
                f"model.vocab_size={model.vocab_size}: token inputs are streams, trained in stream mode (set train.tbptt)"
            )
        return problems
    tbptt = f"train.tbptt={train.tbptt}"
    if model.bidirectional:
        problems.append(
            f"{tbptt} with model.bidirectional=true: a state carried forward into the next chunk cannot hold the "
            "backward direction, which reads steps that have not arrived yet (set model.bidirectional=false)"
        )
    if model.head != "step":
        problems.append(
            f"{tbptt} with model.head={model.head}: stream mode trains an output at every step of every chunk "
            "(model.head=step)"
            + ("; a forecast head reads one summary per window, not a carried state" if model.head == "forecast" else "")
        )
    if data.window is not None:
        problems.append(f"{tbptt} with data.window={data.window}: chunks replace windows in stream mode (data.window=null)")
    if data.name != "files":
        problems.append(f"{tbptt} with data.name={data.name}: streams are read from dist_gru.seq/v1 folders (data.name=files)")
    if train.grad_accum_steps != 1:
        problems.append(
            f"{tbptt} with train.grad_accum_steps={train.grad_accum_steps}: every lane carries its state to its next "
            "chunk, one chunk per optimizer step (use train.grad_accum_steps=1)"
        )
    if data.scaling != "none":
        problems.append(f"{tbptt} with data.scaling={data.scaling}: stream mode reads raw inputs (data.scaling=none)")
    return problems


# ---------------------------------------------------------------------------------------------
# What defines a run's trajectory: a checkpoint resumes only under a config equal in these keys

TRAJECTORY_SECTIONS = ("model", "data", "optim", "train")
# Keys of those sections that do not change the weights a run computes from a checkpoint on: the
# validation split and how often it is evaluated, logging, loader workers, threads, kernels chosen
# for determinism or speed and the allocator (like the world size, they change the summation order,
# not the computation), the
# sample audit, where the run lives and how it resumes, and the horizon (`train.max_steps` may be
# raised to continue a finished run; the cosine schedule then follows the new horizon; early
# stopping only chooses where the run ends; `train.nonfinite` changes nothing in a run without a
# non-finite step, and a run stopped at one may go on with `skip`). Every other
# key of the four sections defines the trajectory, including keys added later, so a new field is
# safe by default; the `checkpoint` and `log` sections never do.
NOT_TRAJECTORY = frozenset(
    {
        "data.val_size",
        "data.val_path",
        "data.num_workers",
        "train.max_steps",
        "train.eval_every",
        "train.eval_batch_size",
        "train.log_every",
        "train.run_dir",
        "train.resume",
        "train.threads",
        "train.deterministic",
        "train.recurrence",
        "train.keep_freed_memory",
        "train.record_samples",
        "train.run_lock",
        "train.early_stopping",
        "train.nonfinite",
        "train.nonfinite_max_skips",
    }
)


def trajectory(tree: dict[str, Any]) -> dict[str, Any]:
    """The trajectory-defining keys of a config tree (`Config.to_dict()`), flat: {"optim.lr": 0.003, ...}."""
    flat: dict[str, Any] = {}
    for section in TRAJECTORY_SECTIONS:
        for key, value in (tree.get(section) or {}).items():
            dotted = f"{section}.{key}"
            if dotted not in NOT_TRAJECTORY:
                flat[dotted] = value
    return flat


# ---------------------------------------------------------------------------------------------
# Loading


# A config is a few hundred values a few levels deep. Aliases make YAML a compression format: a
# few hundred bytes of nested anchors ("billion laughs") stand for billions of values, which
# validating or printing would expand; deep nesting overflows the composer's recursion.
MAX_YAML_NODES = 10_000
MAX_YAML_DEPTH = 100
MAX_PROBLEMS = 20  # listed in one error message


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `3e-3` as a float (YAML 1.1 wants `3.0e-3`, a classic trap) and refuses
    (ConfigError) a document whose aliases expand it past MAX_YAML_NODES values, a recursive alias,
    or nesting deeper than MAX_YAML_DEPTH."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> values it stands for, aliases expanded
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        where = f"line {event.start_mark.line + 1}"
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:  # its anchor's collection is still being composed
                raise ConfigError(f"{where}: alias *{event.anchor} refers to a collection that contains it")
            return node
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{where}: nested deeper than {MAX_YAML_DEPTH} levels")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        size = 1 + sum(self._sizes[id(child)] for child in children)
        if size > MAX_YAML_NODES:
            raise ConfigError(
                f"{where}: this value holds {size:,} values (aliases *name expanded); at most "
                f"{MAX_YAML_NODES:,} are allowed in a config"
            )
        self._sizes[id(node)] = size
        return node


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """Parse one override value the way YAML would (`3e-3` -> float, `[a, b]` -> list, `null`)."""
    return yaml.load(text, Loader=_YamlLoader)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, problems: list[str]) -> None:
    keys = dotted.split(".")
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            problems.append(f"{'.'.join(keys[: depth + 1])}: is a value, not a section; cannot set {dotted}")
            return
        node = child
    node[keys[-1]] = value


def _valid_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names allowed at the parent of `loc`, for 'unknown key' messages."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


_SHORT = reprlib.Repr()  # (keyword arguments need Python 3.12)
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple = 3, 8, 12, 12
_SHORT.maxstring = _SHORT.maxother = 120


def short_repr(value: Any, limit: int = 200) -> str:
    """repr(value) for an error message, at most `limit` characters: a bad value can be huge, and
    the message must stay one readable line (reprlib elides deep, long or wide parts)."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_error(err: dict[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    dotted = ".".join(str(p) for p in loc) or "<config>"
    given = short_repr(err.get("input"))
    if err["type"] == "extra_forbidden":
        valid = ", ".join(_valid_keys(loc))
        return f"{dotted}: unknown key (value {given}); valid keys here: {valid}"
    if err["type"] == "value_error":
        return err["msg"].removeprefix("Value error, ")
    return f"{dotted}: {err['msg']} (got {given})"


def _read_yaml_file(path: Path) -> Any:
    """The YAML document in `path`, any problem a ConfigError naming the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read the file ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"--config {path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line}); "
            "expected a UTF-8 file: re-save it as UTF-8"
        ) from None
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except ConfigError as exc:
        raise ConfigError(f"--config {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML: {exc}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults < YAML file at `path` < `key.sub=value` overrides. Raises ConfigError listing all problems."""
    problems: list[str] = []
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        loaded = _read_yaml_file(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            problems.append(f"{item!r}: overrides look like section.key=value (e.g. optim.lr=3e-3)")
            continue
        try:
            _set_dotted(tree, key, parse_value(text), problems)
        except yaml.YAMLError:
            _set_dotted(tree, key, text, problems)
        except ConfigError as exc:  # too large or too deep to be a config value
            problems.append(f"{key}: {exc}")
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as exc:
        problems += [_format_error(e) for e in exc.errors(include_url=False)]
    if len(problems) > MAX_PROBLEMS:  # e.g. one per element of a long list of the wrong type
        problems = problems[:MAX_PROBLEMS] + [f"... and {len(problems) - MAX_PROBLEMS} more problems"]
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return cfg


def help_text() -> str:
    """Every key with its type, default and description (`dist-gru train --help`)."""
    lines = ["config keys (set in the YAML file or as section.key=value overrides):"]
    for section, field in Config.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        lines.append(f"\n  {section}:")
        for name, sub in model.model_fields.items():
            default = sub.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                default = default.model_dump(mode="json")
            lines.append(f"    {section}.{name} = {json.dumps(default)}")
            lines.append(f"        {sub.description}")
    return "\n".join(lines)


def config_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf key of the config tree as (dotted name, pydantic FieldInfo), in declaration order;
    nested sections (train.early_stopping) are walked into."""
    fields: list[tuple[str, Any]] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            fields += config_fields(sub, dotted + ".")
        else:
            fields.append((dotted, field))
    return fields


def _allowed_text(field: Any) -> str:
    """What a field accepts, for the reference table: its choices, or its type and bounds."""
    annotation = field.annotation
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        text = " \\| ".join(str(a) for a in get_args(annotation))
    elif get_origin(annotation) is list:
        inner = args[0] if args else Any
        choices = get_args(inner) if get_origin(inner) is Literal else ()
        text = "list of " + (" \\| ".join(choices) if choices else getattr(inner, "__name__", str(inner)))
    else:
        names = [getattr(a, "__name__", str(a)) for a in (args or [annotation])]
        text = " or ".join(names)
        bounds = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        for item in field.metadata:
            for attr, sign in bounds.items():
                if getattr(item, attr, None) is not None:
                    text += f", {sign} {getattr(item, attr)}"
    if type(None) in get_args(annotation):
        text += ", or null"
    return text


def config_reference_markdown() -> str:
    """docs/config.md: every key with what it accepts, its default and its description, generated
    from the fields themselves (`python -m dist_gru.config --markdown > docs/config.md`) so the
    manual cannot drift from the code; a test compares the two."""
    lines = [
        "# Config reference",
        "",
        "<!-- Generated by `python -m dist_gru.config --markdown > docs/config.md`; do not edit. -->",
        "",
        "Every key of a job's config, from the fields' own descriptions (also `dist-gru train --help`).",
        "Precedence: defaults < the YAML file (`--config`) < `section.key=value` overrides on the command",
        "line, parsed as YAML (`optim.lr=3e-3` is a float, `log.tags=[a,b]` a list, `data.val_path=null`",
        "None). The whole config is validated before any work starts; every problem is listed at once.",
    ]
    section = None
    for dotted, field in config_fields():
        if dotted.split(".")[0] != section:
            section = dotted.split(".")[0]
            lines += ["", f"## {section}", "", "| key | accepts | default | description |", "|---|---|---|---|"]
        default = json.dumps(field.get_default(call_default_factory=True))
        description = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{dotted}` | {_allowed_text(field)} | `{default}` | {description} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Derived values: functions of the config and the launch, never written back


def micro_batch_size(cfg: Config) -> int:
    """Samples in one global micro-batch (all ranks together)."""
    return cfg.train.global_batch_size // cfg.train.grad_accum_steps


def per_rank_batch_size(cfg: Config, world_size: int) -> int:
    """Samples each rank computes per micro-batch; the world size must divide the micro-batch."""
    micro = micro_batch_size(cfg)
    if micro % world_size:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} with train.grad_accum_steps="
            f"{cfg.train.grad_accum_steps} gives micro-batches of {micro}, which {world_size} processes cannot "
            f"split evenly: choose a global_batch_size divisible by grad_accum_steps x world_size = "
            f"{cfg.train.grad_accum_steps * world_size}"
        )
    return micro // world_size


if __name__ == "__main__":  # python -m dist_gru.config --markdown > docs/config.md
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dist_gru.config", description="print the config reference")
    parser.add_argument("--markdown", action="store_true", help="as Markdown (docs/config.md)")
    parser.parse_args()
    print(config_reference_markdown(), end="")
