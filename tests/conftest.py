"""Shared helpers: run the real CLI and real torchrun processes, with free ports, timeouts and cleanup.

Everything that builds an Accelerator runs in a subprocess: Accelerate's state is a per-process
singleton, and the distributed tests must exercise real launchers anyway.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from wandb_reader import ...`

# A model and dataset small enough for a 2-core machine: a few seconds per run.
TINY = [
    "model.hidden_size=16",
    "model.num_layers=1",
    "data.name=adding",
    "data.seq_len=10",
    "data.train_size=512",
    "data.val_size=64",
    "optim.warmup_steps=2",
    "train.global_batch_size=16",
    "train.max_steps=12",
    "train.log_every=4",
    "log.mode=offline",
    "--quiet",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_env(**extra: str) -> dict[str, str]:
    """The environment of every subprocess: offline W&B, no API key, one thread, the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TORCHELASTIC_", "SLURM_"))}
    env.pop("PYTEST_CURRENT_TEST", None)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DISABLE_GIT="true",
        WANDB_DISABLE_CODE="true",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def json_last_line(self) -> dict:
        return json.loads(self.stdout.strip().splitlines()[-1])


def kill_tree(pid: int) -> None:
    """SIGKILL a process, its group and every descendant: torchrun starts each worker in a new session,
    so killing torchrun's group alone would leave its workers running."""
    import psutil

    try:
        victims = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        victims = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for child in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def run(cmd: list[str], *, timeout: float = 240, env: dict[str, str] | None = None, cwd: Path | None = None) -> Result:
    """Run a command in its own process group; on timeout kill the whole group and fail the test."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or test_env(),
        cwd=cwd or REPO,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(
            f"timed out after {timeout}s: {' '.join(cmd)}\n--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}"
        )
    return Result(proc.returncode, out, err)


class Background:
    """A launched command whose output goes to a file, so the test can watch the run while it trains."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None):
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env or test_env(), cwd=REPO, start_new_session=True
            )

    def output(self) -> str:
        return self.log.read_text()

    def printed(self, text: str):
        return lambda: text in self.output()

    def wait_until(self, condition, what: str, timeout: float = 120) -> float:
        """Poll until `condition()`; returns the time it became true. Fails if the run ends first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                self._fail(f"the run exited ({self.proc.returncode}) before {what}")
            if time.monotonic() > deadline:
                self._fail(f"no {what} after {timeout} s")
            time.sleep(0.01)
        return time.monotonic()

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._fail(f"still running after {timeout} s (a hang?)")

    def worker(self, rank: int):
        """The torchrun worker process of global rank `rank` (a child of the agent), a psutil.Process."""
        import psutil

        workers = [p for p in psutil.Process(self.proc.pid).children() if p.environ().get("RANK") == str(rank)]
        assert len(workers) == 1, f"expected one worker of rank {rank}, found {workers}"
        return workers[0]

    def kill(self) -> None:
        """SIGKILL to the launcher and all its workers at once: a crash, nothing is saved.

        torchrun starts each worker in a session of its own, so killing the launcher's process
        group alone would leave the workers training on, orphaned.
        """
        if self.proc.poll() is None:
            kill_tree(self.proc.pid)
        self.proc.wait()

    def _fail(self, message: str):
        self.kill()
        pytest.fail(f"{message}\n--- output\n{self.output()[-6000:]}")


def run_all(
    cmds: list[list[str]],
    *,
    timeout: float = 240,
    env: dict[str, str] | None = None,
    envs: list[dict[str, str]] | None = None,
    cwds: list[Path] | None = None,
) -> list[Result]:
    """Run commands concurrently (e.g. two torchrun agents acting as two nodes), each in its own
    process group, with `env` (or one of `envs` each) and one of `cwds` each; if any is still running
    after `timeout`, kill every group and fail the test. Output goes to files, not pipes: an agent
    blocked on a full pipe would stall its peers."""
    cwds = cwds or [REPO] * len(cmds)
    envs = envs or [env or test_env()] * len(cmds)
    with tempfile.TemporaryDirectory() as tmp:
        logs = [(open(Path(tmp) / f"{i}.out", "w+"), open(Path(tmp) / f"{i}.err", "w+")) for i in range(len(cmds))]
        procs = [
            subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=cmd_env, cwd=cwd, start_new_session=True)
            for cmd, cmd_env, cwd, (out, err) in zip(cmds, envs, cwds, logs, strict=True)
        ]
        deadline = time.monotonic() + timeout
        timed_out = False
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        if timed_out:
            for proc in procs:
                if proc.poll() is None:
                    kill_tree(proc.pid)
                    proc.wait()
        results = []
        for proc, (out, err) in zip(procs, logs, strict=True):
            out.seek(0)
            err.seek(0)
            results.append(Result(proc.returncode, out.read(), err.read()))
            out.close()
            err.close()
    if timed_out:
        tails = "\n".join(f"--- {i}: exit {r.returncode}\n{r.output[-3000:]}" for i, r in enumerate(results))
        pytest.fail(f"timed out after {timeout}s: {[' '.join(c) for c in cmds]}\n{tails}")
    return results


def summary_fields(output: str) -> dict[str, str]:
    """The key=value pairs of the start-up summary line (`dist-gru: world_size=2 nodes=1 ...`); fails if absent."""
    lines = re.findall(r"dist-gru: (world_size=.*)", output)
    assert len(lines) == 1, f"expected one summary line, found {len(lines)}:\n{output[-3000:]}"
    return dict(item.split("=", 1) for item in lines[0].split())


def cli(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> Result:
    """`python -m dist_gru ARGS` (the same entry point as the `dist-gru` script)."""
    return run([PY, "-m", "dist_gru", *args], timeout=timeout, env=env)


def torchrun_cmd(nproc: int, *args: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        PY,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *extra,
        "-m",
        "dist_gru",
        *args,
    ]


def torchrun(nproc: int, *args: str, timeout: float = 300, env=None, extra: tuple[str, ...] = ()) -> Result:
    return run(torchrun_cmd(nproc, *args, extra=extra), timeout=timeout, env=env)


def assert_ok(result: Result) -> Result:
    assert result.returncode == 0, (
        f"exit {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"
    )
    return result


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root`: sha256 of each file, "dir" for each folder, the target of each link
    (what "nothing changed on disk" compares)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = "link -> " + str(path.readlink())
        elif path.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def assert_refused(result: Result, *phrases: str) -> str:
    """A refused command: exit 2, one `error:` line, no traceback, every phrase in stderr."""
    assert result.returncode == 2, result.output[-3000:]
    assert "Traceback" not in result.output, result.output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in result.stderr, f"{phrase!r} not in:\n{result.stderr[-3000:]}"
    return result.stderr


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def one_and_two_processes(root: Path, *train_args: str) -> tuple[dict, dict]:
    """`dist-gru train` with 1 process (root/one) and under torchrun with 2 (root/two); the two
    model folders' weights."""
    assert_ok(cli("train", *train_args, f"train.run_dir={root / 'one'}"))
    assert_ok(torchrun(2, "train", *train_args, f"train.run_dir={root / 'two'}"))
    return tuple(load_weights(root / run / "model" / "model.safetensors") for run in ("one", "two"))


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def save_run(tmp_path: Path, model, config: dict) -> str:
    """A run folder as training leaves it, for the inference commands: `model/` and `config.yaml`."""
    import yaml

    run = tmp_path / "run"
    model.save_pretrained(run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return str(run / "model")


# `make test` runs the suite in two pytest-xdist workers: most of a test's time is process start-up,
# rendezvous and waiting on a scheduler, not both cores computing, so two at once fill the machine.
# Each file stays on one worker (its module fixtures, such as the baseline runs, are made once), and
# the files that submit jobs to the single-node Slurm cluster share a worker, so their jobs never
# queue behind each other's on the one node.
SLURM_FILES = {"tests/test_slurm.py", "tests/test_slurm_cluster.py"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling

    class FileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "slurm" if path in SLURM_FILES else path

    return FileScheduling(config, log)


# The fast tier (`pytest -m "not slow"`): a test is slow when it, a fixture it requests, or a helper
# of its module starts a process (the CLI, torchrun, a Slurm job, any subprocess): that is where
# the suite's minutes go. Found from the source, so a new test lands in the right tier by itself;
# `@pytest.mark.slow` marks one by hand.
SPAWNERS = {"run", "cli", "torchrun", "run_all", "Popen", "check_output", "check_call", "Background", "sbatch",
            "sbatch_train"}


def _spawning_functions(path: Path) -> set[str]:
    """Names of the module-level functions of `path` that start a process, directly or through another."""
    calls = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            called = set()
            for call in ast.walk(node):
                if isinstance(call, ast.Call):
                    func = call.func
                    called.add(func.id if isinstance(func, ast.Name) else getattr(func, "attr", ""))
            calls[node.name] = called
    spawning: set[str] = set()
    while True:
        more = {name for name, called in calls.items() if name not in spawning and called & (SPAWNERS | spawning)}
        if not more:
            return spawning
        spawning |= more


def pytest_collection_modifyitems(config, items):
    shared = _spawning_functions(Path(__file__))
    by_file: dict[Path, set[str]] = {}
    for item in items:
        path = Path(item.path)
        if path not in by_file:
            by_file[path] = _spawning_functions(path) | shared
        names = {getattr(item, "originalname", item.name), *getattr(item, "fixturenames", ())}
        cluster = item.get_closest_marker("slurm") or item.get_closest_marker("slurm_multinode")
        if names & by_file[path] or cluster:
            item.add_marker(pytest.mark.slow)
