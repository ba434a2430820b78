"""Train a GRU: one process or many, CPU or GPU, the same code.

    dist-gru train --config configs/adding.yaml train.max_steps=500
    torchrun --nproc-per-node 2 -m dist_gru train --config configs/adding.yaml

`main` parses, builds, trains and tears down; `train_loop` reads top to bottom. The data position,
learning rate and RNG state are pure functions of the optimizer step, so a checkpoint (model,
optimizer, step) is all a resume needs, on any world size that divides the batch. Stream mode
(`train.tbptt`, dist_gru.data.streams) adds the one piece of training state that is not a function
of the step, every lane's carried hidden state, which checkpoints hold indexed by global lane.

Exit codes: 0 finished, 2 bad input, 75 preempted (checkpoint saved, see checkpoint.py), 3 a loss
or gradient norm that is NaN or infinite stopped the run before that step's update, with nothing
saved (`train.nonfinite`, dist_gru/nonfinite.py).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dist_gru import checkpoint as ckpt_lib
from dist_gru import finetune, run_folder
from dist_gru.config import (
    Config,
    OptimConfig,
    help_text,
    load_config,
    micro_batch_size,
    per_rank_batch_size,
)
from dist_gru.data.loading import (
    TrainBatchSampler,
    build_dataset,
    loader_workers,
    make_loader,
    train_stream,
    training_data_fingerprint,
)
from dist_gru.data.moments import moment_sums, moments_from_sums
from dist_gru.data.streams import LaneState, StreamSampler, build_stream_dataset, evaluate_streams, lane_stream
from dist_gru.evaluate import evaluate
from dist_gru.losses import loss_sum
from dist_gru.model import GRUModel
from dist_gru.nonfinite import EXIT_NONFINITE, OK, STOP, LossGuard
from dist_gru.preemption import StepBoundary
from dist_gru.run_lock import RunLock, lock_run_folder
from dist_gru.runtime import compute_precision, exit_process, main_decides, make_accelerator, summary
from dist_gru.selection import BEST, Selection, eval_metric_names, save_best
from dist_gru.tasks import model_kwargs
from dist_gru.tracking import active_trackers, make_tracker

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
    """The RNG seed of (step, rank): dropout is reproducible and resumable without saved RNG state."""
    return (seed * 1_000_003 + step) * 4099 + rank


@dataclass
class Job:
    """Everything the loop needs, built by `build`."""

    cfg: Config
    accelerator: object
    model: torch.nn.Module
    model_config: dict
    optimizer: torch.optim.Optimizer
    train_set: object
    val_set: object
    sampler: TrainBatchSampler
    loader: object
    tracker: object
    run_dir: Path
    start_step: int
    boundary: StepBoundary
    lock: RunLock | None  # global rank 0's lock on the run folder, held until the process ends
    skipped_steps: int = 0  # fp16 steps the gradient scaler skipped, over the whole run (checkpointed)
    lanes: LaneState | None = None  # stream mode (train.tbptt): this rank's carried hidden state
    state_gather_s: float = 0.0  # stream mode: time spent gathering lane state at checkpoints
    selection: Selection | None = None  # checkpoint.best and train.early_stopping (checkpointed)
    init_record: dict | None = None  # fine-tuning: where the initial weights came from (train.init_from)


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
    _prepare(job, plan.resume)
    job.tracker = make_tracker(cfg, accelerator, run_dir, plan.resume)
    return job


def _assemble(
    cfg: Config, accelerator, resume: ckpt_lib.Checkpoint | None, boundary: StepBoundary, lock: RunLock | None
) -> Job:
    """Data, model, optimizer, sampler and resumed state: every check that can refuse the job, before
    anything is written. All ranks participate (global input moments are summed across ranks)."""
    world_size, rank = accelerator.num_processes, accelerator.process_index
    stream_sampler = None
    if cfg.train.tbptt:
        train_set, val_set = build_stream_dataset(cfg, "train"), build_stream_dataset(cfg, "val")
        stream_sampler = StreamSampler(
            train_set.lengths, cfg.train.global_batch_size, cfg.train.tbptt, rank, world_size, cfg.train.seed
        )
    else:
        train_set = build_dataset(cfg.data, "train", head=cfg.model.head)
        val_set = build_dataset(cfg.data, "val", head=cfg.model.head)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model_config = model_kwargs(cfg, train_set)
    model = GRUModel(**model_config)
    finetune.freeze(model, cfg.train.freeze)
    optimizer_cls = torch.optim.AdamW if cfg.optim.name == "adamw" else torch.optim.Adam
    optimizer = optimizer_cls(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        weight_decay=cfg.optim.weight_decay,
    )
    selection = Selection(cfg)
    selection.check(eval_metric_names(model, cfg.data.season, tokens=cfg.model.vocab_size is not None), val_set is not None)
    if stream_sampler is not None:
        sampler, lanes = stream_sampler, LaneState(
            cfg.model.num_layers, stream_sampler.per_rank, cfg.model.hidden_size, accelerator.device
        )
    else:
        lanes = None
        sampler = TrainBatchSampler(
            train_set.lengths,
            micro_batch_size(cfg),
            cfg.train.grad_accum_steps,
            rank,
            world_size,
            cfg.train.seed,
            bucket_by_length=cfg.data.bucket_by_length,
        )
    init_record = None
    if resume is not None:
        ckpt_lib.check_compatible(resume, {"task": train_set.task, **model_config})
        ckpt_lib.load_weights(resume, model, optimizer)
        if lanes is not None:
            _load_lanes(resume, lanes, stream_sampler)
        selection.load(resume.state.get("selection"))
    else:
        if cfg.train.init_from:  # fine-tuning: weights only, everything else as in a fresh run
            init_record = finetune.init_weights(cfg.train.init_from, model, model_config)
        if cfg.data.scaling == "global":
            model.set_normalization(*_global_moments(train_set, accelerator))
    return Job(
        cfg=cfg,
        accelerator=accelerator,
        model=model,
        model_config=model_config,
        optimizer=optimizer,
        train_set=train_set,
        val_set=val_set,
        sampler=sampler,
        loader=None,  # made by `_prepare`
        tracker=None,  # made once the run folder is written
        run_dir=Path(cfg.train.run_dir),
        start_step=resume.step if resume else 0,
        boundary=boundary,
        lock=lock,
        skipped_steps=int(resume.state.get("skipped_steps", 0)) if resume else 0,
        lanes=lanes,
        selection=selection,
        init_record=init_record,
    )


def _prepare(job: Job, resume: ckpt_lib.Checkpoint | None) -> None:
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
    if resume is not None and accelerator.scaler is not None and resume.state.get("scaler"):
        accelerator.scaler.load_state_dict(resume.state["scaler"])  # fp16: the loss scale carries on
    accelerator.unwrap_model(job.model).flatten_parameters()  # cuDNN wants contiguous weights after moves/loads
    if accelerator.is_main_process:
        print(summary(cfg, accelerator, job.model, per_rank_batch_size(cfg, accelerator.num_processes)), flush=True)
    if job.lanes is None:  # stream mode reads its chunks in `lane_stream`, step by step
        workers = loader_workers(cfg.data, accelerator.device)
        job.loader = make_loader(job.train_set, job.sampler, workers, pin_memory=accelerator.device.type == "cuda")


def _load_lanes(resume: ckpt_lib.Checkpoint, lanes: LaneState, sampler: StreamSampler) -> None:
    """This rank's lanes from the checkpoint's state of every lane (saved on any world size); the
    saved positions must be where this job's sampler puts the lanes at that step."""
    saved = resume.state.get("lanes") or {}
    expected = _lane_positions(sampler, resume.step)
    if saved.get("positions") != expected:
        raise ckpt_lib.CheckpointError(
            f"checkpoint {resume.path}: its lanes stand at other stream positions than this job's at step "
            f"{resume.step} (were the training streams changed?)"
        )
    lanes.load(ckpt_lib.load_lanes(resume), sampler.rank_lanes)


def _lane_positions(sampler: StreamSampler, step: int) -> list[list[int]]:
    """[stream, offset] of every lane's chunk at `step` (what a checkpoint of that step records)."""
    where = sampler.chunks(step)
    return [[int(i), int(o)] for i, o in zip(where["stream"], where["offset"], strict=True)]


def loss_units(job: Job, step: int) -> int:
    """The units the loss of optimizer step `step` averages over, in the whole global batch.

    Head `step`: every valid time step of every sequence of the global batch (all ranks, all
    micro-batches), which every rank knows from the sampling contract without a collective. A
    per-rank mean instead would weight a rank holding short sequences as much as one holding long
    ones, and N ranks would no longer compute what 1 rank computes. Other heads: the samples."""
    if job.cfg.model.head == "step":
        return job.sampler.valid_steps(step)
    return job.cfg.train.global_batch_size


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
    path = every_lane = None
    if job.lanes is not None:
        gather_start = time.perf_counter()
        every_lane = job.lanes.gather(acc)  # all ranks participate
        job.state_gather_s += time.perf_counter() - gather_start
    if acc.is_main_process:
        model = acc.unwrap_model(job.model)
        state = {
            "epoch": epoch,
            "samples_seen": step * cfg.train.global_batch_size,
            "world_size": acc.num_processes,
            "config_digest": cfg.digest(),
            "config": cfg.to_dict(),  # a resume compares its trajectory keys with the new job's
            "data": training_data_fingerprint(cfg.data),  # ... and the data it trains on
            "task": job.train_set.task,
            "model_config": job.model_config,
            "tracker_run_id": job.tracker.run_id,
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "skipped_steps": job.skipped_steps,
            "selection": job.selection.state(),
        }
        if every_lane is not None:
            state["lanes"] = {"tbptt": cfg.train.tbptt, "positions": _lane_positions(job.sampler, step)}
        try:
            path = ckpt_lib.save_checkpoint(
                job.run_dir, step, model, job.optimizer, state, cfg.checkpoint.keep, lanes=every_lane
            )
        except ckpt_lib.CheckpointError as exc:  # a full disk, non-finite state: every rank must stop
            path = exc
    path = main_decides(acc, path)  # all ranks participate; every rank raises rank 0's error
    job.boundary.saved()
    return path


def train_loop(job: Job) -> tuple[int, dict[str, float]]:
    """Returns (exit code, final eval metrics)."""
    cfg, acc, model, optimizer = job.cfg, job.accelerator, job.model, job.optimizer
    device, world_size = acc.device, acc.num_processes
    spec = acc.unwrap_model(model).spec
    max_steps, accum = cfg.train.max_steps, cfg.train.grad_accum_steps
    if job.lanes is not None:
        stream = lane_stream(job.train_set, job.sampler, job.start_step)
    else:
        stream = train_stream(job.loader, job.sampler, job.start_step)
    progress = tqdm(
        total=max_steps,
        initial=job.start_step,
        disable=not acc.is_main_process or cfg.log.quiet,
        dynamic_ncols=True,
        desc="train",
    )
    # Per-interval accumulators stay on the device: no host sync until a log step (but `guard`'s one).
    loss_acc = torch.zeros((), device=device)
    samples = seq_steps = interval_steps = loss_steps = 0
    data_wait = 0.0
    interval_start = time.perf_counter()
    epoch = job.sampler.position(job.start_step)[0]
    metrics: dict[str, float] = {}
    sample_log = _sample_log(job)
    end_step, final = max_steps, None  # early stopping ends the run sooner, with its evaluation
    guard = LossGuard(job)  # train.nonfinite: no NaN or infinity reaches the weights

    model.train()
    for step in range(job.start_step, max_steps):
        torch.manual_seed(step_seed(cfg.train.seed, step, acc.process_index))
        lr = lr_at(step, cfg.optim, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        units = loss_units(job, step)
        step_loss, batches = torch.zeros((), device=device), []  # this rank's; batches: `guard` reads them

        # Forward/backward over the micro-batches of one optimizer step; DDP syncs on the last one.
        for _ in range(accum):
            t0 = time.perf_counter()
            epoch, batch = next(stream)
            batches.append(batch)
            data_wait += time.perf_counter() - t0
            x = batch["x"].to(device, non_blocking=True)
            y = batch["y"].to(device, non_blocking=True)
            with acc.accumulate(model):
                if job.lanes is None:
                    output, _ = model(x, batch["lengths"])
                else:  # stream mode: start from the lanes' carried state, keep the new one (detached)
                    output, h_n = model(x, batch["lengths"], state=job.lanes.carried(batch["reset"]))
                    job.lanes.keep(h_n)
                total, _ = loss_sum(spec, output, y, batch["lengths"])
                # Scaled so that DDP's mean over ranks and Accelerate's division by the accumulation
                # steps leave the mean over every unit of the global batch (see `loss_units`).
                loss = total.float() * (world_size * accum / units)
                acc.backward(guard.spread(loss))
            step_loss += loss.detach() / accum
            samples += len(y)
            if sample_log is not None:
                sample_log.write(json.dumps({"step": step, "epoch": epoch, "index": batch["index"].tolist()}) + "\n")
            seq_steps += int(batch["lengths"].sum())
        grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip) if cfg.optim.grad_clip else None
        grad_norm = guard.norm(grad_norm)
        verdict = guard.check(step + 1, grad_norm, batches, step_loss, lr)  # the same on every rank
        if verdict == STOP:  # before optimizer.step: the weights stay finite; nothing is saved
            progress.close()
            job.boundary.drain()
            return EXIT_NONFINITE, metrics
        if verdict == OK:  # SKIP: the step's update and loss are dropped
            optimizer.step()
            loss_acc += step_loss
            loss_steps += 1
        optimizer.zero_grad(set_to_none=True)
        job.skipped_steps += int(acc.optimizer_step_was_skipped)
        done = step + 1
        interval_steps += 1
        progress.update(1)

        # --- once in a while: log (all ranks participate in the reduce) -----------------------
        if done % cfg.train.log_every == 0 or done == max_steps:
            elapsed = time.perf_counter() - interval_start
            local = torch.tensor(
                [
                    float(loss_acc),
                    samples,
                    seq_steps,
                    data_wait / max(elapsed, 1e-9),
                    _peak_rss_mb(),
                    _cuda_peak_mb(device),
                ],
                dtype=torch.float64,
                device=device,
            )
            every = acc.gather(local[None]).cpu()  # [world, 6]
            metrics = {
                "train/loss": float(every[:, 0].mean()) / loss_steps if loss_steps else float("nan"),
                "train/lr": lr,
                "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "perf/samples_per_s": float(every[:, 1].sum()) / elapsed,
                "perf/seq_steps_per_s": float(every[:, 2].sum()) / elapsed,
                "perf/step_time_s": elapsed / interval_steps,
                "perf/data_wait_frac": float(every[:, 3].max()),
                "mem/peak_rss_mb": float(every[:, 4].max()),
                "progress/epoch": epoch,
                "progress/samples_seen": done * cfg.train.global_batch_size,
                "amp/skipped_steps": job.skipped_steps,
                "train/nonfinite_skips": guard.skipped,
            }
            if device.type == "cuda":
                metrics["mem/cuda_max_alloc_mb"] = float(every[:, 5].max())
            if job.lanes is not None:
                metrics["perf/state_gather_s"] = job.state_gather_s  # at checkpoints, outside perf/step_time_s
            job.tracker.log(metrics, step=done)
            guard.watch_loss(metrics["train/loss"], done, lr)
            progress.set_postfix(loss=f"{metrics['train/loss']:.4g}", sps=f"{metrics['perf/samples_per_s']:.0f}")
            if cfg.log.quiet and acc.is_main_process:
                print(
                    f"step {done}/{max_steps} loss {metrics['train/loss']:.4g} lr {lr:.3g} "
                    f"samples/s {metrics['perf/samples_per_s']:.0f}",
                    flush=True,
                )
            loss_acc.zero_()
            samples = seq_steps = interval_steps = loss_steps = 0
            data_wait = 0.0
            interval_start = time.perf_counter()

        # --- once in a while: evaluate (all ranks participate) ----------------------------------
        if job.val_set is not None and cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < max_steps:
            eval_start = time.perf_counter()
            evaluated = _evaluate_and_log(job, done)
            stop = _select(job, evaluated, done)  # all ranks participate: one decision for all
            interval_start += time.perf_counter() - eval_start  # perf/* measure training steps, not evaluation
            if stop:
                end_step, final = done, evaluated
                break

        # --- once in a while: checkpoint (all ranks participate) --------------------------------
        preempted, clock = job.boundary.agreed()
        if preempted or clock or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < max_steps):
            save_start = time.perf_counter()
            path = save(job, done, epoch)
            interval_start += time.perf_counter() - save_start  # perf/* measure training steps, not saving
            if preempted:
                if acc.is_main_process:
                    ckpt_lib.mark_preempted(job.run_dir, path, done, job.boundary.signum)
                    print(
                        f"dist-gru: preempted by signal {job.boundary.signum or '(peer)'}; "
                        f"checkpoint {path}; exiting with code {EXIT_PREEMPTED}",
                        flush=True,
                    )
                progress.close()
                return EXIT_PREEMPTED, metrics

    progress.close()
    job.boundary.drain()  # no collective left in flight once the loop is done
    if final is None:
        # Evaluated before the last checkpoint, so the checkpoint holds the selection state after it.
        final = _evaluate_and_log(job, max_steps) if job.val_set is not None else {}
        _select(job, final, max_steps, can_stop=False)
    final_path = save(job, end_step, epoch)
    if acc.is_main_process:
        ckpt_lib.save_model_folder(acc.unwrap_model(model), job.run_dir / "model")
        _print_final(job, final, final_path)
    return 0, final


def _select(job: Job, metrics: dict[str, float], step: int, can_stop: bool = True) -> bool:
    """Best checkpoint and early stopping after the evaluation at `step`; True: stop now (every rank).

    All ranks participate (the decision is broadcast); global rank 0 writes best/."""
    selection, acc = job.selection, job.accelerator
    if selection is None or not selection.active or not metrics:
        return False
    new_best, stop = selection.update(metrics, step, acc.device, can_stop)
    if new_best and acc.is_main_process:
        path = save_best(job.run_dir, acc.unwrap_model(job.model), selection.best)
        tqdm.write(f"best {selection.best.metric}={selection.best.value:.6g} at step {step}: {path}")
    if stop:
        watch = selection.stopping
        job.tracker.log(
            {"early_stopping/stopped": 1, "early_stopping/best": watch.value, "early_stopping/best_step": watch.step},
            step=step,
        )
        if acc.is_main_process:
            tqdm.write(f"dist-gru: {selection.stopped}")
    return stop


def _evaluate_and_log(job: Job, step: int) -> dict[str, float]:
    acc, cfg = job.accelerator, job.cfg
    if job.lanes is not None:
        metrics = evaluate_streams(
            acc.unwrap_model(job.model), job.val_set, acc, cfg.train.global_batch_size, cfg.train.tbptt
        )
    else:
        metrics = evaluate(
            acc.unwrap_model(job.model),
            job.val_set,
            acc,
            cfg.train.eval_batch_size,
            loader_workers(cfg.data, acc.device),
            season=cfg.data.season,
        )
    job.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    if acc.is_main_process:
        shown = " ".join(f"{k}={v:.6g}" for k, v in metrics.items())
        tqdm.write(f"eval step {step}: {shown}")
    return metrics


def _print_final(job: Job, final: dict[str, float], checkpoint: Path | None) -> None:
    lines = ["", "dist-gru: training finished"]
    if "mse" in final:
        baseline = " (predicting 1 always: 0.167)" if job.cfg.data.name == "adding" else ""
        lines.append(f"  final eval mse: {final['mse']:.6g}{baseline}")
    if "accuracy" in final:
        lines.append(f"  final eval accuracy: {final['accuracy']:.4f}")
    if "macro_f1" in final:
        lines.append(f"  final eval macro-F1: {final['macro_f1']:.4f}")
    if "bits_per_token" in final:
        lines.append(
            f"  final eval bits per token: {final['bits_per_token']:.4f} "
            f"(unigram baseline: {final['unigram_bits_per_token']:.4f})"
        )
    if "mase" in final:
        lines.append(
            f"  final eval forecast mae: {final['mae']:.6g} (naive: {final['naive_mae']:.6g}, seasonal naive: "
            f"{final['seasonal_naive_mae']:.6g}), mase {final['mase']:.4g}"
        )
    selection = job.selection
    if selection is not None and selection.stopped:
        lines.append(f"  stopped:      {selection.stopped}")
    lines += [
        f"  run folder:   {job.run_dir}",
        f"  model:        {job.run_dir / 'model'}",
    ]
    if selection is not None and selection.best is not None and selection.best.step is not None:
        best = selection.best
        lines.append(f"  best model:   {job.run_dir / BEST} ({best.metric} {best.value:.6g} at step {best.step})")
    lines += [
        f"  checkpoint:   {checkpoint}",
        f"  metrics:      {job.run_dir / 'metrics.jsonl'}",
    ]
    lines += job.tracker.final_lines()
    print("\n".join(lines), flush=True)


def _sample_log(job: Job):
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
