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

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dist_gru.config import ConfigError
from dist_gru.data.batching import model_inputs
from dist_gru.data.files import DataFormatError, SequenceFileDataset
from dist_gru.data.table_series import calendar_features, calendar_names
from dist_gru.data.windows import context_at_end
from dist_gru.infer.load import (
    align_statics,
    check_features,
    checked_out,
    command_parser,
    inference_config,
    json_line,
    load_model,
)
from dist_gru.infer.tables import series_columns, step_times, value_names, write_table
from dist_gru.model import GRUModel
from dist_gru.tasks import task_for

OUTPUTS = (".npy", ".csv", ".parquet")


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


def require_forecaster(model: GRUModel, model_dir: str | Path, command: str) -> None:
    """ConfigError unless `model` forecasts a horizon (model.head=forecast)."""
    if model.head_kind != "forecast":
        raise ConfigError(
            f"--model {model_dir}: a model with head {model.head_kind!r} has no horizon to forecast; {command} "
            "needs a model trained with model.head=forecast (use dist-gru predict for this one)"
        )


def forecast_times(dataset: Any, horizon: int) -> np.ndarray | None:
    """datetime64[ns] [num_series, horizon]: the timestamps of the steps after each series' end
    (from its stored start and the frequency), or None for a folder without timestamps."""
    starts, freq = dataset.series_start, dataset.freq
    if starts is None or freq is None:
        return None
    steps = np.asarray(dataset.lengths, dtype=np.int64)[:, None] + np.arange(horizon)  # [N, horizon]
    return step_times(np.repeat(starts, horizon), steps.reshape(-1), freq).reshape(len(starts), horizon)


def future_names(model: GRUModel, dataset: Any) -> list[str]:
    """The data's names of the model's future-known covariates (feature columns after the targets)."""
    names = dataset.feature_names or [f"feature {c}" for c in range(dataset.num_features)]
    return [names[channel - model.output_size] for channel in model.future_channels]


def read_future(path: str | None, model: GRUModel, dataset: Any, times: np.ndarray | None) -> np.ndarray | None:
    """[num_series, horizon, Ff]: the future-known covariates a model reads over the horizon after
    each series' end. Calendar columns follow from the timestamps; the others come from `--future`:
    a table (.csv / .parquet: id, time and those columns) or an .npy array of every column."""
    names = future_names(model, dataset)
    calendar = set(calendar_names(dataset.calendar)) if times is not None else set()
    given = [name for name in names if name not in calendar]
    if not names or (path is None and not given):
        if path is not None:
            raise ConfigError(f"--future {path}: the model reads no future-known covariates given by a file; leave it out")
        return None if not names else calendar_values(times, dataset.calendar, names)
    if path is None:
        raise ConfigError(
            f"the model reads future-known covariates over the horizon ({', '.join(given)}): give their values after "
            f"each series' end with --future FILE (a table: {table_layout(dataset, given)}; or an .npy array "
            f"[{len(dataset)}, {model.horizon}, {len(names)}])"
        )
    if Path(path).suffix == ".npy":
        return read_future_array(path, (len(dataset), model.horizon, len(names)))
    if times is None:
        raise ConfigError(f"--future {path}: {dataset.path} stores no timestamps to match its rows; give an .npy array")
    future = calendar_values(times, dataset.calendar, names)  # the calendar columns; the others follow
    read = read_future_table(Path(path), dataset, given, times)
    for k, name in enumerate(given):
        future[..., names.index(name)] = read[..., k]
    return future


def calendar_values(times: np.ndarray, fields: list[str], names: list[str]) -> np.ndarray:
    """[num_series, horizon, len(names)]: the calendar columns among `names` at `times` (others 0)."""
    derived = calendar_names(fields)
    table = calendar_features(pd.DatetimeIndex(times.reshape(-1)), fields).reshape(*times.shape, len(derived))
    out = np.zeros((*times.shape, len(names)), dtype=np.float32)
    for k, name in enumerate(names):
        if name in derived:
            out[..., k] = table[..., derived.index(name)]
    return out


def table_layout(dataset: Any, columns: list[str]) -> str:
    return ", ".join([dataset.id_column or "(no id column)", dataset.time_column or "ds", *columns])


def read_future_array(path: str, shape: tuple[int, int, int]) -> np.ndarray:
    """An .npy `--future`: every future column in the model's order, checked."""
    try:
        future = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"--future {path}: not a readable .npy file ({exc})") from None
    expected = f"[num_series, horizon, future covariates] = {list(shape)}"
    if future.shape != shape or future.dtype.kind not in "fiu":
        raise DataFormatError(f"--future {path}: {future.dtype} {list(future.shape)}; expected numbers {expected}")
    if not np.isfinite(future).all():
        series = int(np.flatnonzero(~np.isfinite(future.reshape(shape[0], -1)).all(axis=1))[0])
        raise DataFormatError(f"--future {path}: series {series} has a missing or non-finite value; expected finite values")
    return np.asarray(future, dtype=np.float32)


def read_future_table(path: Path, dataset: Any, columns: list[str], times: np.ndarray) -> np.ndarray:
    """[num_series, horizon, len(columns)] from a table with one row per series and timestamp of the
    horizon; refused, naming them, when rows or values are missing or a row is there twice."""
    id_column, time_column = dataset.id_column, dataset.time_column or "ds"
    frame = read_table(path, [c for c in (id_column, time_column, *columns) if c is not None])
    ids = dataset.series_ids if dataset.series_ids is not None else np.array([""] * len(dataset))
    key_ids = frame[id_column].astype(str).to_numpy() if id_column else np.full(len(frame), "")
    try:
        key_times = pd.to_datetime(frame[time_column]).to_numpy(dtype="datetime64[ns]")
    except (ValueError, TypeError) as exc:
        raise DataFormatError(f"--future {path}: column {time_column!r} holds a value that is not a time ({exc})") from None
    keys = pd.MultiIndex.from_arrays([key_ids, key_times])
    if keys.has_duplicates:
        first = keys[keys.duplicated()][0]
        raise DataFormatError(f"--future {path}: two rows for series {first[0]!r} at {pd.Timestamp(first[1])}")
    wanted = pd.MultiIndex.from_arrays([np.repeat(ids, times.shape[1]), times.reshape(-1)])
    values = frame[columns].set_axis(keys).reindex(wanted)
    missing = values.isna().any(axis=1).to_numpy()
    if missing.any():
        shown = ", ".join(f"{i!r} at {pd.Timestamp(t)}" for i, t in wanted[missing][:3])
        raise DataFormatError(
            f"--future {path}: {int(missing.sum())} of the {len(wanted)} (series, time) rows of the horizon are missing "
            f"or incomplete, e.g. {shown}; expected every series' next {times.shape[1]} steps ({', '.join(columns)})"
        )
    return values.to_numpy(dtype=np.float32).reshape(*times.shape, len(columns))


def read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    """The named columns of a CSV or Parquet file (a small one: one row per series and future step)."""
    try:
        frame = pd.read_parquet(path) if path.suffix in (".parquet", ".pq") else pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"--future {path}: not a readable CSV or Parquet table ({exc})") from None
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise DataFormatError(f"--future {path}: no column {', '.join(map(repr, absent))}; expected {', '.join(columns)}")
    return frame[columns]


def forecast_frame(outputs: np.ndarray, model: GRUModel, dataset: Any, times: np.ndarray | None) -> pd.DataFrame:
    """The forecast as a long table: id, time (or the step after the end), then per target its
    point forecast and what the output kind adds (gaussian: scale; quantile: each level)."""
    count, horizon = outputs.shape[:2]
    frame = series_columns(dataset, np.repeat(np.arange(count), horizon))
    if times is not None:
        frame[dataset.time_column or "ds"] = times.reshape(-1)
    else:
        frame["step"] = np.tile(np.arange(1, horizon + 1), count)
    names = value_names(model, dataset.target_names)
    rows = outputs.reshape(count * horizon, *outputs.shape[2:])
    frame.update(task_for(model.config).table_columns(rows, names))
    return pd.DataFrame(frame)


def write_forecast(out: Path, outputs: np.ndarray, model: GRUModel, dataset: Any, times: np.ndarray | None) -> None:
    """`--out` as .npy (the array), .csv or .parquet (the table); written whole, then moved into place."""
    if out.suffix != ".npy":
        write_table(out, [forecast_frame(outputs, model, dataset, times)])
        return
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.npy")
    try:
        np.save(tmp, outputs)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def checked_data(args: argparse.Namespace, model: GRUModel) -> Any:
    """`--data`: a folder of series this model can forecast from."""
    if not Path(args.data).is_dir():
        raise ConfigError(f"--data {args.data}: expected a dist_gru.seq/v1 folder of series with per-step targets")
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
    return dataset


def forecast_main(argv: list[str] | None = None) -> int:
    """`dist-gru forecast`: the forecast after the end of every series of a folder."""
    parser = command_parser("dist-gru forecast")
    parser.add_argument("--out", required=True, help=f"output file ({', '.join(OUTPUTS)}): the array, or a table")
    parser.add_argument(
        "--future",
        help="the future-known covariates over the horizon after each series' end: a table (.csv / .parquet; id, time "
        "and the columns) or an .npy array [num_series, horizon, Ff] (models trained with future-known covariates)",
    )
    args = parser.parse_intermixed_args(argv)
    out = checked_out(args, OUTPUTS)
    model = load_model(Path(args.model))
    require_forecaster(model, args.model, "dist-gru forecast")
    cfg = inference_config(args, model)
    dataset = checked_data(args, model)
    align_statics(dataset, model, f"--data {args.data}")
    times = forecast_times(dataset, model.horizon)
    future = read_future(args.future, model, dataset, times)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    outputs = forecast_series(model.to(device), dataset, cfg.data.window, args.batch_size, device, future)
    write_forecast(out, outputs, model, dataset, times)
    written = {"out": str(out), "shape": list(outputs.shape)}
    bad = int((~np.isfinite(outputs.reshape(len(outputs), -1))).any(axis=1).sum())
    if bad:  # a model whose weights or inputs are not finite: say so, not only in the file
        written["nonfinite_series"] = bad
        print(f"dist-gru: warning: the forecasts of {bad} of {len(outputs)} series hold NaN or infinity", file=sys.stderr)
    print(json_line(written), file=sys.stdout)
    return 0
