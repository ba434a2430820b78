"""slurm/train.sbatch (torchrun per node) and slurm/train_tasks.sbatch (one task per process) on a real
Slurm cluster: they train, agree, survive a preemption by requeueing, and do not requeue failures.

    bash slurm/cluster.sh up && .venv/bin/pytest -q tests/test_slurm.py

The jobs run `sys.executable` (PYTHON=...): a job does not see the virtual environment otherwise.
Every job holds both CPUs of the test node, so they run one after the other; a requeue waits
cred_expire + 1 = 31 s. The tests that need no cluster check the shell helpers of slurm/common.sh.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import PY, REPO, TINY, assert_ok, load_weights, max_abs_diff, read_metrics, summary_fields, torchrun
from slurm_helpers import (
    cancel,
    finish,
    header_lines,
    rendezvous_port,
    requires_slurm,
    sbatch_train,
    wait_for,
    wait_state,
)
from wandb_reader import find_offline_runs, read_run

TORCHRUN_SBATCH = REPO / "slurm" / "train.sbatch"
TASKS_SBATCH = REPO / "slurm" / "train_tasks.sbatch"
COMMON_SH = REPO / "slurm" / "common.sh"
# A run long enough to be signalled mid-run (~15 steps/s on 2 processes here).
LONG = [*TINY, "train.max_steps=300", "train.log_every=10", "checkpoint.every=100"]


def sbatch(script: Path, folder: Path, *train_args: str, options: tuple[str, ...] = (), env=None) -> int:
    """Submit `script` with the dist-gru train arguments; output in `folder`/slurm-<id>.out."""
    return sbatch_train(script, folder, *train_args, python=PY, options=options, env=env)


# --------------------------------------------------------------------------------------------------
# slurm/common.sh helpers, no cluster needed


def bash(snippet: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", f'source "{COMMON_SH}"; {snippet}', "bash", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHON": PY, **(env or {})},
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("tasks_per_node", "node", "expected"),
    [("2", "0", "2"), ("2(x3),1", "2", "2"), ("2(x3),1", "3", "1"), ("4,3(x2)", "2", "3"), ("8", "5", "1")],
)
def test_tasks_on_node_reads_slurms_compressed_list(tasks_per_node, node, expected):
    res = bash("dg_tasks_on_node", env={"SLURM_TASKS_PER_NODE": tasks_per_node, "SLURM_NODEID": node})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == expected


@pytest.mark.timeout(60)
def test_run_dir_is_resolved_like_the_trainer_does(tmp_path):
    args = ["--config", str(REPO / "configs/debug.yaml"), "train.max_steps=3", "--quiet", f"train.run_dir={tmp_path}/r"]
    res = bash('dg_resolve_config "$@"', *args)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{tmp_path}/r\tauto\n"
    res = bash('dg_resolve_config "$@"', "--config", str(REPO / "configs/debug.yaml"))
    assert res.stdout == "runs/debug\tauto\n", res.stderr  # the YAML's run_dir
    res = bash('dg_resolve_config "$@"', "train.resum=none")
    assert res.returncode != 0 and res.stdout == ""
    assert "train.resum: unknown key (value 'none')" in res.stderr, res.stderr


@pytest.mark.timeout(60)
def test_rendezvous_port_skips_ports_held_by_another_job_or_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        base = busy.getsockname()[1]
        # Another job's batch shell holds base+1's lock (it has not started torchrun yet).
        lock = tmp_path / f"dist-gru-rdzv-{base + 1}.lock"
        lock.touch()
        holder = subprocess.Popen(["flock", str(lock), "sleep", "60"], start_new_session=True)
        try:
            wait_for(lambda: subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 1, 30, "the lock holder")
            res = bash(
                'dg_rdzv_port && echo "$RDZV_PORT|$_dg_port_skipped"',
                env={"RDZV_PORT_MIN": str(base), "RDZV_PORT_COUNT": "20", "DIST_GRU_LOCK_DIR": str(tmp_path)},
            )
        finally:
            holder.kill()
            holder.wait()
    assert res.returncode == 0, res.stderr
    port, skipped = res.stdout.strip().split("|")
    assert int(port) >= base + 2, res.stdout
    assert skipped.split()[:2] == [str(base), str(base + 1)], res.stdout
    assert (tmp_path / f"dist-gru-rdzv-{port}.lock").exists()


@pytest.mark.timeout(60)
def test_two_jobs_choosing_at_once_get_different_rendezvous_ports(tmp_path):
    # Two batch shells on one node choose their port at the same moment; each keeps its lock while
    # it runs (here: 3 s), as a job keeps it until it ends.
    env = {**os.environ, "PATH": "/usr/bin:/bin", "PYTHON": PY, "DIST_GRU_LOCK_DIR": str(tmp_path)}
    snippet = f'source "{COMMON_SH}"; dg_rdzv_port && echo "$RDZV_PORT" && sleep 3'
    shells = [subprocess.Popen(["bash", "-c", snippet], stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    ports = [int(shell.communicate(timeout=50)[0].strip()) for shell in shells]
    assert all(shell.returncode == 0 for shell in shells)
    assert ports[0] != ports[1] and all(20000 <= port < 21000 for port in ports), ports


# --------------------------------------------------------------------------------------------------
# Real jobs


@pytest.fixture(scope="module")
def torchrun_job(tmp_path_factory):
    """The tiny 2-process job through slurm/train.sbatch, shared by the tests that compare with it."""
    folder = tmp_path_factory.mktemp("slurm_torchrun")
    run_dir = folder / "run"
    job = sbatch(TORCHRUN_SBATCH, folder, *TINY, f"train.run_dir={run_dir}", "checkpoint.every=4")
    info, out = finish(job, folder, timeout_s=240)
    return job, info, out, run_dir


@requires_slurm
@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_torchrun_mode_trains_on_two_processes(torchrun_job):
    job, info, out, run_dir = torchrun_job
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    host = info["NodeList"]  # one node: its name is the first host of the allocation
    # The lowest free port from 20000 that no other job on the node holds (see the port tests below).
    port = rendezvous_port(out)
    assert 20000 <= port < 21000, out
    assert header_lines(out, "rendezvous endpoint:")[0].startswith(f"dist-gru slurm: rendezvous endpoint: {host}:{port}")
    # One torchrun agent per node, each printing its own (per-task expanded) node rank and host.
    assert header_lines(out, "node_rank=") == [f"dist-gru slurm: node_rank=0 host={host} nproc_per_node=2 task=0"]
    fields = summary_fields(out)
    assert fields["world_size"] == "2" and fields["backend"] == "gloo", out
    assert "SLURM_RESTART_COUNT=0" in out
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert [m["step"] for m in read_metrics(run_dir) if "train/loss" in m] == [4, 8, 12]
    assert "training step exited with code 0" in out and not (run_dir / "PREEMPTED").exists()


@requires_slurm
@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_per_task_mode_gives_the_same_weights(torchrun_job, tmp_path):
    run_dir = tmp_path / "run"
    job = sbatch(TASKS_SBATCH, tmp_path, *TINY, f"train.run_dir={run_dir}", options=("--ntasks=2",))
    info, out = finish(job, tmp_path, timeout_s=240)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    host = info["NodeList"]
    ranks = sorted(header_lines(out, "rank="))
    assert ranks == [
        f"dist-gru slurm: rank=0 local_rank=0 node_rank=0 host={host}",
        f"dist-gru slurm: rank=1 local_rank=1 node_rank=0 host={host}",
    ], out
    assert summary_fields(out)["world_size"] == "2"
    assert "torch.distributed.run" not in out  # no torchrun: Slurm started both processes
    reference = load_weights(torchrun_job[3] / "model" / "model.safetensors")
    assert max_abs_diff(load_weights(run_dir / "model" / "model.safetensors"), reference) <= 1e-5


def signal_once_training_runs(job: int, run_dir: Path) -> None:
    """USR1 to the batch shell (what --signal=B:USR1@T does) once the first metrics are written."""
    wait_state(job, "RUNNING", timeout_s=120)
    wait_for(lambda: (run_dir / "metrics.jsonl").is_file(), timeout_s=120, what="the first training metrics")
    assert cancel(job, signal="USR1", batch=True)


@requires_slurm
@pytest.mark.slurm
@pytest.mark.timeout(420)
def test_preempted_job_requeues_and_finishes_like_an_uninterrupted_run(tmp_path):
    run_dir = tmp_path / "run"
    job = sbatch(TORCHRUN_SBATCH, tmp_path, *LONG, f"train.run_dir={run_dir}")
    try:
        with ThreadPoolExecutor(1) as pool:
            signal_once_training_runs(job, run_dir)
            # The uninterrupted reference trains while the requeued job waits its 31 s.
            ref_dir = tmp_path / "reference"
            reference = pool.submit(torchrun, 2, "train", *LONG, f"train.run_dir={ref_dir}", timeout=240)
            info, out = finish(job, tmp_path, timeout_s=300)
            assert_ok(reference.result())
    finally:
        cancel(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    assert info["restarts"] == 1, out
    # The output file is appended to (--open-mode=append): both runs are in it.
    counts = [line.split("SLURM_RESTART_COUNT=")[1].split()[0] for line in header_lines(out, f"job {job} ")]
    assert counts == ["0", "1"], out
    assert "batch shell got SIGUSR1" in out and f"requeuing job {job}" in out, out
    preempted = re.search(r"preempted by signal 10; checkpoint \S+step-(\d+)", out)
    assert preempted, out
    step = int(preempted.group(1))
    assert 0 < step < 300, out
    assert f"resuming from {run_dir}/checkpoints/step-{step:06d} (step {step})" in out
    assert not (run_dir / "PREEMPTED").exists()  # removed when the second run started
    ref = load_weights(ref_dir / "model" / "model.safetensors")
    assert max_abs_diff(load_weights(run_dir / "model" / "model.safetensors"), ref) <= 1e-5
    # One W&B run: the id kept in the run folder, one offline folder per start, both readable.
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    folders = find_offline_runs(run_dir)
    assert [f.name.rsplit("-", 1)[1] for f in folders] == [run_id, run_id]
    assert [read_run(f).run_id for f in folders] == [run_id, run_id]
    first = read_run(folders[0])  # the first start's W&B service survived the signal: its history is there
    assert first.history[0]["_step"] == 10 and first.record_types.get("exit") == 1


@requires_slurm
@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_per_task_mode_preemption_past_max_requeues_exits_75(tmp_path):
    run_dir = tmp_path / "run"
    job = sbatch(
        TASKS_SBATCH,
        tmp_path,
        *LONG,
        f"train.run_dir={run_dir}",
        options=("--ntasks=2",),
        env={"MAX_REQUEUES": "0"},
    )
    try:
        signal_once_training_runs(job, run_dir)
        info, out = finish(job, tmp_path, timeout_s=200)
    finally:
        cancel(job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0", out
    assert info["restarts"] == 0, out
    assert "not requeuing: already requeued 0 times (MAX_REQUEUES=0)" in out, out
    marker = (run_dir / "PREEMPTED").read_text()
    assert '"signal": "SIGUSR1"' in marker and '"exit_code": 75' in marker
    # USR1 reached W&B's service process too, which ignores it: the run's history was written.
    (folder,) = find_offline_runs(run_dir)
    assert read_run(folder).history[0]["_step"] == 10


@requires_slurm
@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_cancelled_job_saves_but_is_not_requeued(tmp_path):
    # scancel sends TERM to the batch shell and every process: the job is ending, not preempted.
    # (log.mode=disabled: the TERM kills W&B's service process too; the run survives that, with a
    # warning, as test_tracking.py checks, but a W&B shutdown is not what this test is about.)
    run_dir = tmp_path / "run"
    args = (*LONG, f"train.run_dir={run_dir}", "log.mode=disabled")
    job = sbatch(TASKS_SBATCH, tmp_path, *args, options=("--ntasks=2",))
    try:
        wait_state(job, "RUNNING", timeout_s=120)
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file(), timeout_s=120, what="the first training metrics")
        assert cancel(job)
        info, out = finish(job, tmp_path, timeout_s=120)
    finally:
        cancel(job)
    assert info["JobState"] == "CANCELLED" and info["restarts"] == 0, out
    assert "batch shell got SIGTERM" in out, out
    assert "not requeuing: Slurm is ending the job (SIGTERM)" in out, out
    assert (run_dir / "PREEMPTED").is_file()  # the checkpoint was saved: a resubmission resumes


@requires_slurm
@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_failing_jobs_exit_nonzero_and_are_not_requeued(tmp_path):
    missing = tmp_path / "no-such-data"
    bad_data = sbatch(TORCHRUN_SBATCH, tmp_path, *TINY, "data.name=files", f"data.train_path={missing}")
    bad_key = sbatch(TASKS_SBATCH, tmp_path, *TINY, "train.max_step=5", options=("--ntasks=2",))
    info, out = finish(bad_data, tmp_path, timeout_s=200)
    assert info["JobState"] == "FAILED" and info["exit_status"] != 0, out
    assert info["restarts"] == 0, out
    assert f"error: {missing}: does not exist" in out, out
    assert "no PREEMPTED marker): not requeuing" in out, out
    info, out = finish(bad_key, tmp_path, timeout_s=200)
    # A bad config fails in the batch shell already, before any process starts.
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", out
    assert info["restarts"] == 0, out
    assert "train.max_step: unknown key (value 5)" in out and "rendezvous" not in out, out
