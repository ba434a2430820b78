"""Fault tolerance with real processes: crash, kill a worker, signal, corrupt checkpoints, then resume.

    .venv/bin/pytest -q tests/test_resume.py          # add -s to see the measured figures

Every interrupted run is compared with an uninterrupted run of the same command: final weights equal
(max abs difference 0 on CPU fp32 for the same world size; within 1e-5 across world sizes, where the
gradient all-reduce sums in another order). The model has two layers with dropout between them: its
masks are keyed by (seed, step, sample), so they survive a resume on any world size. A run is
interrupted for real: the test watches the run folder and kills or signals the processes once a
checkpoint has appeared, so the stop lands mid-epoch at whatever step the processes had reached.

The sample audit (`train.record_samples=true`): a killed run may have trained steps after its last
checkpoint; their updates died with the process and the resumed run trains them again. So the
record of what the final weights saw is the killed run's lines for steps before the resumed
checkpoint's step, plus the resumed run's lines (which start at that step).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import PY, TINY, Background, assert_ok, cli, load_weights, max_abs_diff, torchrun, torchrun_cmd

from dist_gru.train import checkpoint as ckpt_lib

STEPS_PER_EPOCH = 64  # 1024 samples / 16 per step: every interruption below lands mid-epoch 0
MAX_STEPS = 80  # ... and the resumed run crosses into epoch 1
STOP_AFTER = "step-000016"  # interrupt once this checkpoint exists (checkpoint.every=8)
RUN = [
    *(arg for arg in TINY if not arg.startswith("train.max_steps")),
    "data.train_size=1024",
    f"train.max_steps={MAX_STEPS}",
    "model.num_layers=2",
    "model.dropout=0.3",
    "checkpoint.every=8",
    "train.record_samples=true",
    "log.mode=disabled",
]
GRACE_S = 30  # torchrun kills workers 30 s after it forwards a TERM: a preemption must be done by then


@pytest.fixture
def launch(tmp_path):
    """Start background runs; whatever is still running at the end of the test is killed."""
    started: list[Background] = []

    def start(nproc: int, run_dir: Path, *extra_args: str, torchrun_extra: tuple[str, ...] = ()) -> Background:
        args = ("train", *RUN, f"train.run_dir={run_dir}", *extra_args)
        cmd = torchrun_cmd(nproc, *args, extra=torchrun_extra) if nproc > 1 else [PY, "-m", "dist_gru", *args]
        started.append(Background(cmd, tmp_path / f"launch-{len(started)}.log"))
        return started[-1]

    yield start
    for job in started:
        job.kill()


def train(nproc: int, run_dir: Path, *extra_args: str):
    """A foreground run of the same command (resume=auto continues whatever the run folder holds)."""
    args = ("train", *RUN, f"train.run_dir={run_dir}", *extra_args)
    return torchrun(nproc, *args, timeout=180) if nproc > 1 else cli(*args, timeout=120)


def checkpoint_exists(run_dir: Path, name: str = STOP_AFTER):
    return lambda: (run_dir / "checkpoints" / name).is_dir()


def preempted(run_dir: Path):
    return lambda: ckpt_lib.read_preempted(run_dir) is not None


def weights(run_dir: Path) -> dict:
    return load_weights(run_dir / "model" / "model.safetensors")


def resumed_step(output: str) -> int:
    found = re.findall(r"dist-gru: resuming from (\S+) \(step (\d+)\)", output)
    assert len(found) == 1, f"expected one resume, found {found}\n{output[-3000:]}"
    return int(found[0][1])


def step_samples(samples_dir: Path, killed: bool = False) -> dict[int, list[int]]:
    """Sample ids of each optimizer step, all ranks' records together (one micro-batch per step here).

    Each rank must record each step once. A killed process may leave a last line cut mid-write;
    only there (`killed`) is an unreadable line tolerated.
    """
    by_step: dict[int, list[int]] = defaultdict(list)
    files = sorted(samples_dir.glob("rank-*.jsonl"))
    assert files, f"no sample records in {samples_dir}"
    for file in files:
        lines = file.read_text().splitlines()
        records = []
        for number, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                assert killed and number == len(lines) - 1, f"{file}:{number + 1}: unreadable record {line!r}"
        steps = [r["step"] for r in records]
        assert len(steps) == len(set(steps)), f"{file}: a step recorded twice by one rank"
        for record in records:
            assert record["epoch"] == record["step"] // STEPS_PER_EPOCH
            by_step[record["step"]] += record["index"]
    return dict(by_step)


def _run_baseline(tmp_path_factory, nproc: int) -> Path:
    run_dir = tmp_path_factory.mktemp(f"uninterrupted-{nproc}") / "run"
    assert_ok(train(nproc, run_dir))
    return run_dir


@pytest.fixture(scope="module")
def baseline_1(tmp_path_factory) -> Path:
    return _run_baseline(tmp_path_factory, 1)


@pytest.fixture(scope="module")
def baseline_2(tmp_path_factory) -> Path:
    return _run_baseline(tmp_path_factory, 2)


@pytest.mark.timeout(240)
def test_uninterrupted_runs_on_one_and_two_processes_agree(baseline_1, baseline_2):
    diff = max_abs_diff(weights(baseline_1), weights(baseline_2))
    print(f"\nMEASURED uninterrupted 1 vs 2 processes: max abs diff {diff:.3g}")
    assert diff < 1e-5
    assert step_samples(baseline_1 / "samples") == step_samples(baseline_2 / "samples")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("nproc", [1, 2])
def test_crash_mid_epoch_then_resume_equals_the_uninterrupted_run(nproc, tmp_path, launch, request):
    baseline = request.getfixturevalue(f"baseline_{nproc}")
    run_dir = tmp_path / "run"
    first = launch(nproc, run_dir)
    first.wait_until(checkpoint_exists(run_dir), f"checkpoint {STOP_AFTER}")
    first.kill()
    assert not (run_dir / "model").exists()
    assert ckpt_lib.find_latest(run_dir).step < MAX_STEPS, "interrupted too late: the run had finished"

    resumed = assert_ok(train(nproc, run_dir))
    step = resumed_step(resumed.stdout)
    assert 16 <= step < MAX_STEPS and step % STEPS_PER_EPOCH != 0, step  # mid-epoch
    diff = max_abs_diff(weights(run_dir), weights(baseline))
    print(f"\nMEASURED crash at step >= {step} on {nproc} process(es), resumed on {nproc}: max abs diff {diff:.3g}")
    assert diff == 0.0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_trains_every_sample_once(before, after, tmp_path, launch, baseline_1, baseline_2):
    run_dir = tmp_path / "run"
    first = launch(before, run_dir)
    first.wait_until(checkpoint_exists(run_dir), f"checkpoint {STOP_AFTER}")
    first.kill()
    shutil.move(run_dir / "samples", tmp_path / "samples-killed")  # the resumed run records afresh
    assert ckpt_lib.find_latest(run_dir).state["world_size"] == before

    resumed = assert_ok(train(after, run_dir))
    step = resumed_step(resumed.stdout)
    assert f"world_size={after} " in resumed.stdout
    diffs = {n: max_abs_diff(weights(run_dir), weights(b)) for n, b in ((1, baseline_1), (2, baseline_2))}
    print(f"\nMEASURED {before} -> {after} processes, resumed at step {step}: max abs diff vs uninterrupted {diffs}")
    assert max(diffs.values()) < 1e-5

    killed, second = step_samples(tmp_path / "samples-killed", killed=True), step_samples(run_dir / "samples")
    assert set(range(step)) <= set(killed), "the killed run must have recorded every step before its checkpoint"
    assert sorted(second) == list(range(step, MAX_STEPS)), "the resumed run starts exactly at the checkpoint"
    redone = sorted(s for s in killed if s >= step)  # trained after the checkpoint, lost with the process
    trained = {s: ids for s, ids in killed.items() if s < step} | second
    assert trained == step_samples(baseline_1 / "samples")  # the same samples at every step
    epoch_0 = sorted(i for s in range(STEPS_PER_EPOCH) for i in trained[s])
    assert epoch_0 == list(range(1024)), "epoch 0: every sample exactly once, none skipped or repeated"
    epoch_1 = [i for s in range(STEPS_PER_EPOCH, MAX_STEPS) for i in trained[s]]
    assert len(epoch_1) == len(set(epoch_1)) == (MAX_STEPS - STEPS_PER_EPOCH) * 16
    print(f"MEASURED steps trained by the killed run after its checkpoint and redone: {len(redone)}")


@pytest.mark.timeout(420)
def test_kill_9_of_one_worker_under_torchrun_restarts_and_finishes_exactly(tmp_path, launch, baseline_2):
    restart_s, diffs = [], []
    for attempt in range(2):  # restarts must work every time, not usually
        run_dir = tmp_path / f"run-{attempt}"
        job = launch(2, run_dir, torchrun_extra=("--max-restarts", "1"))
        job.wait_until(checkpoint_exists(run_dir), f"checkpoint {STOP_AFTER}")
        victim = job.worker(rank=1)
        killed_at = time.monotonic()
        victim.kill()
        resumed_at = job.wait_until(job.printed("dist-gru: resuming from"), "resume after the restart")
        assert job.wait(timeout=120) == 0, job.output()[-6000:]
        out = job.output()
        assert "connectFullMesh" not in out
        assert resumed_step(out) >= 16 and "dist-gru: training finished" in out
        assert ckpt_lib.read_preempted(run_dir) is None
        restart_s.append(resumed_at - killed_at)
        diffs.append(max_abs_diff(weights(run_dir), weights(baseline_2)))
    print(f"\nMEASURED kill -9 of rank 1 -> restarted workers resumed after {[f'{s:.1f}' for s in restart_s]} s")
    print(f"MEASURED final weights vs uninterrupted: max abs diff {diffs}")
    assert diffs == [0.0, 0.0]


def _worker_exit_codes(output: str) -> dict[int, int]:
    """Exit code of each rank from torchrun's failure report."""
    found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)", output)
    return {int(rank): int(code) for rank, code in found}


@pytest.mark.timeout(300)
def test_sigusr1_to_one_rank_checkpoints_all_ranks_and_resumes_exactly(tmp_path, launch, baseline_2):
    run_dir = tmp_path / "run"
    job = launch(2, run_dir)  # --max-restarts 0: the agent reports the workers' 75 and exits
    job.wait_until(checkpoint_exists(run_dir), f"checkpoint {STOP_AFTER}")
    signalled_at = time.monotonic()
    job.worker(rank=1).send_signal(signal.SIGUSR1)  # one rank only: rank 0 learns of it at the step boundary
    saved = job.wait_until(preempted(run_dir), "preemption marker") - signalled_at
    code = job.wait(timeout=60)
    elapsed = time.monotonic() - signalled_at
    out = job.output()
    print(f"\nMEASURED SIGUSR1 to rank 1 -> checkpoint + marker after {saved:.2f} s, all exited after {elapsed:.1f} s")
    assert elapsed < GRACE_S
    assert code == 1, out[-4000:]  # torchrun's own code for failed workers
    assert _worker_exit_codes(out) == {0: ckpt_lib.EXIT_PREEMPTED, 1: ckpt_lib.EXIT_PREEMPTED}
    assert "dist-gru: preempted by signal (peer)" in out  # rank 0 saw no signal itself, yet saved
    marker = ckpt_lib.read_preempted(run_dir)
    assert marker is not None and marker["exit_code"] == 75 and marker["step"] > 16
    newest = ckpt_lib.find_latest(run_dir)
    assert newest.step == marker["step"] and str(newest.path) == marker["checkpoint"]

    resumed = assert_ok(train(2, run_dir))
    assert resumed_step(resumed.stdout) == marker["step"]
    assert ckpt_lib.read_preempted(run_dir) is None
    diff = max_abs_diff(weights(run_dir), weights(baseline_2))
    print(f"MEASURED preempted at step {marker['step']}, resumed on 2 processes: max abs diff {diff:.3g}")
    assert diff == 0.0


@pytest.mark.timeout(240)
def test_sigusr1_to_a_single_process_exits_75_and_resumes_exactly(tmp_path, launch, baseline_1):
    run_dir = tmp_path / "run"
    job = launch(1, run_dir)
    job.wait_until(checkpoint_exists(run_dir), f"checkpoint {STOP_AFTER}")
    signalled_at = time.monotonic()
    job.proc.send_signal(signal.SIGUSR1)
    saved = job.wait_until(preempted(run_dir), "preemption marker") - signalled_at
    assert job.wait(timeout=60) == ckpt_lib.EXIT_PREEMPTED, job.output()[-4000:]
    elapsed = time.monotonic() - signalled_at
    print(
        f"\nMEASURED SIGUSR1 to one process -> checkpoint + marker after {saved:.2f} s, exit 75 after {elapsed:.1f} s"
    )
    assert elapsed < GRACE_S
    marker = ckpt_lib.read_preempted(run_dir)
    assert marker["signal"] == "SIGUSR1" and ckpt_lib.verify(Path(marker["checkpoint"])).step == marker["step"]

    resumed = assert_ok(train(1, run_dir))
    assert resumed_step(resumed.stdout) == marker["step"]
    assert max_abs_diff(weights(run_dir), weights(baseline_1)) == 0.0


@pytest.mark.timeout(240)
def test_sigterm_to_the_torchrun_agent_checkpoints_and_exits_inside_the_grace(tmp_path, launch):
    # What Slurm does at a time limit or preemption: TERM to the launcher, which forwards it to its workers.
    run_dir = tmp_path / "run"
    job = launch(2, run_dir, torchrun_extra=("--max-restarts", "1"))
    job.wait_until(checkpoint_exists(run_dir), f"checkpoint {STOP_AFTER}")
    signalled_at = time.monotonic()
    job.proc.send_signal(signal.SIGTERM)
    saved = job.wait_until(preempted(run_dir), "preemption marker") - signalled_at
    code = job.wait(timeout=60)
    elapsed = time.monotonic() - signalled_at
    out = job.output()
    print(
        f"\nMEASURED SIGTERM to the torchrun agent -> checkpoint + marker after {saved:.2f} s, exited after {elapsed:.1f} s"
    )
    assert elapsed < GRACE_S and code == 1, out[-4000:]
    assert "dist-gru: preempted by signal 15" in out
    assert "forcefully exiting" not in out  # no worker needed the agent's SIGKILL
    assert "resuming from" not in out  # the agent is shutting down: no restart despite --max-restarts 1
    marker = ckpt_lib.read_preempted(run_dir)
    assert marker["signal"] == "SIGTERM" and ckpt_lib.find_latest(run_dir).step == marker["step"] > 16


# --- bad checkpoints, end to end through `dist-gru train` ---------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 12-step run with checkpoints at steps 4, 8 and 12."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert_ok(cli("train", *TINY, "log.mode=disabled", "checkpoint.every=4", f"train.run_dir={run_dir}"))
    return run_dir


def _copy_with_truncated_newest(finished: Path, tmp_path: Path) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    shutil.rmtree(run_dir / "model")
    newest = run_dir / "checkpoints" / "step-000012"
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])  # a file cut mid-write
    return run_dir, newest


@pytest.mark.timeout(120)
def test_a_truncated_newest_checkpoint_is_skipped_for_the_previous_one(finished, tmp_path):
    run_dir, broken = _copy_with_truncated_newest(finished, tmp_path)
    crashed_save = run_dir / "checkpoints" / ".tmp-step-000016-4242"  # a save killed half-way
    crashed_save.mkdir()
    (crashed_save / "model.safetensors").write_bytes(b"partial")

    result = assert_ok(cli("train", *TINY, "log.mode=disabled", "checkpoint.every=4", f"train.run_dir={run_dir}"))
    assert f"skipping checkpoint {broken}: model.safetensors has" in result.stderr
    assert "(truncated?)" in result.stderr
    assert resumed_step(result.stdout) == 8 and f"resuming from {broken.parent / 'step-000008'} " in result.stdout
    assert max_abs_diff(weights(run_dir), weights(finished)) == 0.0
    assert ckpt_lib.verify(broken).step == 12  # rewritten by the resumed run


@pytest.mark.timeout(120)
def test_an_explicitly_named_bad_checkpoint_is_an_error(finished, tmp_path):
    run_dir, broken = _copy_with_truncated_newest(finished, tmp_path)
    result = cli("train", *TINY, "log.mode=disabled", f"train.run_dir={run_dir}", f"train.resume={broken}")
    assert result.returncode == 2, result.output[-3000:]
    assert f"error: checkpoint {broken}: model.safetensors has" in result.stderr
    assert "Traceback" not in result.stderr and not (run_dir / "model").exists()


@pytest.mark.timeout(120)
def test_a_checkpoint_of_another_model_shape_is_refused(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    result = cli("train", *TINY, "log.mode=disabled", "model.hidden_size=32", f"train.run_dir={run_dir}")
    assert result.returncode == 2, result.output[-3000:]
    assert "step-000012 does not fit this job" in result.stderr
    assert "hidden_size: checkpoint has 16, this job has 32" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(300)
def test_restart_after_a_killed_worker_continues_the_same_wandb_run(tmp_path, launch):
    """A torchrun restart resumes the W&B run of its checkpoint, with steps that go on: one run id,
    never a second W&B run that starts over at step 0 (W&B would drop its steps as out of order)."""
    from wandb_reader import find_offline_runs, history_series, read_run

    run_dir = tmp_path / "run"
    job = launch(2, run_dir, "log.mode=offline", torchrun_extra=("--max-restarts", "1"))
    job.wait_until(checkpoint_exists(run_dir), f"checkpoint {STOP_AFTER}")
    job.worker(rank=1).kill()
    assert job.wait(timeout=120) == 0, job.output()[-6000:]
    resumed_at = resumed_step(job.output())
    runs = [read_run(path) for path in find_offline_runs(run_dir)]
    assert len(runs) == 2  # one folder per attempt ...
    assert {r.run_id for r in runs} == {(run_dir / "wandb_run_id").read_text().strip()}  # ... one W&B run
    first, second = (history_series(r, "train/loss") for r in runs)
    assert second and min(step for step, _ in second) > resumed_at  # the restart logs on from its checkpoint
    assert max(step for step, _ in second) == MAX_STEPS
    assert [s for s, _ in first if s <= resumed_at] + [s for s, _ in second] == sorted(
        {s for s, _ in first if s <= resumed_at} | {s for s, _ in second}
    )
