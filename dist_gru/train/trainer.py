"""Train a GRU: one process or many, CPU or GPU, the same code.

    dist-gru train --config configs/adding.yaml train.max_steps=500
    torchrun --nproc-per-node 2 -m dist_gru train --config configs/adding.yaml

`main` parses, builds, trains and tears down; `train_loop` reads top to bottom. The micro-batches
come from the job's Source (dist_gru.data.sources: samples or streams), which also carries the
state between chunks in stream mode, so the loop has no branch on the data kind. The data
position, learning rate and RNG state are pure functions of the optimizer step; everything else a
resume needs (the lanes' carried state, selection, the gradient scaler ...) is registered by name
with the job's Checkpointer (stateful.py), so a checkpoint resumes on any world size that divides
the batch.

Exit codes: 0 finished, 2 bad input, 75 preempted (checkpoint saved, see checkpoint.py), 3 a loss
or gradient norm that is NaN or infinite stopped the run before that step's update, with nothing
saved (`train.nonfinite`, dist_gru/train/nonfinite.py).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from dist_gru.config import Config, OptimConfig, help_text, load_config, per_rank_batch_size
from dist_gru.data.batching import model_inputs
from dist_gru.data.loading import training_data_fingerprint
from dist_gru.data.moments import moment_sums, moments_from_sums
from dist_gru.data.sources import Source, build_source
from dist_gru.infer.evaluate import evaluate
from dist_gru.model import GRUModel
from dist_gru.model.dropout import sample_keys
from dist_gru.runtime import compute_precision, exit_process, main_decides, make_accelerator, summary
from dist_gru.tasks import Task, data_info, model_kwargs, task_for
from dist_gru.train import checkpoint as ckpt_lib
from dist_gru.train import finetune, run_folder
from dist_gru.train.meter import Meter
from dist_gru.train.nonfinite import EXIT_NONFINITE, OK, STOP, LossGuard
from dist_gru.train.preemption import StepBoundary
from dist_gru.train.run_lock import RunLock, lock_run_folder
from dist_gru.train.selection import BEST, Selection, save_best
from dist_gru.train.stateful import Checkpointer, Count, ScalerState, Stateful
from dist_gru.train.tracking import active_trackers, make_tracker
from dist_gru.tune.prune import trial_reporter

# Exit code after a preemption signal made every rank checkpoint: "try again later" (sysexits
# EX_TEMPFAIL), distinct from success (0) and from failures; the contract is in checkpoint.py.
EXIT_PREEMPTED = ckpt_lib.EXIT_PREEMPTED


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warm-up to optim.lr, then cosine decay to lr * min_lr_ratio (or constant)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    return optim.lr * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of (step, rank): anything that draws from torch's RNG in a step is reproducible
    and resumable without saved RNG state (dropout draws from keys of its own: ``sample_keys``)."""
    return (seed * 1_000_003 + step) * 4099 + rank


@dataclass
class Job:
    """Everything the loop needs, built by `build`."""

    cfg: Config
    accelerator: Any
    model: torch.nn.Module
    model_config: dict
    optimizer: torch.optim.Optimizer
    source: Source  # the training (and validation) data: samples or streams
    task: Task  # the loss, its units, metrics and summary of the model's output kind
    checkpointer: Checkpointer  # every piece of resumable state, by name
    selection: Selection  # checkpoint.best and train.early_stopping
    skipped_steps: Count  # fp16 steps the gradient scaler skipped, over the whole run
    run_dir: Path
    start_step: int
    boundary: StepBoundary
    lock: RunLock | None  # global rank 0's lock on the run folder, held until the process ends
    tracker: Any = None  # made once the run folder is written
    init_record: dict | None = None  # fine-tuning: where the initial weights came from (train.init_from)
    state_gather_s: float = 0.0  # time spent gathering a checkpoint's distributed state


def build(cfg: Config) -> Job:
    # First: a preemption signal during start-up is then honoured at the first step, not fatal.
    boundary = StepBoundary(cfg.checkpoint.signals, cfg.checkpoint.every_minutes)
    accelerator = make_accelerator(cfg, log_with=active_trackers(cfg))
    run_dir = Path(cfg.train.run_dir)
    lock = lock_run_folder(run_dir, cfg.train.run_lock, accelerator)  # all ranks participate
    try:
        plan = run_folder.resolve(cfg, run_dir, accelerator)  # all ranks participate; nothing is written yet
        if plan.finished:  # nothing to train, nothing to write: every rank leaves here, with exit code 0
            if accelerator.is_main_process:
                print(plan.message, flush=True)
            if lock is not None:
                lock.release(undo=True)  # not even the lock file's record of this job
            accelerator.wait_for_everyone()
            exit_process(0)  # under a launcher it ends the process here; a single process raises below
            raise SystemExit(0)
        job = _assemble(cfg, accelerator, plan.resume, boundary, lock)
    except Exception:
        if lock is not None:
            lock.release(undo=True)  # a refused job leaves the folder as it found it
        raise
    if accelerator.is_main_process:  # every check has passed: only now does the run folder change
        run_folder.commit(plan, cfg, run_dir)
        if plan.resume is not None:
            print(f"dist-gru: resuming from {plan.resume.path} (step {plan.resume.step})", flush=True)
        if job.init_record is not None:
            finetune.write_record(run_dir, job.init_record, cfg.train.freeze)
            print(finetune.describe(job.init_record), flush=True)
    accelerator.wait_for_everyone()  # all ranks participate: the run folder exists from here on
    _prepare(job)
    job.tracker = make_tracker(cfg, accelerator, run_dir, plan.resume)
    job.checkpointer.register("tracker_run_id", job.tracker)
    return job


def _assemble(
    cfg: Config, accelerator, resume: ckpt_lib.Checkpoint | None, boundary: StepBoundary, lock: RunLock | None
) -> Job:
    """Data, model, optimizer and resumed state: every check that can refuse the job, before
    anything is written. All ranks participate (global input moments are summed across ranks)."""
    source = build_source(cfg, accelerator.process_index, accelerator.num_processes, accelerator.device)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model_config = model_kwargs(cfg, source.train_set)
    model = GRUModel(**model_config)
    finetune.freeze(model, cfg.train.freeze)
    optimizer_cls = torch.optim.AdamW if cfg.optim.name == "adamw" else torch.optim.Adam
    optimizer = optimizer_cls(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        weight_decay=cfg.optim.weight_decay,
    )
    task = task_for(model_config)
    if source.val_set is not None:  # the validation data must fit the model as the training data does
        task.check_fits(data_info(cfg, source.val_set, "val"))
    selection = Selection(cfg, trial_reporter(cfg, accelerator.is_main_process))
    selection.check(task.metric_names(), source.val_set is not None)
    job = Job(
        cfg=cfg,
        accelerator=accelerator,
        model=model,
        model_config=model_config,
        optimizer=optimizer,
        source=source,
        task=task,
        checkpointer=Checkpointer(resume),
        selection=selection,
        skipped_steps=Count(),
        run_dir=Path(cfg.train.run_dir),
        start_step=resume.step if resume else 0,
        boundary=boundary,
        lock=lock,
    )
    if resume is not None:  # the model and optimizer are the checkpoint's files; the rest registers
        ckpt_lib.check_compatible(resume, {"task": source.train_set.task, **model_config})
        ckpt_lib.load_weights(resume, model, optimizer)
    elif cfg.train.init_from:  # fine-tuning: weights only, everything else as in a fresh run
        job.init_record = finetune.init_weights(cfg.train.init_from, model, model_config)
    elif cfg.data.scaling == "global":
        model.set_normalization(*_global_moments(source.train_set, accelerator))
    if resume is None and model.statics is not None:  # fine-tuning loads rnn and head only; every rank holds them whole
        model.statics.set_normalization(*source.train_set.statics.value_moments())
    if isinstance(source, Stateful):  # stream mode: the lanes' carried state
        job.checkpointer.register("lanes", source)
    job.checkpointer.register("selection", selection)
    job.checkpointer.register("skipped_steps", job.skipped_steps)
    return job


def _prepare(job: Job) -> None:
    """Precision, devices and DDP (Accelerate's prepare), and the data loader; after the run folder is written."""
    cfg, accelerator = job.cfg, job.accelerator
    on_cpu = accelerator.device.type == "cpu"
    compute = compute_precision(cfg, use_gpu=not on_cpu)
    # autocast would leave nn.GRU in fp32 on CPU
    gru_dtype = torch.bfloat16 if on_cpu and compute == "bf16" and cfg.train.cpu_bf16 != "autocast" else None
    if compute != cfg.train.precision and accelerator.is_main_process:
        print(
            f"dist-gru: train.precision={cfg.train.precision}, but this CPU has no bf16 instructions "
            "(AVX512-BF16, AMX): computing in fp32, which is faster here (train.cpu_bf16=gru forces bf16)",
            flush=True,
        )
    job.model.encoder.configure(dtype=gru_dtype, recurrence=cfg.train.recurrence)
    job.model, job.optimizer = accelerator.prepare(job.model, job.optimizer)
    job.checkpointer.register("scaler", ScalerState(accelerator.scaler))  # fp16: the loss scale carries on
    accelerator.unwrap_model(job.model).flatten_parameters()  # cuDNN wants contiguous weights after moves/loads
    if accelerator.is_main_process:
        print(summary(cfg, accelerator, job.model, per_rank_batch_size(cfg, accelerator.num_processes)), flush=True)
    job.source.prepare(accelerator.device)


def _global_moments(train_set, accelerator) -> tuple[np.ndarray, np.ndarray]:
    """Input statistics for `data.scaling=global`: each rank sums its shard of the training split
    (float64), one all-reduce adds the shards (all ranks participate), so no rank reads it whole."""
    sums = moment_sums(train_set, accelerator.process_index, accelerator.num_processes)
    if accelerator.num_processes > 1:
        total = torch.from_numpy(sums).to(accelerator.device)
        sums = accelerator.reduce(total, reduction="sum").cpu().numpy()
    return moments_from_sums(sums, train_set)


def save(job: Job, step: int, epoch: int) -> Path | None:
    """A checkpoint at an optimizer-step boundary. All ranks participate; global rank 0 writes."""
    acc, cfg = job.accelerator, job.cfg
    acc.wait_for_everyone()
    gather_start = time.perf_counter()
    tensors = job.checkpointer.gather(acc)  # all ranks participate (stream mode's lanes)
    job.state_gather_s += time.perf_counter() - gather_start
    path = None
    if acc.is_main_process:
        model = acc.unwrap_model(job.model)
        state = {
            "epoch": epoch,
            "samples_seen": step * cfg.train.global_batch_size,
            "world_size": acc.num_processes,
            "config_digest": cfg.digest(),
            "config": cfg.to_dict(),  # a resume compares its trajectory keys with the new job's
            "data": training_data_fingerprint(cfg.data),  # ... and the data it trains on
            "task": job.source.train_set.task,
            "model_config": job.model_config,
            **job.checkpointer.state_dict(),
        }
        try:
            path = ckpt_lib.save_checkpoint(
                job.run_dir, step, model, job.optimizer, state, cfg.checkpoint.keep, lanes=tensors
            )
        except ckpt_lib.CheckpointError as exc:  # a full disk, non-finite state: every rank must stop
            path = exc
    path = main_decides(acc, path)  # all ranks participate; every rank raises rank 0's error
    job.boundary.saved()
    return path


def train_loop(job: Job) -> tuple[int, dict[str, float]]:
    """Returns (exit code, final eval metrics)."""
    cfg, acc, optimizer = job.cfg, job.accelerator, job.optimizer
    max_steps = cfg.train.max_steps
    batches = job.source.batches(job.start_step)
    meter = Meter(job)  # per-interval figures, logged every train.log_every steps
    guard = LossGuard(job)  # train.nonfinite: no NaN or infinity reaches the weights
    progress = _progress_bar(job)
    epoch, metrics, final, end_step = job.source.epoch_at(job.start_step), {}, None, max_steps

    job.model.train()
    for step in range(job.start_step, max_steps):
        torch.manual_seed(step_seed(cfg.train.seed, step, acc.process_index))
        lr = lr_at(step, cfg.optim, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch, step_loss, seen = forward_backward(job, step, batches, guard, meter)
        grad_norm = acc.clip_grad_norm_(job.model.parameters(), cfg.optim.grad_clip) if cfg.optim.grad_clip else None
        grad_norm = guard.norm(grad_norm)
        verdict = guard.check(step + 1, grad_norm, seen, step_loss, lr)  # the same on every rank
        if verdict == STOP:  # before optimizer.step: the weights stay finite; nothing is saved
            progress.close()
            job.boundary.drain()
            return EXIT_NONFINITE, metrics
        if verdict == OK:  # SKIP: the step's update and loss are dropped
            optimizer.step()
        meter.add_step(step_loss, kept=verdict == OK)
        optimizer.zero_grad(set_to_none=True)
        job.skipped_steps.value += int(acc.optimizer_step_was_skipped)
        done = step + 1
        progress.update(1)

        if done % cfg.train.log_every == 0 or done == max_steps:  # all ranks participate
            metrics = meter.log(done, lr, grad_norm, epoch, guard, progress)
        if _evaluation_due(job, done):  # all ranks participate
            with meter.paused():
                evaluated = _evaluate_and_log(job, done)
                stop = _select(job, evaluated, done)  # one decision for all ranks
            if stop:
                end_step, final = done, evaluated
                break
        preempted, clock = job.boundary.agreed()
        if preempted or clock or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < max_steps):
            with meter.paused():
                path = save(job, done, epoch)
            if preempted:
                _preempted(job, path, done)
                progress.close()
                return EXIT_PREEMPTED, metrics

    progress.close()
    job.boundary.drain()  # no collective left in flight once the loop is done
    return 0, _finish(job, end_step, epoch, final)


def forward_backward(job: Job, step: int, batches: Iterator, guard: LossGuard, meter: Meter) -> tuple[int, Tensor, list]:
    """Forward and backward over the micro-batches of optimizer step `step`; DDP syncs on the last.

    Returns (epoch, this rank's loss of the step, its micro-batches: `guard` reads them)."""
    acc, model, accum = job.accelerator, job.model, job.cfg.train.grad_accum_steps
    plain = acc.unwrap_model(model)  # what the task reads the loss's units from (model.loss_units)
    # Scaled so that DDP's mean over ranks and Accelerate's division by the accumulation steps leave
    # the mean over every unit (sample or valid time step) of the global batch, which every rank
    # knows from the sampling contract without a collective (`Task.units`). A per-rank mean instead
    # would weight a rank holding short sequences as much as one holding long ones, and N ranks
    # would no longer compute what 1 rank computes.
    scale = acc.num_processes * accum / job.task.units(job.source, step, job.cfg.train.global_batch_size)
    step_loss, seen = torch.zeros((), device=acc.device), []
    for _ in range(accum):
        with meter.waiting():
            epoch, batch = next(batches)
        seen.append(batch)
        y = batch["y"].to(acc.device, non_blocking=True)
        with acc.accumulate(model):
            inputs = model_inputs(batch, acc.device)
            # Dropout masks keyed by (seed, step, sample), not drawn from this rank's RNG: any
            # world size, micro-batching or resume point draws the same mask for a sample.
            keys = sample_keys(job.cfg.train.seed, step, batch["index"])
            output, state = model(**inputs, state=job.source.carried(batch), dropout_keys=keys)
            job.source.keep(state)  # stream mode: carried into the lane's next chunk, detached
            units = job.task.loss_units(plain, inputs["x"], inputs["lengths"])  # None: the data's units
            total, _ = job.task.loss_sum(output, y, batch["lengths"], units)
            loss = total.float() * scale
            acc.backward(guard.spread(loss))
        step_loss += loss.detach() / accum
        meter.add_batch(step, epoch, batch)
    return epoch, step_loss, seen


def _evaluation_due(job: Job, done: int) -> bool:
    every = job.cfg.train.eval_every
    return job.source.val_set is not None and bool(every) and done % every == 0 and done < job.cfg.train.max_steps


def _preempted(job: Job, path: Path | None, done: int) -> None:
    if job.accelerator.is_main_process:
        ckpt_lib.mark_preempted(job.run_dir, path, done, job.boundary.signum)
        print(
            f"dist-gru: preempted by signal {job.boundary.signum or '(peer)'}; "
            f"checkpoint {path}; exiting with code {EXIT_PREEMPTED}",
            flush=True,
        )


def _finish(job: Job, end_step: int, epoch: int, final: dict[str, float] | None) -> dict[str, float]:
    """The final evaluation (unless early stopping just made it), the last checkpoint, model/."""
    acc = job.accelerator
    if final is None:
        # Evaluated before the last checkpoint, so the checkpoint holds the selection state after it.
        final = _evaluate_and_log(job, end_step) if job.source.val_set is not None else {}
        _select(job, final, end_step, can_stop=False)
    final_path = save(job, end_step, epoch)
    if acc.is_main_process:
        ckpt_lib.save_model_folder(acc.unwrap_model(job.model), job.run_dir / "model")
        _print_final(job, final, final_path)
    return final


def _select(job: Job, metrics: dict[str, float], step: int, can_stop: bool = True) -> bool:
    """Best checkpoint and early stopping after the evaluation at `step`; True: stop now (every rank).

    All ranks participate (the decision is broadcast); global rank 0 writes best/."""
    selection, acc = job.selection, job.accelerator
    if not selection.active or not metrics:
        return False
    new_best, stop = selection.update(metrics, step, acc.device, can_stop)
    if new_best and acc.is_main_process:
        path = save_best(job.run_dir, acc.unwrap_model(job.model), selection.best)
        tqdm.write(f"best {selection.best.metric}={selection.best.value:.6g} at step {step}: {path}")
    if stop:
        job.tracker.log(selection.stop_record(), step=step)
        if acc.is_main_process:
            tqdm.write(f"dist-gru: {selection.stopped}")
    return stop


def _evaluate_and_log(job: Job, step: int) -> dict[str, float]:
    acc, model = job.accelerator, job.accelerator.unwrap_model(job.model)
    metrics = evaluate(model, job.source.eval_batches(model, acc), acc, season=job.cfg.data.season)
    job.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    if acc.is_main_process:
        shown = " ".join(f"{k}={v:.6g}" for k, v in metrics.items())
        tqdm.write(f"eval step {step}: {shown}")
    return metrics


def _print_final(job: Job, final: dict[str, float], checkpoint: Path | None) -> None:
    lines = ["", "dist-gru: training finished"]
    lines += job.task.summary_lines(final, getattr(job.source.train_set, "mse_baseline", None))
    selection = job.selection
    if selection.stopped:
        lines.append(f"  stopped:      {selection.stopped}")
    lines += [
        f"  run folder:   {job.run_dir}",
        f"  model:        {job.run_dir / 'model'}",
    ]
    if selection.best is not None and selection.best.step is not None:
        best = selection.best
        lines.append(f"  best model:   {job.run_dir / BEST} ({best.metric} {best.value:.6g} at step {best.step})")
    lines += [
        f"  checkpoint:   {checkpoint}",
        f"  metrics:      {job.run_dir / 'metrics.jsonl'}",
    ]
    lines += job.tracker.final_lines()
    print("\n".join(lines), flush=True)


def _progress_bar(job: Job) -> tqdm:
    quiet = not job.accelerator.is_main_process or job.cfg.log.quiet
    return tqdm(total=job.cfg.train.max_steps, initial=job.start_step, disable=quiet, dynamic_ncols=True, desc="train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dist-gru train",
        description="Train a GRU model. Precedence: defaults < --config YAML < section.key=value overrides.",
        epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (same as log.quiet=true)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=500 optim.lr=3e-3")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides + (["log.quiet=true"] if args.quiet else []))
    job = build(cfg)
    try:
        code, _ = train_loop(job)
        job.tracker.finish()  # rank 0 flushes W&B (about a second) ...
        job.accelerator.wait_for_everyone()  # ... while the others wait: all ranks exit together
    finally:
        job.tracker.finish()
    exit_process(code)
    return code
