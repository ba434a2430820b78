"""End-to-end: the real CLI trains, evaluates and predicts; bad input fails clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import REPO, TINY, assert_ok, cli, read_metrics, torchrun
from wandb_reader import find_offline_runs

pytestmark = pytest.mark.timeout(300)


def test_two_process_run_writes_the_whole_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    result = assert_ok(torchrun(2, "train", *TINY, f"train.run_dir={run_dir}", "checkpoint.every=4"))
    out = result.stdout
    assert "world_size=2" in out and "backend=gloo" in out and "wrapper=DistributedDataParallel" in out
    assert "per_rank_batch=8" in out
    # The resolved config is saved and printed once (by the main process only).
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 12 and saved["model"]["hidden_size"] == 16
    assert out.count("run_dir:") == 1
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics if "train/loss" in m] == [4, 8, 12]
    assert all(np.isfinite(m["train/loss"]) for m in metrics if "train/loss" in m)
    assert {"eval/loss", "eval/mse", "eval/mae"} <= set(metrics[-1])
    assert (run_dir / "model" / "config.json").is_file() and (run_dir / "model" / "model.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000004", "step-000008", "step-000012"]
    assert len(find_offline_runs(run_dir)) == 1
    for label in ("final eval mse:", "run folder:", "checkpoint:", "metrics:", "W&B run:"):
        assert label in out


def test_adding_problem_is_learned_well_below_the_baseline(tmp_path):
    run_dir = tmp_path / "run"
    assert_ok(
        cli(
            "train",
            "--config",
            str(REPO / "configs/adding.yaml"),
            "--quiet",
            f"train.run_dir={run_dir}",
            "data.seq_len=20",
            "data.train_size=20000",
            "data.val_size=500",
            "model.hidden_size=32",
            "train.max_steps=300",
            "train.eval_every=0",
            "checkpoint.every=0",
            "log.mode=disabled",
        )
    )
    final = read_metrics(run_dir)[-1]
    assert final["eval/mse"] < 0.03, final  # predicting 1 always gives 0.167


def test_seed_example_config_runs_and_learns(tmp_path):
    run_dir = tmp_path / "seed"
    assert_ok(
        cli(
            "train",
            "--config",
            str(REPO / "configs/seed_example.yaml"),
            "--quiet",
            f"train.run_dir={run_dir}",
            "log.mode=disabled",
        )
    )
    losses = [m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m]
    assert len(losses) == 10 and np.mean(losses[-3:]) < np.mean(losses[:3])
    cfg = json.loads((run_dir / "model" / "config.json").read_text())
    assert (cfg["input_size"], cfg["hidden_size"], cfg["output_size"]) == (10, 20, 1)


def _classification_files(tmp_path):
    from dist_gru.data import write_sequences

    rng = np.random.default_rng(0)

    def make(n):
        lengths = rng.integers(3, 16, n)
        seqs = [rng.standard_normal((length, 3)).astype(np.float32) for length in lengths]
        labels = np.array([int(s[:, 0].sum() > 0) + int(s[:, 1].mean() > 0.3) for s in seqs])
        return seqs, labels

    write_sequences(tmp_path / "train", *make(1024), task="classification", num_classes=3)
    write_sequences(tmp_path / "val", *make(200), task="classification", num_classes=3)


def test_file_backed_variable_length_classification_trains_and_evaluates(tmp_path):
    _classification_files(tmp_path)
    run_dir = tmp_path / "run"
    overrides = [
        "data.name=files",
        f"data.train_path={tmp_path / 'train'}",
        f"data.val_path={tmp_path / 'val'}",
        "data.normalize=true",
        "model.hidden_size=32",
        "model.num_layers=1",
        "optim.lr=1e-2",
        "train.global_batch_size=32",
        "train.max_steps=150",
        "train.log_every=50",
        "log.mode=disabled",
        f"train.run_dir={run_dir}",
        "--quiet",
    ]
    assert_ok(torchrun(2, "train", *overrides))
    trained = read_metrics(run_dir)[-1]
    assert trained["eval/accuracy"] > 0.6  # majority class is about 0.5

    result = assert_ok(cli("evaluate", "--model", str(run_dir / "model"), "--data", str(tmp_path / "val")))
    metrics = result.json_last_line()
    assert metrics["num_samples"] == 200
    assert metrics["accuracy"] == pytest.approx(trained["eval/accuracy"], abs=1e-9)
    assert metrics["loss"] == pytest.approx(trained["eval/loss"], rel=1e-5)

    out = tmp_path / "pred.npy"
    assert_ok(cli("predict", "--model", str(run_dir / "model"), "--data", str(tmp_path / "val"), "--out", str(out)))
    pred = np.load(out)
    labels = np.load(tmp_path / "val" / "targets.npy")
    assert pred.shape == (200,) and (pred == labels).mean() == pytest.approx(metrics["accuracy"])


def test_evaluate_synthetic_uses_the_runs_config(tmp_path):
    run_dir = tmp_path / "run"
    assert_ok(cli("train", *TINY, f"train.run_dir={run_dir}", "log.mode=disabled"))
    result = assert_ok(cli("evaluate", "--model", str(run_dir / "model"), "--data", "adding"))
    metrics = result.json_last_line()
    final = read_metrics(run_dir)[-1]
    assert metrics["num_samples"] == 64
    assert metrics["mse"] == pytest.approx(final["eval/mse"], rel=1e-6)


def test_bad_config_fails_before_any_work_with_every_problem(tmp_path):
    run_dir = tmp_path / "never"
    result = cli(
        "train",
        f"train.run_dir={run_dir}",
        "optim.lr=-1",
        "model.hiden_size=3",
        "train.precision=fp8",
        "train.max_steps=ten",
    )
    assert result.returncode == 2
    err = result.stderr
    assert "optim.lr: Input should be greater than 0 (got -1)" in err
    assert "model.hiden_size: unknown key" in err and "hidden_size" in err
    assert "train.precision: Input should be 'fp32', 'bf16' or 'fp16' (got 'fp8')" in err
    assert "train.max_steps: Input should be a valid integer (got 'ten')" in err
    assert "Traceback" not in err
    assert not run_dir.exists()


def test_bad_yaml_and_missing_config_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    result = cli("train", "--config", str(bad))
    assert result.returncode == 2 and "not valid YAML" in result.stderr
    result = cli("train", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "cannot read the file" in result.stderr


def test_fp16_on_cpu_is_rejected(tmp_path):
    result = cli("train", *TINY, "train.precision=fp16", f"train.run_dir={tmp_path / 'r'}")
    assert result.returncode == 2
    assert "train.precision=fp16: fp16 mixed precision needs a GPU" in result.stderr


def test_world_size_must_divide_the_batch(tmp_path):
    result = torchrun(2, "train", *TINY, "train.global_batch_size=15", f"train.run_dir={tmp_path / 'r'}")
    assert result.returncode != 0
    assert "15 processes" not in result.output and "which 2 processes cannot split evenly" in result.output


def test_malformed_data_file_gives_one_clear_message(tmp_path):
    _classification_files(tmp_path)
    (tmp_path / "train" / "meta.json").write_text("{not json")
    result = cli(
        "train", *TINY, "data.name=files", f"data.train_path={tmp_path / 'train'}", f"train.run_dir={tmp_path / 'r'}"
    )
    assert result.returncode == 2
    assert "meta.json" in result.stderr and "Traceback" not in result.stderr


def test_train_help_lists_every_key_with_default_and_description():
    from dist_gru.config import Config

    result = assert_ok(cli("train", "--help"))
    for section, field in Config.model_fields.items():
        for name, sub in field.annotation.model_fields.items():
            assert f"{section}.{name} = " in result.stdout
            assert sub.description in result.stdout


def test_top_level_help_and_unknown_command():
    assert "train" in assert_ok(cli("--help")).stdout
    result = cli("fly")
    assert result.returncode == 2 and "unknown command 'fly'" in result.stderr
