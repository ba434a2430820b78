"""Bad state on disk is never a traceback, and dist-gru never removes what it did not write.

    .venv/bin/pytest -q tests/test_run_state.py -n 0

The run folder (its `.dist-gru-run` manifest, `train.resume=overwrite`), the training data's
fingerprint in every checkpoint, damaged or unreadable checkpoints, a full disk during a save, a
torn metrics.jsonl, and `model/`'s SHA256SUMS: all through the real CLI on TINY runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import PY, TINY, assert_ok, assert_refused, cli, read_metrics, run, snapshot, torchrun_cmd

from dist_gru.config import ConfigError, load_config
from dist_gru.data import write_sequences
from dist_gru.train import checkpoint as ckpt_lib
from dist_gru.train import run_folder

pytestmark = pytest.mark.timeout(180)

RUN = [*TINY, "checkpoint.every=4", "log.mode=disabled"]  # 12 steps: checkpoints at 4, 8 and 12






def train(run_dir: Path, *overrides: str, prefix: tuple[str, ...] = ()):
    return run([*prefix, PY, "-m", "dist_gru", "train", *RUN, f"train.run_dir={run_dir}", *overrides], timeout=150)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert_ok(train(run_dir))
    return run_dir


@pytest.fixture
def used(finished, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return run_dir


# --------------------------------------------------------------------------------------------
# The run folder: overwrite removes only what a run wrote


def _users_folder(root: Path) -> Path:
    root.mkdir()
    (root / "config.yaml").write_text("my: own settings\n")
    for name in ("model", "plots", "samples"):
        (root / name).mkdir()
        (root / name / "mine.txt").write_text(name)
    return root


@pytest.mark.parametrize("mode", ["overwrite", "auto"])
def test_a_folder_of_the_users_files_is_refused_and_left_as_it_was(tmp_path, mode):
    folder = _users_folder(tmp_path / "mine")
    before = snapshot(folder)
    err = assert_refused(
        train(folder, f"train.resume={mode}"),
        "no dist-gru run wrote",
        "config.yaml, model/, plots/, samples/",
        "another train.run_dir",
    )
    assert str(folder) in err
    assert snapshot(folder) == before


def test_a_run_claims_its_folder_and_an_entry_it_does_not_own_is_refused(used):
    manifest = json.loads((used / run_folder.MANIFEST).read_text())
    assert manifest == {"format": run_folder.MANIFEST_FORMAT, "owns": list(run_folder.RUN_FILES)}
    # `plots/` made by the user in a run folder whose manifest does not list it (written by a release
    # whose runs never wrote plots, say): overwrite neither removes it nor lets a run write into it.
    manifest["owns"].remove("plots")
    (used / run_folder.MANIFEST).write_text(json.dumps(manifest))
    (used / "plots").mkdir()
    (used / "plots" / "mine.png").write_text("keep me")
    before = snapshot(used)
    assert_refused(train(used, "train.resume=overwrite"), "holds plots/, which no dist-gru run wrote")
    assert snapshot(used) == before
    shutil.rmtree(used / "plots")  # moved out: the overwrite goes ahead, and the run owns plots/ again
    result = assert_ok(train(used, "train.resume=overwrite", "train.max_steps=4"))
    assert "removing the earlier run" in result.stdout
    assert json.loads((used / run_folder.MANIFEST).read_text())["owns"] == list(run_folder.RUN_FILES)
    assert sorted(p.name for p in (used / "checkpoints").iterdir()) == ["step-000004"]


def test_a_run_folder_of_an_older_version_is_recognised_by_its_checkpoints(used):
    (used / run_folder.MANIFEST).unlink()  # as an older version left it
    plan = run_folder.decide(load_config(None, ["train.resume=overwrite"]), used)
    assert {"checkpoints", "model", "config.yaml", "metrics.jsonl"} <= set(plan.remove)


def test_a_broken_manifest_is_an_error_not_a_traceback(used):
    (used / run_folder.MANIFEST).write_text("[1, 2")
    with pytest.raises(ConfigError, match=r"\.dist-gru-run.*not a dist-gru run manifest"):
        run_folder.decide(load_config(None, ["train.resume=overwrite"]), used)


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_a_run_folder_that_cannot_be_made_is_one_error(tmp_path, where):
    (tmp_path / "somefile").write_text("x")
    run_dir = tmp_path / "somefile" / "run" if where == "under_a_file" else tmp_path / "somefile"
    before = snapshot(tmp_path)
    assert_refused(train(run_dir), f"train.run_dir={run_dir}", "not a folder")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------
# The training data's fingerprint


def _write_data(path: Path, n: int) -> None:
    rng = np.random.default_rng(n)
    write_sequences(path, [rng.normal(size=(10, 2)).astype(np.float32) for _ in range(n)],
                    rng.normal(size=(n, 1)).astype(np.float32), task="regression")


def test_a_resume_onto_other_training_data_is_refused_naming_what_changed(tmp_path):
    from dist_gru.data.files import data_fingerprint

    data, run_dir = tmp_path / "train", tmp_path / "run"
    _write_data(data, 64)
    files = ["data.name=files", f"data.train_path={data}"]
    assert_ok(train(run_dir, *files, "train.max_steps=4"))
    state = json.loads((run_dir / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["data"]["train"] == data_fingerprint(data)
    assert state["data"]["train"]["num_sequences"] == 64
    shutil.rmtree(data)
    _write_data(data, 500)  # other data at the same path
    before = snapshot(run_dir)
    assert_refused(
        train(run_dir, *files, "train.max_steps=8"),
        "data.train: num_sequences was 64, is 500",
        "train.resume=overwrite",
    )
    assert snapshot(run_dir) == before


def test_the_fingerprint_reads_no_whole_file_and_names_sizes(tmp_path):
    from dist_gru.data.files import data_fingerprint

    _write_data(tmp_path / "d", 8)
    fp = data_fingerprint(tmp_path / "d")
    assert fp["num_sequences"] == 8 and fp["total_steps"] == 80 and "created_by" not in fp
    assert fp["features.npy bytes"] == (tmp_path / "d" / "features.npy").stat().st_size


# --------------------------------------------------------------------------------------------
# Damaged checkpoints: auto resume skips them with a warning; an explicit path is one error


def _reseal(folder: Path, name: str, text: str) -> None:
    """Replace one file and update the COMPLETE marker to match, as an editor could."""
    (folder / name).write_text(text)
    marker = json.loads((folder / ckpt_lib.MARKER).read_text())
    data = (folder / name).read_bytes()
    marker[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / ckpt_lib.MARKER).write_text(json.dumps(marker))


DAMAGE = {
    "marker_is_a_list": lambda f: (f / ckpt_lib.MARKER).write_text("[]"),
    "marker_is_a_string": lambda f: (f / ckpt_lib.MARKER).write_text('"x"'),
    "marker_entry_not_an_object": lambda f: (f / ckpt_lib.MARKER).write_text('{"state.json": 3}'),
    "state_is_a_list": lambda f: _reseal(f, "state.json", "[]"),
    "state_without_step": lambda f: _reseal(f, "state.json", '{"epoch": 0}'),
    "state_step_not_an_int": lambda f: _reseal(f, "state.json", '{"step": "twelve"}'),
    "state_not_json": lambda f: _reseal(f, "state.json", "{not json"),
    "state_model_config_a_list": lambda f: _reseal(f, "state.json", '{"step": 12, "model_config": []}'),
    "weights_replaced_by_a_folder": lambda f: ((f / "model.safetensors").unlink(), (f / "model.safetensors").mkdir()),
    "state_a_dangling_link": lambda f: ((f / "state.json").unlink(), (f / "state.json").symlink_to(f / "gone")),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_by_auto_and_refused_by_path(used, damage):
    newest = used / "checkpoints" / "step-000012"
    DAMAGE[damage](newest)
    with pytest.raises(ckpt_lib.CheckpointError, match=str(newest)):
        ckpt_lib.verify(newest)
    before = snapshot(used)
    assert_refused(train(used, f"train.resume={newest}"), f"checkpoint {newest}")
    assert snapshot(used) == before
    result = assert_ok(train(used))  # step 12 is skipped: the run resumes from 8 and ends at 12
    assert f"skipping checkpoint {newest}" in result.output
    assert "step-000008 (step 8)" in result.stdout
    assert ckpt_lib.verify(newest).step == 12  # saved anew


def _without_root_powers() -> tuple[str, ...]:
    """A prefix that runs a command without root's power to read any file (tests run as root)."""
    if os.geteuid() != 0:
        return ()
    drop = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")
    if shutil.which("setpriv") is None or subprocess.run([*drop, "true"]).returncode != 0:
        pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE: chmod 000 denies nothing")
    return drop


@pytest.mark.parametrize("what", ["model.safetensors", "folder"])
def test_an_unreadable_checkpoint_is_skipped_with_a_warning(used, what):
    prefix = _without_root_powers()
    newest = used / "checkpoints" / "step-000012"
    target = newest if what == "folder" else newest / what
    target.chmod(0)
    try:
        result = assert_ok(train(used, prefix=prefix))
        assert f"skipping checkpoint {newest}" in result.output and "step-000008 (step 8)" in result.stdout
    finally:
        target.chmod(0o755)


def test_an_unreadable_checkpoints_folder_is_one_error(used):
    prefix = _without_root_powers()
    (used / "checkpoints").chmod(0)
    try:
        assert_refused(train(used, prefix=prefix), str(used / "checkpoints"), "Permission denied")
    finally:
        (used / "checkpoints").chmod(0o755)


# --------------------------------------------------------------------------------------------
# A full disk during a save


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a 2 MiB tmpfs here (not root, or no mount permission)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_during_a_save_is_one_error_and_leaves_no_temporary_folder(small_disk):
    run_dir = small_disk / "run"
    # 256 hidden units: a checkpoint of about 2.4 MB (weights + Adam's two moments) on a 2 MiB disk.
    result = train(run_dir, "model.hidden_size=256", "train.max_steps=4")
    assert_refused(result, "checkpoint", "No space left on device", str(run_dir / "checkpoints"))
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == []


def test_a_full_disk_under_torchrun_stops_every_rank_with_one_error(small_disk):
    """Rank 0's failed save reaches every rank (it is broadcast where a barrier stood): both stop at
    once with exit 2, instead of rank 1 waiting at the barrier for its peer timeout."""
    run_dir = small_disk / "run"
    cmd = torchrun_cmd(2, "train", *RUN, f"train.run_dir={run_dir}", "model.hidden_size=256", "train.max_steps=4")
    cmd[cmd.index("torch.distributed.run")] = "dist_gru.torchrun"
    result = run(cmd, timeout=150)
    assert_refused(result, "cannot save checkpoint", "No space left on device")
    assert "dist-gru torchrun: stopped: rank 0 exited with 2" in result.stderr
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == []


def test_a_model_folder_that_does_not_fit_on_the_disk_is_an_error_and_leaves_nothing(small_disk):
    from dist_gru.model import GRUModel

    model = GRUModel(input_size=1, hidden_size=512, output_size=1, num_layers=2)  # about 9 MB
    with pytest.raises(ckpt_lib.CheckpointError, match="cannot save the model folder .*No space left on device"):
        ckpt_lib.save_model_folder(model, small_disk / "model")
    assert list(small_disk.iterdir()) == []


def test_checkpoint_files_follow_the_umask(finished):
    newest = finished / "checkpoints" / "step-000012"
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in newest.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


# --------------------------------------------------------------------------------------------
# metrics.jsonl with a torn, non-UTF-8 tail


def test_a_garbage_metrics_tail_is_dropped_with_a_warning_at_resume(used):
    with open(used / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 13, "train/lo\xff\xfe\x80')
    result = assert_ok(train(used, "train.max_steps=16"))
    assert "metrics.jsonl: dropping its last line" in result.output
    steps = [m["step"] for m in read_metrics(used) if "train/loss" in m]
    assert steps == [4, 8, 12, 16]


@pytest.mark.parametrize("saved", ["state", "file"])
def test_a_damaged_saved_run_id_gives_a_new_one_with_a_warning(used, saved):
    newest = used / "checkpoints" / "step-000012"
    state = json.loads((newest / "state.json").read_text())
    if saved == "state":
        state["tracker_run_id"] = ["not", "an", "id"]  # an edit, resealed
    else:  # an older checkpoint without the id: the folder's wandb_run_id, torn and not UTF-8
        del state["tracker_run_id"]
        (used / "wandb_run_id").write_bytes(b"\xff\xfe/")
    _reseal(newest, "state.json", json.dumps(state))
    result = assert_ok(train(used, "train.max_steps=16"))
    assert "is not a run id; logging under a new one" in result.stderr
    run_id = (used / "wandb_run_id").read_text().strip()
    assert len(run_id) == 8 and json.loads((used / "checkpoints" / "step-000016" / "state.json").read_text())[
        "tracker_run_id"
    ] == run_id


# --------------------------------------------------------------------------------------------
# model/: loading errors and SHA256SUMS


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _model_commands(used: Path, tmp_path: Path) -> dict[str, list[str]]:
    model = str(used / "model")
    return {
        "evaluate": ["evaluate", "--model", model, "--data", "adding"],
        "predict": ["predict", "--model", model, "--data", "adding", "--out", str(tmp_path / "p.npy")],
        "export": ["export", "--model", model, "--format", "torchscript", "--out", str(tmp_path / "m.pt")],
        "init_from": ["train", *RUN, f"train.run_dir={tmp_path / 'tuned'}", f"train.init_from={model}"],
    }


def test_model_folder_has_checksums(finished):
    sums = (finished / "model" / "SHA256SUMS").read_text().splitlines()
    for name in ("config.json", "model.safetensors"):
        digest = hashlib.sha256((finished / "model" / name).read_bytes()).hexdigest()
        assert f"{digest}  {name}" in sums


@pytest.mark.parametrize("command", ["evaluate", "predict", "export", "init_from"])
def test_a_flipped_byte_in_the_model_is_caught_by_every_loader(used, tmp_path, command):
    _flip_last_byte(used / "model" / "model.safetensors")
    before = snapshot(tmp_path)
    result = cli(*_model_commands(used, tmp_path)[command], timeout=150)
    assert_refused(result, "model.safetensors", "corrupt or edited", "SHA256SUMS")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["truncated_weights", "bad_config_json"])
@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_broken_model_folder_is_one_error(used, tmp_path, command, damage):
    model = used / "model"
    if damage == "truncated_weights":
        data = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (model / "config.json").write_text("{not json")
    (model / "SHA256SUMS").unlink()  # an older model folder: the loader itself must say what is wrong
    assert_refused(cli(*_model_commands(used, tmp_path)[command], timeout=150), f"--model {model}")


def test_a_model_folder_without_checksums_loads_with_a_warning(used, tmp_path):
    (used / "model" / "SHA256SUMS").unlink()
    result = assert_ok(cli(*_model_commands(used, tmp_path)["evaluate"], timeout=150))
    assert "no SHA256SUMS" in result.stderr
    assert "mse" in result.json_last_line()
