"""Evaluation and forecasting, shared by training and the `evaluate` / `forecast` commands.

    dist-gru evaluate --model runs/adding/model --data adding
    dist-gru evaluate --model runs/files/model --data data/val
    dist-gru forecast --model runs/forecast/model --data data/series --out forecast.npy
    dist-gru evaluate --model runs/bytes/model --data data/bytes/val      # stream mode: bits_per_token

Evaluation runs on every rank over disjoint shards (sample r, r + W, ...), sums per-sample errors in
float64 and reduces the sums once: every sample counts exactly once, and the metrics equal the
1-process ones whatever the world size. Which metrics depends on the model's head and output
(`dist_gru.tasks`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_gru.config import ConfigError
from dist_gru.data.sources import evaluation_batches
from dist_gru.infer.load import (
    batch_to,
    check_features,
    command_parser,
    inference_config,
    json_line,
    load_for_inference,
    load_model,
    output_inside_input,
)
from dist_gru.model import GRUModel
from dist_gru.tasks import task_for


def loss_fn(task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean loss of a batch of a head-`last` point model: MSE (regression) or cross-entropy.

    Every other head and output: `Task.loss_sum` (`dist_gru.tasks`), which the trainer divides by
    the global number of units."""
    total, units = task_for({"task": task}).loss_sum(output, target)
    return total / units


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Any, accelerator: Any, season: int = 1) -> dict[str, float]:
    """Metrics of the model's task over every unit of `batches`, the one evaluator of every kind of
    data: samples (`SampleEvalBatches`) or streams (`StreamEvalBatches`), which say what state a
    batch starts from (`carried`) and take the state after it (`keep`).

    All ranks participate (one reduce of float64 sums at the end). `season` is `data.season`: the
    seasonal-naive baseline of head `forecast`."""
    was_training = model.training
    model.eval()
    sums = task_for(model.config).metric_sums(season, accelerator.device)
    for batch in batches:
        inputs, y = batch_to(batch, accelerator.device)
        with accelerator.autocast():
            out, state = model(**inputs, state=batches.carried(batch))
        batches.keep(state)
        sums.update(out, y, inputs["lengths"], inputs["x"])
    reduced = accelerator.reduce(sums.sums, reduction="sum") if accelerator.num_processes > 1 else sums.sums
    model.train(was_training)
    return sums.results(reduced)


def evaluate_main(argv: list[str] | None = None) -> int:
    """`dist-gru evaluate`: one JSON line of metrics on the last line of stdout. Works under torchrun too."""
    from dist_gru.runtime import exit_process, make_accelerator

    args = command_parser("dist-gru evaluate").parse_intermixed_args(argv)
    cfg, model, dataset = load_for_inference(args)
    accelerator = make_accelerator(cfg)
    model = model.to(accelerator.device)
    model.flatten_parameters()
    batches = evaluation_batches(cfg, dataset, model, accelerator, args.batch_size)
    metrics = evaluate(model, batches, accelerator, season=cfg.data.season)
    if accelerator.is_main_process:
        print(json_line(metrics), flush=True)
    exit_process(0)
    return 0


@torch.no_grad()
def forecast_series(
    model: torch.nn.Module,
    dataset,
    window: int,
    batch_size: int,
    device: torch.device,
    future: np.ndarray | None = None,
) -> np.ndarray:
    """The `horizon` steps after the end of every stored series: [num_series, horizon, O(, K)].

    The context is each series' last `window` steps as the model was trained on them: its target
    history followed by its covariates (`dataset` is a `SequenceFileDataset` with per-step targets);
    `future` [num_series, horizon, Ff]: the future-known covariates over the horizon, for a model
    that reads them.
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
        inputs = {"x": torch.from_numpy(np.concatenate([history, features], axis=-1)).to(device)}
        if future is not None:
            inputs["future"] = torch.from_numpy(np.ascontiguousarray(future[seq], dtype=np.float32)).to(device)
        outputs.append(model(**inputs)[0].float().cpu())
    return torch.cat(outputs).numpy()


def read_future(path: str | None, model: GRUModel, num_series: int) -> np.ndarray | None:
    """`--future`: the future-known covariates a model reads over the horizon, checked against it."""
    from dist_gru.data.files import DataFormatError

    columns = len(model.future_channels)
    expected = f"[num_series, horizon, future covariates] = [{num_series}, {model.horizon}, {columns}]"
    if path is None:
        if columns:
            raise ConfigError(
                f"the model reads {columns} future-known covariate(s) over the horizon: give their values after each "
                f"series' end with --future FILE.npy {expected}"
            )
        return None
    if not columns:
        raise ConfigError(f"--future {path}: the model was trained without future-known covariates; leave it out")
    try:
        future = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"--future {path}: not a readable .npy file ({exc})") from None
    if future.shape != (num_series, model.horizon, columns) or future.dtype.kind not in "fiu":
        raise DataFormatError(f"--future {path}: {future.dtype} {list(future.shape)}; expected numbers {expected}")
    if not np.isfinite(future).all():
        series = int(np.flatnonzero(~np.isfinite(future.reshape(num_series, -1)).all(axis=1))[0])
        raise DataFormatError(f"--future {path}: series {series} has a missing or non-finite value; expected finite values")
    return np.asarray(future)


def forecast_main(argv: list[str] | None = None) -> int:
    """`dist-gru forecast`: the forecast after the end of every series of a folder, as .npy."""
    from dist_gru.data.files import SequenceFileDataset

    parser = command_parser("dist-gru forecast")
    parser.add_argument("--out", required=True, help="output .npy path: [num_series, horizon, O] (+ quantile axis)")
    parser.add_argument(
        "--future",
        help=".npy [num_series, horizon, Ff]: the future-known covariates over the horizon after each series' end "
        "(models trained with future-known covariates)",
    )
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
    cfg = inference_config(args, model)
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
    check_features(args, model, dataset.output_size + dataset.num_features)
    future = read_future(args.future, model, len(dataset))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    outputs = forecast_series(model.to(device), dataset, cfg.data.window, args.batch_size, device, future)
    np.save(args.out, outputs)
    written = {"out": str(args.out), "shape": list(outputs.shape)}
    bad = int((~np.isfinite(outputs.reshape(len(outputs), -1))).any(axis=1).sum())
    if bad:  # a model whose weights or inputs are not finite: say so, not only in the file
        written["nonfinite_series"] = bad
        print(f"dist-gru: warning: the forecasts of {bad} of {len(outputs)} series hold NaN or infinity", file=sys.stderr)
    print(json_line(written), file=sys.stdout)
    return 0
