"""One job per run folder, with real processes: a second job refuses before it writes anything.

    .venv/bin/pytest -q tests/test_run_lock.py

The first job holds an flock on `<run_dir>/.lock` for its whole life (global rank 0 holds it for
all ranks); a second job, one process or a torchrun job, exits 2 with one `error:` line naming the
holder. A holder killed by SIGKILL leaves a lock file but no lock: the next job resumes at once.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from conftest import PY, TINY, Background, cli, read_metrics, run, torchrun, torchrun_cmd

from dist_gru.train import run_lock

pytestmark = pytest.mark.slow

LONG = [
    *(arg for arg in TINY if not arg.startswith("train.max_steps")),
    "train.max_steps=100000",
    "checkpoint.every=4",
    "log.mode=disabled",
]


def _start(tmp_path: Path, run_dir: Path, nproc: int = 1) -> Background:
    args = ("train", *LONG, f"train.run_dir={run_dir}")
    cmd = torchrun_cmd(nproc, *args) if nproc > 1 else [PY, "-m", "dist_gru", *args]
    job = Background(cmd, tmp_path / f"first-{nproc}.log")
    job.wait_until(lambda: (run_dir / "checkpoints" / "step-000004").is_dir(), "the first checkpoint")
    return job


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error")]


@pytest.fixture
def first(tmp_path):
    jobs: list[Background] = []

    def start(run_dir: Path, nproc: int = 1) -> Background:
        jobs.append(_start(tmp_path, run_dir, nproc))
        return jobs[-1]

    yield start
    for job in jobs:
        job.kill()


def test_second_job_refuses_and_the_first_trains_on(tmp_path, first):
    run_dir = tmp_path / "run"
    job = first(run_dir)
    holder = job.proc.pid
    second = cli("train", *LONG, f"train.run_dir={run_dir}", "optim.lr=0.01", timeout=120)
    assert second.returncode == 2, second.output
    errors = _error_lines(second.stderr)
    assert len(errors) == 1, second.stderr
    assert f"train.run_dir={run_dir} is in use by another job (pid {holder} on host" in errors[0]
    assert "use another train.run_dir" in errors[0]
    assert second.stdout == ""  # not even the resolved config: it refused before everything
    # The first job never noticed: it saves, then stops on SIGTERM like any preempted run.
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait() == 75, job.output()
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == sorted(set(steps)), steps  # one writer: no step logged twice
    assert "optim.lr: 0.01" not in (run_dir / "config.yaml").read_text()
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    # Once the holder is gone, the same command resumes its run.
    last = max(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*"))
    again = cli("train", *LONG, f"train.run_dir={run_dir}", f"train.max_steps={last + 4}", timeout=120)
    assert again.returncode == 0, again.output
    assert f"resuming from {run_dir / 'checkpoints' / f'step-{last:06d}'}" in again.stdout


def test_a_killed_holder_never_blocks_the_next_job(tmp_path, first):
    """... and the next job, holding the lock, removes the unfinished save a kill can leave."""
    run_dir = tmp_path / "run"
    job = first(run_dir)
    job.kill()  # SIGKILL: no handler runs, the lock file stays with the dead job's pid in it
    assert f'"pid": {job.proc.pid}' in (run_dir / run_lock.LOCK_FILE).read_text()
    unfinished = run_dir / "checkpoints" / f".tmp-step-000099-{job.proc.pid}"
    unfinished.mkdir(exist_ok=True)  # what a kill in the middle of a save leaves
    last = max(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*"))
    again = cli("train", *LONG, f"train.run_dir={run_dir}", f"train.max_steps={last + 4}", timeout=120)
    assert again.returncode == 0, again.output
    assert "resuming from" in again.stdout
    assert not list((run_dir / "checkpoints").glob(".tmp-step-*"))


def test_second_torchrun_job_refuses_once(tmp_path, first):
    run_dir = tmp_path / "run"
    job = first(run_dir, nproc=2)
    holder = job.worker(0).pid  # global rank 0 holds the lock for the whole job
    second = torchrun(2, "train", *LONG, f"train.run_dir={run_dir}", timeout=180)
    assert second.returncode != 0, second.output
    errors = _error_lines(second.stderr)
    assert len(errors) == 1, second.stderr  # rank 0 says it; rank 1 exits 2 quietly
    assert f"is in use by another job (pid {holder} on host" in errors[0]
    assert "world_size=" not in second.stdout  # refused before the run started
    assert job.proc.poll() is None  # the first job trains on
    job.kill()


def test_a_refused_job_leaves_no_folder(tmp_path):
    """A check that fails after the lock was taken (here: fewer samples than one global batch)
    removes the lock file and the folders the lock made: nothing on disk changed."""
    run_dir = tmp_path / "new" / "run"
    result = cli("train", *TINY, f"train.run_dir={run_dir}", "data.train_size=40", "train.global_batch_size=64")
    assert result.returncode == 2, result.output
    assert "fewer than one global batch" in result.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("launcher", ["torch.distributed.run", "dist_gru.torchrun"])
def test_user_error_under_torchrun_printed_once_and_nothing_written(tmp_path, launcher):
    """Every rank finds the error; rank 0 prints it, once. torchrun itself exits 1 with its
    ChildFailedError traceback; dist_gru.torchrun (what launch/ and slurm/ run) ends in one line, exit 2."""
    run_dir = tmp_path / "run"
    args = ("train", *TINY, f"train.run_dir={run_dir}", "data.train_size=40", "train.global_batch_size=64")
    cmd = torchrun_cmd(2, *args)
    cmd[cmd.index("torch.distributed.run")] = launcher
    result = run(cmd, timeout=180)
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and "fewer than one global batch" in errors[0], result.stderr
    assert not run_dir.exists()
    if launcher == "dist_gru.torchrun":
        assert result.returncode == 2, result.output
        assert "Traceback" not in result.output and "ChildFailedError" not in result.output, result.output
        assert "dist-gru torchrun: stopped: rank 0 exited with 2 (the error above)" in result.stderr
    else:
        assert result.returncode == 1


def test_lock_is_exclusive_and_released(tmp_path):
    """In one process: a second acquire is refused (flock conflicts between open file descriptions),
    a release lets the next one in, and `undo` removes only what acquire made."""
    run_dir = tmp_path / "a" / "b"
    lock = run_lock.RunLock.acquire(run_dir)
    with pytest.raises(run_lock.RunFolderInUse, match=r"pid \d+ on host"):
        run_lock.RunLock.acquire(run_dir)
    lock.release(undo=True)
    assert not (tmp_path / "a").exists()
    run_dir.mkdir(parents=True)
    (run_dir / "mine.txt").write_text("x")
    lock = run_lock.RunLock.acquire(run_dir)
    lock.release(undo=True)
    assert sorted(p.name for p in run_dir.iterdir()) == ["mine.txt"]
