"""Checkpoint files in-process: atomic layout, pruning, corrupt-folder handling, safe loading, markers.

    .venv/bin/pytest -q tests/test_checkpoint.py

The end-to-end behaviour (real runs that are killed, signalled and resumed) is in test_resume.py.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch

from dist_gru.model import GRUModel
from dist_gru.train import checkpoint as ckpt_lib
from dist_gru.train.checkpoint import Checkpoint, CheckpointError

pytestmark = pytest.mark.timeout(60)

MODEL_CONFIG = {
    "input_size": 2,
    "hidden_size": 8,
    "num_layers": 1,
    "dropout": 0.0,
    "task": "regression",
    "output_size": 1,
    "cell": "torch",
}


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and an Adam optimizer with real state (one step taken)."""
    torch.manual_seed(0)
    model = GRUModel(**MODEL_CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, lengths = torch.randn(4, 5, 2), torch.tensor([5, 4, 3, 5])
    model(x, lengths)[0].pow(2).mean().backward()
    optimizer.step()
    return model, optimizer


def _state(**extra) -> dict:
    return {
        "epoch": 1,
        "samples_seen": 7 * 16,
        "world_size": 2,
        "config_digest": "0123456789abcdef",
        "task": "regression",
        "model_config": MODEL_CONFIG,
        "tracker_run_id": "abcd1234",
        "scaler": None,
        **extra,
    }


def _save(run_dir: Path, step: int, keep: int = 10) -> Path:
    model, optimizer = _trained()
    return ckpt_lib.save_checkpoint(run_dir, step, model, optimizer, _state(), keep)


def _names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_lib.checkpoint_dir(run_dir).iterdir())


def test_save_is_atomic_and_writes_a_readable_state(tmp_path):
    path = _save(tmp_path, 7)
    assert path == tmp_path / "checkpoints" / "step-000007"
    assert _names(tmp_path) == ["step-000007"]  # no temporary folder left behind
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "model.safetensors", "optimizer.pt", "state.json"]
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 7 and state["epoch"] == 1 and state["samples_seen"] == 112
    assert state["world_size"] == 2 and state["config_digest"] == "0123456789abcdef"
    assert state["task"] == "regression" and state["model_config"] == MODEL_CONFIG
    assert state["tracker_run_id"] == "abcd1234" and state["scaler"] is None
    marker = json.loads((path / "COMPLETE").read_text())
    assert sorted(marker) == ["model.safetensors", "optimizer.pt", "state.json"]
    assert all(marker[name]["bytes"] == (path / name).stat().st_size for name in marker)


def test_saved_checkpoint_round_trips_model_and_optimizer(tmp_path):
    model, optimizer = _trained()
    path = ckpt_lib.save_checkpoint(tmp_path, 3, model, optimizer, _state(), keep=2)
    torch.manual_seed(1)
    fresh = GRUModel(**MODEL_CONFIG)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    ckpt_lib.load_weights(ckpt_lib.verify(path), fresh, fresh_opt)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    saved, loaded = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key]["exp_avg_sq"], loaded[key]["exp_avg_sq"])
        assert float(saved[key]["step"]) == float(loaded[key]["step"]) == 1.0


def test_keep_last_k(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    assert _names(tmp_path) == ["step-000004", "step-000005"]
    assert ckpt_lib.find_latest(tmp_path).step == 5


def test_pruning_never_deletes_the_checkpoint_just_saved(tmp_path):
    # A run resumed from step 10 (past a broken step-20) saves step 12 below the higher step-20:
    # with keep=1, pruning by step alone would delete step 12 and keep only the broken folder.
    _save(tmp_path, 10)
    broken = _save(tmp_path, 20)
    (broken / "model.safetensors").write_bytes(b"")
    _save(tmp_path, 12, keep=1)
    assert _names(tmp_path) == ["step-000012", "step-000020"]
    assert ckpt_lib.find_latest(tmp_path).step == 12


def test_keep_one_keeps_the_newest_complete_one_and_ignores_unfinished_saves(tmp_path):
    _save(tmp_path, 1)
    (ckpt_lib.checkpoint_dir(tmp_path) / ".tmp-step-000003-999").mkdir()  # a save in flight or crashed
    _save(tmp_path, 2, keep=1)
    assert _names(tmp_path) == [".tmp-step-000003-999", "step-000002"]
    assert [p.name for p in ckpt_lib.list_checkpoints(tmp_path)] == ["step-000002"]


def _truncate_weights(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _flip_optimizer_byte(path: Path) -> None:
    data = bytearray((path / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "optimizer.pt").write_bytes(bytes(data))


def _delete_marker(path: Path) -> None:
    (path / "COMPLETE").unlink()


def _garble_marker(path: Path) -> None:
    (path / "COMPLETE").write_text("{not json")


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_truncate_weights, "model.safetensors has"),
        (_flip_optimizer_byte, "optimizer.pt does not match its sha256"),
        (_delete_marker, "no COMPLETE marker"),
        (_garble_marker, "unreadable COMPLETE marker"),
    ],
)
def test_find_latest_skips_a_broken_newest_checkpoint_with_a_warning(tmp_path, caplog, damage, reason):
    _save(tmp_path, 4)
    newest = _save(tmp_path, 8)
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="dist_gru.train.checkpoint"):
        found = ckpt_lib.find_latest(tmp_path)
    assert found is not None and found.step == 4 and found.path.name == "step-000004"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(newest) in warnings[0] and reason in warnings[0]
    with pytest.raises(CheckpointError, match=reason) as err:
        ckpt_lib.verify(newest)  # named explicitly: an error, never a fallback
    assert str(newest) in str(err.value)


def test_find_latest_with_nothing_usable(tmp_path):
    assert ckpt_lib.find_latest(tmp_path) is None
    _delete_marker(_save(tmp_path, 1))
    assert ckpt_lib.find_latest(tmp_path) is None


def test_an_explicit_path_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint .*/nope: not a folder"):
        ckpt_lib.verify(tmp_path / "nope")
    path = _save(tmp_path, 2)
    (path / "state.json").unlink()
    with pytest.raises(CheckpointError, match="state.json is missing"):
        ckpt_lib.verify(path)


def test_check_compatible_names_every_mismatched_field(tmp_path):
    ckpt = ckpt_lib.verify(_save(tmp_path, 1))
    ckpt_lib.check_compatible(ckpt, {"task": "regression", **MODEL_CONFIG})  # the same job: no error
    job = {**MODEL_CONFIG, "hidden_size": 32, "input_size": 3, "task": "classification"}
    with pytest.raises(CheckpointError) as err:
        ckpt_lib.check_compatible(ckpt, job)
    message = str(err.value)
    assert "step-000001 does not fit this job" in message
    assert "hidden_size: checkpoint has 8, this job has 32" in message
    assert "input_size: checkpoint has 2, this job has 3" in message
    assert "task: checkpoint has 'regression', this job has 'classification'" in message
    assert "num_layers" not in message  # only the fields that differ
    # A field added after the checkpoint was written (absent from its model_config) is not a mismatch.
    ckpt_lib.check_compatible(ckpt, {"task": "regression", **MODEL_CONFIG, "bidirectional": False})


def test_check_compatible_leaves_the_models_data_facts_out(tmp_path):
    # What inference needs to know of the data (window, season) is no part of the model's shape: a
    # checkpoint with other facts, or none (saved before models carried them), fits the job.
    job = {"task": "regression", **MODEL_CONFIG, "data": {"season": 12, "window": 24, "window_stride": 1}}
    ckpt_lib.check_compatible(ckpt_lib.verify(_save(tmp_path / "old", 1)), job)
    model, optimizer = _trained()
    state = _state(model_config={**MODEL_CONFIG, "data": {"season": 7}})
    ckpt = ckpt_lib.verify(ckpt_lib.save_checkpoint(tmp_path / "new", 1, model, optimizer, state, 10))
    ckpt_lib.check_compatible(ckpt, job)


class _Bomb:
    """Unpickling this would run a shell command (the classic malicious checkpoint)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def _plant_bomb(path: Path, target: Path) -> None:
    # torch.save's own zip format, so the loader gets past the container and meets the pickled call.
    torch.save({"state": _Bomb(target), "param_groups": []}, path / "optimizer.pt")


def test_pickle_bomb_is_refused_by_the_marker_and_by_the_loader(tmp_path):
    target = tmp_path / "pwned"
    path = _save(tmp_path, 5)
    _plant_bomb(path, target)
    # The marker check refuses it before any loader runs.
    with pytest.raises(CheckpointError, match="optimizer.pt has .* bytes, the marker says"):
        ckpt_lib.verify(path)
    assert ckpt_lib.find_latest(tmp_path) is None
    # Even with a forged marker that matches the bomb, torch.load(weights_only=True) refuses it.
    marker = json.loads((path / "COMPLETE").read_text())
    marker["optimizer.pt"] = {
        "bytes": (path / "optimizer.pt").stat().st_size,
        "sha256": ckpt_lib.sha256_file(path / "optimizer.pt"),
    }
    (path / "COMPLETE").write_text(json.dumps(marker))
    ckpt = ckpt_lib.verify(path)
    model, optimizer = _trained()
    with pytest.raises(CheckpointError, match=r"optimizer.pt refused by torch.load\(weights_only=True\)"):
        ckpt_lib.load_weights(ckpt, model, optimizer)
    assert not target.exists()


def test_loader_errors_are_checkpoint_errors(tmp_path):
    path = _save(tmp_path, 1)
    _truncate_weights(path)
    model, optimizer = _trained()
    with pytest.raises(CheckpointError, match="model.safetensors is unreadable"):
        ckpt_lib.load_weights(Checkpoint(path, {}), model, optimizer)  # the loader alone, no marker check
    other = GRUModel(**{**MODEL_CONFIG, "hidden_size": 4})
    with pytest.raises(CheckpointError, match=r"(?s)does not fit this model/optimizer.*size mismatch"):
        ckpt_lib.load_weights(ckpt_lib.verify(_save(tmp_path, 2)), other, torch.optim.AdamW(other.parameters()))


def test_preemption_marker(tmp_path):
    assert ckpt_lib.read_preempted(tmp_path) is None
    path = _save(tmp_path, 9)
    ckpt_lib.mark_preempted(tmp_path, path, 9, signal.SIGUSR1)
    info = ckpt_lib.read_preempted(tmp_path)
    assert info["step"] == 9 and info["checkpoint"] == str(path)
    assert info["signal"] == "SIGUSR1" and info["exit_code"] == ckpt_lib.EXIT_PREEMPTED == 75
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # written atomically
    ckpt_lib.mark_preempted(tmp_path, path, 9, 0)  # a rank that only heard of a peer's signal
    assert ckpt_lib.read_preempted(tmp_path)["signal"] is None
    ckpt_lib.clear_preempted(tmp_path)
    ckpt_lib.clear_preempted(tmp_path)  # idempotent
    assert ckpt_lib.read_preempted(tmp_path) is None


class _Crash(BaseException):
    """A process dying at one point of a save (BaseException: nothing in the writer may catch it)."""


def _crash_at(monkeypatch, point: int) -> list[str]:
    """Make the `point`-th rename or removal of the checkpoint writer die; returns the calls seen."""
    calls: list[str] = []
    real_replace, real_rmtree = os.replace, ckpt_lib.shutil.rmtree

    def step(name, real):
        def wrapped(*args, **kwargs):
            calls.append(f"{name}({Path(args[0]).name})")
            if len(calls) == point + 1:
                raise _Crash(calls[-1])
            return real(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(ckpt_lib.os, "replace", step("replace", real_replace))
    monkeypatch.setattr(ckpt_lib.shutil, "rmtree", step("rmtree", real_rmtree))
    return calls


def test_resaving_a_step_with_keep_1_leaves_a_loadable_checkpoint_whatever_the_crash_point(tmp_path, monkeypatch):
    """A signal right after a periodic save writes the same step again. The old folder moves aside
    and the new one takes its name; a crash at any rename or removal leaves a complete checkpoint of
    that step, the only one there is with checkpoint.keep=1."""
    points = []
    for point in range(20):
        run_dir = tmp_path / f"run-{point}"
        _save(run_dir, 7, keep=1)
        model, optimizer = _trained()
        calls = _crash_at(monkeypatch, point)
        try:
            ckpt_lib.save_checkpoint(run_dir, 7, model, optimizer, _state(epoch=2), keep=1)
            crashed = False
        except _Crash:
            crashed = True
        monkeypatch.undo()
        found = ckpt_lib.find_latest(run_dir)
        assert found is not None and found.step == 7, (calls, _names(run_dir))
        fresh = GRUModel(**MODEL_CONFIG)
        ckpt_lib.load_weights(found, fresh, torch.optim.AdamW(fresh.parameters()))
        points.append((calls[-1], found.state["epoch"], found.path.name))
        if not crashed:
            assert found.path.name == "step-000007" and found.state["epoch"] == 2  # the new save
            assert _names(run_dir) == ["step-000007"]  # the old copy is gone
            break
    else:
        pytest.fail("the save never completed")
    renames = [call for call, _, _ in points if call.startswith("replace(")]
    assert renames == ["replace(step-000007)", f"replace(.tmp-step-000007-{os.getpid()})"]
    # Between the two renames the old copy, moved aside, is the checkpoint of the step.
    between = [entry for entry in points if entry[0] == renames[1]]
    assert between == [(renames[1], 1, f".replaced-step-000007-{os.getpid()}")]


def test_a_copy_moved_aside_counts_only_while_its_step_has_no_folder_and_is_pruned_after(tmp_path):
    path = _save(tmp_path, 3)
    aside = path.with_name(".replaced-step-000003-4242")
    os.replace(path, aside)  # a crash between the two renames
    assert ckpt_lib.list_checkpoints(tmp_path) == [aside] and ckpt_lib.find_latest(tmp_path).path == aside
    _save(tmp_path, 3)  # the resumed run saves that step again: the aside copy is redundant
    assert _names(tmp_path) == ["step-000003"]
    _save(tmp_path, 5)
    stale = tmp_path / "checkpoints" / ".replaced-step-000005-4243"
    stale.mkdir()
    assert [p.name for p in ckpt_lib.list_checkpoints(tmp_path)] == ["step-000003", "step-000005"]
    _save(tmp_path, 6)
    assert not stale.exists()


def test_a_save_failure_names_the_first_line_that_says_something(tmp_path):
    from dist_gru.train.checkpoint import save_failure

    # safetensors' refusal of tensors that share memory opens with a blank line.
    shared = RuntimeError("\n            Some tensors share memory, this will lead to duplicate memory on disk\n")
    message = save_failure(tmp_path / "step-000010", shared)
    assert message.startswith(
        f"cannot save checkpoint {tmp_path / 'step-000010'}: Some tensors share memory, this will lead to duplicate"
    ), message
    assert save_failure(tmp_path / "s", RuntimeError()).startswith(f"cannot save checkpoint {tmp_path / 's'}: RuntimeError()")
