"""A model folder is all inference needs: copied away from its run folder (no config.yaml next to
it), `evaluate`, `forecast`, `predict` and `export` give what they give on the run's own folder.

    .venv/bin/pytest -q tests/test_model_folder.py -n 0 -s     # -s prints the metrics compared

The facts of the data a model was trained on (context window and stride, season, the synthetic
generator's parameters, stream settings) are in the model's config.json (`data`), not only in the
run's config.yaml.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_ok, cli

from dist_gru.train import checkpoint as ckpt_lib

COMMON = [
    "model.hidden_size=8",
    "model.num_layers=1",
    "optim.warmup_steps=2",
    "train.global_batch_size=16",
    "train.log_every=4",
    "log.mode=disabled",
    "--quiet",
]
SEASON, WINDOW, HORIZON = 6, 12, 3


def _seasonal_series(path: Path, count: int, length: int, seed: int) -> None:
    """Series of period SEASON plus noise, per-step targets, one covariate."""
    from dist_gru.data.files import write_sequences

    rng = np.random.default_rng(seed)
    t = np.arange(length)
    targets = [
        (3 * np.sin(2 * np.pi * (t + rng.integers(SEASON)) / SEASON) + 0.3 * rng.standard_normal(length))
        .astype(np.float32)[:, None]
        for _ in range(count)
    ]
    features = [rng.standard_normal((length, 1)).astype(np.float32) for _ in range(count)]
    write_sequences(path, features, targets, task="regression")


def _copy(model_dir: Path, to: Path) -> Path:
    """`cp -r RUN/model ELSEWHERE/model`: the copy has no run folder around it."""
    shutil.copytree(model_dir, to / "model")
    assert not (to / "config.yaml").exists()
    return to / "model"


@pytest.fixture(scope="module")
def forecaster(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("forecaster")
    _seasonal_series(root / "train", 8, 60, seed=0)
    _seasonal_series(root / "val", 4, 60, seed=1)
    args = [
        *COMMON,
        "model.head=forecast",
        "data.name=files",
        f"data.train_path={root / 'train'}",
        f"data.val_path={root / 'val'}",
        f"data.window={WINDOW}",
        f"data.horizon={HORIZON}",
        "data.window_stride=2",
        f"data.season={SEASON}",
        "train.max_steps=8",
    ]
    assert_ok(cli("train", *args, f"train.run_dir={root / 'run'}"))
    return root / "run" / "model", root


def test_a_copied_forecaster_evaluates_and_forecasts_like_its_run_folder(forecaster, tmp_path):
    model_dir, root = forecaster
    copy = _copy(model_dir, tmp_path / "elsewhere")
    val = str(root / "val")
    original = assert_ok(cli("evaluate", "--model", str(model_dir), "--data", val)).json_last_line()
    copied = cli("evaluate", "--model", str(copy), "--data", val)
    print(f"\nevaluate, run's model folder: {json.dumps(original)}\nevaluate, copied folder: {copied.output[-400:]}")
    assert_ok(copied)
    assert copied.json_last_line() == original
    # The season is the model's (the seasonal-naive baseline is not the naive one) ...
    assert original["seasonal_naive_mae"] != original["naive_mae"]
    # ... and a command-line override still wins over it.
    season1 = assert_ok(cli("evaluate", "--model", str(copy), "--data", val, "data.season=1")).json_last_line()
    print(f"mase: season {SEASON} {original['mase']:.4f}, override data.season=1 {season1['mase']:.4f}")
    assert season1["seasonal_naive_mae"] == pytest.approx(season1["naive_mae"])
    assert season1["mase"] != original["mase"] and season1["mae"] == original["mae"]

    outs = [tmp_path / "original.npy", tmp_path / "copied.npy"]
    for folder, out in zip((model_dir, copy), outs, strict=True):
        assert_ok(cli("forecast", "--model", str(folder), "--data", val, "--out", str(out)))
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert np.load(outs[0]).shape == (4, HORIZON, 1)


def test_the_model_config_and_the_export_metadata_carry_the_data_facts(forecaster, tmp_path):
    from dist_gru.infer import export

    model_dir, _ = forecaster
    facts = {"window": WINDOW, "window_stride": 2, "season": SEASON}
    config = json.loads((model_dir / "config.json").read_text())
    assert config["data"] == facts
    out = tmp_path / "model.pt"
    assert_ok(cli("export", "--model", str(_copy(model_dir, tmp_path)), "--format", "torchscript", "--out", str(out)))
    meta = export.read_metadata(out, "torchscript")
    assert meta["data"] == facts and meta["model_config"]["data"] == facts


@pytest.mark.timeout(400)
def test_a_copied_classifier_evaluates_and_predicts_like_its_run_folder(tmp_path):
    # Windows of synthetic series labelled by their last step: the generator's parameters, the
    # window and its stride all come from the run's config at training time.
    args = [
        *COMMON,
        "data.name=running_count",
        "data.seq_len=20",
        "data.train_size=96",
        "data.val_size=24",
        "data.seed=7",
        "data.window=8",
        "data.window_stride=3",
        "train.max_steps=6",
        "checkpoint.every=3",
    ]
    run = tmp_path / "run"
    assert_ok(cli("train", *args, f"train.run_dir={run}"))
    copy = _copy(run / "model", tmp_path / "elsewhere")
    original = assert_ok(cli("evaluate", "--model", str(run / "model"), "--data", "running_count")).json_last_line()
    copied = cli("evaluate", "--model", str(copy), "--data", "running_count")
    print(f"\nevaluate, run's model folder: {json.dumps(original)}\nevaluate, copied folder: {copied.output[-400:]}")
    assert_ok(copied)
    assert copied.json_last_line() == original
    outs = [tmp_path / "original.npy", tmp_path / "copied.npy"]
    for folder, out in zip((run / "model", copy), outs, strict=True):
        assert_ok(cli("predict", "--model", str(folder), "--data", "running_count", "--out", str(out)))
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert np.load(outs[0]).shape == (24 * 5,)  # 24 val series of 20 steps: windows at 0, 3, 6, 9, 12 of each


def test_a_checkpoint_saved_before_models_carried_data_facts_still_resumes(tmp_path):
    args = [
        *COMMON,
        "data.name=running_count",
        "data.seq_len=12",
        "data.train_size=64",
        "data.val_size=16",
        "model.head=step",
        "checkpoint.every=3",
    ]
    run = tmp_path / "run"
    assert_ok(cli("train", *args, "train.max_steps=3", f"train.run_dir={run}"))
    step = run / "checkpoints" / "step-000003"
    # Rewrite the checkpoint as an older release wrote it: no `data` in its model config.
    state = json.loads((step / "state.json").read_text())
    assert state["model_config"].pop("data")["season"] == 1
    (step / "state.json").write_text(json.dumps(state))
    marker = json.loads((step / ckpt_lib.MARKER).read_text())
    marker["state.json"] = {"bytes": (step / "state.json").stat().st_size, "sha256": ckpt_lib.sha256_file(step / "state.json")}
    (step / ckpt_lib.MARKER).write_text(json.dumps(marker))
    resumed = assert_ok(cli("train", *args, "train.max_steps=6", f"train.run_dir={run}"))
    assert "resuming from" in resumed.stdout and "step-000003" in resumed.stdout
    assert json.loads((run / "model" / "config.json").read_text())["data"]["synthetic"]["seq_len"] == 12


@pytest.mark.timeout(400)
def test_a_copied_stream_model_evaluates_like_its_run_folder(tmp_path):
    # Stream mode: the chunk length and the number of lanes the validation stream is split into
    # (the run's train.tbptt and train.global_batch_size) and next-byte targets come with the model.
    rng = np.random.default_rng(0)
    words = [b"the ", b"model ", b"folder ", b"carries ", b"its ", b"data. "]
    (tmp_path / "text.txt").write_bytes(b"".join(words[i] for i in rng.integers(0, len(words), 600)))
    assert_ok(cli("prepare", "--text", str(tmp_path / "text.txt"), "--out", str(tmp_path / "bytes"), "--val-fraction", "0.2"))
    run = tmp_path / "run"
    train = [
        "--config", "configs/bytes.yaml", f"data.train_path={tmp_path / 'bytes' / 'train'}",
        f"data.val_path={tmp_path / 'bytes' / 'val'}", "model.hidden_size=16", "model.embedding_dim=8",
        "train.tbptt=12", "train.global_batch_size=6", "train.max_steps=6", "train.eval_every=0", "checkpoint.every=0",
    ]
    assert_ok(cli("train", *train, f"train.run_dir={run}", "--quiet"))
    copy = _copy(run / "model", tmp_path / "elsewhere")
    val = str(tmp_path / "bytes" / "val")
    original = assert_ok(cli("evaluate", "--model", str(run / "model"), "--data", val)).json_last_line()
    copied = cli("evaluate", "--model", str(copy), "--data", val)
    print(f"\nevaluate, run's model folder: {json.dumps(original)}\nevaluate, copied folder: {copied.output[-400:]}")
    assert_ok(copied)
    assert copied.json_last_line() == original
    assert json.loads((copy / "config.json").read_text())["data"]["stream"] == {"tbptt": 12, "lanes": 6, "targets": "next"}


def test_a_model_that_does_not_fit_the_data_is_one_error_line(tmp_path):
    """A folder saved without its data facts (head last, one output per sequence), given per-step
    data: evaluate and predict refuse it as training would, in one line, and write nothing."""
    import numpy as np
    import torch

    from dist_gru.data import write_sequences
    from dist_gru.model import GRUModel

    rng = np.random.default_rng(0)
    write_sequences(
        tmp_path / "steps",
        [rng.standard_normal((n, 2)).astype(np.float32) for n in (5, 7)],
        [rng.integers(0, 3, n) for n in (5, 7)],
        task="classification",
        num_classes=3,
    )
    torch.manual_seed(0)
    GRUModel(2, 8, task="classification", output_size=3).save_pretrained(tmp_path / "model")
    expected = (
        f"model.head=last needs one target per sequence, but {tmp_path / 'steps'} has a target at every step"
    )
    for command in (["evaluate"], ["predict", "--out", str(tmp_path / "out.npy")]):
        result = cli(*command, "--model", str(tmp_path / "model"), "--data", str(tmp_path / "steps"))
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and expected in result.stderr, result.stderr
    assert not (tmp_path / "out.npy").exists()
