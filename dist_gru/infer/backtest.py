"""`dist-gru backtest`: a forecaster scored on the last K forecast origins of every series, per
series and pooled, against the naive and seasonal-naive forecasts of the same origins.

    dist-gru backtest --model runs/stores/model --data data/stores/val --origins 4 --out backtest.csv
    torchrun --nproc-per-node 2 -m dist_gru backtest --model runs/stores/model --data data/stores/val --origins 4

Origin k (k = 0 .. K-1) of a series of L steps forecasts the `horizon` steps that end k * S steps
before its end (S = --stride, default the horizon: origins whose forecasts do not overlap), from
the `data.window` steps before them, read exactly as training reads a forecast window (target
history, covariates, and the future-known covariates over the horizon). Every series needs
window + horizon + (K - 1) * S steps: a folder with a shorter series is refused, naming it, so
that every series is scored on the same K origins.

The metrics are those `dist-gru evaluate` reports for the model's task (mae, rmse, smape, mase =
mae / the seasonal-naive forecast's mae on the same windows, bias = the mean of forecast - actual,
quantile coverage, ..., and the MAE per horizon step: `mae_by_step` in the JSON line, columns
`mae_step_1` ... in the table), and the
point metrics of the two baselines (`naive_mae`, `seasonal_naive_rmse`, ...). A series loses to
the baselines when its model MAE is above the lower of theirs.

Distributed as evaluate: rank r scores windows r, r + W, ... (`eval_batches`) into float64 sums per
series, one reduce of them, and rank 0 writes the table and prints the JSON line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dist_gru.config import ConfigError
from dist_gru.data.loading import SampleEvalBatches
from dist_gru.data.windows import WindowDataset
from dist_gru.infer.forecast import require_forecaster
from dist_gru.infer.load import (
    batch_to,
    checked_out,
    command_parser,
    data_for_model,
    json_line,
    load_model,
    require_positive,
)
from dist_gru.infer.tables import TABLES, write_table
from dist_gru.tasks import ForecastTask, task_for

BASELINES = ("naive", "seasonal_naive")
BASELINE_METRICS = ("mae", "rmse", "mase", "smape")
# The baselines' own columns hold their MAE, and a series' windows are its `origins`.
MODEL_OMITTED = ("num_samples", "naive_mae", "seasonal_naive_mae")
MAX_LISTED = 20  # losing series named in the JSON line (the table has them all)


class OriginWindows(torch.utils.data.Dataset):
    """The K last forecast origins of every series of a forecast window dataset's source: sample
    `series * K + k` is origin k of `series`, read by `WindowDataset.read_windows`."""

    def __init__(self, windows: WindowDataset, origins: int, stride: int):
        self.windows, self.origins = windows, origins
        lengths = np.asarray(windows.source.lengths, dtype=np.int64)
        last = lengths - windows.horizon - windows.window  # the window start of origin 0
        self.starts = last[:, None] - stride * np.arange(origins, dtype=np.int64)[None, :]  # [N, K]

    def __len__(self) -> int:
        return int(self.starts.size)

    def __getitems__(self, indices: list[int]) -> dict:
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        seq, k = np.divmod(index, self.origins)
        return self.windows.read_windows(seq, self.starts[seq, k], index)

    def series(self, index: torch.Tensor) -> np.ndarray:
        """The series of each sample of a batch's `index`."""
        return index.numpy() // self.origins


class SeriesSums:
    """Float64 metric sums per series: a row per series of the model task's sums, then a point
    forecast task's sums of each baseline, so that one reduce gives every series' metrics and the
    rows' sum the pooled ones (equal to evaluate's over the same windows)."""

    def __init__(self, model_config: dict[str, Any], num_series: int, season: int, device: torch.device):
        self.task: ForecastTask = task_for(model_config)
        point = task_for({**model_config, "output": "point"})
        self.season = season
        self.parts = {"model": self.task.metric_sums(season, device)}
        self.parts |= {name: point.metric_sums(season, device) for name in BASELINES}
        self.widths = [len(part.sums) for part in self.parts.values()]
        self.rows = torch.zeros(num_series, sum(self.widths), dtype=torch.float64, device=device)

    def update(self, series: np.ndarray, output: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor,
               x: torch.Tensor, units: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Add one batch: `series` [B] of its windows, the model's `output`, as `MetricSums.update`."""
        forecasts = {"model": output, **self.task.baseline_forecasts(x, lengths, self.season)}
        for s in np.unique(series):
            rows = torch.from_numpy(np.flatnonzero(series == s))
            on = rows.to(y.device)
            # The loss's units: per window [B, 1, O] (this series' windows), or global [O].
            own = None if units is None else tuple(t[on] if t.dim() == 3 else t for t in units)
            for name, part in self.parts.items():
                part.sums.zero_()  # a scratch vector: this series' sums of this batch
                part.update(forecasts[name][on], y[on], lengths[rows], x[on], own)
            self.rows[int(s)] += torch.cat([part.sums for part in self.parts.values()])

    def results(self, row: torch.Tensor) -> dict[str, Any]:
        """The metrics of one row of sums (a series, or the sum of all rows): the model's as
        evaluate names them (its `mae_by_step` list too), then `<baseline>_<metric>` of each baseline."""
        metrics: dict[str, Any] = {}
        for (name, part), values in zip(self.parts.items(), row.split(self.widths), strict=True):
            found = part.results(values, breakdowns=name == "model")
            if name == "model":
                metrics |= {key: value for key, value in found.items() if key not in MODEL_OMITTED}
            else:
                metrics |= {f"{name}_{key}": found[key] for key in BASELINE_METRICS}
        return metrics


def loses(metrics: dict[str, float]) -> bool:
    """The model's MAE is above the best baseline's (a non-finite model MAE loses too)."""
    return not metrics["mae"] <= min(metrics[f"{name}_mae"] for name in BASELINES)


@torch.no_grad()
def backtest(model: torch.nn.Module, origins: OriginWindows, sums: SeriesSums, accelerator: Any, batch_size: int) -> torch.Tensor:
    """The reduced per-series sums of every origin window (all ranks participate)."""
    model.eval()
    batches = SampleEvalBatches(origins, batch_size, accelerator.process_index, accelerator.num_processes)
    for batch in batches:
        inputs, y = batch_to(batch, accelerator.device)
        with accelerator.autocast():
            out, _ = model(**inputs)
        units = sums.task.loss_units(model, inputs["x"], inputs["lengths"])
        sums.update(origins.series(batch["index"]), out, y, inputs["lengths"], inputs["x"], units)
    if accelerator.num_processes > 1:
        return accelerator.reduce(sums.rows, reduction="sum")
    return sums.rows


def series_names(source: Any, index: np.ndarray) -> list:
    """How the table names series: their stored ids (`series_ids`), else their index."""
    ids = getattr(source, "series_ids", None)
    return [str(ids[i]) for i in index] if ids is not None else [int(i) for i in index]


def check_origins(args: argparse.Namespace, windows: WindowDataset, stride: int) -> None:
    """ConfigError unless every series holds `--origins` windows `stride` steps apart, naming the short ones."""
    lengths = np.asarray(windows.source.lengths, dtype=np.int64)
    need = windows.window + windows.horizon + (args.origins - 1) * stride
    short = np.flatnonzero(lengths < need)
    if len(short):
        names = ", ".join(str(name) for name in series_names(windows.source, short[:5]))
        raise ConfigError(
            f"--origins {args.origins}: needs {need} steps per series (data.window={windows.window} + horizon "
            f"{windows.horizon} + {args.origins - 1} x stride {stride}), but {len(short)} of {len(lengths)} series of "
            f"--data {args.data} are shorter (series {names}{', ...' if len(short) > 5 else ''}; the shortest has "
            f"{int(lengths[short].min())} steps); lower --origins or --stride"
        )


def check_out(args: argparse.Namespace) -> None:
    """ConfigError unless `--out` is a .csv or .parquet file in an existing folder, outside the inputs."""
    if args.out is not None:
        checked_out(args, TABLES)


def step_columns(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` with the list `mae_by_step` as one table column per horizon step, in its place:
    `mae_step_1` ... `mae_step_H`."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if key == "mae_by_step":
            flat |= {f"mae_step_{h}": step for h, step in enumerate(value, start=1)}
        else:
            flat[key] = value
    return flat


def report(sums: SeriesSums, rows: torch.Tensor, origins: OriginWindows, stride: int) -> tuple[list[dict], dict]:
    """(the table: a row per series, the JSON record: pooled metrics and the losing series)."""
    rows = rows.cpu()
    names = series_names(origins.windows.source, np.arange(len(rows)))
    table = []
    for name, row in zip(names, rows, strict=True):
        metrics = step_columns(sums.results(row))
        table.append({"id": name, "origins": origins.origins, **metrics, "loses_to_baseline": loses(metrics)})
    losing = [entry["id"] for entry in table if entry["loses_to_baseline"]]
    record = {"series": len(table), "origins": origins.origins, "stride": stride, "windows": len(origins)}
    record |= sums.results(rows.sum(0))
    record |= {"losing_series": len(losing), "losing_ids": losing[:MAX_LISTED]}
    return table, record


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = command_parser("dist-gru backtest")
    parser.add_argument("--origins", type=int, required=True, help="forecast origins per series, the last ones")
    parser.add_argument("--stride", type=int, help="steps between origins (default: the model's horizon)")
    parser.add_argument("--out", help="the per-series table: .csv or .parquet")
    args = parser.parse_intermixed_args(argv)
    require_positive(args, "--origins", "--stride", "--batch-size")
    return args


def backtest_main(argv: list[str] | None = None) -> int:
    """`dist-gru backtest`: the per-series table (--out) and one JSON line of pooled metrics."""
    from dist_gru.runtime import exit_process, make_accelerator

    args = parse(argv)
    check_out(args)
    model = load_model(args.model)
    require_forecaster(model, args.model, "dist-gru backtest")
    cfg, windows = data_for_model(args, model)
    stride = args.stride or model.horizon
    check_origins(args, windows, stride)
    accelerator = make_accelerator(cfg)
    model = model.to(accelerator.device)
    model.flatten_parameters()
    origins = OriginWindows(windows, args.origins, stride)
    sums = SeriesSums(model.config, len(origins.starts), cfg.data.season, accelerator.device)
    rows = backtest(model, origins, sums, accelerator, args.batch_size)
    if accelerator.is_main_process:
        table, record = report(sums, rows, origins, stride)
        if args.out is not None:
            write_table(Path(args.out), [pd.DataFrame(table)])
            record["out"] = str(args.out)
        print(json_line(record), flush=True)
    exit_process(0)
    return 0
