"""The local Slurm cluster (slurm/cluster.sh) behaves the way the Slurm launcher relies on.

Real jobs on a real cluster; skipped when none runs (`bash slurm/cluster.sh up` starts one).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from slurm_helpers import (
    SLURM_CONF,
    cancel,
    parse_job_line,
    requires_slurm,
    submit,
    usable_nodes,
    wait_for,
    wait_job,
    wait_state,
)


def test_parse_job_line():
    line = (
        "JobId=42 JobName=wrap UserId=root(0) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) "
        "Requeue=1 Restarts=1 BatchFlag=1 ExitCode=3:0 TRES=cpu=2,mem=4G,node=1 WorkDir=/tmp/a b StdOut=/tmp/o"
    )
    f = parse_job_line(line)
    assert f["JobId"] == "42" and f["JobState"] == "FAILED" and f["ExitCode"] == "3:0"
    assert f["Restarts"] == "1" and f["TRES"] == "cpu=2,mem=4G,node=1"
    assert f["WorkDir"] == "/tmp/a b" and f["StdOut"] == "/tmp/o"


@requires_slurm
@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_two_tasks_get_ranks_0_and_1(tmp_path):
    script = """#!/bin/bash
#SBATCH --ntasks=2
#SBATCH --output=out-%j.txt
srun --kill-on-bad-exit=1 bash -c 'echo "procid=$SLURM_PROCID ntasks=$SLURM_NTASKS"'
"""
    job = submit(script, cwd=tmp_path)
    info = wait_job(job, timeout_s=100)
    out = (tmp_path / f"out-{job}.txt").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    ranks = {line.split()[0] for line in out.splitlines() if line.startswith("procid=")}
    assert ranks == {"procid=0", "procid=1"}, out
    assert "ntasks=2" in out


@requires_slurm
@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_two_cpus_per_task(tmp_path):
    job = submit(
        None,
        "--ntasks=1",
        "--cpus-per-task=2",
        "--output=out-%j.txt",
        "--wrap=echo cpus=$SLURM_CPUS_PER_TASK nproc=$(nproc)",
        cwd=tmp_path,
    )
    info = wait_job(job, timeout_s=100)
    out = (tmp_path / f"out-{job}.txt").read_text()
    assert info["JobState"] == "COMPLETED", out
    assert "cpus=2" in out


@requires_slurm
@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_exit_code_3_is_failed(tmp_path):
    job = submit(None, "--output=out-%j.txt", "--wrap=echo bye; exit 3", cwd=tmp_path)
    info = wait_job(job, timeout_s=100)
    assert info["JobState"] == "FAILED"
    assert info["ExitCode"] == "3:0" and info["exit_status"] == 3
    assert (tmp_path / f"out-{job}.txt").read_text().strip() == "bye"


REQUEUE_SCRIPT = """#!/bin/bash
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=out-%j.txt
if [[ -z "${SLURM_RESTART_COUNT:-}" ]]; then
    # First run: on USR1 requeue ourselves (as a preempted trainer would after its checkpoint).
    trap 'echo "USR1 in batch shell"; kill "$child" 2>/dev/null; scontrol requeue "$SLURM_JOB_ID"; exit 0' USR1
    sleep 600 &
    child=$!
    touch ready            # the trap is installed: the test may signal now
    wait "$child"          # a bash trap runs promptly only while the shell waits
    echo "not signalled"
    exit 1
fi
echo "second run, restart count $SLURM_RESTART_COUNT"
echo "$SLURM_RESTART_COUNT" > restart_count
"""


@requires_slurm
@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_usr1_then_self_requeue_restarts_with_count_1(tmp_path):
    job = submit(REQUEUE_SCRIPT, cwd=tmp_path)
    try:
        wait_state(job, "RUNNING", timeout_s=60)
        wait_for(lambda: (tmp_path / "ready").exists(), timeout_s=30, what="the job to install its USR1 trap")
        assert cancel(job, signal="USR1", batch=True)
        # The requeued job waits cred_expire+1 s (31 s with cluster.sh's AuthInfo=cred_expire=30).
        info = wait_job(job, timeout_s=150)
    finally:
        cancel(job)
    out = (tmp_path / f"out-{job}.txt").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    assert info["restarts"] == 1, out
    assert "USR1 in batch shell" in out and "not signalled" not in out, out
    assert (tmp_path / "restart_count").read_text().strip() == "1", out


CLUSTER_SH = Path(__file__).resolve().parents[1] / "slurm" / "cluster.sh"


def cluster_sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_SH), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(os.geteuid() != 0, reason="slurm/cluster.sh needs root")
@pytest.mark.timeout(120)
def test_cluster_sh_rejects_a_bad_node_count():
    res = cluster_sh("up", "--nodes", "abc")
    assert res.returncode == 1
    assert res.stderr.strip() == "[cluster.sh] ERROR: --nodes must be 1..16, got 'abc'"


@requires_slurm
@pytest.mark.slurm
@pytest.mark.skipif(os.geteuid() != 0, reason="slurm/cluster.sh needs root")
@pytest.mark.timeout(120)
def test_up_in_the_other_mode_is_refused_while_a_cluster_runs_and_changes_nothing():
    conf = SLURM_CONF.read_text()
    mode = re.search(r"^# dist-gru cluster mode: (\w+) ", conf, re.MULTILINE)
    assert mode, conf[:300]
    nodes = usable_nodes()
    other = ["up", "--nodes", "2"] if mode.group(1) == "single" else ["up"]
    res = cluster_sh(*other)
    assert res.returncode == 1, res.stderr
    assert f"ERROR: the '{mode.group(1)}' cluster is running (slurmctld" in res.stderr, res.stderr
    assert "run `bash " in res.stderr and "cluster.sh down` first" in res.stderr, res.stderr
    assert SLURM_CONF.read_text() == conf and usable_nodes() == nodes
    # The same mode again: already up, nothing restarted.
    same = ["up"] if mode.group(1) == "single" else ["up", "--nodes", str(len(nodes))]
    res = cluster_sh(*same)
    assert res.returncode == 0 and "Slurm is already up" in res.stderr, res.stderr
