"""`dist-gru bench --inference`: a saved model's inference speed in PyTorch eager, TorchScript and
onnxruntime, side by side in one run.

    dist-gru bench --inference --model runs/adding/model
    dist-gru bench --inference --model runs/adding/model --length 200 --rounds 5

Per-sequence latency is the median time of one call with batch 1; throughput is sequences per
second of calls with batch 256. The model is exported to both files first (with the same check as
`dist-gru export`), and the three runtimes take turns within every round, so that drifting machine
load hits them alike; the figures are medians over rounds. Every runtime gets the same number of
threads (torch's, which `OMP_NUM_THREADS` sets). Prints a table and one JSON line (last line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dist_gru.infer import export
from dist_gru.infer.load import load_model

RUNTIMES = ("eager", "torchscript", "onnxruntime")


def _seconds_per_call(call: Callable[[], Any], calls: int) -> float:
    """Median wall time of ``calls`` calls, after one untimed call."""
    call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_inference(args: argparse.Namespace) -> dict[str, Any]:
    """Latency (batch 1) and throughput (batch ``args.batch_size``) of each runtime."""
    model = load_model(Path(args.model))
    threads = torch.get_num_threads()
    generator = torch.Generator().manual_seed(0)
    batches = {
        "latency": export.random_batch(model, 1, args.length, generator, padded=False)[:2],
        "throughput": export.random_batch(model, args.batch_size, args.length, generator, padded=False)[:2],
    }
    with tempfile.TemporaryDirectory() as tmp:
        calls: dict[str, Callable[..., Any]] = {}

        def eager(x: torch.Tensor, lengths: torch.Tensor) -> Any:
            with torch.no_grad():
                return model(x, lengths)[0]

        calls["eager"] = eager
        differences = {}
        for runtime, fmt in (("torchscript", "torchscript"), ("onnxruntime", "onnx")):
            path = Path(tmp) / f"model.{fmt}"
            export.write_export(args.model, fmt, path, export.DEFAULT_OPSET, stateful=False)
            differences[runtime] = export.verify(path, fmt, model, stateful=False)
            runner = export.load_runner(path, fmt, threads=threads)
            calls[runtime] = lambda x, lengths, run=runner: run(x.numpy(), lengths.numpy())
        rounds: dict[str, dict[str, list[float]]] = {r: {"latency": [], "throughput": []} for r in RUNTIMES}
        for _ in range(args.rounds):
            for runtime in RUNTIMES:
                for kind, (x, lengths) in batches.items():
                    count = args.latency_calls if kind == "latency" else args.throughput_calls
                    rounds[runtime][kind].append(_seconds_per_call(lambda c=calls[runtime], x=x, n=lengths: c(x, n), count))
    report: dict[str, Any] = {
        "model": str(args.model),
        "cell": model.cell,
        "head": model.head_kind,
        "hidden_size": model.hidden_size,
        "num_layers": model.num_layers,
        "bidirectional": model.bidirectional,
        "length": args.length,
        "batch_size": args.batch_size,
        "threads": threads,
        "rounds": args.rounds,
    }
    for runtime in RUNTIMES:
        latency = statistics.median(rounds[runtime]["latency"])
        throughput = args.batch_size / statistics.median(rounds[runtime]["throughput"])
        report[runtime] = {
            "latency_ms": round(latency * 1e3, 4),
            "throughput_seq_per_s": round(throughput, 1),
            "max_difference": differences.get(runtime, 0.0),
        }
    return report


def table(report: dict[str, Any]) -> str:
    eager = report["eager"]
    lines = [
        f"{report['cell']} GRU {report['hidden_size']} x {report['num_layers']}, head {report['head']}, "
        f"length {report['length']}, {report['threads']} threads, medians of {report['rounds']} rounds",
        f"{'runtime':<12} {'latency (batch 1)':>18} {'throughput (batch ' + str(report['batch_size']) + ')':>24} "
        f"{'vs eager':>9} {'max diff':>9}",
    ]
    for runtime in RUNTIMES:
        row = report[runtime]
        speedup = row["throughput_seq_per_s"] / eager["throughput_seq_per_s"]
        lines.append(
            f"{runtime:<12} {row['latency_ms']:>15.3f} ms {row['throughput_seq_per_s']:>18.1f} seq/s "
            f"{speedup:>8.2f}x {row['max_difference']:>9.1e}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """The `bench --inference` branch of `dist-gru bench` (its parser holds these options)."""
    report = bench_inference(args)
    print(table(report))
    print(json.dumps(report), flush=True)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inference (--inference)")
    group.add_argument("--inference", action="store_true", help="benchmark a saved model's inference instead")
    group.add_argument("--model", help="the saved model folder to benchmark (with --inference)")
    group.add_argument("--length", type=int, default=100, help="sequence length of the benchmark batches")
    group.add_argument("--batch-size", type=int, default=256, help="batch size of the throughput calls")
    group.add_argument("--latency-calls", type=int, default=50, help="timed batch-1 calls per runtime and round")
    group.add_argument("--throughput-calls", type=int, default=5, help="timed full-batch calls per runtime and round")


def check_arguments(args: argparse.Namespace) -> list[str]:
    """Problems with the inference options, each naming the flag and what it expects."""
    problems = []
    if args.inference and not args.model:
        problems.append("--inference needs --model RUN/model (a saved model folder)")
    if args.model and not args.inference:
        problems.append(f"--model {args.model}: only with --inference")
    for flag in ("length", "batch_size", "latency_calls", "throughput_calls", "rounds"):
        value = getattr(args, flag)
        if value < 1:
            problems.append(f"--{flag.replace('_', '-')} {value}: expected an integer >= 1")
    return problems
