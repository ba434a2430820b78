"""The `dist-gru` command.

    dist-gru train    --config configs/adding.yaml train.max_steps=500
    dist-gru evaluate --model runs/adding/model --data adding
    dist-gru predict  --model runs/adding/model --data data/val --out preds.npy
    dist-gru backtest --model runs/stores/model --data data/stores/val --origins 4 --out backtest.csv
    dist-gru export   --model runs/adding/model --format onnx --out adding.onnx
    dist-gru prepare  --npz arrays.npz --out data/ --task classification --num-classes 3 --val-fraction 0.1
    dist-gru sample   --model runs/bytes/model --prompt "def " --bytes 200 --temperature 0.8 --seed 0
    dist-gru tune     --config configs/adding.yaml --space space.yaml --study runs/tune --trials 16
    dist-gru bench    --compare-bare
    dist-gru plot     runs/adding

Every subcommand turns a user error (bad config, bad data file, bad checkpoint, bad launch
environment) into one `error: ...` message on stderr and exit code 2, leaving files on disk alone.
Under a launcher every rank exits 2, but a message every rank has in common (a config error, or a
decision global rank 0 made for all, marked `same_on_every_rank`) is printed by rank 0 alone; an
error of one rank's own (its files, its devices) by that rank, named.
Any other exception is a crash: its traceback goes to stderr in one piece, under a line naming
the process (`dist-gru: rank 1 of 2 (local rank 1, host node2) crashed: ...`), and, under
torchrun, also into the error file torchrun reads (`@record`), so the agent's failure summary
names the rank and shows the traceback too. On a cluster every rank's stderr is the job's output,
but without this nothing says which of the interleaved lines came from which rank.
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import sys
import traceback

COMMANDS = {
    "train": ("dist_gru.train.trainer", "main", "train a model"),
    "evaluate": ("dist_gru.infer.evaluate", "evaluate_main", "print metrics of a saved model as one JSON line"),
    "predict": ("dist_gru.infer.predict", "predict_main", "write a saved model's predictions as .npy (torchrun: sharded)"),
    "forecast": ("dist_gru.infer.forecast", "forecast_main", "write the forecast after the end of every series as .npy"),
    "backtest": ("dist_gru.infer.backtest", "backtest_main", "score a forecaster on the last origins of every series vs baselines"),
    "export": ("dist_gru.infer.export", "main", "export a saved model to ONNX or TorchScript, checked against its runtime"),
    "prepare": ("dist_gru.data.prepare", "main", "convert .npy/.npz/.csv data to the dist_gru.seq/v1 format"),
    "sample": ("dist_gru.infer.sample", "main", "generate text from a byte-level stream-mode model"),
    "tune": ("dist_gru.tune.command", "main", "search hyperparameters: trials as resumable runs, any number of workers"),
    "bench": ("dist_gru.bench.throughput", "main", "measure training throughput"),
    "plot": ("dist_gru.plot", "main", "draw PNG curves from a run's metrics.jsonl"),
}

USAGE = (
    "usage: dist-gru {"
    + ",".join(COMMANDS)
    + "} [args...]\n\n"
    + "\n".join(f"  {name:<9} {help_}" for name, (_, _, help_) in COMMANDS.items())
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    from torch.distributed.elastic.multiprocessing.errors import record

    from dist_gru.config import ConfigError
    from dist_gru.data.files import DataFormatError
    from dist_gru.runtime import LaunchError, exit_process
    from dist_gru.train.checkpoint import CheckpointError

    module, func, _ = COMMANDS[argv[0]]

    @record
    def run() -> int:
        try:
            return getattr(importlib.import_module(module), func)(argv[1:])
        except (ConfigError, DataFormatError, CheckpointError, LaunchError) as exc:
            rank = launch_rank() or "0"
            if rank == "0":
                print(f"error: {exc}", file=sys.stderr, flush=True)
            elif getattr(exc, "same_on_every_rank", isinstance(exc, ConfigError)) and stopped_after_rank0():
                pass  # rank 0 has said it
            else:  # this rank's own error, or one rank 0 did not stop on
                print(f"error (rank {rank}): {exc}", file=sys.stderr, flush=True)
            exit_process(2)  # under a launcher: now, and with exactly 2 (runtime.exit_process says why)
            return 2

    try:
        return run()
    except KeyboardInterrupt:  # Ctrl-C before training installed its handler, or in another command
        print(f"dist-gru: interrupted ({argv[0]} stopped; nothing half-written is ever kept)", file=sys.stderr)
        return 130
    except Exception as exc:
        # One write: the ranks of a job share its output, and their lines must not interleave.
        report = f"dist-gru: {process_name()} crashed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        sys.stderr.write(report)
        sys.stderr.flush()
        return 1


def stopped_after_rank0(limit_s: float = 10.0) -> bool:
    """Wait for the launcher to stop this process because global rank 0 exited, having printed the
    error every rank shares. True if it did; False after `limit_s` (rank 0 did not fail: the error
    is this rank's after all, and it must say so itself).

    A launcher stops the other workers when the first one exits (torchrun: SIGTERM, which may come
    before rank 0 has printed anything, and it names the first to exit as the failure), so the
    others wait with SIGTERM and SIGINT blocked: the signal ends the wait instead of the process."""
    from dist_gru.train.preemption import signals_received

    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    if stops & set(signals_received()):  # it came already, while training started up
        return True
    return signal.sigtimedwait(stops, limit_s) is not None


def launch_rank() -> str | None:
    """This process's global rank as its launcher gave it (torchrun, srun), None when launched alone."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID"))


def process_name() -> str:
    """`rank R of W (local rank L, host H)` from the launcher's environment, `host H` for one process."""
    host = socket.gethostname()
    rank = launch_rank()
    if rank is None:
        return f"host {host}"
    world = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "?"))
    local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "?"))
    return f"rank {rank} of {world} (local rank {local}, host {host})"
