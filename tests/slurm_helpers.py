"""Helpers for tests that run real jobs on a Slurm cluster (`bash slurm/cluster.sh up` starts one here).

    from slurm_helpers import requires_slurm, submit, wait_job

    @requires_slurm
    def test_x(tmp_path):
        job = submit("#!/bin/bash\\necho hi\\n", "--output=out-%j.txt", cwd=tmp_path)
        info = wait_job(job, timeout_s=60)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0"

There is no slurmdbd, so `sacct` does not work: job state comes from `scontrol show job -o ID`, whose
record slurmctld keeps only ~8-12 s after the job ends (MinJobAge=4 plus the purge cycle). Poll
while the job runs (wait_job does) rather than asking long after it ended.

Every subprocess call has a timeout. Set DIST_GRU_REQUIRE_SLURM=1 to make `requires_slurm` tests
run (and fail) instead of skipping when no cluster answers, so a broken cluster cannot pass CI silently;
DIST_GRU_REQUIRE_SLURM_MULTINODE=1 does the same for `requires_slurm_multinode` (a cluster of at least
two usable nodes: `bash slurm/cluster.sh up --nodes 2`).

The dist-gru job helpers (`train_job_env`, `sbatch_train`, `finish`, `header_lines`) submit
slurm/train.sbatch or slurm/train_tasks.sbatch with `dist-gru train` arguments and read the output back.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pytest

CMD_TIMEOUT_S = 30.0
USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
    }
)
OUR_CONF_MARKER = "# written by dist-gru slurm/cluster.sh"
SLURM_CONF = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))

_KEY_SPLIT = re.compile(r" (?=[A-Za-z][A-Za-z0-9_:/]*=)")


class SlurmError(RuntimeError):
    """A Slurm command failed."""


def _run(cmd: list[str], *, timeout: float = CMD_TIMEOUT_S, check: bool = True, **kw) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise SlurmError(f"timed out after {timeout}s: {' '.join(cmd)}") from e
    if check and res.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} exited {res.returncode}: {(res.stderr or res.stdout).strip()}")
    return res


def _local_controller_down() -> bool:
    """True when our own config is installed but no slurmctld runs (sinfo would retry for ~9 s)."""
    try:
        ours = OUR_CONF_MARKER in SLURM_CONF.read_text()
    except OSError:
        return False
    if not ours or not shutil.which("pgrep"):
        return False
    return subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True, timeout=10).returncode != 0


def usable_nodes() -> list[str]:
    """Names of the nodes that are idle, mixed or allocated (so jobs can run); [] without a cluster."""
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return []
    try:
        if _local_controller_down():
            return []
        res = _run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=20, check=False)
    except (SlurmError, OSError, subprocess.SubprocessError):
        return []
    if res.returncode != 0:
        return []
    pairs = [line.split() for line in res.stdout.splitlines() if len(line.split()) == 2]
    return sorted({name for name, state in pairs if state in USABLE_NODE_STATES})


def slurm_available() -> bool:
    """True when `sinfo` answers and at least one node is idle, mixed or allocated (so jobs can run)."""
    return bool(usable_nodes())


_REQUIRE = os.environ.get("DIST_GRU_REQUIRE_SLURM", "") not in ("", "0")
requires_slurm = pytest.mark.skipif(
    not _REQUIRE and not slurm_available(),
    reason="no Slurm cluster running: start one with `bash slurm/cluster.sh up` (CI does)",
)


_REQUIRE_MULTINODE = os.environ.get("DIST_GRU_REQUIRE_SLURM_MULTINODE", "") not in ("", "0")
requires_slurm_multinode = pytest.mark.skipif(
    not _REQUIRE_MULTINODE and len(usable_nodes()) < 2,
    reason="no Slurm cluster of 2 nodes running: start one with `bash slurm/cluster.sh up --nodes 2` (CI does)",
)


def job_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without SLURM_*/SBATCH_*/SRUN_* (they would leak from an enclosing job), plus `env`."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    out.pop("PYTEST_CURRENT_TEST", None)
    if env:
        out.update(env)
    return out


def submit(
    script_path_or_text: str | os.PathLike | None,
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    script_args: Iterable[str] = (),
) -> int:
    """Submit a batch job with `sbatch --parsable ARGS [SCRIPT [SCRIPT_ARGS]]`; return its job id.

    script_path_or_text: a path to a script file, or the script text itself (it must start with "#!";
    it goes to sbatch on stdin), or None when ARGS contain `--wrap=...`.
    args: sbatch options, e.g. "--ntasks=2", "--output=out-%j.txt" (they override #SBATCH lines).
    env: variables added to the job's environment. sbatch's default --export=ALL passes the whole
    environment of this process (minus SLURM_*/SBATCH_*/SRUN_*) to the job.
    cwd: where sbatch runs = the job's working directory (relative --output paths and the default
    slurm-%j.out land there); default: the current directory.
    """
    cmd = ["sbatch", "--parsable", *args]
    stdin_text = None
    if script_path_or_text is not None:
        text = script_path_or_text if isinstance(script_path_or_text, str) else None
        if text is not None and (text.startswith("#!") or "\n" in text):
            stdin_text = text
            if list(script_args):
                raise ValueError("script_args need a script file, not script text")
        else:
            path = Path(script_path_or_text)
            if not path.is_file():
                raise FileNotFoundError(f"no such script: {path} (script text must start with '#!')")
            cmd += [str(path), *script_args]
    elif not any(a.startswith("--wrap") for a in args):
        raise ValueError("give a script (path or text) or a --wrap=... option")
    res = _run(cmd, input=stdin_text, env=job_env(env), cwd=str(cwd) if cwd is not None else None)
    out = res.stdout.strip().splitlines()
    if not out:
        raise SlurmError(f"sbatch printed no job id: {res.stderr.strip()}")
    return int(out[-1].split(";")[0])


def parse_job_line(line: str) -> dict[str, str]:
    """Parse one line of `scontrol show job -o` ("Key=Value Key=Value ...") into a dict."""
    fields: dict[str, str] = {}
    for part in _KEY_SPLIT.split(line.strip()):
        key, sep, value = part.partition("=")
        if sep:
            fields[key] = value
    return fields


def job_info(job_id: int) -> dict[str, str] | None:
    """All fields of `scontrol show job -o ID`, or None once slurmctld has purged the record."""
    res = _run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
    if res.returncode != 0:
        if "Invalid job id" in (res.stderr + res.stdout):
            return None
        raise SlurmError(f"scontrol show job {job_id} exited {res.returncode}: {res.stderr.strip()}")
    for line in res.stdout.splitlines():
        fields = parse_job_line(line)
        if fields.get("JobId") == str(job_id):
            return fields
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    return parse_job_line(lines[0]) if lines else None


def job_field(job_id: int, name: str) -> str | None:
    """One field of the job record (e.g. "JobState", "ExitCode", "Restarts", "StdOut"), None if absent."""
    info = job_info(job_id)
    return None if info is None else info.get(name)


def _state(info: Mapping[str, str]) -> str:
    # JobState may carry flags in some versions ("CANCELLED by 0" is in Reason, not here); keep the word.
    return info.get("JobState", "").split()[0] if info.get("JobState") else ""


def _with_exit(info: dict[str, str]) -> dict[str, str | int]:
    out: dict[str, str | int] = dict(info)
    code, _, sig = info.get("ExitCode", "0:0").partition(":")
    out["exit_status"] = int(code) if code.isdigit() else -1
    out["exit_signal"] = int(sig) if sig.isdigit() else 0
    out["restarts"] = int(info.get("Restarts", "0") or 0)
    return out


def wait_job(job_id: int, timeout_s: float, poll_s: float = 0.5) -> dict:
    """Poll until the job reaches a terminal state; return its fields.

    Terminal: COMPLETED FAILED CANCELLED TIMEOUT NODE_FAIL PREEMPTED OUT_OF_MEMORY (BOOT_FAIL, DEADLINE).
    A requeued job passes through COMPLETING/REQUEUED/PENDING (Reason=BeginTime, ~cred_expire+1 s) and
    is waited for. The dict has every `scontrol show job` field (JobState, ExitCode "3:0", Restarts,
    StdOut, WorkDir, RunTime, ...) plus exit_status / exit_signal / restarts as ints.
    On timeout the job is cancelled and TimeoutError names its last state.
    """
    deadline = time.monotonic() + timeout_s
    last: dict[str, str] | None = None
    while True:
        info = job_info(job_id)
        if info is None:
            if last is None:
                raise SlurmError(f"job {job_id} unknown to slurmctld (wrong id, or ended >8 s ago and purged)")
            raise SlurmError(f"job {job_id} record vanished while {_state(last)} (ended and purged between polls?)")
        last = info
        if _state(info) in TERMINAL_STATES:
            return _with_exit(info)
        if time.monotonic() >= deadline:
            cancel(job_id)
            raise TimeoutError(
                f"job {job_id} not finished after {timeout_s}s: JobState={_state(info)} "
                f"Reason={info.get('Reason')} Restarts={info.get('Restarts')} (cancelled)"
            )
        time.sleep(poll_s)


def wait_state(job_id: int, states: str | Iterable[str], timeout_s: float, poll_s: float = 0.2) -> dict[str, str]:
    """Poll until JobState is one of `states` (e.g. "RUNNING"); raise TimeoutError otherwise."""
    wanted = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout_s
    state = "?"
    while True:
        info = job_info(job_id)
        state = _state(info) if info else "PURGED"
        if info and state in wanted:
            return info
        if state in TERMINAL_STATES - wanted or state == "PURGED":
            raise SlurmError(f"job {job_id} is {state}, will never be {sorted(wanted)}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout_s}s, wanted {sorted(wanted)}")
        time.sleep(poll_s)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    """Poll `predicate` until true (e.g. a file the job writes appears); TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(poll_s)


def cancel(job_id: int, signal: str | None = None, batch: bool = False, full: bool = False) -> bool:
    """scancel the job (default: kill it). With `signal` only signal it: batch=True signals the batch
    shell only (`--batch`, what `--signal=B:SIG@T` does), full=True the shell and all steps, neither:
    the steps' tasks only. Returns False when scancel failed (e.g. the job is gone)."""
    cmd = ["scancel"]
    if signal:
        cmd.append(f"--signal={signal}")
    if batch:
        cmd.append("--batch")
    if full:
        cmd.append("--full")
    cmd.append(str(job_id))
    try:
        return _run(cmd, check=False).returncode == 0
    except SlurmError:
        return False


# --------------------------------------------------------------------------------------------------
# dist-gru jobs


def train_job_env(python: str) -> dict[str, str]:
    """What conftest.test_env gives its subprocesses, plus the interpreter the sbatch scripts should use."""
    return {
        "PYTHON": python,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def sbatch_train(
    script: Path,
    folder: Path,
    *train_args: str,
    python: str,
    options: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
) -> int:
    """Submit `script` with the dist-gru train arguments; output in `folder`/slurm-<id>.out."""
    return submit(
        script,
        f"--output={folder}/slurm-%j.out",
        *options,
        env={**train_job_env(python), **(env or {})},
        cwd=folder,
        script_args=train_args,
    )


def finish(job: int, folder: Path, timeout_s: float) -> tuple[dict, str]:
    """Wait for the job (cancelled if it outlives timeout_s); return its record and output file."""
    try:
        info = wait_job(job, timeout_s=timeout_s)
    finally:
        cancel(job)
    return info, (folder / f"slurm-{job}.out").read_text()


def header_lines(out: str, prefix: str) -> list[str]:
    """The job output's `dist-gru slurm: PREFIX...` lines (header, per-node and per-rank lines)."""
    return [line for line in out.splitlines() if line.startswith(f"dist-gru slurm: {prefix}")]


def rendezvous_port(out: str) -> int:
    """The port of the job's (first) `rendezvous endpoint: HOST:PORT` line."""
    match = re.search(r"^dist-gru slurm: rendezvous endpoint: \S+:(\d+)", out, re.MULTILINE)
    if not match:
        raise AssertionError(f"no rendezvous endpoint line in the job output:\n{out[-3000:]}")
    return int(match.group(1))


def follow_job(job_id: int, timeout_s: float, poll_s: float = 0.25) -> tuple[dict, list[tuple[float, str]]]:
    """Like wait_job, but also return the job's state changes as (time.monotonic(), "STATE restarts=N")."""
    deadline = time.monotonic() + timeout_s
    changes: list[tuple[float, str]] = []
    while True:
        info = job_info(job_id)
        if info is None:
            raise SlurmError(f"job {job_id} record vanished (states seen: {[s for _, s in changes]})")
        state = f"{_state(info)} restarts={info.get('Restarts', '0')}"
        if not changes or changes[-1][1] != state:
            changes.append((time.monotonic(), state))
        if _state(info) in TERMINAL_STATES:
            return _with_exit(info), changes
        if time.monotonic() >= deadline:
            cancel(job_id)
            raise TimeoutError(f"job {job_id} not finished after {timeout_s}s: {[s for _, s in changes]} (cancelled)")
        time.sleep(poll_s)


# The network namespace of a node of `bash slurm/cluster.sh up --nodes N` (node1, node2, ...).
NETNS_PREFIX = "dist-gru-"


def node_pids(node: str) -> list[int]:
    """Processes running inside the node's network namespace (its slurmd and the job steps it runs)."""
    res = _run(["ip", "netns", "pids", f"{NETNS_PREFIX}{node}"])
    return [int(p) for p in res.stdout.split()]


def job_pids(node: str, job_id: int) -> list[int]:
    """The processes of one job on a node of the namespaced cluster (their SLURM_JOB_ID says so)."""
    mine = []
    for pid in node_pids(node):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in environ:
            mine.append(pid)
    return mine


def cmdline(pid: int) -> list[str]:
    """The process's argv, [] once it has exited."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []
