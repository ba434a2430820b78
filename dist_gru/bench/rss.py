"""Peak RSS of window datasets against the series length: opening a 10^8-step and a 10^6-step series
and drawing random batches of forecast windows through the training sampler, each in a fresh process.

    python -m dist_gru.bench.rss --rss-bench --dir /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from dist_gru.data.files import SequenceFileDataset, write_sequences
from dist_gru.data.loading import TrainBatchSampler
from dist_gru.data.windows import WindowDataset


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork
    and exec, so a child would report its parent's peak (here: the writer's mapped pages)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _write_series(path: Path, steps: int, chunk: int = 1 << 22) -> None:
    """A one-feature series with one per-step target, written through `write_sequences` from
    memory-mapped inputs (so the writer holds a chunk, never the series)."""
    from numpy.lib.format import open_memmap

    scratch = Path(tempfile.mkdtemp(prefix=".inputs-", dir=path.parent))
    try:
        features = open_memmap(scratch / "f.npy", mode="w+", dtype=np.float32, shape=(steps, 1))
        targets = open_memmap(scratch / "t.npy", mode="w+", dtype=np.float32, shape=(steps,))
        rng = np.random.default_rng(0)
        for first in range(0, steps, chunk):
            t = np.arange(first, min(first + chunk, steps))
            targets[first : first + len(t)] = np.sin(2 * np.pi * t / 24) + 0.1 * rng.standard_normal(len(t))
            features[first : first + len(t), 0] = np.cos(2 * np.pi * t / 24)
        features.flush()
        targets.flush()
        write_sequences(path, [features], [targets], task="regression")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _probe(path: str, window: int, horizon: int, batches: int, batch_size: int) -> dict:
    """In a fresh process: open `path` as forecast windows, draw `batches` random batches through the
    training sampler, report RSS (MB) before and at peak."""
    before = _current_rss_mb()
    dataset = WindowDataset(SequenceFileDataset(path), window=window, horizon=horizon)
    sampler = TrainBatchSampler(dataset.lengths, batch_size, 1, 0, 1, seed=0)
    total = 0.0
    for _, indices in zip(range(batches), sampler, strict=False):
        total += float(dataset.__getitems__(indices)["y"].sum())
    return {
        "steps": int(dataset.source.meta["total_steps"]),
        "windows": len(dataset),
        "in_memory_order": sampler.in_memory,
        "rss_before_open_mb": round(before, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "peak_minus_before_mb": round(_peak_rss_mb() - before, 1),
        "checksum": round(total, 3),
    }


def rss_bench(directory: str, sizes: list[int], window: int, horizon: int, batches: int, batch_size: int) -> list[dict]:
    """Write each series under `directory`, measure it in a fresh process, delete it."""
    results = []
    for steps in sizes:
        root = Path(tempfile.mkdtemp(prefix="dist-gru-rss-", dir=directory))
        try:
            _write_series(root / "series", steps)
            command = [sys.executable, "-m", "dist_gru.bench.rss", "--probe", str(root / "series")]
            command += ["--window", str(window), "--horizon", str(horizon)]
            command += ["--batches", str(batches), "--batch-size", str(batch_size)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_gru.bench.rss", description=__doc__.split("\n")[0])
    parser.add_argument("--rss-bench", action="store_true", help="peak RSS of window datasets of each --sizes")
    parser.add_argument("--probe", metavar="DIR", help=argparse.SUPPRESS)  # one measurement, in a fresh process
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the series are written (then deleted)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**6, 10**8], help="series lengths in steps")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--horizon", type=int, default=24)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(_probe(args.probe, args.window, args.horizon, args.batches, args.batch_size)))
        return 0
    if not args.rss_bench:
        parser.error("nothing to do: pass --rss-bench")
    results = rss_bench(args.dir, args.sizes, args.window, args.horizon, args.batches, args.batch_size)
    growth = results[-1]["peak_minus_before_mb"] - results[0]["peak_minus_before_mb"]
    print(json.dumps({"sizes": args.sizes, "peak_rss_growth_mb": round(growth, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
