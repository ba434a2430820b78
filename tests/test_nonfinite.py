"""Non-finite values stop the run (or are skipped) and are never saved, exported or printed as bare NaN.

    .venv/bin/pytest -q tests/test_nonfinite.py -n 0

The training data: 64 sequences of 6 steps, batches of 16, so an epoch is 4 steps; with the
default seed sample 31 is in the 4th step of epoch 0 (and the 6th step overall), on rank 1 of 2.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, assert_ok, cli, load_weights, read_metrics, run, save_run, torchrun_cmd

from dist_gru import cli as dist_gru_cli
from dist_gru.data import write_sequences
from dist_gru.infer import export
from dist_gru.model import GRUModel
from dist_gru.train import checkpoint as ckpt_lib
from dist_gru.train.nonfinite import EXIT_NONFINITE
from dist_gru.train.selection import Watch, save_best

BAD_SAMPLE, LENGTH = 31, 6
FILES = [
    "model.hidden_size=16",
    "model.num_layers=1",
    "data.name=files",
    "optim.warmup_steps=2",
    "train.global_batch_size=16",
    "train.max_steps=8",
    "train.log_every=4",
    "checkpoint.every=2",
    "log.mode=offline",
    "--quiet",
]
STOP_LINE = re.compile(r"^dist-gru: non-finite values at optimizer step .*$", re.M)


def _strict(line: str) -> dict:
    """json.loads that refuses NaN / Infinity, as strict parsers (and other languages) do."""

    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def _data(folder: Path, every_sequence: bool = False) -> Path:
    """A regression dataset; one NaN in sample 31's features (or in every sample's), written into
    the memory-mapped file after `write_sequences`, as a corrupted file would hold it."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, LENGTH, 2)).astype(np.float32)
    path = write_sequences(folder, x, x.sum(axis=(1, 2))[:, None], task="regression")
    features = np.load(path / "features.npy", mmap_mode="r+")
    rows = range(64) if every_sequence else [BAD_SAMPLE]
    for sample in rows:
        features[sample * LENGTH + 2, 1] = np.nan
    features.flush()
    return path


def _all_finite(folder: Path) -> bool:
    return all(bool(t.isfinite().all()) for t in load_weights(folder / "model.safetensors").values())


def _train(data: Path, run_dir: Path, *extra: str):
    return cli("train", *FILES, f"data.train_path={data}", f"train.run_dir={run_dir}", *extra, timeout=180)


def test_nan_in_a_sample_stops_before_the_update_then_skip_resumes(tmp_path: Path) -> None:
    data, run_dir = _data(tmp_path / "train"), tmp_path / "run"
    stopped = _train(data, run_dir)
    assert stopped.returncode == EXIT_NONFINITE == 3, stopped.output[-3000:]
    messages = STOP_LINE.findall(stopped.stderr)
    assert len(messages) == 1, stopped.stderr[-3000:]
    message = messages[0]
    assert "optimizer step 4:" in message and "the loss is nan on rank 0" in message
    assert f"sample {BAD_SAMPLE} of the training data has non-finite inputs ({data / 'features.npy'})" in message
    assert f"the last good checkpoint is {run_dir / 'checkpoints' / 'step-000002'}" in message
    assert "train.nonfinite=skip" in message and "Exit code 3" in message
    assert "training finished" not in stopped.output
    # Nothing saved at the bad step: the periodic checkpoint before it stays the newest, and is finite.
    assert [p.name for p in ckpt_lib.list_checkpoints(run_dir)] == ["step-000002"]
    assert not (run_dir / "model").exists()
    assert _all_finite(run_dir / "checkpoints" / "step-000002")

    # The way on that the message names: skip such steps, resuming from that checkpoint.
    skipped = assert_ok(_train(data, run_dir, "train.nonfinite=skip"))
    warnings = re.findall(r"dist-gru: warning: non-finite values at optimizer step (\d+): .*", skipped.stdout)
    assert warnings == ["4", "6"], skipped.stdout[-3000:]  # sample 31 again in epoch 1's 2nd step
    assert f"resuming from {run_dir / 'checkpoints' / 'step-000002'}" in skipped.stdout
    logged = read_metrics(run_dir)
    train = [m for m in logged if "train/loss" in m]
    assert [m["step"] for m in train] == [4, 8]
    assert all(np.isfinite(m["train/loss"]) for m in train)  # the skipped steps' NaN is not averaged in
    assert train[-1]["train/nonfinite_skips"] == 2
    assert _all_finite(run_dir / "model") and _all_finite(run_dir / "checkpoints" / "step-000008")


@pytest.mark.timeout(400)
def test_two_processes_stop_at_the_same_step_with_one_message(tmp_path: Path) -> None:
    data, run_dir = _data(tmp_path / "train"), tmp_path / "run"
    args = ("train", *FILES, f"data.train_path={data}", f"train.run_dir={run_dir}")
    result = run(torchrun_cmd(2, *args), timeout=300)
    assert result.returncode != 0
    # Both workers exit with the code (torchrun itself reports 1); neither hangs at a collective.
    assert len(re.findall(r"exitcode\s+: 3 \(pid", result.stderr)) == 2, result.stderr[-4000:]  # its failure summary
    messages = STOP_LINE.findall(result.stderr)
    assert len(messages) == 1, result.stderr[-4000:]
    assert "optimizer step 4:" in messages[0] and "the loss is nan on rank 1" in messages[0]
    assert f"sample {BAD_SAMPLE} of the training data" in messages[0]
    assert [p.name for p in ckpt_lib.list_checkpoints(run_dir)] == ["step-000002"]
    assert not (run_dir / "model").exists()


def test_skip_stops_after_max_skips_in_a_row(tmp_path: Path) -> None:
    data = _data(tmp_path / "train", every_sequence=True)
    result = _train(data, tmp_path / "run", "train.nonfinite=skip", "train.nonfinite_max_skips=2")
    assert result.returncode == EXIT_NONFINITE, result.output[-3000:]
    assert len(re.findall(r"dist-gru: warning: non-finite values at optimizer step", result.stdout)) == 2
    (message,) = STOP_LINE.findall(result.stderr)
    assert "optimizer step 3 (3 in a row, more than train.nonfinite_max_skips=2)" in message
    # Step 2's checkpoint holds the weights after 2 skipped updates (the initial ones): finite.
    assert [p.name for p in ckpt_lib.list_checkpoints(tmp_path / "run")] == ["step-000002"]
    assert _all_finite(tmp_path / "run" / "checkpoints" / "step-000002")


def test_a_diverging_loss_is_warned_about_once_per_jump(tmp_path: Path) -> None:
    result = assert_ok(
        cli(
            "train", *TINY, "optim.lr=10", "optim.grad_clip=0", "train.log_every=1", f"train.run_dir={tmp_path / 'r'}",
            timeout=180,
        )
    )
    lines = re.findall(r"^dist-gru: warning: loss .*$", result.stdout, re.M)
    # Logged losses with this seed: 0.85, 96, 5.6e3, ...: step 2 is 113x the lowest, and no later
    # one reaches 100x step 2's (the warning does not repeat for every log line).
    assert len(lines) == 1, result.stdout[-3000:]
    assert re.match(r"dist-gru: warning: loss 95\.\d+ at step 2 is 1\d\dx the lowest so far \(0\.8\d+ at step 1\)", lines[0])
    assert "optim.lr=10 " in lines[0] and "optim.grad_clip=0 clips nothing" in lines[0]
    assert _all_finite(tmp_path / "r" / "model")


def _nan_model(folder: Path | None = None, **kwargs) -> GRUModel:
    torch.manual_seed(0)
    model = GRUModel(2, 8, **kwargs)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    if folder is not None:
        model.save_pretrained(folder)
    return model


def test_savers_refuse_non_finite_weights_and_write_nothing(tmp_path: Path) -> None:
    model = _nan_model()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ckpt_lib.NonFiniteError, match=r"refusing to save checkpoint .*step-000005: 1 of \d+ tensors hold NaN or infinity \(head.weight\)"):
        ckpt_lib.save_checkpoint(tmp_path, 5, model, optimizer, {}, keep=3)
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(ckpt_lib.NonFiniteError, match="refusing to save .*best"):
        save_best(tmp_path, model, Watch("eval/loss", "min", value=1.0, step=5))
    assert list(tmp_path.iterdir()) == []

    # The optimizer state is checked too: finite weights with NaN moments are refused as well.
    finite = GRUModel(2, 8)
    optimizer = torch.optim.AdamW(finite.parameters())
    finite(torch.zeros(1, 3, 2))[0].sum().backward()
    optimizer.step()
    next(iter(optimizer.state.values()))["exp_avg"].fill_(float("inf"))
    with pytest.raises(ckpt_lib.NonFiniteError, match=r"optimizer 0/exp_avg"):
        ckpt_lib.save_checkpoint(tmp_path, 6, finite, optimizer, {}, keep=3)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_refuses_non_finite_weights_and_outputs(tmp_path: Path, fmt: str, capsys) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model.out"
    _nan_model(tmp_path / "nan")
    capsys.readouterr()
    code = dist_gru_cli.main(["export", "--model", str(tmp_path / "nan"), "--format", fmt, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    assert f"--model {tmp_path / 'nan'}: cannot export a model whose weights are not finite" in err
    assert "(head.weight)" in err

    # Finite weights whose outputs overflow: each output is inf in both runtimes, and inf - inf is
    # NaN, which a running max() took for a difference of 0.0. Every hidden unit is 0.5 after the
    # first step (zero weights, a candidate gate bias of 10: tanh saturates), so every term of the
    # head's sum is +1.5e38 and the sum overflows in any order the CPU's kernel adds them (with
    # random weights, terms of both signs overflowed on one CPU and not on another).
    torch.manual_seed(0)
    huge = GRUModel(2, 8)
    with torch.no_grad():
        for parameter in huge.encoder.rnn.parameters():
            parameter.zero_()
        huge.encoder.rnn.bias_ih_l0[16:].fill_(10.0)  # gates r, z, n: the candidate's input bias
        huge.head.weight.fill_(3e38)
    huge.save_pretrained(tmp_path / "huge")
    code = dist_gru_cli.main(["export", "--model", str(tmp_path / "huge"), "--format", fmt, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    assert "the model's own outputs hold NaN or infinity" in err
    assert list(tmp_path.glob("*.out*")) == [] and not list(tmp_path.glob(".model.out*"))


def test_the_export_check_counts_a_nan_difference_as_a_failure() -> None:
    assert export.max_difference(np.array([1.0, np.nan]), np.array([1.0, 2.0])) == float("inf")
    assert export.max_difference(np.array([np.inf]), np.array([np.inf])) == float("inf")
    assert export.max_difference(np.array([1.0, 2.5]), np.array([1.0, 2.0])) == 0.5


def test_evaluate_and_predict_print_strict_json_for_a_nan_model(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4, 2)).astype(np.float32)
    write_sequences(tmp_path / "val", x, x.sum(axis=(1, 2))[:, None], task="regression")
    model_dir = save_run(tmp_path, _nan_model(), {"model": {"hidden_size": 8}})
    evaluated = assert_ok(cli("evaluate", "--model", model_dir, "--data", str(tmp_path / "val"), timeout=120))
    metrics = _strict(evaluated.stdout.strip().splitlines()[-1])
    assert metrics["mse"] is None and metrics["loss"] is None and metrics["num_samples"] == 5
    assert {"loss", "mse", "mae"} <= set(metrics["nonfinite"])

    out = tmp_path / "pred.npy"
    capsys.readouterr()
    assert dist_gru_cli.main(["predict", "--model", model_dir, "--data", str(tmp_path / "val"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    written = _strict(captured.out.strip().splitlines()[-1])
    assert written["nonfinite_rows"] == 5 and np.isnan(np.load(out)).all()
    assert f"dist-gru: warning: 5 of 5 rows of {out} hold NaN or infinity" in captured.err


def test_forecast_says_which_series_are_not_finite(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    series = [rng.standard_normal((n, 2)).astype(np.float32) for n in (9, 8)]
    targets = [rng.standard_normal((len(s), 1)).astype(np.float32) for s in series]
    write_sequences(tmp_path / "series", series, targets, task="regression")
    model = GRUModel(3, 8, head="forecast", horizon=2)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    model_dir = save_run(tmp_path, model, {"model": {"head": "forecast"}, "data": {"window": 4, "horizon": 2}})
    out = tmp_path / "f.npy"
    capsys.readouterr()
    args = ["forecast", "--model", model_dir, "--data", str(tmp_path / "series"), "--out", str(out)]
    assert dist_gru_cli.main(args) == 0
    captured = capsys.readouterr()
    assert _strict(captured.out.strip().splitlines()[-1]) == {"out": str(out), "shape": [2, 2, 1], "nonfinite_series": 2}
    assert "the forecasts of 2 of 2 series hold NaN or infinity" in captured.err


def test_config_names_the_nonfinite_modes_and_help_describes_them(tmp_path: Path) -> None:
    result = cli("train", *TINY, "train.nonfinite=ignore", f"train.run_dir={tmp_path / 'r'}", timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.nonfinite: Input should be 'stop' or 'skip' (got 'ignore')" in result.stderr
    assert not (tmp_path / "r").exists()
    described = assert_ok(cli("train", "--help", timeout=60)).stdout
    assert "nonfinite_max_skips" in described and "exit with code 3" in described


def test_stream_mode_skip_restarts_a_lane_whose_state_is_not_finite(tmp_path: Path) -> None:
    """4 streams of 160 steps, 4 lanes of 16-step chunks: 10 steps per epoch, each lane walking one
    stream. A NaN at step 40 of stream 1 poisons the chunk that reads it; the lane's carried state
    would poison every later chunk of that stream (steps in a row), so the lane restarts from zero."""
    rng = np.random.default_rng(0)
    series = [rng.standard_normal((160, 2)).astype(np.float32) for _ in range(4)]
    targets = [s.sum(axis=1, keepdims=True) for s in series]
    path = write_sequences(tmp_path / "streams", series, targets, task="regression")
    features = np.load(path / "features.npy", mmap_mode="r+")
    features[160 + 40, 0] = np.nan
    features.flush()
    args = [
        "train", "model.hidden_size=8", "model.num_layers=1", "model.head=step", "data.name=files",
        f"data.train_path={path}", "data.targets=dataset", "train.tbptt=16", "train.global_batch_size=4",
        "train.max_steps=20", "train.log_every=5", "checkpoint.every=5", "optim.warmup_steps=2",
        "log.mode=disabled", "train.nonfinite=skip", "train.nonfinite_max_skips=2", f"train.run_dir={tmp_path / 'run'}",
        "--quiet",
    ]
    result = assert_ok(cli(*args, timeout=180))
    skips = re.findall(r"dist-gru: warning: non-finite values at optimizer step (\d+): (.*)", result.stdout)
    assert [step for step, _ in skips] == ["3", "13"], result.stdout[-3000:]  # once per epoch: chunk 2 of stream 1
    assert f"the chunk from stored row {160 + 32} of the training data has non-finite inputs" in skips[0][1]
    for checkpoint in ckpt_lib.list_checkpoints(tmp_path / "run"):
        assert _all_finite(checkpoint) and bool(load_weights(checkpoint / "lanes.safetensors")["lane_state"].isfinite().all())
