"""Draw a run's curves as PNG files from its `metrics.jsonl`: no W&B server needed.

    dist-gru plot runs/adding                 # -> runs/adding/plots/curves.png (+ one PNG per panel)
    dist-gru plot runs/adding --out /tmp/pics
    dist-gru plot --model runs/stores/model --data data/stores/val --series 4   # forecasts vs actuals

Four panels: loss (train line, eval points), the eval metric (mse or accuracy), learning rate and
throughput (samples/s), all against the optimizer step. Works on a run that is still training (a
half-written last line is ignored). Matplotlib's object API with the Agg canvas: no display, no
pyplot global state.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

PANELS = ("loss", "eval", "lr", "throughput")
EVAL_KEYS = ("eval/mse", "eval/accuracy")  # regression, classification
TITLES = {"loss": "loss", "lr": "learning rate", "throughput": "throughput (samples/s)"}

Series = dict[str, tuple[list[int], list[float]]]


class PlotError(ValueError):
    """A run folder that cannot be plotted; the message says which file and why."""


def _parse_lines(path: Path) -> list[dict]:
    text = path.read_text()
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # the unterminated last line of a run still writing
                continue
            raise PlotError(f"{path}: line {number} is not JSON: {line[:80]!r}") from None
    return rows


def load_series(run_dir: str | Path) -> Series:
    """Every numeric metric of `run_dir/metrics.jsonl` as key -> (steps, values), in file order.

    Non-finite values (written as null) are left out. Raises PlotError for a missing folder or
    file, a malformed line, or a file without any metric.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: no such run folder")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: not found (is {run_dir} a dist-gru run folder?)")
    series: Series = {}
    for row in _parse_lines(path):
        step = row.get("step")
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(step, int) and math.isfinite(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(step)
                values.append(float(value))
    if not series:
        raise PlotError(f"{path}: no metrics logged yet")
    return series


def panel_keys(panel: str, series: Series) -> list[str]:
    """The metrics a panel draws: the first as a line, any others as points on top."""
    if panel == "loss":
        return ["train/loss", "eval/loss"]
    if panel == "eval":
        return [next((k for k in EVAL_KEYS if k in series), EVAL_KEYS[0])]
    if panel == "lr":
        return ["train/lr"]
    return ["perf/samples_per_s"]


def draw_panel(ax: Axes, panel: str, series: Series) -> None:
    """One panel on `ax`; a panel without data says so instead of staying blank."""
    keys = panel_keys(panel, series)
    ax.set_title(TITLES.get(panel) or keys[0].replace("/", " "))
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    # Every panel spans the run's steps, so a metric logged rarely (eval) lines up with the others.
    steps = [s for run_steps, _ in series.values() for s in run_steps]
    pad = max(1.0, 0.03 * (max(steps) - min(steps)))
    ax.set_xlim(min(steps) - pad, max(steps) + pad)
    drawn = [k for k in keys if k in series]
    if not drawn:
        ax.text(0.5, 0.5, f"no {keys[0]} logged", ha="center", va="center", transform=ax.transAxes)
        return
    for i, key in enumerate(keys):
        if key not in series:
            continue
        steps, values = series[key]
        style = {"marker": "o", "linestyle": "none"} if i else {"marker": "." if len(steps) < 50 else None}
        ax.plot(steps, values, label=key, **style)
    values = [v for k in drawn for v in series[k][1]]
    # Losses and MSE span decades: a log axis shows late training; accuracy and LR stay linear.
    if panel in ("loss", "eval") and drawn[0] != "eval/accuracy" and min(values) > 0:
        ax.set_yscale("log")
    if len(drawn) > 1:
        ax.legend()


def curves_figure(series: Series, title: str = "") -> Figure:
    """The four panels in one 2 x 2 figure (1100 x 800 px at 100 dpi)."""
    fig = Figure(figsize=(11, 8), dpi=100, layout="constrained")
    for ax, panel in zip(fig.subplots(2, 2).flat, PANELS, strict=True):
        draw_panel(ax, panel, series)
    if title:
        fig.suptitle(title)
    return fig


def panel_figure(series: Series, panel: str) -> Figure:
    fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    draw_panel(fig.add_subplot(), panel, series)
    return fig


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write `curves.png` and one PNG per panel to `out_dir` (default `run_dir/plots`); returns the paths."""
    run_dir = Path(run_dir)
    series = load_series(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"curves": curves_figure(series, title=str(run_dir))}
    figures.update({panel: panel_figure(series, panel) for panel in PANELS})
    paths = []
    for name, fig in figures.items():
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--model" in argv:  # forecasts against actuals (dist_gru.infer.forecast_plot)
        from dist_gru.infer.forecast_plot import forecast_parser, plot_forecasts

        paths = plot_forecasts(forecast_parser().parse_intermixed_args(argv))
        print("\n".join(str(p) for p in paths), flush=True)
        return 0
    epilog = None
    if "-h" in argv or "--help" in argv:  # the forecast options need torch: imported only to show them
        from dist_gru.infer.forecast_plot import forecast_parser

        epilog = "With --model, forecasts against actuals:\n" + forecast_parser().format_help()
    parser = argparse.ArgumentParser(
        prog="dist-gru plot",
        description=__doc__.split("\n\n")[0],
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", help="a run folder (train.run_dir) holding metrics.jsonl")
    parser.add_argument("--out", help="folder for the PNG files (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except PlotError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print("\n".join(str(p) for p in paths), flush=True)
    return 0
