"""`dist-gru bench`: throughput of the real training loop, against a bare PyTorch loop if asked.

    dist-gru bench                                         # the reference workload, 1 process
    dist-gru bench --compare-bare                          # + an independent hand-written loop, same shapes
    torchrun --nproc-per-node 2 -m dist_gru bench --compare-bare
    dist-gru bench train.precision=bf16 model.hidden_size=512
    dist-gru bench --config configs/files.yaml data.bucket_by_length=true
    dist-gru bench --inference --model runs/adding/model   # eager vs TorchScript vs onnxruntime
    dist-gru bench --accuracy --quick                      # accuracy against peers (dist_gru.bench.accuracy)
    dist-gru bench --config configs/files.yaml train.tbptt=100 model.head=step ... --compare-window --checkpoint-every 10

The reference workload: GRU 32 -> 128 x 2 layers, length 100, batch 64 per process, fp32,
trained from a `dist_gru.seq/v1` folder of 8192 noise sequences written once beside the run folder
(`reference_files`; the bare loop holds the same tensors in memory). Our loop is measured by
running `train.build` + `train.train_loop` themselves (logging every `--window` steps, as a user
would) and reading the figures they log; warm-up windows are dropped. With `--compare-bare`,
rounds alternate ours / an independent loop (`dist_gru.bench.bare_loop`: plain `nn.GRU` + `nn.Linear`,
an in-memory TensorDataset and a DataLoader, DDP under torchrun, in a fresh process per rank) so
that drifting machine load hits both alike, and the ratio compares their median throughput.
With `train.tbptt` (stream mode), `--compare-window`
alternates rounds with the same job in window mode (`data.window` = the chunk length, no carried
state: the same shapes) and reports the ratio of their median step times; `--checkpoint-every N`
saves checkpoints, whose lane-state gather is reported (`state_gather_s`) apart from the step time.
Prints a table and one JSON line (last line).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dist_gru.bench import inference as inference_bench
from dist_gru.bench.bare_loop import BareSpec, reference_tensors
from dist_gru.config import Config, ConfigError, load_config
from dist_gru.runtime import exit_process, launch_world

REFERENCE = [
    "data.name=seed_example",
    "data.num_features=32",
    "data.seq_len=100",
    "data.train_size=200000",
    "model.hidden_size=128",
    "model.num_layers=2",
    "optim.warmup_steps=0",
]


def reference_files(cfg: Config, folder: Path, timeout_s: float = 600.0) -> Path:
    """`reference_tensors` at `cfg`'s shapes as a `dist_gru.seq/v1` folder under `folder`, written
    once per shape (the node's first process writes it atomically, the others wait for it): our loop
    reads memory-mapped files as real jobs do, and nothing is generated inside the timed steps."""
    from dist_gru.data.files import write_sequences

    shape = (cfg.data.seq_len, cfg.data.num_features, cfg.train.global_batch_size, cfg.train.seed)
    path = folder / "t{}-f{}-b{}-s{}".format(*shape)
    if (path / "meta.json").is_file():
        return path
    if launch_world()[1] == 0:
        x, y = reference_tensors(*shape)
        write_sequences(path, x.numpy(), y.numpy(), task="regression")
        return path
    deadline = time.monotonic() + timeout_s
    while not (path / "meta.json").is_file():
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench: the reference data {path} did not appear within {timeout_s:.0f} s")
        time.sleep(0.2)
    return path


def _bench_config(args: argparse.Namespace, world_size: int, max_steps: int, extra: tuple[str, ...] = ()) -> Config:
    base = [] if args.config else REFERENCE + [f"train.global_batch_size={64 * world_size}"]
    forced = [
        *extra,
        f"train.max_steps={max_steps}",
        f"train.log_every={args.window}",
        "train.eval_every=0",
        f"data.val_size={world_size}",
        f"checkpoint.every={args.checkpoint_every}",
        "train.resume=none",
        f"train.run_dir={args.run_dir}",
        "log.mode=disabled",
        "log.quiet=true",
    ]
    cfg = load_config(args.config, base + list(args.overrides) + forced)
    if args.config or any(o.startswith("data.name=") for o in args.overrides) or cfg.data.variable_length:
        return cfg
    # The reference workload trains from files, like a real job and like an independent harness.
    folder = Path(args.run_dir).with_name(Path(args.run_dir).name + "-data")
    files = ["data.name=files", f"data.train_path={reference_files(cfg, folder)}"]
    return load_config(None, base + list(args.overrides) + forced + files)


def gru_flops_per_seq_step(cfg: Config, input_size: int) -> float:
    """Matmul FLOPs of forward + backward per valid time step: 3 gates x 2HI + 2HH per layer, backward ~2x."""
    hidden, total = cfg.model.hidden_size, 0.0
    for layer in range(cfg.model.num_layers):
        inputs = input_size if layer == 0 else hidden
        total += 3 * 2 * 3 * hidden * (inputs + hidden)
    return total


def matmul_gflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5, windows: int = 5) -> float:
    """This process's dense matmul rate (n = 1024), measured while every rank does the same: the
    best of `windows` windows, since the ceiling is the rate the machine reaches, not its average
    under whatever else briefly ran."""
    n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(windows):
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            torch.mm(a, b)
            reps += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return best


def _sum_over_ranks(value: float) -> float:
    if not dist.is_initialized():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)  # all ranks participate
    return float(t)


def run_ours(args: argparse.Namespace, world_size: int, extra: tuple[str, ...] = ()) -> dict:
    """One round of the real loop; figures from its own metrics (windows after warm-up)."""
    from dist_gru.train import build, train_loop

    cfg = _bench_config(args, world_size, args.warmup + args.steps, extra)
    started = time.perf_counter()
    job = build(cfg)
    startup_s = time.perf_counter() - started
    try:
        train_loop(job)
    finally:
        job.tracker.finish()
    windows = []
    if job.accelerator.is_main_process:
        lines = (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()
        windows = [m for m in map(json.loads, lines) if "perf/step_time_s" in m and m["step"] > args.warmup]
    job.accelerator.wait_for_everyone()
    elapsed = sum(m["perf/step_time_s"] * args.window for m in windows) or float("nan")
    return {
        "cfg": cfg,
        "job": job,
        "samples_per_s": sum(m["perf/samples_per_s"] * m["perf/step_time_s"] * args.window for m in windows) / elapsed,
        "seq_steps_per_s": sum(m["perf/seq_steps_per_s"] * m["perf/step_time_s"] * args.window for m in windows)
        / elapsed,
        "median_step_s": statistics.median(m["perf/step_time_s"] for m in windows) if windows else float("nan"),
        "data_wait_frac": statistics.mean(m["perf/data_wait_frac"] for m in windows) if windows else float("nan"),
        "peak_rss_mb": windows[-1]["mem/peak_rss_mb"] if windows else float("nan"),
        "startup_s": startup_s,
        "state_gather_s": job.state_gather_s,
    }


def run_bare(cfg: Config, num_features: int, steps: int, warmup: int, device: torch.device) -> float:
    """One round of the independent loop (`dist_gru.bench.bare_loop`) at the job's shapes and settings,
    in a fresh process per rank with a process group of its own (rank 0 picks its port, on
    MASTER_ADDR); this process only waits for it. Fixed-length sequences of `data.seq_len`: compare
    with fixed-length jobs. Returns samples/s over all ranks."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    init_method = None
    if world_size > 1:
        port = [_free_port() if rank == 0 else 0]
        dist.broadcast_object_list(port, src=0)  # all ranks participate
        init_method = f"tcp://{os.environ['MASTER_ADDR']}:{port[0]}"
    spec = BareSpec(
        seq_len=cfg.data.seq_len,
        num_features=num_features,
        global_batch=cfg.train.global_batch_size,
        seed=cfg.train.seed,
        hidden_size=cfg.model.hidden_size,
        num_layers=cfg.model.num_layers,
        optimizer=cfg.optim.name,
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        weight_decay=cfg.optim.weight_decay,
        grad_clip=cfg.optim.grad_clip,
        bf16=cfg.train.precision == "bf16",
        steps=steps,
        warmup=warmup,
        threads=torch.get_num_threads(),
        device=str(device),
        rank=rank,
        world_size=world_size,
        init_method=init_method,
    )
    # Without torchrun's variables: under them the rendezvous would wait for torchrun's agent store.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    env["OMP_NUM_THREADS"] = str(spec.threads)
    done = subprocess.run(
        [sys.executable, "-m", "dist_gru.bench.bare_loop", spec.to_json()], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"the bare loop of rank {rank} exited with code {done.returncode}:\n{done.stderr[-4000:]}")
    return _sum_over_ranks(json.loads(done.stdout.splitlines()[-1])["samples_per_s"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def make_skewed_files(path: str, megabytes: float, num_features: int = 32, max_len: int = 400, seed: int = 0) -> dict:
    """A regression dataset of noise sequences with skewed lengths (lognormal, median ~ max_len / 8,
    a long tail up to max_len), about `megabytes` of features: the variable-length benchmark input."""
    from dist_gru.data.files import write_sequences
    from dist_gru.data.synthetic import normal

    rng = np.random.default_rng(seed)
    mean_len = float(np.clip(rng.lognormal(np.log(max_len / 8), 0.9, 100_000), 1, max_len).mean())
    count = max(64, int(megabytes * 2**20 / (4 * num_features * mean_len)))
    lengths = np.clip(rng.lognormal(np.log(max_len / 8), 0.9, count), 1, max_len).astype(np.int64)
    sequences, targets = [], np.empty((count, 1), dtype=np.float32)
    for first in range(0, count, 4096):  # generate in blocks: the numbers of sample i depend on i only
        index = np.arange(first, min(first + 4096, count))
        block = normal(seed, index, 0, lengths[index], (num_features,))
        for row, i in enumerate(index):
            sequences.append(block[row, : lengths[i]])
            targets[i, 0] = block[row, : lengths[i], 0].mean()
    write_sequences(path, sequences, targets, task="regression")
    return {
        "path": path,
        "num_sequences": count,
        "mean_length": float(lengths.mean()),
        "max_length": int(lengths.max()),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dist-gru bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a job config (default: the reference workload)")
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (a multiple of --window)")
    parser.add_argument("--window", type=int, default=5, help="steps per logged window (the loop's log_every)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of ours (and bare) to take medians over")
    parser.add_argument("--compare-bare", action="store_true", help="also time a hand-written PyTorch loop")
    parser.add_argument(
        "--accuracy", action="store_true",
        help="the accuracy benchmark instead; its options (--quick, --sets, --models, --seeds, --steps, --override, "
        "--out, --join) are listed by --accuracy --help"
    )
    parser.add_argument(
        "--compare-window",
        action="store_true",
        help="stream mode: also time the same job in window mode (data.window = train.tbptt, no carried state)",
    )
    parser.add_argument("--checkpoint-every", type=int, default=0, help="save a checkpoint every N steps (0 = never)")
    parser.add_argument("--run-dir", default="runs/bench", help="scratch run folder (wiped)")
    parser.add_argument("--make-files", metavar="DIR", help="only write a skewed-length dataset to DIR and exit")
    parser.add_argument("--files-mb", type=float, default=40.0, help="size of --make-files's features in MiB")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    inference_bench.add_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    problems = inference_bench.check_arguments(args)
    if problems:
        raise ConfigError("invalid bench options:\n  " + "\n  ".join(problems))
    if args.warmup % args.window or args.steps % args.window:
        parser.error("--warmup and --steps must be multiples of --window")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--accuracy" in argv:  # a benchmark of its own, with its own options
        from dist_gru.bench.accuracy.suite import main as accuracy_main
        return accuracy_main([a for a in argv if a != "--accuracy"])
    args = parse_args(argv)
    if args.inference:
        return inference_bench.main(args)
    if args.make_files:
        print(json.dumps(make_skewed_files(args.make_files, args.files_mb)))
        return 0
    rank, _, world_size, _ = launch_world()
    ours, bare, windowed = [], [], []
    for _ in range(args.rounds):
        if rank == 0:
            shutil.rmtree(args.run_dir, ignore_errors=True)
        result = run_ours(args, world_size)
        ours.append(result)
        if args.compare_window:
            chunk = result["cfg"].train.tbptt
            if chunk is None:
                raise ConfigError("--compare-window compares stream mode with window mode: set train.tbptt")
            if rank == 0:
                shutil.rmtree(args.run_dir, ignore_errors=True)
            windowed.append(run_ours(args, world_size, ("train.tbptt=null", f"data.window={chunk}")))
        if args.compare_bare:
            job = result["job"]
            bare.append(
                run_bare(result["cfg"], job.source.train_set.num_features, args.steps, args.warmup, job.accelerator.device)
            )
    job, cfg = ours[-1]["job"], ours[-1]["cfg"]
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    ceiling = _sum_over_ranks(matmul_gflops(job.accelerator.device, dtype))
    figures = {k: statistics.median(r[k] for r in ours) for k in ("samples_per_s", "seq_steps_per_s", "median_step_s")}
    figures.update({k: ours[-1][k] for k in ("data_wait_frac", "peak_rss_mb", "startup_s")})
    gflops = figures["seq_steps_per_s"] * gru_flops_per_seq_step(cfg, job.source.train_set.num_features) / 1e9
    ran_batches = (args.warmup + args.steps) * cfg.train.grad_accum_steps
    report = {
        "world_size": world_size,
        "precision": cfg.train.precision,
        "cell": cfg.model.cell,
        "hidden_size": cfg.model.hidden_size,
        "num_layers": cfg.model.num_layers,
        "global_batch_size": cfg.train.global_batch_size,
        "threads_per_process": torch.get_num_threads(),
        "data": cfg.data.train_path if cfg.data.name == "files" else cfg.data.name,
        **{k: round(v, 4) for k, v in figures.items()},
        # Over the batches this bench ran, not a whole epoch (a windowed epoch can hold billions).
        "padding_fraction": round(job.source.sampler.padding_fraction(0, ran_batches), 4) if not cfg.train.tbptt else 0.0,
        "gru_gflops": round(gflops, 4),
        "matmul_gflops": round(ceiling, 2),
        "fraction_of_matmul": round(gflops / ceiling, 4),
        "rounds_samples_per_s": [round(r["samples_per_s"], 1) for r in ours],
    }
    if cfg.train.tbptt:
        report["tbptt"] = cfg.train.tbptt
        report["state_gather_s"] = round(statistics.median(r["state_gather_s"] for r in ours), 6)
        report["checkpoints"] = (args.warmup + args.steps) // args.checkpoint_every if args.checkpoint_every else 0
    if windowed:
        report["window_median_step_s"] = round(statistics.median(r["median_step_s"] for r in windowed), 4)
        report["rounds_window_median_step_s"] = [round(r["median_step_s"], 4) for r in windowed]
        report["rounds_median_step_s"] = [round(r["median_step_s"], 4) for r in ours]
        report["stream_vs_window_step_time"] = round(figures["median_step_s"] / report["window_median_step_s"], 4)
    if bare:
        report["bare_samples_per_s"] = round(statistics.median(bare), 2)
        report["rounds_bare_samples_per_s"] = [round(b, 1) for b in bare]
        report["ratio_vs_bare"] = round(figures["samples_per_s"] / statistics.median(bare), 4)
    if rank == 0:
        width = max(map(len, report))
        print("\n".join(f"{k:<{width}}  {v}" for k, v in report.items()))
        print(json.dumps(report), flush=True)
    exit_process(0)
    return 0
