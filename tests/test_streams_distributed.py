"""Stream mode with real torchrun processes on gloo: 1 vs 2 processes, mid-epoch resume on the same and
on another world size (the carried lane state is in the checkpoint, re-sharded on load), and the
command-line errors of stream mode.

    .venv/bin/pytest -q tests/test_streams_distributed.py -s     # -s prints the measured differences

A byte-level model (2 layers, dropout 0.3 between them) on a small generated text: 4 lanes of
16-byte chunks, 11 steps per epoch, 14 steps (the runs cross into epoch 1). Each run checkpoints
every 6 steps; a copy of its folder without the checkpoints after step 6 (and without the final
model) resumes at step 6, mid-epoch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_ok, cli, load_weights, max_abs_diff, torchrun

from dist_gru.data.streams import write_token_stream

STEPS, STOP = 14, 6
BASE = [
    "model.vocab_size=256",
    "model.embedding_dim=8",
    "model.hidden_size=16",
    "model.num_layers=2",
    "model.dropout=0.3",  # keyed by (seed, step, chunk position): the same masks on any world size
    "model.head=step",
    "data.name=files",
    "data.targets=next",
    "train.tbptt=16",
    "train.global_batch_size=4",
    "train.log_every=7",
    "train.eval_every=0",
    f"checkpoint.every={STOP}",
    "optim.warmup_steps=2",
    "optim.schedule=constant",
    "optim.lr=1e-3",
    "log.mode=disabled",
    "--quiet",
]
# Measured: 1.7e-6, one element of weight_hh_l1 ([23, 12]), the same after 1, 2 and 4 steps. Its
# gradient at step 0 is 3.1e-9 (the median element's: 2.2e-4), under Adam's eps of 1e-8, where the
# first update turns a summation-order difference of the gradient into that. Masks drawn from each
# rank's RNG instead: 6.4e-3 after 4 steps.
TOL = 1e-5


def _text(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    words = [b"stream ", b"lane ", b"state ", b"chunk ", b"gru\n"]
    return np.frombuffer(b"".join(words[i] for i in rng.integers(0, len(words), n)), dtype=np.uint8)[:700]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bytes")
    write_token_stream(root / "train", _text(200, 0), 256)  # 699 trained steps: 44 chunks, 11 steps per epoch
    write_token_stream(root / "val", _text(60, 1)[:200], 256)
    return root


def _args(data: Path, run_dir: Path, steps: int) -> list[str]:
    return [
        "train",
        *BASE,
        f"data.train_path={data / 'train'}",
        f"data.val_path={data / 'val'}",
        f"train.max_steps={steps}",
        f"train.run_dir={run_dir}",
    ]


def _train(nproc: int, data: Path, run_dir: Path):
    args = _args(data, run_dir, STEPS)
    result = assert_ok(torchrun(nproc, *args) if nproc > 1 else cli(*args))
    assert f"world_size={nproc} " in result.stdout
    return result


def _weights(run_dir: Path) -> dict:
    return load_weights(run_dir / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream-runs")
    for nproc in (1, 2):
        _train(nproc, data, root / f"full{nproc}")
    return {"full1": root / "full1", "full2": root / "full2"}


def _stopped_copy(run_dir: Path, dest: Path) -> Path:
    """`run_dir` as it was after step STOP: later checkpoints and the final model removed."""
    shutil.copytree(run_dir, dest)
    shutil.rmtree(dest / "model")
    for ckpt in (dest / "checkpoints").iterdir():
        if int(ckpt.name.removeprefix("step-")) > STOP:
            shutil.rmtree(ckpt)
    return dest


@pytest.mark.timeout(600)
def test_one_and_two_processes_train_the_same_weights_in_stream_mode(runs):
    diff = max_abs_diff(_weights(runs["full1"]), _weights(runs["full2"]))
    print(f"\nMEASURED stream mode, 1 vs 2 processes, {STEPS} steps: max abs weight diff {diff:.3g}")
    assert diff < TOL
    # The weights moved after step STOP: the resume comparisons below are not vacuous.
    at_stop = load_weights(runs["full1"] / "checkpoints" / f"step-{STOP:06d}" / "model.safetensors")
    assert max_abs_diff(_weights(runs["full1"]), at_stop) > 1e-4


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("before", "after"), [(2, 2), (2, 1), (1, 2)])
def test_mid_epoch_resume_continues_the_carried_state(runs, data, tmp_path, before, after):
    run_dir = _stopped_copy(runs[f"full{before}"], tmp_path / "resumed")
    result = _train(after, data, run_dir)
    assert f"(step {STOP})" in result.stdout  # "resuming from ... (step 6)"
    diff = max_abs_diff(_weights(run_dir), _weights(runs[f"full{after}"]))
    print(f"\nMEASURED stream mode, stopped at step {STOP} on {before}, resumed on {after}: max abs diff {diff:.3g}")
    if before == after:
        assert diff == 0.0
    else:
        assert diff < TOL


def test_stream_checkpoint_holds_every_lane(runs):
    import json

    from safetensors.torch import load_file

    ckpt = runs["full2"] / "checkpoints" / f"step-{STOP:06d}"
    lanes = load_file(str(ckpt / "lanes.safetensors"))["lane_state"]
    state = json.loads((ckpt / "state.json").read_text())
    assert tuple(lanes.shape) == (4, 2, 16)  # every global lane (2 layers), saved by 2 ranks
    assert float(lanes.abs().sum()) > 0
    assert [p[1] for p in state["lanes"]["positions"]] == [(lane * 11 + STOP) * 16 for lane in range(4)]


# ------------------------------------------------------------------------------ bad input


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.bidirectional=true"], "train.tbptt=16 with model.bidirectional=true: a state carried forward"),
        (
            ["model.head=forecast", "data.window=8", "data.horizon=2"],
            "train.tbptt=16 with model.head=forecast: stream mode trains an output at every step",
        ),
        (["train.global_batch_size=64"], "train.global_batch_size=64 lanes, but an epoch of the training streams has only 44 chunks"),
        (["model.vocab_size=100"], "is outside the model's vocabulary, model.vocab_size=100; expected ids in [0, 100)"),
    ],
)
def test_stream_mode_bad_input_is_one_error_and_changes_nothing(data, tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("untouched")
    before = _snapshot(tmp_path) | _snapshot(data)
    result = cli(*_args(data, run_dir, 4), *overrides)
    assert result.returncode == 2, result.output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert message in result.stderr, result.stderr[-3000:]
    assert _snapshot(tmp_path) | _snapshot(data) == before


def test_validation_tokens_outside_the_vocabulary_refuse_the_job_before_it_trains(data, tmp_path):
    """The validation streams are checked against the model as the training streams are, so an id
    the embedding cannot take stops the job at start, not at its first evaluation."""
    write_token_stream(tmp_path / "val", np.frombuffer(b"abc\xfa", dtype=np.uint8), 256)
    run_dir = tmp_path / "run"
    result = cli(*_args(data, run_dir, 4), f"data.val_path={tmp_path / 'val'}", "model.vocab_size=128")
    assert result.returncode == 2, result.output[-3000:]
    # The training ids are plain text (< 128); the validation stream holds 250.
    assert f"{tmp_path / 'val'}: token id 250 is outside the model's vocabulary, model.vocab_size=128" in result.stderr
    assert not run_dir.exists()
