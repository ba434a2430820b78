"""Trust probes: bad inputs, damaged run folders, full disks and kill -9 against the real CLI.

    .venv/bin/python tests/stress/torture.py                     # every probe, 8 kill -9 per run kind
    .venv/bin/python tests/stress/torture.py --only ctrl-c,full-disk --kills 4
    .venv/bin/python tests/stress/torture.py --list

Each probe runs real `python -m dist_gru` commands (tiny models: seconds per run) in a temporary
folder of its own and prints one line: `ok    <probe>  <the figure that matters>` or
`FAIL  <probe>  <reason>`, then `N passed, M failed`; the exit code is 1 if any failed. What they
check: a user error is one `error` line, exit 2, no traceback and nothing changed on disk (sha256
of every file before and after); one job per run folder; Ctrl-C preempts and the same command
resumes; checkpoints by the clock; non-finite values stop training (exit 3) and are never saved
or printed as bare NaN; bounded config loading, CSV parsing and the umask; damaged checkpoints,
model folders, data and metrics; a full disk (a small tmpfs, mounted as root) at several fill
levels during a save, and under a 2-process torchrun job; and kill -9 at random moments and in
the middle of saves, of a 1-process and a 2-process torchrun run, each followed by the same
command: a resume must name a checkpoint whose COMPLETE marker verifies, and the run must finish
with exit 0. Every process a probe starts is killed with its children when the probe ends, and
every command has a timeout.

Run it as root for all of it: full-disk mounts a tmpfs, and the probes of unreadable files drop
root's power to read them with `setpriv`. Not part of the test suite (pytest does not collect it:
the file is not named test_*.py). It takes about 7 minutes on 2 cores (402 s for 35 probes on
2026-12-04); run probes one at a time with --only while working on one.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest

from conftest import PY, TINY, Background, Result, assert_refused, run, snapshot, test_env, torchrun_cmd  # noqa: E402

from dist_gru.train import checkpoint as ckpt_lib  # noqa: E402

# TINY without W&B (no service process to start) and with checkpoints every 4 of 12 steps.
BASE = [
    *(arg for arg in TINY if not arg.startswith(("log.mode", "train.max_steps"))),
    "log.mode=disabled",
    "train.max_steps=12",
    "checkpoint.every=4",
]
# A files job: the run reads data.train_path, so a probe can damage or replace the data.
FILES = [*BASE, "data.name=files", "checkpoint.every=2", "train.max_steps=8"]
# The real entry point with a cap on address space (an expanding config fails fast instead of
# taking the shared machine's memory) and a umask.
CAPPED = (
    "import os, resource, sys\n"
    "resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"
    "os.umask(int(sys.argv[1], 8))\n"
    "from dist_gru.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)
# Run a command without root's power to read or write any file, so that chmod denies something.
NO_DAC = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")
LAUGHS = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)
]


class ProbeFailed(Exception):
    """A probe's finding: the reason, one line."""


PROBES: dict[str, Callable[[Path, argparse.Namespace], str]] = {}
LIVE: list[Background] = []  # what the running probe launched; killed when it ends


def probe(name: str):
    def register(func):
        PROBES[name] = func
        return func

    return register


# ------------------------------------------------------------------------------------ helpers


def check(condition: object, reason: str) -> None:
    if not condition:
        raise ProbeFailed(reason)


def tail(text: str, lines: int = 1) -> str:
    """The last lines of an output, on one line, for a FAIL reason."""
    kept = [line.strip() for line in text.strip().splitlines() if line.strip().strip("^~")][-lines:]
    return " | ".join(kept)[:300] or "(no output)"


def dist_gru(*args: str, timeout: float = 180, prefix: tuple[str, ...] = (), umask: int | None = None) -> Result:
    """`python -m dist_gru ARGS`, or with `umask` under the capped entry point."""
    if umask is None:
        return run([*prefix, PY, "-m", "dist_gru", *args], timeout=timeout)
    return run([*prefix, PY, "-c", CAPPED, f"{umask:o}", *args], timeout=timeout)


def train(run_dir: Path, *extra: str, base: list[str] = BASE, **kwargs) -> Result:
    return dist_gru("train", *base, f"train.run_dir={run_dir}", *extra, **kwargs)


def launcher(nproc: int, *args: str) -> list[str]:
    """`python -m dist_gru.torchrun ... -m dist_gru ARGS`: torchrun that ends a user error in one line."""
    cmd = torchrun_cmd(nproc, *args)
    cmd[cmd.index("torch.distributed.run")] = "dist_gru.torchrun"
    return cmd


def background(cmd: list[str], log: Path) -> Background:
    job = Background(cmd, log, env=test_env())
    LIVE.append(job)
    return job


def refused(result: Result, *phrases: str) -> str:
    """conftest's assert_refused (exit 2, one `error:` line, no traceback, every phrase), its failure
    as a one-line reason. Returns the stderr line naming the first phrase (for a message of several
    lines), else the error line."""
    try:
        stderr = assert_refused(result, *phrases)
    except AssertionError as exc:
        if str(exc).startswith("'"):  # refused, but the message misses a phrase
            raise ProbeFailed(f"{str(exc).splitlines()[0]} {tail(result.stderr, 2)}") from None
        raise ProbeFailed(f"not refused as a user error (exit {result.returncode}): {tail(result.output, 2)}") from None
    lines = [line.strip() for line in stderr.splitlines()]
    named = [line for line in lines if phrases and phrases[0] in line]
    return (named or [line for line in lines if line.startswith("error: ")])[0]


def finished(result: Result) -> Result:
    check(result.returncode == 0, f"exit {result.returncode}: {tail(result.output, 2)}")
    check("Traceback" not in result.output, f"a traceback: {tail(result.output, 2)}")
    return result


def unchanged(before: dict[str, str], folder: Path) -> None:
    after = snapshot(folder)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    check(not changed, f"changed on disk: {', '.join(changed[:5])}")


def strict_json(line: str) -> dict:
    def refuse(constant: str):
        raise ProbeFailed(f"bare {constant} in the JSON: {line[:200]}")

    return json.loads(line, parse_constant=refuse)


def all_finite(run_dir: Path) -> tuple[int, list[str]]:
    """(number of safetensors files under run_dir, those holding a NaN or an infinity)."""
    from safetensors.torch import load_file

    files = sorted(run_dir.rglob("*.safetensors"))
    bad = [str(f.relative_to(run_dir)) for f in files if not all(t.isfinite().all() for t in load_file(f).values())]
    return len(files), bad


def dataset(folder: Path, n: int = 64, length: int = 6, nan_sample: int | None = None, per_step: bool = False) -> Path:
    """A regression dataset of `n` sequences of 2 features (a target per sequence, or per step: series
    to forecast); optionally one NaN in a sample's features, written into the file after
    `write_sequences`, as a corrupted file would hold it."""
    from dist_gru.data import write_sequences

    x = np.random.default_rng(0).standard_normal((n, length, 2)).astype(np.float32)
    y = x.sum(axis=2, keepdims=True) if per_step else x.sum(axis=(1, 2))[:, None]
    path = write_sequences(folder, list(x), list(y) if per_step else y, task="regression")
    if nan_sample is not None:
        features = np.load(path / "features.npy", mmap_mode="r+")
        features[nan_sample * length + 2, 1] = np.nan
        features.flush()
    return path


def finished_run(tmp: Path, name: str = "run", *extra: str) -> Path:
    """A tiny run trained to its end: checkpoints of steps 4, 8 and 12, and model/."""
    run_dir = tmp / name
    finished(train(run_dir, *extra))
    return run_dir


def nan_model(folder: Path, inputs: int = 2, weights: str = "one NaN", **kwargs) -> Path:
    """A model folder (saved by the library, so any checksum matches) whose head weights hold
    "one NaN", or are "finite", or "huge" (3e38 each: finite, but every output overflows)."""
    import torch

    from dist_gru.model import GRUModel

    torch.manual_seed(0)
    model = GRUModel(inputs, 8, **kwargs)
    with torch.no_grad():
        if weights == "one NaN":
            model.head.weight[0, 0] = float("nan")
        elif weights == "huge":
            model.head.weight.fill_(3e38)
    model.save_pretrained(folder)
    return folder


def reseal(folder: Path, name: str, text: str) -> None:
    """Replace one checkpoint file and update its COMPLETE marker to match, as an editor could."""
    (folder / name).write_text(text)
    marker = json.loads((folder / ckpt_lib.MARKER).read_text())
    data = (folder / name).read_bytes()
    marker[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / ckpt_lib.MARKER).write_text(json.dumps(marker))


def resumed_from(output: str) -> str | None:
    for line in output.splitlines():
        if line.startswith("dist-gru: resuming from "):
            return line.split("resuming from ", 1)[1].rsplit(" (step", 1)[0]
    return None


def tmp_steps(run_dir: Path) -> list[str]:
    root = ckpt_lib.checkpoint_dir(run_dir)
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-step-")) if root.is_dir() else []


def verified(run_dir: Path) -> set[str]:
    """The checkpoint folders of run_dir whose COMPLETE marker verifies."""
    good = set()
    for path in ckpt_lib.list_checkpoints(run_dir):
        try:
            ckpt_lib.verify(path)
            good.add(str(path))
        except ckpt_lib.CheckpointError:
            pass
    return good


# ------------------------------------------------------------------ on main: jobs and signals


@probe("refused-writes-nothing")
def refused_writes_nothing(tmp: Path, args) -> str:
    run_dir = tmp / "run"
    line = refused(train(run_dir, "data.train_size=40", "train.global_batch_size=64"), "40", "64")
    if run_dir.exists():
        raise ProbeFailed(f"the refused job left {sorted(os.listdir(run_dir))} in its run folder")
    return f"exit 2, no run folder: {line[:90]}"


@probe("run-lock")
def run_lock(tmp: Path, args) -> str:
    run_dir = tmp / "run"
    first = background([PY, "-m", "dist_gru", "train", *BASE, "train.max_steps=100000", f"train.run_dir={run_dir}"],
                       tmp / "first.log")  # fmt: skip
    first.wait_until(lambda: (run_dir / "checkpoints" / "step-000004").is_dir(), "the first checkpoint", timeout=180)
    line = refused(train(run_dir), "is in use by another job", f"pid {first.proc.pid} on host")
    check(first.proc.poll() is None, f"the first job ended ({first.proc.returncode}) when the second was refused")
    return f"second job exit 2 while the first trains: {line[:110]}"


@probe("ctrl-c")
def ctrl_c(tmp: Path, args) -> str:
    run_dir = tmp / "run"
    cmd = [PY, "-m", "dist_gru", "train", *BASE, "train.max_steps=400", f"train.run_dir={run_dir}"]
    job = background(cmd, tmp / "train.log")
    job.wait_until(lambda: (run_dir / "checkpoints" / "step-000004").is_dir(), "the first checkpoint", timeout=180)
    os.killpg(job.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    code = job.wait(timeout=120)
    out = job.output()
    check(code == ckpt_lib.EXIT_PREEMPTED, f"exit {code} after SIGINT, not 75: {tail(out, 2)}")
    check("Traceback" not in out, f"a traceback after SIGINT: {tail(out, 2)}")
    marker = ckpt_lib.read_preempted(run_dir)
    check(marker and marker.get("signal") == "SIGINT", f"PREEMPTED marker {marker}, not one naming SIGINT")
    again = finished(run(cmd, timeout=240))
    source = resumed_from(again.stdout)
    check(source == marker["checkpoint"], f"the same command resumed from {source}, not {marker['checkpoint']}")
    return f"exit 75 at step {marker['step']} (SIGINT), the same command resumed from it and exited 0"


@probe("ctrl-c-twice")
def ctrl_c_twice(tmp: Path, args) -> str:
    run_dir = tmp / "run"
    slow = ["model.hidden_size=256", "data.seq_len=400", "train.global_batch_size=256", "train.max_steps=100000"]
    job = background([PY, "-m", "dist_gru", "train", *BASE, *slow, f"train.run_dir={run_dir}"], tmp / "train.log")
    job.wait_until(job.printed("dist-gru: world_size="), "the start of training", timeout=180)
    time.sleep(1.0)
    os.killpg(job.proc.pid, signal.SIGINT)
    job.wait_until(job.printed("dist-gru: interrupted"), "the interrupted line", timeout=60)
    os.killpg(job.proc.pid, signal.SIGINT)
    code = job.wait(timeout=60)
    out = job.output()
    check(code == 130, f"exit {code} after two SIGINTs, not 130: {tail(out, 2)}")
    check("interrupted again" in out, f"no 'interrupted again' line: {tail(out, 2)}")
    check("Traceback" not in out, f"a traceback: {tail(out, 2)}")
    steps, good, left = ckpt_lib.list_checkpoints(run_dir), verified(run_dir), tmp_steps(run_dir)
    check(len(good) == len(steps), f"a checkpoint that does not verify: {[p.name for p in steps]}")
    # An abort may leave its save's temporary folder: the next run must not load it.
    newest = ckpt_lib.find_latest(run_dir)
    again = finished(train(run_dir, *slow, f"train.max_steps={(newest.step if newest else 0) + 1}"))
    source = resumed_from(again.stdout)
    check(source is None or source in good, f"the next run resumed from {source}, not a verified checkpoint")
    after = f"resumed from {Path(source).name}" if source else "started afresh (no checkpoint yet)"
    return f"exit 130, '{tail(out)[10:60]}...'; {len(left)} .tmp-step left; the next run {after}"


@probe("every-minutes")
def every_minutes(tmp: Path, args) -> str:
    """Checkpoints by a 0.6 s clock alone (checkpoint.every=0): four of them, each >= 0.6 s after the last."""
    run_dir = tmp / "run"
    clock = ["checkpoint.every=0", "checkpoint.every_minutes=0.01", "checkpoint.keep=1000", "train.max_steps=1000000"]
    job = background([PY, "-m", "dist_gru", "train", *BASE, *clock, f"train.run_dir={run_dir}"], tmp / "train.log")
    job.wait_until(lambda: len(ckpt_lib.list_checkpoints(run_dir)) >= 4, "4 checkpoints by the clock", timeout=180)
    job.kill()
    saved = [ckpt_lib.verify(path).state for path in ckpt_lib.list_checkpoints(run_dir)[:4]]
    gaps = [later["saved_at"] - earlier["saved_at"] for earlier, later in zip(saved[:-1], saved[1:], strict=True)]
    check(min(gaps) >= 0.6, f"checkpoints {min(gaps):.2f} s apart under a 0.6 s clock")
    steps = [state["step"] for state in saved]
    return f"4 checkpoints by a 0.6 s clock alone, {min(gaps):.2f}-{max(gaps):.2f} s apart, at steps {steps}"


@probe("torchrun-user-error")
def torchrun_user_error(tmp: Path, args) -> str:
    bad = ["train", *BASE, "train.precision=fp8", f"train.run_dir={tmp / 'run'}"]
    ours = run(launcher(2, *bad), timeout=240)
    refused(ours, "train.precision")
    check("ChildFailedError" not in ours.output, f"a ChildFailedError report: {tail(ours.output, 2)}")
    plain = run(torchrun_cmd(2, *bad), timeout=240)
    printed = plain.output.count("train.precision: Input should be")
    check(printed == 1, f"plain torchrun printed the config error {printed} times, not once (rank 0)")
    check(not (tmp / "run").exists(), "the refused job left a run folder")
    return f"dist_gru.torchrun: exit 2, one error line, {len(ours.output.splitlines())} lines in all; torchrun: once"


# ---------------------------------------------------------------- inputs: configs, CSV, umask


def config_refused(tmp: Path, config: Path | None, *extra: str, phrase: str) -> tuple[str, float]:
    """Train with a bad --config (or overrides) under a memory cap: one error line, fast, no run folder."""
    start = time.monotonic()
    result = dist_gru("train", *(["--config", str(config)] if config else []), *extra,
                      f"train.run_dir={tmp / 'run'}", umask=0o022, timeout=120)  # fmt: skip
    seconds = time.monotonic() - start
    line = refused(result, phrase)
    check(not (tmp / "run").exists(), "the refused job left a run folder")
    return line, seconds


@probe("billion-laughs")
def billion_laughs(tmp: Path, args) -> str:
    top = tmp / "laughs.yaml"
    top.write_text("\n".join(LAUGHS) + "\n")
    tags = tmp / "tags.yaml"
    tags.write_text("anchors:\n" + "\n".join(f"  {line}" for line in LAUGHS) + "\nlog:\n  tags: *a9\n")
    _, s1 = config_refused(tmp, top, phrase="aliases")
    _, s2 = config_refused(tmp, tags, phrase="aliases")
    slowest = max(s1, s2)
    check(slowest < 60, f"refused only after {slowest:.0f} s")
    return f"{top.stat().st_size}-byte file refused in {s1:.1f} s, under log.tags in {s2:.1f} s"


@probe("deep-yaml")
def deep_yaml(tmp: Path, args) -> str:
    config = tmp / "deep.yaml"
    config.write_text("train:\n  max_steps: " + "[" * 5000 + "]" * 5000 + "\n")
    line, seconds = config_refused(tmp, config, phrase="nested deeper")
    return f"5000 levels refused in {seconds:.1f} s: {line[line.index('deep.yaml') :]}"


@probe("non-utf8-config")
def non_utf8_config(tmp: Path, args) -> str:
    config = tmp / "latin1.yaml"
    config.write_bytes("log:\n  notes: caf\xe9\n".encode("latin-1"))
    line, _ = config_refused(tmp, config, phrase="UTF-8")
    return line[line.index("latin1.yaml") :][:100]


@probe("huge-seed")
def huge_seed(tmp: Path, args) -> str:
    line, _ = config_refused(tmp, None, "train.seed=99999999999999999999999", phrase="train.seed")
    return line[:100]


@probe("out-inside-input")
def out_inside_input(tmp: Path, args) -> str:
    data = dataset(tmp / "data")
    model = nan_model(tmp / "run" / "model", weights="finite")
    before = snapshot(tmp)
    cases = [
        ("predict", "--data", str(data), "--out", str(data / "features.npy")),
        ("predict", "--data", str(data), "--out", str(model / "p.npy")),
        ("forecast", "--data", str(data), "--out", str(data / "targets.npy")),
        ("export", "--format", "torchscript", "--out", str(model / "model.safetensors")),
    ]
    for case in cases:
        refused(dist_gru(*case, "--model", str(model), timeout=120), "is inside")
        unchanged(before, tmp)
    return f"{len(cases)} of {len(cases)} refused (predict, forecast, export), nothing changed"


def prepare_csv(tmp: Path, text: bytes) -> Result:
    (tmp / "in.csv").write_bytes(text)
    series = ["--series", "--series-column", "key", "--target-columns", "y"]
    return dist_gru("prepare", "--csv", str(tmp / "in.csv"), "--out", str(tmp / "out"), *series, timeout=120)


def csv_refused(tmp: Path, text: bytes, *phrases: str) -> str:
    line = refused(prepare_csv(tmp, text), *phrases)
    check(not (tmp / "out").exists(), "the refused prepare left its --out folder")
    return line[line.find("in.csv") :][:110]


@probe("csv-quoted-keys")
def csv_quoted_keys(tmp: Path, args) -> str:
    result = finished(prepare_csv(tmp, b'key,x,y\n"s,0",1,2\n"s,1",3,4\n"s,0",5,6\n'))
    count = strict_json(result.stdout.strip().splitlines()[-1]).get("num_sequences")
    check(count == 2, f'keys "s,0" and "s,1" made {count} series, not 2')
    return 'keys "s,0" and "s,1": 2 series'


@probe("csv-extra-field")
def csv_extra_field(tmp: Path, args) -> str:
    return csv_refused(tmp, b"key,x,y\na,1,2\na,3,4,5\na,5,6\n", "line 3")


@probe("csv-latin1")
def csv_latin1(tmp: Path, args) -> str:
    return csv_refused(tmp, "key,x,y\ncaf\xe9,1,2\ncaf\xe9,3,4\n".encode("latin-1"), "utf-8", "line 2")


@probe("csv-blank-line")
def csv_blank_line(tmp: Path, args) -> str:
    return csv_refused(tmp, b"key,x,y\na,1,2\n\na,5,6\n", "line 3", "blank")


@probe("umask")
def umask(tmp: Path, args) -> str:
    (tmp / "in.csv").write_text("x,y\n" + "".join(f"{i},{i % 3}\n" for i in range(20)))
    prepare = ["prepare", "--csv", str(tmp / "in.csv"), "--series", "--target-columns", "y", "--val-fraction", "0.2"]
    finished(dist_gru(*prepare, "--out", str(tmp / "data"), umask=0o022))
    finished(dist_gru("train", *BASE, "train.max_steps=2", f"train.run_dir={tmp / 'run'}", umask=0o022))
    weights = stat.S_IMODE((tmp / "run" / "model" / "model.safetensors").stat().st_mode)
    folders = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp / "data", *(tmp / "data").iterdir()] if p.is_dir()}
    check(weights == 0o644, f"model.safetensors is {weights:04o} under umask 022, not 0644")
    wrong = {name: f"{mode:04o}" for name, mode in folders.items() if mode != 0o755}
    check(not wrong, f"dataset folders {wrong} under umask 022, not 0755")
    return f"umask 022: model.safetensors 0644, dataset folders {sorted(folders)} 0755"


# ------------------------------------------------------------------------- non-finite values


def nonfinite_run(tmp: Path, *extra: str) -> tuple[Result, Path, Path]:
    """Train on 64 sequences of which sample 31 holds a NaN in its features."""
    data, run_dir = dataset(tmp / "data", nan_sample=31), tmp / "run"
    return train(run_dir, f"data.train_path={data}", *extra, base=FILES), data, run_dir


def saved_finite(run_dir: Path) -> int:
    count, bad = all_finite(run_dir)
    check(not bad, f"non-finite tensors saved: {', '.join(bad)}")
    return count


@probe("nan-in-features")
def nan_in_features(tmp: Path, args) -> str:
    result, data, run_dir = nonfinite_run(tmp)
    out = result.output
    check(result.returncode == 3, f"exit {result.returncode}, not 3 (non-finite): {tail(out, 2)}")
    check("Traceback" not in out, f"a traceback: {tail(out, 2)}")
    lines = [line for line in out.splitlines() if "non-finite" in line]
    check(lines, f"no line about non-finite values: {tail(out, 2)}")
    message = out[out.index(lines[0]) :]
    for phrase in ("step", "loss", "nan", "sample 31", str(data / "features.npy")):
        check(phrase in message, f"the message does not name {phrase!r}: {lines[0][:200]}")
    count = saved_finite(run_dir)
    return f"exit 3, '{lines[0][10:70]}...' names sample 31 and its file; {count} saved weight files, all finite"


@probe("nan-skip")
def nan_skip(tmp: Path, args) -> str:
    result, _, run_dir = nonfinite_run(tmp, "train.nonfinite=skip")
    finished(result)
    skipped = [line for line in result.output.splitlines() if "skip" in line and "non-finite" in line]
    check(skipped, f"no line about a skipped step: {tail(result.output, 2)}")
    count = saved_finite(run_dir)
    check((run_dir / "model" / "model.safetensors").is_file(), "no model/ after a run that skipped its NaN steps")
    return f"exit 0, {len(skipped)} step(s) skipped with a warning, {count} saved weight files, all finite"


@probe("diverging")
def diverging(tmp: Path, args) -> str:
    run_dir = tmp / "run"
    result = train(run_dir, "optim.lr=10", "optim.grad_clip=0", "train.log_every=1")
    out = result.output
    check("Traceback" not in out, f"a traceback: {tail(out, 2)}")
    warned = [line for line in out.splitlines() if "warning" in line and "loss" in line]
    check(result.returncode in (0, 3), f"exit {result.returncode}: {tail(out, 2)}")
    check(result.returncode == 3 or warned, "optim.lr=10 optim.grad_clip=0: exit 0 without a warning")
    count = saved_finite(run_dir)
    said = warned[0][warned[0].find("loss") :][:60] if warned else "stopped"
    return f"exit {result.returncode}, '{said}...'; {count} saved weight files, all finite"


@probe("export-nonfinite")
def export_nonfinite(tmp: Path, args) -> str:
    nan, huge = nan_model(tmp / "nan"), nan_model(tmp / "huge", weights="huge")
    before = snapshot(tmp)
    lines = [
        refused(
            dist_gru("export", "--model", str(model), "--format", "torchscript", "--out", str(tmp / "m.pt")), phrase
        )
        for model, phrase in ((nan, "not finite"), (huge, "NaN or infinity"))
    ]
    unchanged(before, tmp)
    return f"a NaN weight and overflowing outputs refused, nothing written: {lines[1][lines[1].find('the') :][:70]}"


def strict_last_line(result: Result, command: str) -> dict:
    check(result.returncode == 0, f"{command}: exit {result.returncode}: {tail(result.output, 2)}")
    return strict_json(result.stdout.strip().splitlines()[-1])


@probe("strict-json")
def strict_json_output(tmp: Path, args) -> str:
    data = dataset(tmp / "data", n=5)
    model = nan_model(tmp / "run" / "model")
    (tmp / "run" / "config.yaml").write_text("model:\n  hidden_size: 8\n")
    metrics = strict_last_line(dist_gru("evaluate", "--model", str(model), "--data", str(data)), "evaluate")
    predict = ["predict", "--model", str(model), "--data", str(data), "--out", str(tmp / "p.npy")]
    predicted = strict_last_line(dist_gru(*predict), "predict")
    forecaster = nan_model(tmp / "fc" / "model", inputs=3, head="forecast", horizon=2)
    (tmp / "fc" / "config.yaml").write_text("model:\n  head: forecast\ndata:\n  window: 4\n  horizon: 2\n")
    series = dataset(tmp / "series", n=3, length=9, per_step=True)
    forecast = ["forecast", "--model", str(forecaster), "--data", str(series), "--out", str(tmp / "f.npy")]
    forecasted = strict_last_line(dist_gru(*forecast), "forecast")
    return (
        f"evaluate {{loss: {metrics.get('loss')}, nonfinite: {metrics.get('nonfinite')}}}, "
        f"predict nonfinite_rows {predicted.get('nonfinite_rows')}, forecast nonfinite_series "
        f"{forecasted.get('nonfinite_series')}: strict JSON"
    )


# -------------------------------------------------------------------------- run state on disk


@probe("overwrite-user-files")
def overwrite_user_files(tmp: Path, args) -> str:
    run_dir = tmp / "mine"
    for name in ("model/notes.txt", "plots/figure.png", "samples/a.txt"):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(f"the user's {name}\n")
    (run_dir / "config.yaml").write_text("my: own config\n")
    before = snapshot(run_dir)
    result = train(run_dir, "train.resume=overwrite")
    check("Traceback" not in result.output, f"a traceback: {tail(result.output, 2)}")
    unchanged(before, run_dir)
    line = refused(result)
    return f"refused, the user's config.yaml, model/, plots/, samples/ unchanged: {line[7:120]}"


@probe("data-replaced")
def data_replaced(tmp: Path, args) -> str:
    data, run_dir = tmp / "data", tmp / "run"
    dataset(data, n=64)
    finished(train(run_dir, f"data.train_path={data}", base=FILES))
    shutil.rmtree(data)
    dataset(data, n=500)
    before = snapshot(run_dir)
    line = refused(train(run_dir, f"data.train_path={data}", "train.max_steps=12", base=FILES), "64", "500")
    unchanged(before, run_dir)
    return f"resume onto 500 sequences refused, run folder unchanged: {line[line.find('data.train') :][:60]}"


def damaged_newest(tmp: Path, damage: Callable[[Path], object], prefix: tuple[str, ...] = ()) -> str:
    """Damage step 12 of a finished run: a resume by its path is refused (nothing changed), and
    `auto` skips it with a warning and resumes from step 8."""
    run_dir = finished_run(tmp)
    newest = run_dir / "checkpoints" / "step-000012"
    damage(newest)
    before = snapshot(run_dir)
    line = refused(train(run_dir, f"train.resume={newest}", prefix=prefix), str(newest))
    unchanged(before, run_dir)
    auto = finished(train(run_dir, prefix=prefix))
    source = resumed_from(auto.stdout)
    check(source and source.endswith("step-000008"), f"auto resumed from {source}, not step-000008")
    check(f"skipping checkpoint {newest}" in auto.output, "auto skipped step 12 without a warning")
    return f"by path refused ({line[line.find('step-000012') + 13 :][:50]}), auto skipped it and resumed from step 8"


@probe("marker-not-object")
def marker_not_object(tmp: Path, args) -> str:
    return damaged_newest(tmp, lambda f: (f / ckpt_lib.MARKER).write_text("[]"))


@probe("state-edited")
def state_edited(tmp: Path, args) -> str:
    return damaged_newest(tmp, lambda f: reseal(f, "state.json", '{"step": "twelve"}'))


@probe("unreadable-checkpoint")
def unreadable_checkpoint(tmp: Path, args) -> str:
    prefix = NO_DAC if os.geteuid() == 0 else ()
    return damaged_newest(tmp, lambda f: (f / "model.safetensors").chmod(0), prefix=prefix)


def model_users(run_dir: Path, model: Path, tmp: Path) -> dict[str, list[str]]:
    """Every command that loads a model folder, with arguments that would otherwise succeed."""
    return {
        "evaluate": ["evaluate", "--model", str(model), "--data", "adding"],
        "predict": ["predict", "--model", str(model), "--data", "adding", "--out", str(tmp / "p.npy")],
        "export": ["export", "--model", str(model), "--format", "torchscript", "--out", str(tmp / "m.pt")],
        "init_from": ["train", *BASE, f"train.init_from={model}", f"train.run_dir={tmp / 'new'}"],
    }


def damaged_model(tmp: Path, damage: Callable[[Path], object], commands: tuple[str, ...], phrase: str) -> str:
    run_dir = finished_run(tmp)
    damage(run_dir / "model")
    before = snapshot(tmp)
    users = model_users(run_dir, run_dir / "model", tmp)
    lines = []
    for name in commands:
        try:
            lines.append(refused(dist_gru(*users[name], timeout=180), phrase))
        except ProbeFailed as exc:
            raise ProbeFailed(f"{name}: {exc}") from None
        unchanged(before, tmp)
    gist = lines[0][lines[0].find(phrase) :].split(": ", 1)[-1][:70]
    return f"{len(commands)} of {len(commands)} refused ({', '.join(commands)}), nothing written: {gist}"


def flip_last_byte(model: Path) -> None:
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: the file still parses
    weights.write_bytes(bytes(data))


@probe("flipped-byte")
def flipped_byte(tmp: Path, args) -> str:
    return damaged_model(tmp, flip_last_byte, ("evaluate", "predict", "export", "init_from"), "model.safetensors")


def reseal_sums(model: Path) -> None:
    """Make the folder's SHA256SUMS (`sha256sum` format) match its files again, as an editor could:
    the damage must then be caught by the loader itself, not by the checksum."""
    sums = model / "SHA256SUMS"
    if sums.is_file():
        names = [line.split(maxsplit=1)[1].lstrip("*") for line in sums.read_text().splitlines() if line.strip()]
        sums.write_text("".join(f"{hashlib.sha256((model / n).read_bytes()).hexdigest()}  {n}\n" for n in names))


@probe("truncated-model")
def truncated_model(tmp: Path, args) -> str:
    def truncate(model: Path) -> None:
        with open(model / "model.safetensors", "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
        reseal_sums(model)

    return "SHA256SUMS resealed; " + damaged_model(tmp, truncate, ("evaluate", "predict"), "--model")


@probe("bad-model-config")
def bad_model_config(tmp: Path, args) -> str:
    def garble(model: Path) -> None:
        (model / "config.json").write_text("{not json")
        reseal_sums(model)

    return "SHA256SUMS resealed; " + damaged_model(tmp, garble, ("evaluate", "predict"), "--model")


@probe("unwritable-run-dir")
def unwritable_run_dir(tmp: Path, args) -> str:
    (tmp / "a-file").write_text("not a folder\n")
    before = snapshot(tmp)
    line = refused(train(tmp / "a-file" / "run"), "a-file")
    unchanged(before, tmp)
    if os.geteuid() != 0:
        return f"run_dir under a file refused: {line[:80]}"
    (tmp / "read-only").mkdir(mode=0o555)
    refused(train(tmp / "read-only" / "run", prefix=NO_DAC), "read-only")
    return "under a regular file and in a 0555 folder (root powers dropped): refused, nothing written"


@probe("metrics-non-utf8")
def metrics_non_utf8(tmp: Path, args) -> str:
    run_dir = finished_run(tmp)
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 13, "train/lo\xff\xfe\x80')
    result = finished(train(run_dir, "train.max_steps=16"))
    warned = [line for line in result.output.splitlines() if "metrics.jsonl" in line and "warning" in line.lower()]
    check(warned, f"no warning naming metrics.jsonl: {tail(result.output, 2)}")
    return f"resumed with exit 0: {warned[0][warned[0].find('metrics.jsonl') :][:80]}"


# ------------------------------------------------------------------------- kill -9, full disk


MOMENTS = ("any", "save", "training", "save")  # the kill of attempt i waits for MOMENTS[i % 4]
STEPS = 3000  # a run of the kill probes: far more steps than the seconds between kills train


def kill_moment(job: Background, run_dir: Path, moment: str, stale: set[str]) -> None:
    """Wait for the moment to kill: a random time after the launch (start-up included) or after
    training began, or a new `.tmp-step-*` folder in checkpoints/ (a save in flight; `stale` are
    those an earlier kill left)."""
    if moment == "any":
        time.sleep(random.uniform(0.2, 5.0))
    elif moment == "training":
        job.wait_until(job.printed("dist-gru: world_size="), "the start of training", timeout=180)
        time.sleep(random.uniform(0.0, 2.0))
    else:
        # A tiny model's save lasts a few milliseconds: poll at half a millisecond to land inside one.
        root = ckpt_lib.checkpoint_dir(run_dir)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and job.proc.poll() is None:
            try:
                if any(e.name.startswith(".tmp-step-") and e.name not in stale for e in os.scandir(root)):
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.0005)


def kill_and_resume(tmp: Path, nproc: int, kills: int) -> str:
    """kill -9 a run `kills` times, the same command started again after each; then let it finish.
    Every resume must name a checkpoint that verified before it started (nothing changes between)."""
    run_dir = tmp / "run"
    args = ["train", *BASE, "checkpoint.every=2", f"train.max_steps={STEPS}", f"train.run_dir={run_dir}"]
    # A fresh free port each time: the killed agent's port may linger; the arguments are the same.
    command = (lambda: torchrun_cmd(nproc, *args)) if nproc > 1 else (lambda: [PY, "-m", "dist_gru", *args])
    mid_save, resumes, steps = set(), [], []
    for i in range(kills + 1):
        good, tmps = verified(run_dir), set(tmp_steps(run_dir))
        if i == kills:  # the last start runs to the end
            final = finished(run(command(), timeout=500))
            output = final.output
        else:
            job = background(command(), tmp / f"attempt-{i}.log")
            kill_moment(job, run_dir, MOMENTS[i % len(MOMENTS)], stale=tmps)
            check(job.proc.poll() is None, f"attempt {i} ended ({job.proc.returncode}) before its kill")
            job.kill()
            output = job.output()
            mid_save |= set(tmp_steps(run_dir)) - tmps
            listed = ckpt_lib.list_checkpoints(run_dir)
            check(len(verified(run_dir)) == len(listed), f"kill {i} left a checkpoint that does not verify: {listed}")
            newest = ckpt_lib.find_latest(run_dir)
            steps.append(newest.step if newest else 0)
        source = resumed_from(output)
        check(source is None or source in good, f"start {i} resumed from {source}, not a verified checkpoint")
        resumes += [source] if source else []
    newest = ckpt_lib.find_latest(run_dir)
    check(newest and newest.step == STEPS, f"the final run did not end at step {STEPS}")
    return (
        f"{kills} kill -9 (newest checkpoint then: {steps}; {len(mid_save)} left a .tmp-step), "
        f"{len(resumes)} resumes, all from verified checkpoints; final run exit 0 at step {STEPS}"
    )


@probe("kill9-1proc")
def kill9_one_process(tmp: Path, args) -> str:
    return kill_and_resume(tmp, 1, args.kills)


@probe("kill9-torchrun2")
def kill9_torchrun(tmp: Path, args) -> str:
    return kill_and_resume(tmp, 2, args.kills)


def fill(disk: Path, free: int) -> None:
    """Fill the disk but `free` bytes (a file of zeros; tmpfs counts whole 4 KiB pages)."""
    fs = os.statvfs(disk)
    with open(disk / "filler", "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, fs.f_bavail * fs.f_frsize - free))


def disk_full_levels(disk: Path) -> str:
    """Train, then at each fill level: a save that cannot fit must fail in one error line leaving no
    temporary folder, and the same command with the space back must resume from a verified checkpoint."""
    run_dir = disk / "run"
    wide = ["model.hidden_size=64", "checkpoint.every=2", "checkpoint.keep=2"]
    finished(train(run_dir, *wide, "train.max_steps=2"))
    size = sum(f.stat().st_size for f in (run_dir / "checkpoints" / "step-000002").iterdir())
    levels, step = (0, size // 4, size // 2, 3 * size // 4, size - 8192), 2
    for free in levels:
        fill(disk, free)
        failed = train(run_dir, *wide, f"train.max_steps={step + 2}")
        check(failed.returncode != 0, f"{free} bytes free for a {size}-byte checkpoint, yet the run exited 0")
        line = refused(failed)
        check(not tmp_steps(run_dir), f"{free} bytes free: the failed save left {tmp_steps(run_dir)}")
        listed = ckpt_lib.list_checkpoints(run_dir)
        check(len(verified(run_dir)) == len(listed), f"{free} bytes free: a checkpoint that does not verify")
        (disk / "filler").unlink()
        good = verified(run_dir)
        again = finished(train(run_dir, *wide, f"train.max_steps={step + 2}"))
        source = resumed_from(again.stdout)
        check(source in good, f"{free} bytes free, then space: resumed from {source}, not a verified checkpoint")
        step += 2
    return (
        f"{size}-byte checkpoint, {'/'.join(str(f) for f in levels)} bytes free: every save failed with exit 2 and "
        f"one error line, no .tmp-step left, then resumed; last: {line[line.find(': ', 30) + 2 :][:60]}"
    )


@contextlib.contextmanager
def small_disk(tmp: Path):
    """A 4 MiB tmpfs mounted at TMP/disk (root only), unmounted at the end whatever happens."""
    disk = tmp / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    check(mounted.returncode == 0, f"cannot mount a tmpfs here (root needed): {tail(mounted.stderr)}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@probe("full-disk")
def full_disk(tmp: Path, args) -> str:
    with small_disk(tmp) as disk:
        return disk_full_levels(disk)


@probe("full-disk-torchrun")
def full_disk_torchrun(tmp: Path, args) -> str:
    """Rank 0's save fails on a 2-process job: every rank must stop (no hang), in one error line."""
    with small_disk(tmp) as disk:
        run_dir = disk / "run"
        job = ["train", *BASE, "model.hidden_size=64", "checkpoint.every=2", f"train.run_dir={run_dir}"]
        finished(run(launcher(2, *job, "train.max_steps=2"), timeout=300))
        size = sum(f.stat().st_size for f in (run_dir / "checkpoints" / "step-000002").iterdir())
        fill(disk, size // 2)
        start = time.monotonic()
        line = refused(run(launcher(2, *job, "train.max_steps=4"), timeout=300))
        seconds = time.monotonic() - start
        check(not tmp_steps(run_dir), f"the failed save left {tmp_steps(run_dir)}")
        (disk / "filler").unlink()
        good = verified(run_dir)
        source = resumed_from(finished(run(launcher(2, *job, "train.max_steps=4"), timeout=300)).stdout)
        check(source in good, f"with space again: resumed from {source}, not a verified checkpoint")
    return (
        f"2 processes, {size // 2} of {size} bytes free: exit 2 after {seconds:.0f} s, one error line, "
        f"no .tmp-step; then resumed from step 2: {line[line.find(': ', 30) + 2 :][:60]}"
    )


# ------------------------------------------------------------------------------------- runner


def run_probe(name: str, args: argparse.Namespace) -> tuple[bool, str]:
    """Run one probe in a temporary folder of its own; whatever happens, kill what it launched."""
    import pytest

    tmp = tempfile.mkdtemp(prefix=f"dist-gru-torture-{name}-")
    try:
        return True, PROBES[name](Path(tmp), args).replace(tmp, "TMP")
    except ProbeFailed as exc:
        return False, str(exc).replace(tmp, "TMP")
    except pytest.fail.Exception as exc:  # conftest's timeouts, a Background run that ended early
        return False, str(exc).split("\n")[0][:200].replace(tmp, "TMP")
    except Exception as exc:
        return False, f"the probe crashed: {type(exc).__name__}: {tail(str(exc))}"
    finally:
        while LIVE:
            LIVE.pop().kill()
        subprocess.run(["chmod", "-R", "u+rwX", tmp], capture_output=True)  # what a probe made unreadable
        if args.keep:
            print(f"      (TMP of {name}: {tmp})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated probe names (see --list)")
    parser.add_argument("--kills", type=int, default=8, help="kill -9 tries per kill probe")
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill moments (default: random)")
    parser.add_argument("--list", action="store_true", help="print the probe names and exit")
    parser.add_argument("--keep", action="store_true", help="keep each probe's temporary folder (TMP in the lines)")
    args = parser.parse_args()
    if args.list:
        print("\n".join(PROBES))
        return 0
    names = [n for n in args.only.split(",") if n] or list(PROBES)
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        parser.error(f"unknown probe(s) {', '.join(unknown)}; --list shows them")
    args.seed = random.randrange(1 << 30) if args.seed is None else args.seed
    random.seed(args.seed)
    width = max(map(len, names)) + 2
    passed = failed = 0
    start = time.monotonic()
    for name in names:
        ok, detail = run_probe(name, args)
        passed, failed = passed + ok, failed + (not ok)
        print(f"{'ok' if ok else 'FAIL':<6}{name:<{width}}{detail}", flush=True)
    print(f"{passed} passed, {failed} failed ({time.monotonic() - start:.0f} s, --seed {args.seed})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
