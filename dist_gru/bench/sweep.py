"""`python -m dist_gru.bench.sweep`: how training cost grows with the shape, as curves instead of points.

    python -m dist_gru.bench.sweep --out runs/sweep                 # hidden 64..1024, length 50..2000, 1 and 2
                                                              # processes, fp32 and bf16 (tens of minutes)
    python -m dist_gru.bench.sweep --out runs/sweep --quick         # the ends and the middle of each axis only

Every point is one `dist-gru bench` of the reference workload (GRU 32 -> H x 2 layers, batch 64 per
process) with one axis changed: `model.hidden_size` at length 100, `data.seq_len` at hidden 128.
Two processes run under torchrun with one thread each; one process uses every core. Each point
reports samples/s and the fraction of the measured dense matmul rate that the GRU's matmuls reach
(`fraction_of_matmul`): near 1 the step is matmul-bound, near 0 the time goes to everything around
the matmuls (per-step kernel launches, the loop, the optimizer, data). Writes `sweep.jsonl` (one
bench report per line), `sweep.md` (a table) and `sweep.png` (the curves) into `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from matplotlib.figure import Figure

HIDDEN = [64, 128, 256, 512, 1024]
LENGTHS = [50, 100, 200, 500, 1000, 2000]
QUICK_HIDDEN = [64, 256, 1024]
QUICK_LENGTHS = [50, 200, 2000]


def points(quick: bool, precisions: tuple[str, ...] = ("fp32", "bf16")) -> list[dict]:
    """The sweep: one dict of overrides per point, both axes, every process count and precision."""
    hidden, lengths = (QUICK_HIDDEN, QUICK_LENGTHS) if quick else (HIDDEN, LENGTHS)
    axes = [("hidden_size", h, {"model.hidden_size": h, "data.seq_len": 100}) for h in hidden]
    axes += [("seq_len", t, {"model.hidden_size": 128, "data.seq_len": t}) for t in lengths]
    return [
        {"axis": axis, "value": value, "processes": procs, "precision": precision, "overrides": overrides}
        for axis, value, overrides in axes
        for procs in (1, 2)
        for precision in precisions
    ]


def bench_command(point: dict, run_dir: Path, steps: int) -> list[str]:
    overrides = [f"{k}={v}" for k, v in point["overrides"].items()]
    overrides += [f"train.precision={point['precision']}", "data.train_size=20000"]
    bench = [
        "bench",
        "--steps",
        str(steps),
        "--warmup",
        "5",
        "--window",
        "5",
        "--rounds",
        "1",
        "--run-dir",
        str(run_dir),
        *overrides,
    ]
    if point["processes"] == 1:
        return [sys.executable, "-m", "dist_gru", *bench]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(point["processes"]),
        "-m",
        "dist_gru",
        *bench,
        "train.threads=1",
    ]


def run_point(point: dict, run_dir: Path, steps: int, timeout_s: float) -> dict:
    cmd = bench_command(point, run_dir, steps)
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout_s, env={**os.environ, "WANDB_MODE": "disabled"}
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return {**{k: point[k] for k in ("axis", "value", "processes", "precision")}, **report}


def table(rows: list[dict]) -> str:
    lines = [
        "| axis | value | processes | precision | samples/s | ms/step | fraction of matmul | data wait |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['axis']} | {r['value']} | {r['processes']} | {r['precision']} | {r['samples_per_s']:.0f} | "
            f"{1e3 * r['median_step_s']:.1f} | {r['fraction_of_matmul']:.3f} | {100 * r['data_wait_frac']:.1f} % |"
        )
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], title: str) -> Figure:
    fig = Figure(figsize=(11, 8))
    axes = fig.subplots(2, 2)
    for col, (axis, label) in enumerate(
        [("hidden_size", "hidden size (length 100)"), ("seq_len", "sequence length (hidden 128)")]
    ):
        for procs in (1, 2):
            for precision in ("fp32", "bf16"):
                sel = sorted(
                    (r for r in rows if (r["axis"], r["processes"], r["precision"]) == (axis, procs, precision)),
                    key=lambda r: r["value"],
                )
                if not sel:
                    continue
                name = f"{procs} proc, {precision}"
                style = "-" if precision == "fp32" else "--"
                xs = [r["value"] for r in sel]
                axes[0][col].plot(xs, [r["samples_per_s"] for r in sel], style, marker="o", label=name)
                axes[1][col].plot(xs, [r["fraction_of_matmul"] for r in sel], style, marker="o", label=name)
        for row, ylabel in enumerate(["samples/s", "fraction of matmul rate"]):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log" if row == 0 else "linear")
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def cpu_model() -> str:
    """The CPU as a figure needs it: its name, family and model (a VM often says only "AMD EPYC")
    and its bf16 instruction sets, which decide what bf16 costs."""
    path = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if not line.strip():
            break  # the first processor is enough
    if "model name" not in fields:
        return "unknown CPU"
    flags = set(fields.get("flags", "").split())
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags] or ["no bf16 instructions"]
    return f"{fields['model name']} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, {', '.join(bf16)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_gru.bench.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/sweep", help="folder for sweep.jsonl, sweep.md, sweep.png")
    parser.add_argument("--quick", action="store_true", help="three values per axis instead of all")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per point (a multiple of 5)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one point may take")
    parser.add_argument(
        "--precisions",
        default="fp32,bf16",
        help="comma-separated train.precision values (a CPU without bf16 instructions computes bf16 in fp32)",
    )
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.steps % 5:
        parser.error(f"--steps {args.steps}: expected a positive multiple of 5")
    precisions = tuple(p for p in args.precisions.split(",") if p)
    if not precisions or any(p not in ("fp32", "bf16") for p in precisions):
        parser.error(f"--precisions {args.precisions}: expected fp32, bf16 or fp32,bf16")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(out / "sweep.jsonl", "w") as log:
        for point in points(args.quick, precisions):
            row = run_point(point, out / "bench", args.steps, args.timeout)
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(
                f"{point['axis']}={point['value']} {point['processes']}p {point['precision']}: "
                f"{row['samples_per_s']:.0f} samples/s, {row['fraction_of_matmul']:.3f} of matmul",
                flush=True,
            )
    title = f"dist-gru training throughput, {cpu_model()}, {os.cpu_count()} cores"
    (out / "sweep.md").write_text(f"{title}\n\n{table(rows)}")
    figure(rows, title).savefig(out / "sweep.png", dpi=100)
    print(
        json.dumps(
            {
                "jsonl": str(out / "sweep.jsonl"),
                "table": str(out / "sweep.md"),
                "png": str(out / "sweep.png"),
                "points": len(rows),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
