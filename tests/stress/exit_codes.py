"""Exit codes under load: run the 2-process job many times next to a busy core and count what came out.

    .venv/bin/python tests/stress/exit_codes.py                 # 30 clean runs, 10 preemptions
    .venv/bin/python tests/stress/exit_codes.py --runs 5 --preemptions 2 --load 0

A finished run must exit 0 on every worker and at the launcher, every time; a preempted run (SIGUSR1
to rank 1 only) must end with every worker's code 75, torchrun's 1, and one PREEMPTED marker naming
the checkpoint of the step all ranks saved. `--load N` keeps N extra processes spinning on the CPU
(default 1: one of two cores busy, as on a shared CI machine). Prints one line per run and the
histograms; exits 1 if any run came out otherwise. Not part of the test suite: it takes about
20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest, test_resume

from conftest import TINY, Background, run, torchrun_cmd  # noqa: E402
from test_resume import _worker_exit_codes, checkpoint_exists, preempted  # noqa: E402

from dist_gru.train import checkpoint as ckpt_lib  # noqa: E402

CLEAN = [*TINY, "log.mode=disabled", "train.max_steps=20", "data.variable_length=true"]
PREEMPT = [
    *(arg for arg in TINY if not arg.startswith("train.max_steps")),
    "log.mode=disabled",
    "train.max_steps=100000",
    "checkpoint.every=4",
]


def spin() -> None:
    while True:
        pass


def clean_run(root: Path, i: int) -> str:
    result = run(torchrun_cmd(2, "train", *CLEAN, f"train.run_dir={root / f'clean-{i}'}"), timeout=600)
    if result.returncode == 0 and "dist-gru: training finished" in result.stdout:
        return "launcher 0, workers 0"
    workers = dict(sorted(_worker_exit_codes(result.output).items()))
    abort = " (terminate called)" if "terminate called" in result.output else ""
    return f"launcher {result.returncode}, workers {workers}{abort}"


def preempted_run(root: Path, i: int) -> str:
    run_dir = root / f"preempt-{i}"
    cmd = torchrun_cmd(2, "train", *PREEMPT, f"train.run_dir={run_dir}")
    job = Background(cmd, root / f"preempt-{i}.log")
    try:
        job.wait_until(checkpoint_exists(run_dir, "step-000004"), "the first checkpoint", timeout=300)
        job.worker(rank=1).send_signal(signal.SIGUSR1)
        job.wait_until(preempted(run_dir), "the preemption marker", timeout=120)
        code = job.wait(timeout=120)
    finally:
        job.kill()
    out = job.output()
    marker = ckpt_lib.read_preempted(run_dir)
    newest = ckpt_lib.find_latest(run_dir)
    marker_ok = marker is not None and newest is not None and marker["checkpoint"] == str(newest.path)
    workers = dict(sorted(_worker_exit_codes(out).items()))
    return f"launcher {code}, workers {workers}, marker {'ok' if marker_ok else 'WRONG'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--preemptions", type=int, default=10)
    parser.add_argument("--load", type=int, default=1, help="busy processes beside the runs")
    args = parser.parse_args()
    load = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.load)]
    for proc in load:
        proc.start()
    expected_clean = "launcher 0, workers 0"
    expected_preempted = (
        f"launcher 1, workers {{0: {ckpt_lib.EXIT_PREEMPTED}, 1: {ckpt_lib.EXIT_PREEMPTED}}}, marker ok"
    )
    histograms: dict[str, collections.Counter] = {"clean": collections.Counter(), "preempted": collections.Counter()}
    start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="dist-gru-exit-codes-") as tmp:
            root = Path(tmp)
            for i in range(args.runs):
                outcome = clean_run(root, i)
                histograms["clean"][outcome] += 1
                print(f"clean {i + 1}/{args.runs}: {outcome}", flush=True)
            for i in range(args.preemptions):
                try:
                    outcome = preempted_run(root, i)
                except BaseException as exc:  # pytest.fail from the helpers: report, go on
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    outcome = f"error: {str(exc).splitlines()[0]}"
                histograms["preempted"][outcome] += 1
                print(f"preempted {i + 1}/{args.preemptions}: {outcome}", flush=True)
    finally:
        for proc in load:
            proc.terminate()
    print(
        f"\n{args.runs} clean runs and {args.preemptions} preemptions with {args.load} busy process(es), "
        f"{time.monotonic() - start:.0f} s"
    )
    for kind, counts in histograms.items():
        print(f"{kind}:")
        for outcome, count in counts.most_common():
            print(f"  {count:3d}  {outcome}")
    good = histograms["clean"][expected_clean] == args.runs
    good &= histograms["preempted"][expected_preempted] == args.preemptions
    print("all as documented" if good else "SOME RUNS ENDED OTHERWISE")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
