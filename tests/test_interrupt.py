"""Ctrl-C loses nothing: the first SIGINT is a preemption, a second one aborts at once.

    .venv/bin/pytest -q tests/test_interrupt.py

A terminal sends SIGINT to the whole foreground process group (the trainer, its W&B service, any
loader workers), so the tests do the same with `killpg`. Periodic checkpoints by the clock
(`checkpoint.every_minutes`) are agreed on by every rank, like the signals.
"""

from __future__ import annotations

import os
import signal
import textwrap

import pytest
from conftest import PY, TINY, Background, assert_ok, cli, run, torchrun

from dist_gru.train import checkpoint as ckpt_lib
from dist_gru.train.preemption import EXIT_ABORTED

pytestmark = pytest.mark.slow

LONG = [*(arg for arg in TINY if not arg.startswith("train.max_steps")), "train.max_steps=100000", "checkpoint.every=4"]


@pytest.mark.parametrize("workers", [0, 1])
def test_ctrl_c_saves_and_the_same_command_resumes(tmp_path, workers):
    """Also with a loader worker in the process group: it ignores SIGINT and keeps feeding."""
    run_dir = tmp_path / "run"
    # W&B's service shares the process group too.
    args = ["train", *LONG, f"train.run_dir={run_dir}", f"data.num_workers={workers}", "log.mode=offline"]
    job = Background([PY, "-m", "dist_gru", *args], tmp_path / "train.log")
    try:
        job.wait_until(lambda: (run_dir / "checkpoints" / "step-000004").is_dir(), "the first checkpoint")
        os.killpg(job.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        code = job.wait()
    finally:
        job.kill()
    out = job.output()
    assert code == ckpt_lib.EXIT_PREEMPTED, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert out.count("dist-gru: interrupted: saving a checkpoint at the next step") == 1, out
    marker = ckpt_lib.read_preempted(run_dir)
    assert marker["signal"] == "SIGINT"
    step = marker["step"]
    assert f"preempted by signal 2; checkpoint {run_dir / 'checkpoints' / f'step-{step:06d}'}" in out
    again = cli(*args[:-1], "log.mode=disabled", f"train.max_steps={step + 4}", timeout=120)
    assert_ok(again)
    assert f"resuming from {run_dir / 'checkpoints' / f'step-{step:06d}'} (step {step})" in again.stdout


def test_second_ctrl_c_aborts_at_once(tmp_path):
    """Two real SIGINTs to a process that installed the handlers: the second ends it with 130 and
    one line, without waiting for a step boundary."""
    script = textwrap.dedent(
        """
        import os, signal, time
        from dist_gru.train.preemption import StepBoundary
        boundary = StepBoundary(["SIGINT"], every_minutes=0)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        print("first seen:", boundary.signum, boundary.agreed(), flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        print("not reached", flush=True)
        """
    )
    result = run([PY, "-c", script], timeout=60)
    assert result.returncode == EXIT_ABORTED == 130, result.output
    assert "first seen: 2 (True, False)" in result.stdout
    assert "not reached" not in result.stdout
    assert result.stderr.count("dist-gru: interrupted: saving a checkpoint") == 1, result.stderr
    assert "dist-gru: interrupted again: stopping now, without a checkpoint" in result.stderr


def test_clock_checkpoints_agreed_by_every_rank(tmp_path):
    """checkpoint.every_minutes on 2 processes: rank 0's clock asks, both ranks save the same steps."""
    run_dir = tmp_path / "run"
    result = torchrun(
        2,
        "train",
        *TINY,
        f"train.run_dir={run_dir}",
        "train.max_steps=40",
        "checkpoint.every_minutes=0.0005",  # 30 ms: several saves within 40 steps, none by step count
        "checkpoint.keep=1000",
        "log.mode=disabled",
        timeout=240,
    )
    assert_ok(result)
    steps = [int(p.name[5:]) for p in ckpt_lib.list_checkpoints(run_dir)]
    assert steps[-1] == 40 and len(steps) >= 3, steps
    for path in ckpt_lib.list_checkpoints(run_dir):
        ckpt_lib.verify(path)  # every one complete


def test_no_clock_checkpoint_when_off(tmp_path):
    run_dir = tmp_path / "run"
    assert_ok(cli("train", *TINY, f"train.run_dir={run_dir}", "checkpoint.every_minutes=0", "log.mode=disabled"))
    assert [p.name for p in ckpt_lib.list_checkpoints(run_dir)] == ["step-000012"]
