"""One job per run folder: global rank 0 holds an exclusive lock on `<run_dir>/.lock` for the run's life.

    dist-gru train --config configs/adding.yaml train.run_dir=runs/a &
    dist-gru train --config configs/adding.yaml train.run_dir=runs/a     # error: ... is in use by ...

The lock is the kernel's (`flock`), so it dies with the process that holds it: a job killed by
SIGKILL, OOM or a node failure never blocks the next one, and there is no staleness to guess. The
file stays after the run (its content names the last holder); it is never removed, because
removing a lock file races with a process that has just opened it.

File systems: local ones, NFS (the Linux client maps `flock` onto NFS byte-range locks, so the
lock holds across nodes; NFSv3 needs its lock manager running) and Lustre mounted with `-o flock`
lock across nodes. Lustre with `localflock` locks per node only; Lustre without either refuses
locks (ENOSYS), and so do a few FUSE file systems: there the run stops with an error that says so,
and `train.run_lock=false` runs without the lock (one job per folder is then yours to ensure).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from dist_gru.config import ConfigError
from dist_gru.runtime import LaunchError, main_decides
from dist_gru.train.run_folder import check_run_dir

LOCK_FILE = ".lock"


class RunFolderInUse(LaunchError):
    """Another job holds the run folder's lock."""


class RunLock:
    """An exclusive lock on a run folder, held until `release` or the end of the process."""

    def __init__(self, fd: int, path: Path, created: list[Path], previous: tuple[bytes, os.stat_result]):
        self.fd, self.path, self.created, self.previous = fd, path, created, previous

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Lock `run_dir` (made if missing) or raise RunFolderInUse naming the holder; writes only the lock file."""
        run_dir = Path(run_dir)
        created = _missing_parents(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            path = run_dir / LOCK_FILE
            if not path.exists():
                created.append(path)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            _remove(created)
            raise LaunchError(f"train.run_dir={run_dir}: cannot create the run folder's lock file ({exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            _remove(created)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunFolderInUse(_in_use_message(run_dir, holder)) from None
            raise LaunchError(
                f"train.run_dir={run_dir}: this file system cannot lock {path} ({os.strerror(exc.errno)}): "
                "on Lustre mount with -o flock; or set train.run_lock=false and make sure no second job "
                "uses this folder"
            ) from None
        previous = (os.pread(fd, 1 << 16, 0), os.fstat(fd))  # what `release(undo=True)` puts back
        _rewrite(fd, (json.dumps(_holder_record()) + "\n").encode())
        return cls(fd, path, created, previous)

    def release(self, undo: bool = False) -> None:
        """Unlock; with `undo`, also remove what `acquire` created (a job that stopped before its first write)."""
        if self.fd < 0:
            return
        if undo:  # still under the lock: no other job writes the file meanwhile
            content, stat = self.previous
            _rewrite(self.fd, content)
            os.utime(self.fd, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            _remove(self.created)
        os.close(self.fd)  # closing the descriptor releases the flock
        self.fd = -1


def _holder_record() -> dict:
    """Who holds the lock: host, pid, Slurm job id (when there is one), start time, command line."""
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv),
    }
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        array_task = os.environ.get("SLURM_ARRAY_TASK_ID")
        record["slurm_job"] = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{array_task}" if array_task else job
    return record


def _rewrite(fd: int, content: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, content, 0)


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _in_use_message(run_dir: Path, holder: dict) -> str:
    where = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    if holder.get("slurm_job"):
        where += f", Slurm job {holder['slurm_job']}"
    stop = f"scancel {holder['slurm_job']}" if holder.get("slurm_job") else f"kill {holder.get('pid', 'PID')}"
    return (
        f"train.run_dir={run_dir} is in use by another job ({where}, started {holder.get('started', '?')}); "
        f"two jobs in one run folder would mix their checkpoints. Wait for it to end, stop it "
        f"({stop} on {holder.get('host', 'its host')}; it saves a checkpoint on SIGTERM), or use another train.run_dir"
    )


def _missing_parents(path: Path) -> list[Path]:
    """The folders `mkdir(parents=True)` would create for `path`, innermost last."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing[::-1]


def _remove(created: list[Path]) -> None:
    for path in reversed(created):
        try:
            path.rmdir() if path.is_dir() else path.unlink()
        except OSError:
            pass  # something else appeared in it meanwhile: leave it


def lock_run_folder(run_dir: Path, enabled: bool, accelerator) -> RunLock | None:
    """Global rank 0 takes the run folder's lock (all ranks' work happens under it); if it cannot,
    every rank stops with its error (all ranks participate). None on the other ranks, or when disabled."""
    lock = error = None
    if enabled and accelerator.is_main_process:
        try:
            check_run_dir(run_dir)  # a file in the way: say that, not that the lock file failed
            lock = RunLock.acquire(run_dir)
        except (ConfigError, LaunchError) as exc:
            error = exc
    main_decides(accelerator, error)
    return lock
