"""Throughput and memory of `dist-gru prepare --table` on a generated long-format Parquet file.

    python -m dist_gru.bench.table --rows 50000000 --series 1000 --dir /tmp/x [--memory-mb 1024]

Writes DIR/table.parquet (hourly rows, series interleaved as a time-sorted export would have them:
id, ts, y and two covariates), written one row group at a time so generating it needs no more
memory than a row group, then runs `prepare --table` on it in a fresh process (a validation cut of
the last 24 steps of each series) and prints one JSON line: rows, file size, seconds, rows/s and
the conversion's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP = 1 << 20


def write_table(path: Path, rows: int, series: int, seed: int = 0) -> None:
    """`rows` rows of `series` hourly series (row k: series k % series, step k // series)."""
    rng = np.random.default_rng(seed)
    schema = pa.schema(
        [("id", pa.string()), ("ts", pa.timestamp("ns")), ("y", pa.float64()), ("x1", pa.float64()), ("x2", pa.float64())]
    )
    names = pa.array([f"s{i:06d}" for i in range(series)])
    start = np.datetime64("2000-01-01T00:00", "ns")
    with pq.ParquetWriter(path, schema) as writer:
        for first in range(0, rows, ROW_GROUP):
            k = np.arange(first, min(first + ROW_GROUP, rows), dtype=np.int64)
            step = k // series
            season = np.sin(2 * np.pi * step / 24)
            columns = {
                "id": names.take(pa.array(k % series)),
                "ts": start + step.astype("timedelta64[h]"),
                "y": season + 0.1 * rng.standard_normal(len(k)),
                "x1": season,
                "x2": rng.standard_normal(len(k)),
            }
            writer.write_table(pa.table(columns, schema=schema))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_gru.bench.table", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000_000)
    parser.add_argument("--series", type=int, default=1000)
    parser.add_argument("--dir", type=Path, required=True, help="where the table and the dataset are written")
    parser.add_argument("--memory-mb", type=int, default=1024)
    parser.add_argument("--keep", action="store_true", help="keep the table and the dataset")
    args = parser.parse_args(argv)
    if args.rows < 3 * args.series:
        parser.error(f"--rows {args.rows}: expected at least 3 rows per series ({3 * args.series})")
    args.dir.mkdir(parents=True, exist_ok=True)
    table, out = args.dir / "table.parquet", args.dir / "dataset"
    started = time.perf_counter()
    write_table(table, args.rows, args.series)
    generate_s = time.perf_counter() - started
    command = [
        sys.executable, "-m", "dist_gru", "prepare", "--table", str(table), "--id-column", "id", "--time-column",
        "ts", "--target-columns", "y", "--past-columns", "x1,x2", "--val-last", "24", "--memory-mb",
        str(args.memory_mb), "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=6 * 3600)
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr, end="")
        return result.returncode
    summary = json.loads(result.stdout)
    report = {
        "rows": summary["rows"],
        "series": args.series,
        "file_mb": round(table.stat().st_size / 2**20, 1),
        "generate_s": round(generate_s, 1),
        "seconds": summary["seconds"],
        "rows_per_s": summary["rows_per_s"],
        "peak_rss_mb": summary["peak_rss_mb"],
        "memory_mb": args.memory_mb,
    }
    if not args.keep:
        table.unlink()
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
