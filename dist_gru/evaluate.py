"""Evaluation and forecasting, shared by training and the `evaluate` / `forecast` commands (and `predict`).

    dist-gru evaluate --model runs/adding/model --data adding
    dist-gru evaluate --model runs/files/model --data data/val
    dist-gru forecast --model runs/forecast/model --data data/series --out forecast.npy
    dist-gru evaluate --model runs/bytes/model --data data/bytes/val      # stream mode: bits_per_token

Evaluation runs on every rank over disjoint shards (sample r, r + W, ...), sums per-sample errors in
float64 and reduces the sums once: every sample counts exactly once, and the metrics equal the
1-process ones whatever the world size. Which metrics depends on the model's head and output
(`dist_gru.metrics`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from dist_gru.config import ConfigError, load_config
from dist_gru.data.loading import build_dataset, eval_batches, make_loader
from dist_gru.losses import OutputSpec, loss_sum
from dist_gru.metrics import MetricSums


def loss_fn(task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean loss of a batch of a head-`last` point model: MSE (regression) or cross-entropy.

    Every other head and output: `dist_gru.losses.loss_sum`, which the trainer divides by the
    global number of units."""
    total, units = loss_sum(OutputSpec(task), output, target)
    return total / units


def json_line(record: dict) -> str:
    """`record` as strict JSON: a NaN or infinite number becomes null, and `nonfinite` lists the
    keys that were (bare NaN / Infinity, which `json.dumps` writes by default, is not JSON)."""
    from dist_gru.tracking import finite_or_none

    clean = finite_or_none(record)
    nonfinite = [key for key, value in record.items() if value is not None and clean[key] is None]
    return json.dumps({**clean, "nonfinite": nonfinite} if nonfinite else clean, allow_nan=False)


def _batch_to(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    non_blocking = device.type == "cuda"
    return (
        batch["x"].to(device, non_blocking=non_blocking),
        batch["lengths"],
        batch["y"].to(device, non_blocking=non_blocking),
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset,
    accelerator,
    batch_size: int,
    num_workers: int = 0,
    season: int = 1,
) -> dict[str, float]:
    """Metrics over the whole dataset for the model's head and output (`dist_gru.metrics`).

    All ranks participate (one reduce at the end). `season` is `data.season`: the seasonal-naive
    baseline of head `forecast`."""
    was_training = model.training
    model.eval()
    sums = MetricSums(model.spec, model.output_size, season, accelerator.device)
    batches = eval_batches(len(dataset), batch_size, accelerator.process_index, accelerator.num_processes)
    for batch in make_loader(dataset, batches, num_workers):
        x, lengths, y = _batch_to(batch, accelerator.device)
        with accelerator.autocast():
            out, _ = model(x, lengths)
        sums.update(out, y, lengths, x)
    reduced = accelerator.reduce(sums.sums, reduction="sum")  # all ranks participate
    model.train(was_training)
    return sums.results(reduced)


def load_model(model_dir: Path):
    """The one loader of a saved model folder (evaluate, predict, forecast, export, sample): checked
    against its SHA256SUMS, then loaded strictly; any failure is a ConfigError naming the folder."""
    from dist_gru.model import GRUModel, verify_model_folder

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"--model {model_dir}: not a folder; expected a saved model folder (config.json + model.safetensors)")
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise ConfigError(f"--model {model_dir}: expected a folder with config.json and model.safetensors")
    verify_model_folder(model_dir, f"--model {model_dir}")
    try:
        return GRUModel.from_pretrained(str(model_dir))
    except Exception as exc:  # a broken config.json or weights file: the mixin's errors vary
        raise ConfigError(f"--model {model_dir}: not a loadable model folder ({type(exc).__name__}: {exc})") from exc


def _inference_config(args: argparse.Namespace, model, extra: list[str] = ()):
    """The job's config: the run's config.yaml (or --config) < the model's own head and horizon <
    `extra` < the user's overrides, then checked against the model."""
    model_dir = Path(args.model)
    run_config = args.config or (
        model_dir.parent / "config.yaml" if (model_dir.parent / "config.yaml").is_file() else None
    )
    overrides = [f"model.head={model.head_kind}", f"data.horizon={model.horizon}", *extra, *args.overrides]
    if Path(args.data).exists():
        overrides += ["data.name=files", f"data.val_path={args.data}", f"data.train_path={args.data}"]
    else:
        overrides += [f"data.name={args.data}"]
    cfg = load_config(run_config, overrides)
    for key, want, got in (
        ("model.head", model.head_kind, cfg.model.head),
        ("data.horizon", model.horizon, cfg.data.horizon),
    ):
        if want != got:
            raise ConfigError(f"{key}={got!r}, but the model at --model {model_dir} was built with {key}={want!r}")
    return cfg


def _check_features(args: argparse.Namespace, model, num_features: int) -> None:
    if num_features != model.input_size:
        raise ConfigError(
            f"--data {args.data}: samples have {num_features} input features, the model expects {model.input_size}"
        )


def _load_for_inference(args: argparse.Namespace, extra: list[str] = ()):
    """Model from `--model`, dataset from `--data` (a seq folder or a synthetic name)."""
    model = load_model(Path(args.model))
    cfg = _inference_config(args, model, list(extra))
    if cfg.train.tbptt:  # a stream-mode run: its validation data are streams, evaluated chunk by chunk
        from dist_gru.data.streams import build_stream_dataset

        dataset = build_stream_dataset(cfg, "val")
        if dataset.vocab_size is None:
            _check_features(args, model, dataset.num_features)
        return cfg, model, dataset
    dataset = build_dataset(cfg.data, "val", head=model.head_kind)
    _check_features(args, model, dataset.num_features)
    return cfg, model, dataset


def output_inside_input(out: str | Path, inputs: dict[str, str | Path | None]) -> str | None:
    """Why `out` must not be written, or None: it is (inside) one of `inputs` ({option: path}),
    which writing it would overwrite (e.g. `--out DATA/features.npy`). Paths are compared resolved
    (symlinks and `..` followed); inputs that are not paths on disk (a synthetic dataset name) are skipped."""
    target = Path(out).resolve()
    for option, given in inputs.items():
        if given is None or not Path(given).exists():
            continue
        if target.is_relative_to(Path(given).resolve()):
            return (
                f"--out {out}: is inside {option} {given}, which it would overwrite; choose an output path "
                f"outside the inputs"
            )
    return None


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--model", required=True, help="a saved model folder (config.json + model.safetensors)")
    parser.add_argument(
        "--data", required=True, help="a dist_gru.seq/v1 folder, or a synthetic dataset name (uses its val split)"
    )
    parser.add_argument("--config", help="config for synthetic data parameters (default: the run's config.yaml)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.seq_len=100")
    return parser


def evaluate_main(argv: list[str] | None = None) -> int:
    """`dist-gru evaluate`: one JSON line of metrics on the last line of stdout. Works under torchrun too."""
    from dist_gru.runtime import exit_process, make_accelerator

    args = _parser("dist-gru evaluate").parse_intermixed_args(argv)
    cfg, model, dataset = _load_for_inference(args)
    accelerator = make_accelerator(cfg)
    model = model.to(accelerator.device)
    model.flatten_parameters()
    if cfg.train.tbptt:
        from dist_gru.data.streams import evaluate_streams

        metrics = evaluate_streams(model, dataset, accelerator, cfg.train.global_batch_size, cfg.train.tbptt)
    else:
        metrics = evaluate(model, dataset, accelerator, args.batch_size, season=cfg.data.season)
    if accelerator.is_main_process:
        print(json_line(metrics), flush=True)
    exit_process(0)
    return 0


@torch.no_grad()
def forecast_series(model: torch.nn.Module, dataset, window: int, batch_size: int, device: torch.device) -> np.ndarray:
    """The `horizon` steps after the end of every stored series: [num_series, horizon, O(, K)].

    The context is each series' last `window` steps as the model was trained on them: its target
    history followed by its covariates (`dataset` is a `SequenceFileDataset` with per-step targets).
    """
    from dist_gru.data.files import DataFormatError

    lengths = np.asarray(dataset.lengths, dtype=np.int64)
    short = np.flatnonzero(lengths < window)
    if len(short):
        raise DataFormatError(
            f"{dataset.path}: {len(short)} series are shorter than the context window data.window={window} "
            f"(series {int(short[0])} has {int(lengths[short[0]])} steps); forecasting needs {window} steps of history"
        )
    model.eval()
    outputs = []
    for start in range(0, len(lengths), batch_size):
        seq = np.arange(start, min(start + batch_size, len(lengths)))
        features, targets = dataset.read_steps(seq, lengths[seq] - window, window, window)
        history = targets.reshape(len(seq), window, -1)
        x = torch.from_numpy(np.concatenate([history, features], axis=-1)).to(device)
        outputs.append(model(x)[0].float().cpu())
    return torch.cat(outputs).numpy()


def forecast_main(argv: list[str] | None = None) -> int:
    """`dist-gru forecast`: the forecast after the end of every series of a folder, as .npy."""
    from dist_gru.data.files import SequenceFileDataset

    parser = _parser("dist-gru forecast")
    parser.add_argument("--out", required=True, help="output .npy path: [num_series, horizon, O] (+ quantile axis)")
    args = parser.parse_intermixed_args(argv)
    problem = output_inside_input(args.out, {"--model": args.model, "--data": args.data, "--config": args.config})
    if problem:
        raise ConfigError(problem)
    model_dir = Path(args.model)
    model = load_model(model_dir)
    if model.head_kind != "forecast":
        raise ConfigError(
            f"--model {model_dir}: a model with head {model.head_kind!r} has no horizon to forecast; dist-gru forecast "
            "needs a model trained with model.head=forecast (use dist-gru predict for this one)"
        )
    if not Path(args.data).is_dir():
        raise ConfigError(f"--data {args.data}: expected a dist_gru.seq/v1 folder of series with per-step targets")
    cfg = _inference_config(args, model)
    dataset = SequenceFileDataset(args.data)
    if dataset.target_kind != "step":
        raise ConfigError(
            f"--data {args.data}: has one target per sequence; forecasting reads each series' per-step targets "
            "as its history (write the series with per-step targets)"
        )
    if dataset.output_size != model.output_size:
        raise ConfigError(
            f"--data {args.data}: series have {dataset.output_size} target channels, the model forecasts {model.output_size}"
        )
    _check_features(args, model, dataset.output_size + dataset.num_features)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    outputs = forecast_series(model.to(device), dataset, cfg.data.window, args.batch_size, device)
    np.save(args.out, outputs)
    written = {"out": str(args.out), "shape": list(outputs.shape)}
    bad = int((~np.isfinite(outputs.reshape(len(outputs), -1))).any(axis=1).sum())
    if bad:  # a model whose weights or inputs are not finite: say so, not only in the file
        written["nonfinite_series"] = bad
        print(f"dist-gru: warning: the forecasts of {bad} of {len(outputs)} series hold NaN or infinity", file=sys.stderr)
    print(json_line(written), file=sys.stdout)
    return 0
