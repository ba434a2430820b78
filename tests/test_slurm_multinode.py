"""slurm/train.sbatch and slurm/train_tasks.sbatch across two nodes of a real Slurm cluster: the ranks
spread over both nodes and train like one process; a preempted job requeues and finishes like an
uninterrupted run; a node whose training processes die fails the job quickly, and a resubmission
resumes; a crash on the second node names its rank in the job output.

    bash slurm/cluster.sh down; bash slurm/cluster.sh up --nodes 2
    DIST_GRU_REQUIRE_SLURM_MULTINODE=1 .venv/bin/pytest -q -s tests/test_slurm_multinode.py

Each node of the test cluster is a network namespace of this machine with 2 CPUs, each shared by up to
four jobs (OverSubscribe=FORCE:4); a job here takes 1 CPU per node. To keep the stage short, every
scenario starts at once in its own thread when the module starts (jobs beyond the node's room queue
in Slurm), and each test checks one of them.
With -s the tests print the weight differences, the requeue timeline and the time from the kill to
FAILED.
"""

from __future__ import annotations

import os
import re
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import PY, REPO, TINY, assert_ok, cli, load_weights, max_abs_diff, summary_fields
from slurm_helpers import (
    cancel,
    cmdline,
    finish,
    follow_job,
    header_lines,
    job_pids,
    rendezvous_port,
    requires_slurm_multinode,
    sbatch_train,
    submit,
    train_job_env,
    usable_nodes,
    wait_for,
    wait_state,
)

pytestmark = [pytest.mark.slurm_multinode, requires_slurm_multinode]

TORCHRUN_SBATCH = REPO / "slurm" / "train.sbatch"
TASKS_SBATCH = REPO / "slurm" / "train_tasks.sbatch"
TUNE_SBATCH = REPO / "slurm" / "tune.sbatch"
# No W&B service: these tests are about the launch, and it costs seconds per start.
SHORT = [*TINY, "log.mode=disabled"]
# Long enough to be preempted or killed mid-run, short enough for a loaded 2-core machine.
LONG = [*SHORT, "train.max_steps=120", "train.log_every=10", "checkpoint.every=20"]
# One training process per node (world size 2 over 2 nodes), 1 of each node's 2 CPUs, a time limit
# far above what any job here needs: a job that ends by itself did not wait for it.
TWO_NODES = ("--nodes=2", "--cpus-per-task=1", "--time=10")
TORCHRUN_ENV = {"NPROC_PER_NODE": "1"}
TASKS = ("--ntasks-per-node=1",)
JOB_TIMEOUT_S = 420
TOLERANCE = 1e-6

# A crash on one rank, injected at its third forward pass: Python imports `sitecustomize` from the
# job's PYTHONPATH at start-up. The rank is chosen by the variable below.
CRASH_HOOK = """
import os
if os.environ.get("RANK") == os.environ.get("DIST_GRU_TEST_CRASH_RANK"):
    import dist_gru.model as model

    forward = model.GRUModel.forward
    calls = [0]

    def crashing_forward(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected failure in the third forward pass")
        return forward(self, *args, **kwargs)

    model.GRUModel.forward = crashing_forward
"""


def sbatch(script: Path, folder: Path, *train_args: str, options=(), env=None) -> int:
    return sbatch_train(script, folder, *train_args, python=PY, options=options, env=env)


def weights(run_dir: Path) -> dict:
    return load_weights(run_dir / "model" / "model.safetensors")


def complete_checkpoints(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if (p / "COMPLETE").is_file())


def timeline(changes: list[tuple[float, str]], t0: float) -> str:
    return ", ".join(f"{t - t0:+.1f}s {state}" for t, state in changes)


# --------------------------------------------------------------------------------------------------
# The scenarios, each run in a thread of the module's pool; each returns what its test checks.


def reference(folder: Path, args: list[str]) -> Path:
    """The same training as one local process: the 1-node, 1-process run of the same global batch."""
    run_dir = folder / "run"
    assert_ok(cli("train", *args, f"train.run_dir={run_dir}", timeout=JOB_TIMEOUT_S))
    return run_dir


def two_node_jobs(folder: Path, jobs: list[int]) -> dict:
    """Both scripts on both nodes at once: they share the first node, where both rendezvous."""
    torchrun_dir, tasks_dir = folder / "torchrun", folder / "tasks"
    torchrun_job = sbatch(
        TORCHRUN_SBATCH, folder, *SHORT, f"train.run_dir={torchrun_dir}", options=TWO_NODES, env=TORCHRUN_ENV
    )
    jobs.append(torchrun_job)
    tasks_job = sbatch(TASKS_SBATCH, folder, *SHORT, f"train.run_dir={tasks_dir}", options=(*TWO_NODES, *TASKS))
    jobs.append(tasks_job)
    # Both followed at once: a finished job's record is purged seconds after it ends.
    with ThreadPoolExecutor(2) as pool:
        torchrun_wait = pool.submit(finish, torchrun_job, folder, JOB_TIMEOUT_S)
        tasks_info, tasks_out = finish(tasks_job, folder, JOB_TIMEOUT_S)
        torchrun_info, torchrun_out = torchrun_wait.result()
    return {
        "torchrun": (torchrun_job, torchrun_info, torchrun_out, torchrun_dir),
        "tasks": (tasks_job, tasks_info, tasks_out, tasks_dir),
    }


def restartable_job(folder: Path, run_dir: Path, jobs: list[int]) -> int:
    """Submit a long 2-node torchrun job with MAX_RESTARTS=1."""
    job = sbatch(
        TORCHRUN_SBATCH,
        folder,
        *LONG,
        f"train.run_dir={run_dir}",
        options=TWO_NODES,
        # LOGLEVEL=INFO: torchrun's agents then say when they restart a worker group, or finish.
        env={**TORCHRUN_ENV, "MAX_RESTARTS": "1", "LOGLEVEL": "INFO"},
    )
    jobs.append(job)
    return job


def preempted_job(folder: Path, jobs: list[int]) -> dict:
    """A 2-node torchrun job with MAX_RESTARTS=1, preempted once its first metrics are written."""
    run_dir = folder / "run"
    job = restartable_job(folder, run_dir, jobs)
    t_submit = time.monotonic()
    wait_state(job, "RUNNING", timeout_s=JOB_TIMEOUT_S)
    wait_for(lambda: (run_dir / "metrics.jsonl").is_file(), timeout_s=JOB_TIMEOUT_S, what="the first metrics")
    t_signal = time.monotonic()
    assert cancel(job, signal="USR1", batch=True)
    info, changes = follow_job(job, timeout_s=JOB_TIMEOUT_S)
    out = (folder / f"slurm-{job}.out").read_text()
    return {"job": job, "info": info, "out": out, "run_dir": run_dir, "t_submit": t_submit, "t_signal": t_signal,
            "changes": changes}


def early_notice_job(folder: Path, jobs: list[int]) -> dict:
    """A per-task 2-node job that gets its preemption notice before any training process can handle it."""
    run_dir = folder / "run"
    # Repeats every 2 s, not the default 10: on a fast machine the whole training takes about 10 s,
    # and a 10 s cycle can fall once into start-up and next after the end.
    job = sbatch(
        TASKS_SBATCH, folder, *LONG, f"train.run_dir={run_dir}", options=(*TWO_NODES, *TASKS),
        env={"DG_RENOTIFY_S": "2"},
    )
    jobs.append(job)
    output = folder / f"slurm-{job}.out"
    # The header is written once the batch shell's trap is in place, before the tasks start Python.
    wait_for(lambda: output.is_file() and "rendezvous endpoint" in output.read_text(), JOB_TIMEOUT_S, "the header")
    before_start = "dist-gru: world_size=" not in output.read_text()
    assert cancel(job, signal="USR1", batch=True)
    info, changes = follow_job(job, timeout_s=JOB_TIMEOUT_S)
    return {"job": job, "info": info, "out": output.read_text(), "before_start": before_start, "run_dir": run_dir}


def kill_training_processes(job: int, node: str) -> list[int]:
    """SIGKILL the job's training processes on the node: the workers (and the bash parent each runs
    under), not their torchrun agent (`python -m dist_gru.torchrun`, whose command line holds the
    workers' command too): what an out-of-memory kill takes first."""
    victims = [
        pid
        for pid in job_pids(node, job)
        if "-m dist_gru train" in " ".join(cmdline(pid)) and "dist_gru.torchrun" not in cmdline(pid)
    ]
    assert victims, f"no training process of job {job} on {node}: {[cmdline(p) for p in job_pids(node, job)]}"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    return victims


def killed_node_job(folder: Path, jobs: list[int]) -> dict:
    """Kill node2's training processes after the first checkpoint; then resubmit the same command."""
    run_dir = folder / "run"
    args = (*LONG, f"train.run_dir={run_dir}")
    job = sbatch(TORCHRUN_SBATCH, folder, *args, options=TWO_NODES, env=TORCHRUN_ENV)
    jobs.append(job)
    wait_state(job, "RUNNING", timeout_s=JOB_TIMEOUT_S)
    wait_for(lambda: complete_checkpoints(run_dir), timeout_s=JOB_TIMEOUT_S, what="the first checkpoint")
    victims = kill_training_processes(job, "node2")
    t_kill = time.monotonic()
    info, changes = follow_job(job, timeout_s=JOB_TIMEOUT_S)
    out = (folder / f"slurm-{job}.out").read_text()
    checkpoints = complete_checkpoints(run_dir)
    again = sbatch(TORCHRUN_SBATCH, folder, *args, options=TWO_NODES, env=TORCHRUN_ENV)
    jobs.append(again)
    again_info, again_out = finish(again, folder, JOB_TIMEOUT_S)
    return {"job": job, "info": info, "out": out, "t_kill": t_kill, "changes": changes, "victims": victims,
            "checkpoints": checkpoints, "again": (again, again_info, again_out), "run_dir": run_dir}


def restarted_job(folder: Path, jobs: list[int]) -> dict:
    """MAX_RESTARTS=1: kill node2's training processes after the first checkpoint; torchrun restarts."""
    run_dir = folder / "run"
    job = restartable_job(folder, run_dir, jobs)
    wait_state(job, "RUNNING", timeout_s=JOB_TIMEOUT_S)
    wait_for(lambda: complete_checkpoints(run_dir), timeout_s=JOB_TIMEOUT_S, what="the first checkpoint")
    checkpoints = complete_checkpoints(run_dir)
    kill_training_processes(job, "node2")
    info, _ = follow_job(job, timeout_s=JOB_TIMEOUT_S)
    return {"job": job, "info": info, "out": (folder / f"slurm-{job}.out").read_text(), "run_dir": run_dir,
            "checkpoints": checkpoints}


def crashed_rank_job(folder: Path, jobs: list[int]) -> dict:
    hook = folder / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASH_HOOK)
    job = sbatch(
        TORCHRUN_SBATCH,
        folder,
        *SHORT,
        f"train.run_dir={folder / 'run'}",
        options=TWO_NODES,
        env={**TORCHRUN_ENV, "PYTHONPATH": str(hook), "DIST_GRU_TEST_CRASH_RANK": "1"},
    )
    jobs.append(job)
    info, changes = follow_job(job, timeout_s=JOB_TIMEOUT_S)
    return {"job": job, "info": info, "out": (folder / f"slurm-{job}.out").read_text()}


def same_folder_jobs(folder: Path, jobs: list[int]) -> dict:
    """A job on node1 trains in a run folder; a second job on node2 is started on the same folder
    (the shared file system): it must refuse, naming the first one's host and Slurm job."""
    run_dir = folder / "run"
    args = (*LONG, "train.max_steps=100000", f"train.run_dir={run_dir}")
    first = sbatch(TASKS_SBATCH, folder, *args, options=("--nodes=1", "--nodelist=node1", "--cpus-per-task=1", "--time=10"))
    jobs.append(first)
    wait_for(lambda: complete_checkpoints(run_dir), timeout_s=JOB_TIMEOUT_S, what="the first job's first checkpoint")
    second = sbatch(TASKS_SBATCH, folder, *args, options=("--nodes=1", "--nodelist=node2", "--cpus-per-task=1", "--time=10"))
    jobs.append(second)
    second_info, second_out = finish(second, folder, JOB_TIMEOUT_S)
    first_state = wait_state(first, "RUNNING", timeout_s=10)["JobState"]  # still training
    cancel(first)
    return {"first": first, "first_state": first_state, "second": second, "info": second_info, "out": second_out,
            "run_dir": run_dir}


def tune_arrays(folder: Path, jobs: list[int]) -> dict:
    """One study, worked on by a 2-task array on each node (4 workers); one array task is sent the
    preemption notice while its trial trains, and requeues."""
    study = folder / "study"
    base = folder / "base.yaml"
    base.write_text(
        "model: {hidden_size: 8, num_layers: 1}\n"
        "data: {name: adding, seq_len: 10, train_size: 256, val_size: 64}\n"
        "train: {global_batch_size: 16, max_steps: 400, log_every: 20, eval_every: 200}\n"
        "checkpoint: {every: 20}\nlog: {mode: disabled}\n"
    )
    space = folder / "space.yaml"
    space.write_text(
        "sampler: {name: random, seed: 0}\npruner: {name: none}\n"
        "params:\n  optim.lr: {low: 1.0e-3, high: 1.0e-2, log: true}\n  model.hidden_size: {choices: [4, 8]}\n"
    )
    args = ("--config", str(base), "--space", str(space), "--study", str(study), "--trials", "6")
    arrays = {}
    for node in ("node1", "node2"):
        arrays[node] = submit(
            TUNE_SBATCH, f"--output={folder}/slurm-%A_%a.out", "--array=0-1", f"--nodelist={node}",
            "--cpus-per-task=1", "--time=10", env=train_job_env(PY), cwd=folder, script_args=args,
        )  # fmt: skip
        jobs.append(arrays[node])
    first = folder / f"slurm-{arrays['node1']}_0.out"
    wait_for(lambda: first.is_file() and "tune: starting trial" in first.read_text(), JOB_TIMEOUT_S, "a trial")
    preempted = int(re.findall(r"tune: starting trial (\d+)", first.read_text())[-1])
    checkpoints = study / "trials" / f"{preempted:04d}" / "checkpoints"
    # Mid-training, with a checkpoint to resume from (the trial has 400 steps, saved every 20).
    wait_for(lambda: any(checkpoints.glob("step-*/COMPLETE")), JOB_TIMEOUT_S, "the trial's first checkpoint")
    assert cancel(f"{arrays['node1']}_0", signal="USR1", batch=True)
    wait_for(lambda: not queued(arrays.values()), timeout_s=JOB_TIMEOUT_S * 2, what="the arrays to finish")
    outputs = {path.name: path.read_text() for path in sorted(folder.glob("slurm-*.out"))}
    return {"study": study, "arrays": arrays, "preempted": preempted, "outputs": outputs}


def queued(job_ids) -> bool:
    import subprocess

    listed = subprocess.run(["squeue", "-h", "-j", ",".join(map(str, job_ids))], capture_output=True, text=True, timeout=60)
    return bool(listed.stdout.strip())


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    jobs: list[int] = []
    futures: dict[str, Future] = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        # Submitted in this order, so the two-node pair starts first, together.
        for name, fn in [
            ("two_node", two_node_jobs),
            ("preempt", preempted_job),
            ("kill", killed_node_job),
            ("crash", crashed_rank_job),
            ("early_notice", early_notice_job),
            ("restart", restarted_job),
            ("same_folder", same_folder_jobs),
            ("tune", tune_arrays),
        ]:
            futures[name] = pool.submit(fn, tmp_path_factory.mktemp(name), jobs)
            time.sleep(0.5)
        futures["reference"] = pool.submit(reference, tmp_path_factory.mktemp("reference"), SHORT)
        futures["reference_long"] = pool.submit(reference, tmp_path_factory.mktemp("reference_long"), LONG)
        try:
            yield futures
        finally:
            for job in list(jobs):
                cancel(job)


def result(scenarios: dict[str, Future], name: str):
    return scenarios[name].result(timeout=900)


# --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_the_cluster_has_two_idle_nodes_and_leaves_the_machines_hosts_file_alone():
    assert usable_nodes() == ["node1", "node2"]
    # Each node's name resolves inside its own mount namespace only.
    assert not re.search(r"\bnode[12]\b", Path("/etc/hosts").read_text())


@pytest.mark.timeout(1000)
def test_both_scripts_put_ranks_on_both_nodes_and_train_like_one_process(scenarios):
    jobs = result(scenarios, "two_node")
    ref = weights(result(scenarios, "reference"))
    job, info, out, run_dir = jobs["torchrun"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    assert info["NodeList"] == "node[1-2]", info
    # One torchrun agent per node, each printing its own node rank and host (in either order).
    assert sorted(header_lines(out, "node_rank=")) == [
        "dist-gru slurm: node_rank=0 host=node1 nproc_per_node=1 task=0",
        "dist-gru slurm: node_rank=1 host=node2 nproc_per_node=1 task=1",
    ], out
    assert header_lines(out, "rendezvous endpoint:")[0].startswith("dist-gru slurm: rendezvous endpoint: node1:"), out
    fields = summary_fields(out)
    assert (fields["world_size"], fields["nodes"], fields["backend"]) == ("2", "2", "gloo"), out
    torchrun_diff = max_abs_diff(weights(run_dir), ref)

    tasks_job, tasks_info, tasks_out, tasks_dir = jobs["tasks"]
    assert tasks_info["JobState"] == "COMPLETED" and tasks_info["ExitCode"] == "0:0", tasks_out
    assert sorted(header_lines(tasks_out, "rank=")) == [
        "dist-gru slurm: rank=0 local_rank=0 node_rank=0 host=node1",
        "dist-gru slurm: rank=1 local_rank=0 node_rank=1 host=node2",
    ], tasks_out
    assert header_lines(tasks_out, "rendezvous endpoint:")[0].startswith(
        "dist-gru slurm: rendezvous endpoint: node1:"
    ), tasks_out
    fields = summary_fields(tasks_out)
    assert (fields["world_size"], fields["nodes"]) == ("2", "2"), tasks_out
    tasks_diff = max_abs_diff(weights(tasks_dir), ref)

    # The two jobs ran at the same time on the same nodes: each rendezvous on node1 had its own port,
    # the second job to choose skipped the first one's.
    ports = {job: rendezvous_port(out), tasks_job: rendezvous_port(tasks_out)}
    print(f"\n2 nodes vs 1 process, max abs weight difference: train.sbatch {torchrun_diff:.2e}, "
          f"train_tasks.sbatch {tasks_diff:.2e}; rendezvous ports on node1: {ports}")
    assert ports[job] != ports[tasks_job], (out, tasks_out)
    later = out if ports[job] > ports[tasks_job] else tasks_out
    assert re.search(rf"skipped, in use:.* {min(ports.values())}\b", later), later
    assert torchrun_diff <= TOLERANCE and tasks_diff <= TOLERANCE


@pytest.mark.timeout(1000)
def test_preempted_two_node_job_requeues_and_finishes_like_an_uninterrupted_run(scenarios):
    r = result(scenarios, "preempt")
    job, info, out, run_dir = r["job"], r["info"], r["out"], r["run_dir"]
    ref = weights(result(scenarios, "reference_long"))
    print(f"\nrequeue timeline of job {job} (0 = USR1 to the batch shell): "
          f"submitted {r['t_submit'] - r['t_signal']:+.1f}s, {timeline(r['changes'], r['t_signal'])}")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    assert info["restarts"] == 1, out
    counts = [line.split("SLURM_RESTART_COUNT=")[1].split()[0] for line in header_lines(out, f"job {job} ")]
    assert counts == ["0", "1"], out
    assert "batch shell got SIGUSR1" in out and f"requeuing job {job}" in out, out
    preempted = re.findall(r"preempted by signal 10; checkpoint \S+step-(\d+)", out)
    assert len(preempted) == 1, out
    step = int(preempted[0])
    assert 0 < step < 120, out
    # MAX_RESTARTS=1, yet torchrun did not restart the preempted workers: they exited 0 to it, the
    # marker stayed, the batch shell requeued. One resume only: the requeued run's.
    assert re.findall(r"resuming from (\S+)", out) == [f"{run_dir}/checkpoints/step-{step:06d}"], out
    assert out.count("training step exited with code 0") == 2, out
    assert "will restart worker group" not in out and "worker group successfully finished" in out, out
    diff = max_abs_diff(weights(run_dir), ref)
    print(f"preempted at step {step}, resumed after the requeue; max abs weight difference to the "
          f"uninterrupted 1-process run: {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.timeout(1000)
def test_killed_node_fails_the_job_quickly_and_a_resubmission_resumes(scenarios):
    r = result(scenarios, "kill")
    job, info, out = r["job"], r["info"], r["out"]
    t_failed = next(t for t, state in r["changes"] if state.startswith(("FAILED", "CANCELLED", "COMPLETED")))
    print(f"\njob {job}: killed node2's training processes {r['victims']}; "
          f"{timeline(r['changes'], r['t_kill'])}; kill to {info['JobState']}: {t_failed - r['t_kill']:.1f}s")
    assert info["JobState"] == "FAILED" and info["exit_status"] != 0, out
    assert info["restarts"] == 0, out
    # Far inside the 10 minute time limit: the surviving node did not wait for its dead peer.
    assert t_failed - r["t_kill"] < 120, out
    assert "Signal 9 (SIGKILL)" in out and "no PREEMPTED marker): not requeuing" in out, out
    assert r["checkpoints"], out
    again, again_info, again_out = r["again"]
    assert again_info["JobState"] == "COMPLETED" and again_info["ExitCode"] == "0:0", again_out
    latest = r["checkpoints"][-1]
    assert f"resuming from {r['run_dir']}/checkpoints/step-{latest:06d}" in again_out, again_out
    diff = max_abs_diff(weights(r["run_dir"]), weights(result(scenarios, "reference_long")))
    print(f"resubmitted as job {again}: resumed from step {latest}; max abs weight difference to the "
          f"uninterrupted 1-process run: {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.timeout(1000)
def test_a_crash_on_the_second_node_names_its_rank_in_the_job_output(scenarios):
    r = result(scenarios, "crash")
    info, out = r["info"], r["out"]
    assert info["JobState"] == "FAILED" and info["exit_status"] != 0, out
    assert info["restarts"] == 0, out
    line = "dist-gru: rank 1 of 2 (local rank 0, host node2) crashed: RuntimeError: injected failure in the third forward pass"
    assert line in out, out
    report = out[out.index(line):]
    assert report.splitlines()[1] == "Traceback (most recent call last):", report[:2000]
    # torchrun's failure summary (from the error file @record wrote) names the same rank and host.
    summaries = [block[:4000] for block in out.split("Root Cause (first observed failure):")[1:]]
    assert any(
        "host      : node2" in block
        and "rank      : 1 (local_rank: 0)" in block
        and "injected failure in the third forward pass" in block
        for block in summaries
    ), out


@pytest.mark.timeout(1000)
def test_a_notice_before_the_handlers_exist_kills_no_task_and_still_requeues(scenarios):
    r = result(scenarios, "early_notice")
    job, info, out = r["job"], r["info"], r["out"]
    assert r["before_start"], out  # the notice came before training started
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    # No task died of the signal (tasks ignore USR1 until dist_gru's handler is in place); the notice
    # was repeated until a handler took it, then the job was preempted and requeued once.
    assert "User defined signal 1" not in out and "exit code 138" not in out, out
    assert "repeating the preemption notice" in out, out
    assert info["restarts"] == 1 and f"requeuing job {job}" in out, out
    preempted = re.findall(r"preempted by signal 10; checkpoint \S+step-(\d+)", out)
    assert len(preempted) == 1, out
    print(f"\njob {job}: notice before start-up, preempted at step {preempted[0]} after "
          f"{out.count('repeating the preemption notice')} repeat(s), requeued, finished")


@pytest.mark.timeout(1000)
def test_max_restarts_restarts_both_nodes_after_a_failure_and_the_job_finishes(scenarios):
    r = result(scenarios, "restart")
    job, info, out, run_dir = r["job"], r["info"], r["out"], r["run_dir"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    assert info["restarts"] == 0, out  # torchrun restarted the workers; Slurm did not requeue
    assert "Worker group FAILED. 1/1 attempts left; will restart worker group" in out, out
    resumed = re.findall(r"resuming from \S+step-(\d+)", out)
    assert len(resumed) == 1 and int(resumed[0]) >= r["checkpoints"][0], out
    diff = max_abs_diff(weights(run_dir), weights(result(scenarios, "reference_long")))
    print(f"\njob {job}: node2's workers killed, torchrun restarted both nodes' workers from step "
          f"{int(resumed[0])}; max abs weight difference to the uninterrupted 1-process run: {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.timeout(1000)
def test_a_second_job_on_another_node_refuses_the_run_folder(scenarios):
    """The run folder's lock holds across the nodes of a shared file system."""
    same = result(scenarios, "same_folder")
    assert same["first_state"] == "RUNNING"
    out = same["out"]
    assert same["info"]["JobState"] == "FAILED", out
    errors = [line for line in out.splitlines() if line.startswith("error")]
    assert len(errors) == 1, out
    assert f"train.run_dir={same['run_dir']} is in use by another job" in errors[0], out
    assert f"on host node1, Slurm job {same['first']}" in errors[0], out


@pytest.mark.timeout(1200)
def test_slurm_arrays_on_two_nodes_run_one_study_to_the_end_through_a_requeue(scenarios):
    from dist_gru.tune.study import open_existing

    r = result(scenarios, "tune")
    outputs, study, preempted = r["outputs"], r["study"], r["preempted"]
    everything = "\n".join(f"--- {name}\n{text}" for name, text in outputs.items())
    trials = open_existing(study).study().get_trials()
    assert [t.number for t in trials] == list(range(6)), everything
    assert {t.state.name for t in trials} == {"COMPLETE"}, everything
    # Workers on both nodes ran trials, each trial was started by one worker only.
    ran = {name: re.findall(r"tune: starting trial (\d+)", text) for name, text in outputs.items()}
    started = sorted(int(n) for numbers in ran.values() for n in numbers)
    assert started == list(range(6)), everything
    hosts = {m for name, text in outputs.items() if ran[name] for m in re.findall(r" on (node[12]),", text)}
    assert hosts == {"node1", "node2"}, everything
    # The notified task: its trial saved and exited 75, the task requeued itself and ran again.
    requeued = outputs[f"slurm-{r['arrays']['node1']}_0.out"]
    assert f"tune: trial {preempted} stopped by a signal" in requeued and "preempted; requeued" in requeued, requeued
    assert "SLURM_RESTART_COUNT=1" in requeued and requeued.rstrip().endswith("worker exited with code 0"), requeued
    # Some worker (the requeued task, or another that got there first) resumed that trial from its checkpoint.
    assert f"tune: resuming trial {preempted}" in everything, everything
    log = (study / "logs" / f"{preempted:04d}.log").read_text()
    assert "preempted by signal 10" in log and "dist-gru: resuming from" in log, log
    for text in outputs.values():
        assert text.rstrip().endswith("worker exited with code 0"), everything
