"""Future-known covariates: values known for the forecast horizon (a planned promotion, a calendar)
reach the forecast head, scaled like their channel of the input; a model that reads them learns
what a model without them cannot, forecasts with them from a folder (`dist-gru forecast --future`),
and N processes compute what 1 computes.

    .venv/bin/pytest -q tests/test_future_covariates.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    TINY,
    assert_ok,
    assert_refused,
    cli,
    load_weights,
    max_abs_diff,
    one_and_two_processes,
    read_metrics,
    run_all,
)

from dist_gru.config import load_config
from dist_gru.data.files import write_sequences
from dist_gru.data.loading import build_dataset
from dist_gru.data.synthetic import PromoDataset
from dist_gru.model import GRUModel

PROMO = [
    "data.name=promo",
    "data.seq_len=120",
    "data.window=24",
    "data.horizon=6",
    "model.head=forecast",
]
# 256 series of 120 steps, 24-step context, 6-step horizon: a few seconds per run on 2 cores.
TRAIN = [
    *PROMO,
    "data.train_size=256",
    "data.val_size=64",
    "model.hidden_size=32",
    "model.num_layers=1",
    "train.global_batch_size=32",
    "train.max_steps=300",
    "train.eval_every=300",
    "train.log_every=50",
    "optim.lr=0.01",
    "optim.warmup_steps=20",
    "log.mode=disabled",
    "train.threads=1",
]


def test_forecast_windows_carry_the_planned_values_of_the_horizon():
    cfg = load_config(None, [*PROMO, "data.train_size=4", "data.val_size=2"])
    windows = build_dataset(cfg.data, "train", head="forecast")
    assert windows.future_columns == [0] and windows.future_channels == [1]  # x = [history, promo]
    batch = windows.__getitems__([0, 7, 300])
    seq, starts = windows.locate(np.array([0, 7, 300]))
    features, targets = PromoDataset(4, 120, cfg.data.seed).read_steps(seq, starts, 30, 30)
    np.testing.assert_array_equal(batch["future"].numpy(), features[:, 24:])
    np.testing.assert_array_equal(batch["x"].numpy(), np.concatenate([targets[:, :24], features[:, :24]], axis=2))
    np.testing.assert_array_equal(batch["y"].numpy(), targets[:, 24:])
    cfg = load_config(None, [*PROMO, "data.train_size=4", "data.val_size=2", "data.future_covariates=false"])
    plain = build_dataset(cfg.data, "train", head="forecast")
    assert plain.future_channels == [] and "future" not in plain.__getitems__([0, 7, 300])


def test_future_values_take_the_global_scaling_of_their_channel():
    """The planned values are scaled with the training statistics of their channel, never per
    window: a promotion flag that is 0 over a whole context window still gives a sane forecast for
    a planned promotion (per-window scaling would divide by a zero spread)."""
    torch.manual_seed(0)
    model = GRUModel(2, 8, head="forecast", horizon=3, scaling="window", future_channels=[1]).eval()
    model.set_normalization([0.0, 0.2], [1.0, 0.4])
    x, future = torch.randn(4, 10, 2), torch.ones(4, 3, 1)
    x[..., 1] = 0.0  # no promotion in the context
    with torch.no_grad():
        planned = model.scaler.future(future, [1], 3)
        torch.testing.assert_close(planned, torch.full((4, 3), (1.0 - 0.2) / 0.4))
        out = model(x, future=future)[0]
        assert out.abs().max() < 10 and (model(x, future=0 * future)[0] - out).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"reads the horizon's future covariates \[batch, 3, 1\]; none given"):
        model(x)
    with pytest.raises(ValueError, match=r"future must have shape \[batch, 3, 1\], got \(4, 2, 1\)"):
        model(x, future=future[:, :2])
    assert GRUModel(2, 8, head="forecast", horizon=3).config.get("future_channels") is None
    assert model.config["future_channels"] == [1]


@pytest.fixture(scope="module")
def promo_runs(tmp_path_factory):
    """One model trained with the planned values of the horizon, one without them."""
    root = tmp_path_factory.mktemp("promo")
    cmds = [
        [*cli_cmd("train", *TRAIN, f"train.run_dir={root / name}", f"data.future_covariates={flag}")]
        for name, flag in (("with", "true"), ("without", "false"))
    ]
    for result in run_all(cmds, timeout=600):
        assert_ok(result)
    return root


def cli_cmd(*args: str) -> list[str]:
    from conftest import PY

    return [PY, "-m", "dist_gru", *args]


def final_eval(run_dir: Path) -> dict:
    return [line for line in read_metrics(run_dir) if "eval/mae" in line][-1]


def test_a_planned_covariate_carries_the_signal(promo_runs):
    """The promotion lift (1 to 2 on a fifth of the steps) is unpredictable without the plan: the
    model that reads the horizon's flags forecasts far better than the one that cannot."""
    with_plan, without = final_eval(promo_runs / "with"), final_eval(promo_runs / "without")
    print(f"\npromo forecast MAE: {with_plan['eval/mae']:.4f} with the plan, {without['eval/mae']:.4f} without")
    assert with_plan["eval/mae"] < 0.5 * without["eval/mae"]
    assert without["eval/mae"] < without["eval/naive_mae"]  # it still learns the level
    config = json.loads((promo_runs / "with" / "model" / "config.json").read_text())
    assert config["future_channels"] == [1] and "future_channels" not in json.loads(
        (promo_runs / "without" / "model" / "config.json").read_text()
    )


def test_forecast_reads_the_future_values_and_refuses_without_them(promo_runs, tmp_path):
    rng = np.random.default_rng(0)
    lengths = (40, 31, 55)
    promo = [(rng.random(n) < 0.2).astype(np.float32)[:, None] for n in lengths]
    series = [(0.5 + 1.5 * p[:, 0] + 0.1 * rng.standard_normal(len(p))).astype(np.float32) for p in promo]
    write_sequences(tmp_path / "shop", promo, series, task="regression")
    model = promo_runs / "with" / "model"
    out = tmp_path / "f.npy"
    refused = cli("forecast", "--model", str(model), "--data", str(tmp_path / "shop"), "--out", str(out))
    assert_refused(refused, "reads future-known covariates over the horizon (feature 0)", "--future FILE", "[3, 6, 1]")
    assert not out.exists()
    plans = {}
    for name, value in (("none", 0.0), ("all", 1.0)):
        np.save(tmp_path / f"{name}.npy", np.full((3, 6, 1), value, dtype=np.float32))
        plans[name] = tmp_path / f"{name}.npy"
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 5, 1), dtype=np.float32))
    assert_refused(
        cli("forecast", "--model", str(model), "--data", str(tmp_path / "shop"), "--out", str(out), "--future", str(bad)),
        f"--future {bad}: float32 [3, 5, 1]; expected numbers [num_series, horizon, future covariates] = [3, 6, 1]",
    )
    forecasts = {}
    for name, plan in plans.items():
        args = ("forecast", "--model", str(model), "--data", str(tmp_path / "shop"), "--future", str(plan))
        assert_ok(cli(*args, "--out", str(tmp_path / f"{name}-out.npy")))
        forecasts[name] = np.load(tmp_path / f"{name}-out.npy")
    lift = float((forecasts["all"] - forecasts["none"]).mean())
    print(f"\nforecast with a promotion planned on every step minus none planned: {lift:.3f} (true lift 1.5)")
    assert 0.7 < lift < 2.0
    copied = tmp_path / "elsewhere" / "model"
    shutil.copytree(model, copied)
    args = ("forecast", "--model", str(copied), "--data", str(tmp_path / "shop"), "--future", str(plans["all"]))
    assert_ok(cli(*args, "--out", str(tmp_path / "copied.npy")))
    np.testing.assert_array_equal(np.load(tmp_path / "copied.npy"), forecasts["all"])
    without = promo_runs / "without" / "model"
    assert_refused(
        cli("forecast", "--model", str(without), "--data", str(tmp_path / "shop"), "--out", str(out), "--future", str(bad)),
        "the model reads no future-known covariates given by a file; leave it out",
    )
    table = cli("predict", "--model", str(model), "--data", str(tmp_path / "shop"), "--out", str(tmp_path / "p.csv"))
    assert_refused(table, "a forecast model's rows are whole horizons")
    export = cli("export", "--model", str(model), "--format", "torchscript", "--out", str(tmp_path / "m.pt"))
    assert_refused(export, "future-known covariates")


def test_two_processes_train_like_one_with_future_covariates(tmp_path):
    args = [*TINY, *PROMO, "data.train_size=64", "data.val_size=16", "train.max_steps=12", "log.mode=disabled"]
    args += ["data.scaling=global", "train.eval_every=12"]
    diff = max_abs_diff(*one_and_two_processes(tmp_path, *args))
    print(f"\nfuture covariates, 12 steps: max |w(1 proc) - w(2 procs)| = {diff:.3g}")
    assert diff <= 1e-5
    evals = [final_eval(tmp_path / run) for run in ("one", "two")]
    assert abs(evals[0]["eval/mae"] - evals[1]["eval/mae"]) <= 1e-6


def test_a_copied_model_folder_evaluates_as_the_run_does(promo_runs, tmp_path):
    """Whether the model reads the planned values travels with the model folder, not the run's config."""
    for name in ("with", "without"):
        copied = tmp_path / name / "model"
        shutil.copytree(promo_runs / name / "model", copied)
        original = assert_ok(cli("evaluate", "--model", str(promo_runs / name / "model"), "--data", "promo"))
        elsewhere = assert_ok(cli("evaluate", "--model", str(copied), "--data", "promo"))
        assert original.stdout.splitlines()[-1] == elsewhere.stdout.splitlines()[-1]
        assert json.loads(elsewhere.stdout.splitlines()[-1])["mae"] == pytest.approx(final_eval(promo_runs / name)["eval/mae"])


@pytest.mark.parametrize("task", ["promo", "stores"])
def test_a_resumed_run_with_covariates_equals_the_uninterrupted_one(task, tmp_path):
    """Future-known (promo) and static (stores) covariates: 6 steps, then the same run raised to 12
    resumes from its checkpoint and ends with the weights of 12 steps in one go."""
    args = [*TINY, f"data.name={task}", "data.seq_len=60", "data.window=12", "data.horizon=4", "model.head=forecast",
            "data.train_size=64", "data.val_size=8", "data.scaling=global", "log.mode=disabled", "checkpoint.every=6",
            "optim.schedule=constant"]  # a cosine schedule follows max_steps, which the resumed run raises
    assert_ok(cli("train", *args, "train.max_steps=12", f"train.run_dir={tmp_path / 'once'}"))
    assert_ok(cli("train", *args, "train.max_steps=6", f"train.run_dir={tmp_path / 'twice'}"))
    resumed = assert_ok(cli("train", *args, "train.max_steps=12", f"train.run_dir={tmp_path / 'twice'}"))
    assert "resuming from" in resumed.stdout and "(step 6)" in resumed.stdout
    once, twice = (load_weights(tmp_path / run / "model" / "model.safetensors") for run in ("once", "twice"))
    assert max_abs_diff(once, twice) == 0.0
