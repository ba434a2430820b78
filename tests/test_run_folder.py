"""The run folder contract, end to end through `dist-gru train` and in-process through `run_folder.decide`.

    .venv/bin/pytest -q tests/test_run_folder.py

A command that is refused must leave the run folder exactly as it was: every test that expects a
refusal hashes every file (and lists every folder) before and after.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY, assert_ok, assert_refused, cli, read_metrics, snapshot, torchrun
from wandb_reader import find_offline_runs

from dist_gru.config import NOT_TRAJECTORY, ConfigError, load_config, trajectory
from dist_gru.train import checkpoint as ckpt_lib
from dist_gru.train import lr_at, run_folder

pytestmark = pytest.mark.timeout(120)

RUN = [*TINY, "checkpoint.every=4"]  # 12 steps: checkpoints at 4, 8 and 12; W&B offline




@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 12-step run (checkpoints 4, 8, 12, model/, metrics, an offline W&B run)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert_ok(cli("train", *RUN, f"train.run_dir={run_dir}", timeout=120))
    return run_dir


@pytest.fixture
def used(finished, tmp_path) -> Path:
    """A private copy of the finished run, for a test that may change it."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir, symlinks=True)
    return run_dir


def train(run_dir: Path, *overrides: str, nproc: int = 1):
    args = ("train", *RUN, f"train.run_dir={run_dir}", *overrides)
    return torchrun(nproc, *args, timeout=180) if nproc > 1 else cli(*args, timeout=120)




# --------------------------------------------------------------------------------------------
# Refused commands: one clear error, exit 2, the folder byte for byte as it was


MISMATCH = [
    "optim.lr=0.001",
    "train.seed=5",
    "data.seed=7",
    "train.global_batch_size=32",
    "train.grad_accum_steps=2",
    "train.precision=bf16",
    "train.log_every=2",  # not a trajectory key: never listed
    "checkpoint.keep=1",  # nor this one
]


@pytest.mark.parametrize(
    "overrides, phrases",
    [
        (
            MISMATCH,
            [
                "checkpoint {ckpt}/step-000012 does not fit this job",
                "\n  data.seed: checkpoint has 1234, this job has 7\n"
                "  optim.lr: checkpoint has 0.003, this job has 0.001\n"
                "  train.global_batch_size: checkpoint has 16, this job has 32\n"
                "  train.grad_accum_steps: checkpoint has 1, this job has 2\n"
                "  train.precision: checkpoint has 'fp32', this job has 'bf16'\n"
                "  train.seed: checkpoint has 0, this job has 5\n"
                "To continue that run, give these keys the checkpoint's values",
                "train.resume=overwrite",
                "another train.run_dir",
            ],
        ),
        (
            ["train.resume=none"],
            ["train.resume=none, but {run} holds checkpoints", "step-000004, step-000008, step-000012", "overwrite"],
        ),
        (["train.max_steps=8"], ["train.max_steps=8, but checkpoint", "at step 12 already", "train.max_steps >= 12"]),
    ],
    ids=["changed-config", "resume-none", "shorter"],
)
def test_a_refused_command_names_the_problem_and_leaves_the_folder_byte_for_byte(used, overrides, phrases):
    (used / ckpt_lib.PREEMPTED).write_text("{}\n")  # a marker too: a refused command must not clear it
    before = snapshot(used)
    result = train(used, *overrides)
    assert_refused(result, *(p.format(run=used, ckpt=used / "checkpoints") for p in phrases))
    assert snapshot(used) == before


@pytest.mark.timeout(240)
def test_refusal_under_torchrun_stops_every_rank_and_writes_nothing(used):
    before = snapshot(used)
    result = train(used, "optim.lr=0.001", nproc=2)
    assert result.returncode != 0
    # Rank 0 decided; both ranks received the decision and stopped; rank 0 alone printed it.
    assert result.stderr.count("error: checkpoint ") == 1, result.stderr[-4000:]
    assert result.stderr.count("optim.lr: checkpoint has 0.003, this job has 0.001") == 1
    assert "error (rank 1)" not in result.stderr
    assert snapshot(used) == before


def test_a_foreign_checkpoint_into_a_folder_with_checkpoints_is_refused(used, finished):
    before = snapshot(used)
    result = train(used, f"train.resume={finished / 'checkpoints' / 'step-000008'}")
    assert_refused(result, "is a checkpoint of another run folder", "step-000004, step-000008, step-000012")
    assert snapshot(used) == before


# --------------------------------------------------------------------------------------------
# Finished, continued, started over


@pytest.mark.timeout(240)
def test_a_finished_run_says_so_exits_0_and_writes_nothing(used):
    before = snapshot(used)
    # Non-trajectory keys may differ: they change nothing about the run, and still nothing is written.
    # Two processes: rank 0 decides, and both leave with exit code 0.
    result = assert_ok(train(used, "train.log_every=2", "checkpoint.keep=1", "log.mode=disabled", nproc=2))
    assert f"dist-gru: {used} holds a finished run: checkpoint {used / 'checkpoints' / 'step-000012'}" in result.stdout
    assert "Nothing to do, nothing written. A larger train.max_steps continues it" in result.stdout
    assert "resuming from" not in result.output and "training finished" not in result.output
    assert snapshot(used) == before


@pytest.mark.timeout(180)
def test_a_larger_max_steps_continues_a_finished_run_and_drops_a_torn_metrics_line(used):
    first_id = (used / "wandb_run_id").read_text().strip()
    with open(used / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "train/lo')  # a process killed mid-write
    result = assert_ok(train(used, "train.max_steps=16"))
    assert "dist-gru: resuming from" in result.stdout and "(step 12)" in result.stdout
    assert f"{used / 'metrics.jsonl'}: dropping its last line, which is not a metrics record" in result.stderr
    assert "Traceback" not in result.stderr
    metrics = read_metrics(used)  # every line parses again
    assert [m["step"] for m in metrics if "train/loss" in m] == [4, 8, 12, 16]
    # The cosine follows the new horizon: steps after 12 get lr_at(step, optim, 16), not the old schedule.
    optim = load_config(None, TINY[:-1]).optim
    lr_16 = [m["train/lr"] for m in metrics if m["step"] == 16 and "train/lr" in m]
    assert lr_16 == [pytest.approx(lr_at(15, optim, 16), rel=1e-12)]
    assert lr_at(15, optim, 16) != lr_at(15, optim, 12)
    assert ckpt_lib.find_latest(used).step == 16
    assert yaml.safe_load((used / "config.yaml").read_text())["train"]["max_steps"] == 16
    assert (used / "wandb_run_id").read_text().strip() == first_id  # the same W&B run goes on


def test_overwrite_removes_the_earlier_run_and_starts_over(used):
    old_id = (used / "wandb_run_id").read_text().strip()
    old_wandb = find_offline_runs(used)
    (used / ckpt_lib.PREEMPTED).write_text("{}\n")
    (used / "checkpoints" / "step-000099").mkdir()  # even a broken leftover of the old run goes
    result = assert_ok(train(used, "train.resume=overwrite", "optim.lr=0.001", "train.max_steps=8"))
    assert f"dist-gru: train.resume=overwrite: removing the earlier run in {used} (" in result.stdout
    assert "resuming from" not in result.stdout
    assert sorted(p.name for p in (used / "checkpoints").iterdir()) == ["step-000004", "step-000008"]
    assert not (used / ckpt_lib.PREEMPTED).exists()
    assert [m["step"] for m in read_metrics(used) if "train/loss" in m] == [4, 8]  # no old line left
    state = json.loads((used / "checkpoints" / "step-000008" / "state.json").read_text())
    assert state["config"]["optim"]["lr"] == 0.001
    new_id = (used / "wandb_run_id").read_text().strip()
    assert new_id != old_id and state["tracker_run_id"] == new_id
    assert set(old_wandb) < set(find_offline_runs(used))  # the old W&B run stays, apart under its own id
    assert not list(used.glob(".overwritten-*"))


# --------------------------------------------------------------------------------------------
# In-process: run_folder.decide on folders built with the checkpoint writer (no training)


def _folder(tmp_path: Path, steps: tuple[int, ...], overrides: list[str], with_config: bool = True) -> Path:
    import torch

    from dist_gru.model import GRUModel

    cfg = load_config(None, overrides)
    model = GRUModel(2, 4, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    run_dir = tmp_path / "run"
    for step in steps:
        state = {"config": cfg.to_dict()} if with_config else {}
        ckpt_lib.save_checkpoint(run_dir, step, model, optimizer, state, keep=10)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return run_dir


def test_only_trajectory_keys_are_compared(tmp_path):
    run_dir = _folder(tmp_path, (4,), ["train.max_steps=8"])
    harmless = [
        "train.max_steps=8",
        "train.eval_every=2",
        "train.log_every=1",
        "train.threads=1",
        "train.record_samples=true",
        "train.deterministic=true",
        "data.val_size=10",
        "data.num_workers=1",
        "checkpoint.every=2",
        "checkpoint.keep=1",
        "log.mode=disabled",
        "log.tags=[x]",
        f"train.run_dir={run_dir}",
    ]
    plan = run_folder.decide(load_config(None, harmless), run_dir)
    assert plan.resume.step == 4 and not plan.finished and plan.remove == []
    for changed in ["model.num_layers=3", "data.train_size=100", "optim.warmup_steps=7", "train.cpu_bf16=autocast"]:
        with pytest.raises(ConfigError) as err:
            run_folder.decide(load_config(None, [*harmless, changed]), run_dir)
        key, value = changed.split("=")
        assert f"  {key}: checkpoint has " in str(err.value) and f"this job has {value}" in str(err.value).replace(
            "'", ""
        )


def test_trajectory_keeps_every_section_key_but_the_listed_ones():
    flat = trajectory(load_config().to_dict())
    assert {"model.hidden_size", "data.seed", "data.train_size", "optim.lr", "train.seed", "train.precision"} <= set(
        flat
    )
    assert not {k for k in flat if k.startswith(("checkpoint.", "log."))}
    assert not set(flat) & NOT_TRAJECTORY
    assert load_config(None, ["train.max_steps=5"]).digest() == load_config().digest()
    assert load_config(None, ["optim.lr=0.1"]).digest() != load_config().digest()


def test_a_checkpoint_without_a_stored_config_is_compared_with_its_folders_config_yaml(tmp_path):
    run_dir = _folder(tmp_path, (4,), ["optim.lr=0.01"], with_config=False)
    assert run_folder.decide(load_config(None, ["optim.lr=0.01"]), run_dir).resume.step == 4
    with pytest.raises(ConfigError, match=r"\(from .*config\.yaml\)[\s\S]*optim\.lr: checkpoint has 0\.01"):
        run_folder.decide(load_config(None, ["optim.lr=0.02"]), run_dir)


def test_a_config_key_added_later_takes_its_default_when_comparing(tmp_path):
    run_dir = _folder(tmp_path, (4,), [])
    state_path = run_dir / "checkpoints" / "step-000004" / "state.json"
    state = json.loads(state_path.read_text())
    del state["config"]["optim"]["min_lr_ratio"]  # as if written before the key existed
    _rewrite_state(state_path, state)
    assert run_folder.decide(load_config(), run_dir).resume.step == 4
    with pytest.raises(ConfigError, match="optim.min_lr_ratio: checkpoint has 0.1, this job has 0.5"):
        run_folder.decide(load_config(None, ["optim.min_lr_ratio=0.5"]), run_dir)


def _rewrite_state(state_path: Path, state: dict) -> None:
    """Edit state.json and re-seal the COMPLETE marker, as the writer would have written it."""
    state_path.write_text(json.dumps(state))
    marker_path = state_path.parent / ckpt_lib.MARKER
    marker = json.loads(marker_path.read_text())
    marker["state.json"] = {
        "bytes": state_path.stat().st_size,
        "sha256": hashlib.sha256(state_path.read_bytes()).hexdigest(),
    }
    marker_path.write_text(json.dumps(marker))


def test_a_finished_run_without_its_final_model_is_completed_not_skipped(tmp_path):
    # Preempted at the last step, or killed between the final checkpoint and saving model/:
    # the run resumes at max_steps, trains no step and writes model/ and the final evaluation.
    run_dir = _folder(tmp_path, (4, 8), ["train.max_steps=8"])
    plan = run_folder.decide(load_config(None, ["train.max_steps=8"]), run_dir)
    assert plan.resume.step == 8 and not plan.finished


def test_overwrite_plans_to_remove_only_what_a_run_writes(tmp_path):
    run_dir = _folder(tmp_path, (4,), [])
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "wandb").mkdir()
    plan = run_folder.decide(load_config(None, ["train.resume=overwrite"]), run_dir)
    assert plan.resume is None and plan.remove == ["checkpoints", "config.yaml"]
    run_folder.commit(plan, load_config(None, ["train.resume=overwrite"]), run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [run_folder.MANIFEST, "config.yaml", "notes.txt", "wandb"]


def test_overwrite_refuses_a_folder_that_is_not_a_run_folder(tmp_path):
    (tmp_path / "model").mkdir()  # e.g. a project's own source folder, not a saved model
    with pytest.raises(ConfigError, match=r"holds model/, which no dist-gru run wrote"):
        run_folder.decide(load_config(None, ["train.resume=overwrite"]), tmp_path)
