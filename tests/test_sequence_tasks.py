"""Per-step labelling and multi-horizon forecasting through the trainer, with real torchrun processes.

    .venv/bin/pytest -q tests/test_sequence_tasks.py -s     # -s prints the measured differences

- head `step` on variable-length sequences: ranks hold different numbers of valid steps, and the loss
  is the mean over the valid steps of the whole global batch, so 2 processes compute what 1 does;
- head `forecast` on windows drawn from long series (per-window scaling: window, last, robust, revin,
  with the loss in scaled units and the MAE): 1 vs 2 processes, and a
  run stopped mid-epoch and continued (on the same and on another world size) equals the run that
  went straight through;
- both synthetic tasks are learned clearly better than their baselines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import assert_ok, cli, load_weights, max_abs_diff, torchrun

COMMON = [
    "model.num_layers=1",
    "optim.warmup_steps=2",
    "train.global_batch_size=16",
    "train.log_every=4",
    "log.mode=disabled",
    "--quiet",
]
STEP = [
    *COMMON,
    "model.hidden_size=16",
    "model.head=step",
    "data.name=running_count",
    "data.seq_len=20",
    "data.variable_length=true",
    "data.train_size=200",
    "data.val_size=61",
    "train.max_steps=12",
]
# 16 series of 120 steps, windows of 24 + 6 at stride 1: 1456 windows, 91 steps per epoch, so the
# stop at step 8 is mid-epoch. A constant LR after warm-up makes "8 steps, then continue to 16"
# the same schedule as 16 straight.
FORECAST = [
    *COMMON,
    "model.hidden_size=16",
    "model.head=forecast",
    "data.name=seasonal",
    "data.seq_len=120",
    "data.season=12",
    "data.window=24",
    "data.horizon=6",
    "data.scaling=window",
    "data.train_size=16",
    "data.val_size=4",
    "optim.schedule=constant",
]
WEIGHT_TOL = 1e-6


def _train(nproc: int, run_dir: Path, *args: str):
    cmd = ("train", *args, f"train.run_dir={run_dir}")
    return assert_ok(torchrun(nproc, *cmd) if nproc > 1 else cli(*cmd))


def _weights(run_dir: Path) -> dict:
    return load_weights(run_dir / "model" / "model.safetensors")


@pytest.mark.timeout(400)
def test_step_head_bidirectional_variable_lengths_two_processes_train_like_one(tmp_path):
    from dist_gru.config import load_config
    from dist_gru.data.loading import TrainBatchSampler, build_dataset

    args = [*STEP, "model.bidirectional=true"]
    # The premise: in these steps the two ranks' slices hold different numbers of valid steps.
    dataset = build_dataset(load_config(None, [a for a in args if a != "--quiet"]).data, "train", head="step")
    ranks = [TrainBatchSampler(dataset.lengths, 16, 1, r, 2, 0) for r in (0, 1)]
    per_rank = [[int(dataset.lengths[s].sum()) for s in list(sampler)[:12]] for sampler in ranks]
    assert per_rank[0] != per_rank[1]

    _train(1, tmp_path / "one", *args)
    _train(2, tmp_path / "two", *args)
    diff = max_abs_diff(_weights(tmp_path / "one"), _weights(tmp_path / "two"))
    print(f"\nhead step, bidirectional, variable lengths: max |w(1 proc) - w(2 procs)| = {diff:.3g}")
    assert diff <= WEIGHT_TOL


@pytest.fixture(scope="module")
def forecast_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("forecast")
    runs = {"1x16": root / "1x16", "2x16": root / "2x16", "1x8+1x8": root / "1x8+1x8", "2x8+1x8": root / "2x8+1x8"}
    _train(1, runs["1x16"], *FORECAST, "train.max_steps=16")
    _train(2, runs["2x16"], *FORECAST, "train.max_steps=16")
    _train(1, runs["1x8+1x8"], *FORECAST, "train.max_steps=8")
    _train(2, runs["2x8+1x8"], *FORECAST, "train.max_steps=8")
    for name in ("1x8+1x8", "2x8+1x8"):
        continued = _train(1, runs[name], *FORECAST, "train.max_steps=16")
        assert "resuming from" in continued.stdout and "step-000008" in continued.stdout
    return runs


# Per-window scalers and the loss options (each a short run on 1 and on 2 processes; window: the
# resume test's runs): the loss in scaled units and the MAE keep N ranks computing what 1 does.
SCALER_RUNS = {
    "window": [],
    "last": ["model.loss_units=scaled", "model.point_loss=mae", "model.naive_terms=true"],  # the recipe's
    "robust": ["model.point_loss=mae"],
    "revin": ["model.loss_units=scaled", "model.point_loss=mae"],
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("scaling", list(SCALER_RUNS))
def test_forecast_windows_two_processes_train_like_one(request, tmp_path, scaling):
    if scaling == "window":
        runs = request.getfixturevalue("forecast_runs")
        one, two = runs["1x16"], runs["2x16"]
    else:
        args = [a for a in FORECAST if not a.startswith("data.scaling=")]
        args += [f"data.scaling={scaling}", *SCALER_RUNS[scaling], "train.max_steps=8"]
        one, two = tmp_path / "one", tmp_path / "two"
        _train(1, one, *args)
        _train(2, two, *args)
    diff = max_abs_diff(_weights(one), _weights(two))
    print(f"\nhead forecast, windows, {scaling} scaling {SCALER_RUNS[scaling]}: max |w(1 proc) - w(2 procs)| = {diff:.3g}")
    assert diff <= WEIGHT_TOL


@pytest.mark.timeout(600)
def test_windowed_run_resumed_mid_epoch_equals_the_uninterrupted_run(forecast_runs):
    same = max_abs_diff(_weights(forecast_runs["1x16"]), _weights(forecast_runs["1x8+1x8"]))
    other = max_abs_diff(_weights(forecast_runs["1x16"]), _weights(forecast_runs["2x8+1x8"]))
    print(f"\nwindowed resume at step 8 of 91 per epoch: same world size {same:.3g}, 2 -> 1 processes {other:.3g}")
    assert same == 0.0
    assert other <= WEIGHT_TOL


@pytest.mark.timeout(400)
def test_per_step_labelling_is_learned_beyond_the_memoryless_baseline(tmp_path):
    args = [arg for arg in STEP if not arg.startswith(("train.max_steps", "model.hidden_size", "data.train_size"))]
    result = _train(1, tmp_path / "run", *args, "model.hidden_size=32", "train.max_steps=150", "data.train_size=2048")
    metrics = cli("evaluate", "--model", str(tmp_path / "run" / "model"), "--data", "running_count").json_last_line()
    print(f"\nrunning_count, 150 steps: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    # Seeing only the current step, the best rule is right half the time; the majority class 3/8.
    assert metrics["accuracy"] > 0.65
    assert "final eval macro-F1" in result.stdout


@pytest.mark.timeout(400)
def test_seasonal_forecast_is_learned_beyond_the_naive_forecast(tmp_path):
    args = [arg for arg in FORECAST if not arg.startswith(("model.hidden_size", "optim.schedule"))]
    _train(1, tmp_path / "run", *args, "model.hidden_size=32", "train.max_steps=150", "train.global_batch_size=32")
    metrics = cli("evaluate", "--model", str(tmp_path / "run" / "model"), "--data", "seasonal").json_last_line()
    print(
        f"\nseasonal forecast, 150 steps: mae {metrics['mae']:.4f}, naive {metrics['naive_mae']:.4f}, "
        f"seasonal naive {metrics['seasonal_naive_mae']:.4f}, mase {metrics['mase']:.3f}"
    )
    assert np.isfinite(metrics["mase"])
    assert metrics["mae"] < 0.5 * metrics["naive_mae"]
