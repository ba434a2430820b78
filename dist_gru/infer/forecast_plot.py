"""Forecast against actual for a few series, as PNG files: `dist-gru plot --model M --data DIR`.

    dist-gru plot --model runs/stores/model --data data/stores/val --origins 3 --series 4 --out plots/

For each chosen series (the first `--series` ones, or those named by `--ids`), the series' last
steps and the forecasts of its `--origins` last forecast origins (the windows `dist-gru backtest`
scores), with the interval the model has (quantile: the outer levels; gaussian: 95%) shaded, and
below them a panel of the drawn forecasts' errors: the mean signed error (forecast - actual) and
the MAE at each horizon step, and the bias over all of them in its title. The x axis is the data's
time where the folder stores it, else the step. One process, Agg canvas.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from dist_gru.config import ConfigError
from dist_gru.data.batching import model_inputs
from dist_gru.infer.backtest import OriginWindows, check_origins, series_names
from dist_gru.infer.forecast import require_forecaster
from dist_gru.infer.load import command_parser, data_for_model, load_model, require_positive
from dist_gru.infer.tables import step_times
from dist_gru.tasks import task_for


def forecast_parser() -> argparse.ArgumentParser:
    parser = command_parser("dist-gru plot")
    parser.add_argument("--origins", type=int, default=3, help="forecast origins per series, the last ones (default 3)")
    parser.add_argument("--stride", type=int, help="steps between origins (default: the model's horizon)")
    parser.add_argument("--series", type=int, default=4, help="draw the first N series (default 4)")
    parser.add_argument("--ids", help="draw these series instead: comma-separated ids (or indices)")
    parser.add_argument("--out", help="folder for the PNG files (default: the model folder's run folder /plots)")
    return parser


def chosen_series(source: Any, count: int, ids: str | None) -> np.ndarray:
    """The series to draw: those named by `ids` (stored ids, else indices), or the first `count`."""
    names = series_names(source, np.arange(len(source.lengths)))
    if ids is None:
        return np.arange(min(count, len(names)))
    wanted = [name.strip() for name in ids.split(",")]
    unknown = [name for name in wanted if name not in map(str, names)]
    if unknown:
        raise ConfigError(f"--ids: no series {', '.join(map(repr, unknown))} in --data; it has {len(names)} series")
    return np.array([list(map(str, names)).index(name) for name in wanted])


@torch.no_grad()
def origin_forecasts(model: Any, origins: OriginWindows, series: int) -> list[dict]:
    """Per origin of `series`: its forecast steps (positions in the series), point forecast, interval,
    and the actual values of its horizon (the first target)."""
    task, k = task_for(model.config), origins.origins
    batch = origins.__getitems__(list(range(series * k, series * k + k)))
    out = model(**model_inputs(batch, torch.device("cpu")))[0].float()
    drawn = []
    for j, start in enumerate(origins.starts[series]):
        first = int(start) + origins.windows.window
        interval = task.interval(out[j : j + 1])
        drawn.append({
            "steps": np.arange(first, first + origins.windows.horizon),
            "point": task.point_forecast(out[j : j + 1])[0, :, 0].numpy(),
            "actual": batch["y"][j, :, 0].double().numpy(),
            "interval": None if interval is None else (interval[0][0, :, 0].numpy(), interval[1][0, :, 0].numpy(), interval[2]),
        })
    return drawn


def forecast_errors(drawn: list[dict]) -> dict[str, Any]:
    """The drawn forecasts' errors (forecast - actual): `bias` (their mean), and per horizon step
    `bias_by_step` and `mae_by_step` (means over the origins)."""
    errors = np.stack([d["point"].astype(np.float64) - d["actual"] for d in drawn])  # [origins, horizon]
    return {
        "bias": float(errors.mean()),
        "bias_by_step": errors.mean(0).tolist(),
        "mae_by_step": np.abs(errors).mean(0).tolist(),
    }


def error_panel(ax: Any, drawn: list[dict]) -> None:
    """Bars of the mean signed error per horizon step, the MAE per step as a line, the bias in the title."""
    errors = forecast_errors(drawn)
    steps = np.arange(1, len(errors["mae_by_step"]) + 1)
    ax.bar(steps, errors["bias_by_step"], color="tab:red", alpha=0.6, label="mean error (forecast - actual)")
    ax.plot(steps, errors["mae_by_step"], color="black", marker="o", linewidth=1, label="MAE")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(steps)
    ax.set_xlabel("horizon step")
    ax.set_title(f"bias {errors['bias']:+.4g} over {len(drawn)} forecasts (positive: over-forecast)")
    ax.legend(loc="upper left")


def series_figure(source: Any, series: int, name: Any, drawn: list[dict], context: int) -> Figure:
    """One series: its actual values from `context` steps before the first origin, and every forecast."""
    length = int(source.lengths[series])
    begin = max(0, int(min(d["steps"][0] for d in drawn)) - context)
    _, targets = source.read_steps(np.array([series]), np.array([begin]), 1, length - begin)
    steps = np.arange(begin, length)
    starts = getattr(source, "series_start", None)
    freq = getattr(source, "freq", None)
    axis = (lambda s: step_times(np.full(len(s), starts[series]), s, freq)) if starts is not None and freq else (lambda s: s)
    figure = Figure(figsize=(10, 6), layout="constrained")
    ax, errors = figure.subplots(2, 1, height_ratios=[2, 1])
    ax.plot(axis(steps), targets.reshape(len(steps), -1)[:, 0], color="black", linewidth=1, label="actual")
    for k, d in enumerate(drawn):
        label = "forecast" if k == 0 else None
        ax.plot(axis(d["steps"]), d["point"], color="tab:blue", linewidth=1.5, label=label)
        if d["interval"] is not None:
            low, high, what = d["interval"]
            ax.fill_between(axis(d["steps"]), low, high, color="tab:blue", alpha=0.2, label=what if k == 0 else None)
    target = (getattr(source, "target_names", None) or ["value"])[0]
    ax.set_title(f"series {name}: {target}, {len(drawn)} forecast origins")
    ax.legend(loc="upper left")
    error_panel(errors, drawn)
    return figure


def plot_forecasts(args: argparse.Namespace) -> list[Path]:
    """`dist-gru plot --model M --data DIR`: one PNG per chosen series in `--out`."""
    require_positive(args, "--origins", "--stride", "--series")
    model = load_model(args.model)
    require_forecaster(model, args.model, "dist-gru plot --model")
    _, windows = data_for_model(args, model)
    stride = args.stride or model.horizon
    check_origins(args, windows, stride)
    model.eval()
    origins = OriginWindows(windows, args.origins, stride)
    out = Path(args.out or Path(args.model).parent / "plots")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for series in chosen_series(windows.source, args.series, args.ids):
        name = series_names(windows.source, np.array([series]))[0]
        figure = series_figure(windows.source, series, name, origin_forecasts(model, origins, series), windows.window)
        paths.append(out / f"forecast-{re.sub(r'[^A-Za-z0-9_.-]', '_', str(name))}.png")
        figure.savefig(paths[-1], dpi=100)
    return paths
