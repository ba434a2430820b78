"""`dist-gru plot`: PNG curves from metrics.jsonl, the plotted data equal to the file, clear errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, assert_ok, cli, read_metrics
from matplotlib.image import imread

from dist_gru.plot import PANELS, curves_figure, load_series, main, plot_run

pytestmark = pytest.mark.timeout(60)  # units; each real run sets its own, longer limit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _series(metrics: list[dict], key: str) -> list[tuple[float, float]]:
    return [(m["step"], m[key]) for m in metrics if m.get(key) is not None]


def _lines(ax) -> dict[str, list[tuple[float, float]]]:
    return {line.get_label(): [tuple(p) for p in line.get_xydata().tolist()] for line in ax.get_lines()}


def _write_metrics(run_dir, rows, tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


@pytest.mark.timeout(180)
def test_plot_of_a_real_run_writes_pngs_whose_curves_are_the_metrics(tmp_path):
    run_dir = tmp_path / "run"
    assert_ok(cli("train", *TINY, f"train.run_dir={run_dir}", "train.eval_every=4", "log.mode=disabled"))
    result = assert_ok(cli("plot", str(run_dir)))
    names = ["curves", *PANELS]
    paths = [run_dir / "plots" / f"{name}.png" for name in names]
    assert result.stdout.split() == [str(p) for p in paths]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size > 10_000, path  # drawn curves, not an empty canvas
    assert imread(paths[0]).shape == (800, 1100, 4)
    assert imread(paths[1]).shape == (400, 600, 4)

    # The figure draws exactly what metrics.jsonl holds.
    metrics = read_metrics(run_dir)
    fig = curves_figure(load_series(run_dir))
    loss, evaluation, lr, throughput = fig.axes
    assert _lines(loss) == {"train/loss": _series(metrics, "train/loss"), "eval/loss": _series(metrics, "eval/loss")}
    assert _lines(evaluation) == {"eval/mse": _series(metrics, "eval/mse")}
    assert _lines(lr) == {"train/lr": _series(metrics, "train/lr")}
    assert _lines(throughput) == {"perf/samples_per_s": _series(metrics, "perf/samples_per_s")}
    assert [len(v) for v in _lines(loss).values()] == [3, 3]
    assert loss.get_yscale() == "log" and lr.get_yscale() == "linear"


def test_load_series_skips_nulls_and_a_half_written_last_line(tmp_path):
    rows = [
        {"step": 10, "train/loss": 0.5, "train/grad_norm": None, "train/lr": 1e-3},
        {"step": 10, "eval/accuracy": 0.25, "eval/num_samples": 64},
        {"step": 20, "train/loss": 0.25, "train/grad_norm": 1.5, "train/lr": 2e-3},
    ]
    _write_metrics(tmp_path, rows, tail='{"step": 30, "train/lo')  # a run still writing
    series = load_series(tmp_path)
    assert series["train/loss"] == ([10, 20], [0.5, 0.25])
    assert series["train/grad_norm"] == ([20], [1.5])
    assert series["eval/accuracy"] == ([10], [0.25])
    assert "step" not in series


def test_classification_run_plots_accuracy_on_a_linear_axis_and_marks_missing_panels(tmp_path):
    rows = [{"step": s, "train/loss": 1.0 / s} for s in (1, 2, 3)] + [{"step": 3, "eval/accuracy": 0.75}]
    _write_metrics(tmp_path, rows)
    paths = plot_run(tmp_path, tmp_path / "pics")
    assert [p.name for p in paths] == ["curves.png", "loss.png", "eval.png", "lr.png", "throughput.png"]
    assert all(p.parent == tmp_path / "pics" and p.read_bytes()[:8] == PNG_SIGNATURE for p in paths)
    loss, evaluation, lr, throughput = curves_figure(load_series(tmp_path)).axes
    assert evaluation.get_title() == "eval accuracy" and evaluation.get_yscale() == "linear"
    # One eval point at step 3 still sits on the same step axis as the loss of steps 1-3.
    assert {ax.get_xlim() for ax in (loss, evaluation, lr, throughput)} == {loss.get_xlim()}
    assert loss.get_xlim()[0] < 1 and loss.get_xlim()[1] > 3
    assert _lines(evaluation) == {"eval/accuracy": [(3.0, 0.75)]}
    # No LR or throughput logged: the panel says so rather than staying blank.
    assert _lines(lr) == {} and [t.get_text() for t in lr.texts] == ["no train/lr logged"]
    assert [t.get_text() for t in throughput.texts] == ["no perf/samples_per_s logged"]
    np.testing.assert_allclose(_lines(loss)["train/loss"], [(1, 1.0), (2, 0.5), (3, 1 / 3)])


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing_dir", "no such run folder"),
        ("no_metrics", "metrics.jsonl: not found (is "),
        ("empty", "metrics.jsonl: no metrics logged yet"),
        ("bad_line", "metrics.jsonl: line 2 is not JSON: 'not json'"),
    ],
)
def test_unplottable_run_folders_exit_2_with_one_line(tmp_path, capsys, setup, message):
    run_dir = tmp_path / "run"
    if setup != "missing_dir":
        run_dir.mkdir()
    if setup == "empty":
        (run_dir / "metrics.jsonl").write_text("\n")
    if setup == "bad_line":
        (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\nnot json\n{"step": 2}\n')
    assert main([str(run_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    assert message in captured.err
    assert not (run_dir / "plots").exists()


@pytest.mark.timeout(60)
def test_plot_command_reports_a_missing_folder_through_the_cli(tmp_path):
    result = cli("plot", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path / 'nope'}: no such run folder\n"


def test_forecasts_against_actuals_one_png_per_series_with_the_models_interval(tmp_path):
    """`dist-gru plot --model M --data D`: the chosen series' last steps and the forecasts of their
    last origins, shaded between the outer quantile levels of a quantile model."""
    from conftest import assert_refused

    from dist_gru.data.loading import build_dataset
    from dist_gru.infer.backtest import OriginWindows
    from dist_gru.infer.forecast_plot import forecast_errors, origin_forecasts
    from dist_gru.infer.load import inference_config, load_model

    run = tmp_path / "run"
    args = [*TINY, "data.name=seasonal", "data.seq_len=80", "data.season=6", "data.window=12", "data.horizon=4",
            "model.head=forecast", "model.output=quantile", "train.max_steps=8", "log.mode=disabled",
            f"train.run_dir={run}"]
    assert_ok(cli("train", *args))
    result = assert_ok(cli("plot", "--model", str(run / "model"), "--data", "seasonal", "--series", "2",
                           "--out", str(tmp_path / "pics")))
    paths = result.stdout.strip().splitlines()[-2:]
    assert [Path(p).name for p in paths] == ["forecast-0.png", "forecast-1.png"]
    assert all(Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    picked = assert_ok(cli("plot", "--model", str(run / "model"), "--data", "seasonal", "--ids", "5",
                           "--out", str(tmp_path / "one")))
    assert picked.stdout.strip().splitlines()[-1].endswith("forecast-5.png")
    assert_refused(cli("plot", "--model", str(run / "model"), "--data", "seasonal", "--ids", "999",
                       "--out", str(tmp_path / "none")), "--ids: no series '999'")
    # What is drawn: each origin's horizon steps, its median, and the q0.1..q0.9 band around it.
    model = load_model(run / "model").eval()
    namespace = argparse.Namespace(model=str(run / "model"), data="seasonal", config=None, overrides=[])
    windows = build_dataset(inference_config(namespace, model).data, "val", head="forecast")
    origins = OriginWindows(windows, 2, 4)
    drawn = origin_forecasts(model, origins, 0)
    assert [d["steps"].tolist() for d in drawn] == [[76, 77, 78, 79], [72, 73, 74, 75]]
    with torch.no_grad():
        out = model(origins.__getitems__([0, 1])["x"])[0]  # [2 origins, 4 steps, 1, levels 0.1 0.5 0.9]
    low, high, label = drawn[1]["interval"]
    assert label == "q0.1 to q0.9"
    np.testing.assert_array_equal(low, out[1, :, 0, 0].numpy())
    np.testing.assert_array_equal(drawn[1]["point"], out[1, :, 0, 1].numpy())
    np.testing.assert_array_equal(high, out[1, :, 0, 2].numpy())
    # The error panel: the drawn forecasts' bias and MAE per horizon step against the actual values.
    actual = origins.__getitems__([0, 1])["y"][:, :, 0].double().numpy()
    np.testing.assert_array_equal(drawn[1]["actual"], actual[1])
    errors = forecast_errors(drawn)
    signed = out[:, :, 0, 1].double().numpy() - actual
    assert errors["bias"] == pytest.approx(signed.mean(), rel=1e-12)
    assert errors["mae_by_step"] == pytest.approx(np.abs(signed).mean(0).tolist(), rel=1e-12)
    assert errors["bias_by_step"] == pytest.approx(signed.mean(0).tolist(), rel=1e-12)
