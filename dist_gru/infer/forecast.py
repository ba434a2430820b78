"""`dist-gru forecast`: the next `horizon` steps after the end of every series of a folder.

    dist-gru forecast --model runs/stores/model --data data/stores/val --out forecasts.npy
    dist-gru forecast --model runs/sales/model --data data/sales/val --future plan.csv --out forecasts.csv

The context of each series is its last `data.window` steps as the model was trained on them (the
target history, then the covariates); a model trained with future-known covariates also reads
their values over the horizon (`--future`), except calendar columns, which follow from the
timestamps. A model trained with static covariates reads each series' static columns from the
folder, its category codes remapped by name to the model's vocabularies (`align_statics`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from dist_gru.config import ConfigError
from dist_gru.data.batching import model_inputs
from dist_gru.data.windows import context_at_end
from dist_gru.infer.load import (
    align_statics,
    check_features,
    command_parser,
    inference_config,
    json_line,
    load_model,
    output_inside_input,
)
from dist_gru.model import GRUModel


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
        batch = context_at_end(dataset, seq, window)
        if future is not None:
            batch["future"] = torch.from_numpy(np.ascontiguousarray(future[seq], dtype=np.float32))
        outputs.append(model(**model_inputs(batch, device))[0].float().cpu())
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
    align_statics(dataset, model, f"--data {args.data}")
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
