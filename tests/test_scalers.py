"""Input scalers (`data.scaling`: none, global, window, last, robust, revin), the forecast loss
options (`model.loss_units`, `model.point_loss`) and the forecast error reports (bias, MAE per
horizon step) of evaluate and backtest, checked against hand computations.

    .venv/bin/pytest -q tests/test_scalers.py -n 0
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, assert_ok, assert_refused, cli
from safetensors.torch import load_file

from dist_gru.config import ConfigError, load_config
from dist_gru.data.files import write_sequences
from dist_gru.model import GRUModel, Scaler
from dist_gru.model.scaler import MIN_STD, SCALINGS
from dist_gru.tasks import DataInfo, task_for

KINDS = list(SCALINGS)
PER_WINDOW = ["window", "last", "robust", "revin"]
LENGTHS = torch.tensor([9, 4, 6, 1])  # padded windows, one of a single step
GLOBAL_MEAN, GLOBAL_STD = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2.0, 0.5, 1.5])
REVIN_RAW, REVIN_BIAS = torch.tensor([1.5, -2.0, 0.3]), torch.tensor([0.4, -0.7, 1.1])


def padded_batch(dtype: torch.dtype) -> torch.Tensor:
    """[4, 9, 3] values far from 0 and 1, padding (past LENGTHS) loud: any read of it shows."""
    x = torch.randn(4, 9, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5 + 30
    x[torch.arange(9)[None, :] >= LENGTHS[:, None]] = 1e6
    return x.to(dtype)


def prepared(module: torch.nn.Module, scaler: Scaler, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` in ``dtype`` with global statistics set and RevIN's affine away from identity."""
    module.to(dtype)
    if scaler.scaling == "global":
        scaler.set_normalization(GLOBAL_MEAN, GLOBAL_STD)
    if scaler.scaling == "revin":
        with torch.no_grad():
            scaler.revin_raw_weight.copy_(REVIN_RAW)
            scaler.revin_bias.copy_(REVIN_BIAS)
    return module


def hand_statistics(kind: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(location, scale) per channel of one window's valid steps [n, F] (already globally scaled)."""
    if kind == "robust":
        low, median, high = np.quantile(values, [0.25, 0.5, 0.75], axis=0)
        return median, np.maximum(high - low, MIN_STD)
    scale = np.maximum(values.std(axis=0), MIN_STD)
    return (values[-1] if kind == "last" else values.mean(axis=0)), scale


def hand_affine(kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(global mean, global std, RevIN weight, RevIN bias) as numpy float64; identity where unused."""
    gm, gs = (GLOBAL_MEAN, GLOBAL_STD) if kind == "global" else (torch.zeros(3), torch.ones(3))
    w, b = (torch.nn.functional.softplus(REVIN_RAW.double()) + 1e-3, REVIN_BIAS) if kind == "revin" else (
        torch.ones(3), torch.zeros(3))
    return gm.double().numpy(), gs.double().numpy(), w.double().numpy(), b.double().numpy()


# --- the scalers --------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("kind", KINDS)
def test_scale_then_inverse_gives_back_the_raw_values(kind: str, dtype: torch.dtype, tolerance: float) -> None:
    scaler = Scaler(3, kind)
    prepared(scaler, scaler, dtype)
    x = padded_batch(dtype)
    scaled, lengths, affine = scaler(x, LENGTHS)
    back = scaled * affine.scale + affine.shift
    valid = torch.arange(9)[None, :] < LENGTHS[:, None]
    error = ((back - x).abs() / x.abs())[valid].max().item()  # relative: the values are ~30
    print(f"\n{kind} {dtype}: max relative round-trip error {error:.3g}")
    assert error <= tolerance
    assert torch.equal(lengths, LENGTHS)
    # The padding is never read: other padded values give the same valid scaled values.
    other = torch.where(valid[..., None], x, torch.full_like(x, -7.0))
    assert torch.equal(scaler(other, LENGTHS)[0][valid], scaled[valid])


@pytest.mark.parametrize("kind", KINDS)
def test_scaled_values_are_the_hand_computed_statistics_of_the_valid_steps(kind: str) -> None:
    """window: mean/std; last: the last VALID value/std; robust: median/IQR; revin: window's then
    x * weight + bias; a one-step window's std or IQR (0) is clamped to MIN_STD."""
    scaler = Scaler(3, kind)
    prepared(scaler, scaler, torch.float64)
    x = padded_batch(torch.float64)
    scaled = scaler(x, LENGTHS)[0].detach().numpy()
    gm, gs, w, b = hand_affine(kind)
    for i, n in enumerate(LENGTHS.tolist()):
        values = (x[i, :n].numpy() - gm) / gs
        if kind in PER_WINDOW:
            loc, scale = hand_statistics(kind, values)
            values = (values - loc) / scale * w + b
        np.testing.assert_allclose(scaled[i, :n], values, rtol=1e-12, atol=1e-12)
    if kind == "last":  # the last valid step of the 4-step window is 0 after centring, not the padding
        np.testing.assert_allclose(scaled[1, 3], 0.0, atol=1e-12)


@pytest.mark.parametrize("output", ["point", "gaussian", "quantile"])
@pytest.mark.parametrize("kind", KINDS)
def test_forecast_outputs_undo_the_affine_then_the_statistics(kind: str, output: str) -> None:
    """The head's outputs in scaled units z map back exactly: ((z - bias) / weight) * scale + loc, then
    the global statistics; a gaussian scale and quantile levels alike (a scale only by the factors)."""
    torch.manual_seed(0)
    model = GRUModel(3, 8, head="forecast", horizon=3, output_size=2, output=output, scaling=kind).eval()
    prepared(model, model.scaler, torch.float64)
    x = padded_batch(torch.float64)
    with torch.no_grad():
        got = model(x, LENGTHS)[0].numpy()
        scaled, lengths, _ = model.scaler(x, LENGTHS)
        steps, state = model.encoder(scaled, lengths, None)
        z = model.head(steps, model.encoder.summary(state), None).numpy()  # [4, 3, 2(, K)], scaled units
    gm, gs, w, b = (v[:2] for v in hand_affine(kind))
    for i, n in enumerate(LENGTHS.tolist()):
        loc, scale = np.zeros(2), np.ones(2)
        if kind in PER_WINDOW:
            loc, scale = (v[:2] for v in hand_statistics(kind, (x[i, :n, :2].numpy() - gm) / gs))
        if output == "point":
            want = (((z[i] - b) / w) * scale + loc) * gs + gm
        elif output == "quantile":
            want = (((z[i] - b[:, None]) / w[:, None]) * scale[:, None] + loc[:, None]) * gs[:, None] + gm[:, None]
        else:
            mean = (((z[i, ..., 0] - b) / w) * scale + loc) * gs + gm
            want = np.stack([mean, z[i, ..., 1] / w * scale * gs], axis=-1)
        np.testing.assert_allclose(got[i], want, rtol=1e-10, atol=1e-10)


def test_revin_weight_stays_positive_and_away_from_zero() -> None:
    scaler = Scaler(2, "revin")
    assert torch.allclose(scaler.revin_weight(), torch.ones(2))  # RevIN's start: identity
    with torch.no_grad():
        scaler.revin_raw_weight.copy_(torch.tensor([-1e4, 3.0]))
    weight = scaler.revin_weight()
    assert weight[0].item() == pytest.approx(1e-3) and weight[1].item() == pytest.approx(math.log1p(math.e**3) + 1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_a_copied_model_folder_scales_and_forecasts_the_same(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GRUModel(3, 8, head="forecast", horizon=2, output="quantile", scaling=kind).eval()
    prepared(model, model.scaler, torch.float32)
    model.save_pretrained(tmp_path / "model")
    shutil.copytree(tmp_path / "model", tmp_path / "copy")
    shutil.rmtree(tmp_path / "model")
    loaded = GRUModel.from_pretrained(str(tmp_path / "copy"))
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert config.get("scaling", "none") == kind and loaded.scaler.scaling == kind
    x = padded_batch(torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(x, LENGTHS)[0], model(x, LENGTHS)[0])


def test_target_scale_is_the_statistics_without_the_learned_affine() -> None:
    model = GRUModel(3, 8, head="forecast", horizon=2, output_size=2, scaling="revin").double()
    prepared(model, model.scaler, torch.float64)
    x = padded_batch(torch.float64)
    shift, scale = model.target_scale(x, LENGTHS)
    assert shift.shape == scale.shape == (4, 1, 2) and not shift.requires_grad
    for i, n in enumerate(LENGTHS.tolist()):
        loc, spread = hand_statistics("window", x[i, :n].numpy())
        np.testing.assert_allclose(shift[i, 0].numpy(), loc[:2], rtol=1e-12)
        np.testing.assert_allclose(scale[i, 0].numpy(), spread[:2], rtol=1e-12)


# --- loss options -------------------------------------------------------------------------------

FORECAST = {"task": "regression", "head": "forecast", "horizon": 2, "output_size": 1, "scaling": "window"}
# Two windows: outputs and targets [2 windows, 2 steps, 1], and their units (shift, scale) [2, 1, 1].
OUT = torch.tensor([[[3.0], [5.0]], [[100.0], [130.0]]])
TARGET = torch.tensor([[[1.0], [6.0]], [[110.0], [100.0]]])
UNITS = (torch.tensor([[[2.0]], [[100.0]]]), torch.tensor([[[2.0]], [[10.0]]]))


def test_scaled_mse_weighs_every_window_by_its_own_scale() -> None:
    raw = task_for(FORECAST)
    scaled = task_for({**FORECAST, "loss_units": "scaled"})
    # raw: (2^2 + 1^2) / 2 + (10^2 + 30^2) / 2 = 2.5 + 500; scaled: errors / 2 and / 10.
    assert raw.loss_sum(OUT, TARGET)[0].item() == pytest.approx(502.5)
    total, units = scaled.loss_sum(OUT, TARGET, None, UNITS)
    assert units == 2 and total.item() == pytest.approx((1.0 + 0.25) / 2 + (1.0 + 9.0) / 2)
    with pytest.raises(ValueError, match="loss_units='scaled': the loss needs the units of every window"):
        scaled.loss_sum(OUT, TARGET)


def test_point_loss_mae_is_the_mean_absolute_error_in_either_units() -> None:
    mae = task_for({**FORECAST, "point_loss": "mae"})
    assert mae.loss_sum(OUT, TARGET)[0].item() == pytest.approx((2 + 1) / 2 + (10 + 30) / 2)
    scaled = task_for({**FORECAST, "point_loss": "mae", "loss_units": "scaled"})
    assert scaled.loss_sum(OUT, TARGET, None, UNITS)[0].item() == pytest.approx((1 + 0.5) / 2 + (1 + 3) / 2)
    # Evaluation reports the same loss (over the units), beside the usual errors.
    sums = scaled.metric_sums()
    sums.update(OUT, TARGET, None, torch.zeros(2, 3, 1), UNITS)
    assert sums.results()["loss"] == pytest.approx(((1 + 0.5) / 2 + (1 + 3) / 2) / 2)
    head_last = task_for({"task": "regression", "output_size": 1, "point_loss": "mae"})
    assert head_last.loss_sum(torch.tensor([[1.0], [4.0]]), torch.tensor([[2.0], [1.0]]))[0].item() == 4.0


@pytest.mark.parametrize("output", ["gaussian", "quantile"])
def test_scaled_loss_of_gaussian_and_quantile_outputs_maps_every_value(output: str) -> None:
    config = {**FORECAST, "output": output, "quantiles": [0.1, 0.5, 0.9], "loss_units": "scaled"}
    if output == "gaussian":  # (mean, scale) -> ((mean - shift) / s, scale / s)
        out = torch.stack([OUT, torch.full_like(OUT, 4.0)], -1)
        mean, spread = (OUT - UNITS[0]) / UNITS[1], 4.0 / UNITS[1]
        z = (TARGET - UNITS[0]) / UNITS[1]
        want = (torch.log(spread) + 0.5 * ((z - mean) / spread) ** 2 + 0.5 * math.log(2 * math.pi)).mean((1, 2))
    else:
        out = torch.stack([OUT - 1, OUT, OUT + 1], -1)
        levels = torch.tensor([0.1, 0.5, 0.9])
        diff = ((TARGET - UNITS[0]) / UNITS[1]).unsqueeze(-1) - (out - UNITS[0].unsqueeze(-1)) / UNITS[1].unsqueeze(-1)
        want = torch.maximum(levels * diff, (levels - 1) * diff).mean((1, 2, 3))
    assert task_for(config).loss_sum(out, TARGET, None, UNITS)[0].item() == pytest.approx(want.sum().item(), rel=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.loss_units=scaled", "data.scaling=window"], "model.loss_units=scaled with model.head=last"),
        (["model.loss_units=scaled", "model.head=forecast", "data.window=8", "data.horizon=2"],
         "model.loss_units=scaled with data.scaling=none: there are no scaler units"),
        (["model.point_loss=mae", "model.output=quantile"], "model.point_loss=mae with model.output=quantile"),
        (["model.point_loss=huber"], "model.point_loss: Input should be 'mse' or 'mae'"),
        (["data.scaling=last", "data.normalize=true"], "data.normalize=true means data.scaling=global, but"),
    ],
)
def test_config_refuses_loss_options_that_cannot_apply(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, overrides)


def test_mae_is_refused_for_classification_data() -> None:
    data = DataInfo(source="data.name=adding", task="classification", target_kind="sequence", output_size=3)
    with pytest.raises(ConfigError, match="model.point_loss=mae needs a regression task, but data.name=adding is a "
                                          "classification task with 3 classes"):
        task_for({"task": "classification", "output_size": 3, "point_loss": "mae"}).check_fits(data)


def test_a_bogus_scaling_is_one_clear_error(tmp_path: Path) -> None:
    result = cli("train", *TINY, "data.scaling=bogus", f"train.run_dir={tmp_path / 'run'}")
    assert_refused(result, "data.scaling: Input should be 'none', 'global', 'window', 'last', 'robust' or 'revin'",
                   "(got 'bogus')")
    assert not (tmp_path / "run").exists()


# --- reports: bias and the error per horizon step -----------------------------------------------

WINDOW, HORIZON, STEP_VALUES = 4, 3, [1.0, 2.0, 3.0]


def known_forecaster(folder: Path) -> None:
    """A forecaster of 1 target + 1 covariate that forecasts 1, 2, 3 at horizon steps 1, 2, 3
    whatever its input (zero head weights, the values as the head's bias, no scaling)."""
    model = GRUModel(2, 4, head="forecast", horizon=HORIZON, data={"season": 1, "window": WINDOW, "window_stride": 1})
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor(STEP_VALUES))
    model.save_pretrained(folder)


def series_folder(folder: Path) -> list[np.ndarray]:
    """Two series of 10 and 12 steps (targets i**1.5 / 10 + series), one covariate; returns the targets."""
    targets = [(np.arange(n) ** 1.5 / 10 + s).astype(np.float32)[:, None] for s, n in enumerate((10, 12))]
    write_sequences(folder, [np.ones((len(t), 1), np.float32) for t in targets], targets, task="regression")
    return targets


def hand_errors(targets: list[np.ndarray], starts: list[list[int]]) -> dict:
    """bias and MAE per step of the known forecaster over the windows starting at `starts` per series."""
    errors = np.array([[STEP_VALUES[h] - t[s + WINDOW + h, 0] for h in range(HORIZON)]
                       for t, own in zip(targets, starts, strict=True) for s in own], dtype=np.float64)
    return {"bias": errors.mean(), "mae_by_step": np.abs(errors).mean(0).tolist(), "mae": np.abs(errors).mean()}


def test_evaluate_and_backtest_report_bias_and_the_error_per_step(tmp_path: Path) -> None:
    known_forecaster(tmp_path / "model")
    targets = series_folder(tmp_path / "series")
    model, data = str(tmp_path / "model"), str(tmp_path / "series")
    metrics = assert_ok(cli("evaluate", "--model", model, "--data", data)).json_last_line()
    every = hand_errors(targets, [list(range(len(t) - WINDOW - HORIZON + 1)) for t in targets])
    print(f"\nevaluate: bias {metrics['bias']}, by step {metrics['mae_by_step']}; by hand {every}")
    assert metrics["bias"] == pytest.approx(every["bias"], rel=1e-6)
    assert metrics["mae_by_step"] == pytest.approx(every["mae_by_step"], rel=1e-6)
    assert metrics["mae"] == pytest.approx(every["mae"], rel=1e-6)

    table = tmp_path / "table.csv"
    record = assert_ok(cli("backtest", "--model", model, "--data", data, "--origins", "2",
                           "--out", str(table))).json_last_line()
    last = [[len(t) - WINDOW - HORIZON - k * HORIZON for k in range(2)] for t in targets]
    pooled = hand_errors(targets, last)
    assert record["bias"] == pytest.approx(pooled["bias"], rel=1e-6)
    assert record["mae_by_step"] == pytest.approx(pooled["mae_by_step"], rel=1e-6)
    rows = list(csv.DictReader(table.open()))
    assert [c for c in rows[0] if c.startswith("mae_step_") or c == "bias"] == ["bias", *(f"mae_step_{h}" for h in (1, 2, 3))]
    for row, target, own in zip(rows, targets, last, strict=True):
        mine = hand_errors([target], [own])
        assert float(row["bias"]) == pytest.approx(mine["bias"], rel=1e-6)
        assert [float(row[f"mae_step_{h}"]) for h in (1, 2, 3)] == pytest.approx(mine["mae_by_step"], rel=1e-6)


def test_training_with_revin_scaled_mae_loss_saves_a_folder_that_evaluates_the_same_copied(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*TINY, "data.name=seasonal", "data.seq_len=60", "data.season=6", "data.window=12", "data.horizon=3",
            "model.head=forecast", "data.scaling=revin", "model.loss_units=scaled", "model.point_loss=mae",
            "train.max_steps=6", "log.mode=disabled", f"train.run_dir={run}"]
    assert_ok(cli("train", *args))
    config = json.loads((run / "model" / "config.json").read_text())
    assert (config["scaling"], config["loss_units"], config["point_loss"]) == ("revin", "scaled", "mae")
    weights = load_file(run / "model" / "model.safetensors")
    assert not torch.allclose(weights["scaler.revin_raw_weight"], Scaler(3, "revin").revin_raw_weight)  # trained
    shutil.copytree(run / "model", tmp_path / "copy")
    here = assert_ok(cli("evaluate", "--model", str(run / "model"), "--data", "seasonal")).json_last_line()
    copied = assert_ok(cli("evaluate", "--model", str(tmp_path / "copy"), "--data", "seasonal")).json_last_line()
    assert copied == here
    assert len(here["mae_by_step"]) == 3 and "bias" in here


# The recommended forecasting recipe on seasonal series with a trend (the `seasonal` task): the
# forecasts must not over- or under-shoot as a whole. Per-window mean scaling pulled forecasts toward
# the window's mean (half a window behind the origin) and every model over-shot a rising series.
# Measured (seeds 0-2, 8 validation series, lr 1e-3 decayed to 0, naive terms): |bias| / MAE 0.009, 0.014, 0.001.
BIAS_BOUND = 0.35  # |mean signed error| at most this share of the MAE


def test_the_recommended_forecast_recipe_learns_a_trend_and_season_without_bias(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert_ok(
        cli(
            "train", "--config", "configs/forecast.yaml", "data.train_size=64", "data.val_size=8",
            "train.global_batch_size=32", "train.max_steps=600", "train.eval_every=0",
            "checkpoint.every=0", "log.mode=disabled", f"train.run_dir={run_dir}", "--quiet",
        )  # fmt: skip
    )
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    mae, bias = final["eval/mae"], final["eval/bias"]
    assert mae < 0.5 * final["eval/naive_mae"], final  # it learned the season and the trend
    assert abs(bias) <= BIAS_BOUND * mae, final
