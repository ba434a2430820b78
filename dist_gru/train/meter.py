"""The training figures of each logging interval: loss, throughput, data wait, memory.

Per-interval sums stay on the device (no host sync until a log step); a log step gathers them from
every rank in one collective. Evaluation and checkpointing inside an interval are `paused()` out of
it, so `perf/*` measure training steps only.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class Meter:
    def __init__(self, job: Any):
        self.job = job
        self.device = job.accelerator.device
        self.loss = torch.zeros((), device=self.device)
        self.sample_log = _sample_log(job)
        self._reset()

    def _reset(self) -> None:
        self.loss.zero_()
        self.samples = self.seq_steps = self.steps = self.loss_steps = 0
        self.data_wait = 0.0
        self.start = time.perf_counter()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Time spent waiting for the next batch."""
        start = time.perf_counter()
        yield
        self.data_wait += time.perf_counter() - start

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Work outside the training steps (evaluation, saving): not counted in the interval."""
        start = time.perf_counter()
        yield
        self.start += time.perf_counter() - start

    def add_batch(self, step: int, epoch: int, batch: dict) -> None:
        self.samples += len(batch["y"])
        self.seq_steps += int(batch["lengths"].sum())
        if self.sample_log is not None:
            self.sample_log.write(json.dumps({"step": step, "epoch": epoch, "index": batch["index"].tolist()}) + "\n")

    def add_step(self, loss: torch.Tensor, kept: bool) -> None:
        """One optimizer step; its loss counts unless the step was skipped (`train.nonfinite=skip`)."""
        self.steps += 1
        if kept:
            self.loss += loss
            self.loss_steps += 1

    def log(self, done: int, lr: float, grad_norm: torch.Tensor | None, epoch: int, guard: Any, progress: Any) -> dict:
        """The interval's metrics, logged, printed and returned. All ranks participate."""
        job, cfg = self.job, self.job.cfg
        elapsed = time.perf_counter() - self.start
        local = torch.tensor(
            [float(self.loss), self.samples, self.seq_steps, self.data_wait / max(elapsed, 1e-9), _peak_rss_mb(),
             _cuda_peak_mb(self.device)],
            dtype=torch.float64,
            device=self.device,
        )
        every = job.accelerator.gather(local[None]).cpu()  # [world, 6]
        metrics = {
            "train/loss": float(every[:, 0].mean()) / self.loss_steps if self.loss_steps else float("nan"),
            "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "perf/samples_per_s": float(every[:, 1].sum()) / elapsed,
            "perf/seq_steps_per_s": float(every[:, 2].sum()) / elapsed,
            "perf/step_time_s": elapsed / self.steps,
            "perf/data_wait_frac": float(every[:, 3].max()),
            "mem/peak_rss_mb": float(every[:, 4].max()),
            "progress/epoch": epoch,
            "progress/samples_seen": done * cfg.train.global_batch_size,
            "amp/skipped_steps": job.skipped_steps.value,
            "train/nonfinite_skips": guard.skipped,
        }
        if self.device.type == "cuda":
            metrics["mem/cuda_max_alloc_mb"] = float(every[:, 5].max())
        if cfg.train.tbptt:
            metrics["perf/state_gather_s"] = job.state_gather_s  # at checkpoints, outside perf/step_time_s
        job.tracker.log(metrics, step=done)
        guard.watch_loss(metrics["train/loss"], done, lr)
        progress.set_postfix(loss=f"{metrics['train/loss']:.4g}", sps=f"{metrics['perf/samples_per_s']:.0f}")
        if cfg.log.quiet and job.accelerator.is_main_process:
            print(
                f"step {done}/{cfg.train.max_steps} loss {metrics['train/loss']:.4g} lr {lr:.3g} "
                f"samples/s {metrics['perf/samples_per_s']:.0f}",
                flush=True,
            )
        self._reset()
        return metrics


def _sample_log(job: Any):
    """Per-rank record of the sample ids of every micro-batch (train.record_samples), line-buffered."""
    if not job.cfg.train.record_samples:
        return None
    folder = job.run_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    return open(folder / f"rank-{job.accelerator.process_index}.jsonl", "a", buffering=1)


def _cuda_peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
