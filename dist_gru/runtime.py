"""The distributed boundary: process group, Accelerator, devices, threads, launch checks.

Facts this module rests on (measured with torch 2.13 + accelerate 1.15):
- under torchrun on a machine without GPUs, a plain `Accelerator()` silently trains one full copy
  per process without DDP; it needs `cpu=True` to go MULTI_CPU with gloo. We pass it whenever CUDA
  is absent and then check that Accelerate's world size equals the launcher's.
- after `torchrun --max-restarts` restarts dead workers, gloo workers that rendezvous through the
  agent's store read the dead attempt's addresses and fail (`connectFullMesh ... refused`) or
  hang. We initialise the process group ourselves on a `PrefixStore` keyed by the restart count,
  so every attempt has a clean namespace; Accelerate then reuses that group (its PartialState
  only calls init_process_group when `torch.distributed.is_initialized()` is false).
  Measured (tests/test_resume.py, kill -9 of rank 1 under `--max-restarts 1`): without the prefix
  2 of 3 restarts failed with `Gloo connectFullMesh failed ... Connection refused`; with it 9 of 9
  restarts resumed and finished with weights equal to the uninterrupted run.
  Limit: every worker of an attempt must see the same TORCHELASTIC_RESTART_COUNT. That holds on
  one node. On several nodes torchrun counts only its own node's failures: after a worker on node 2
  fails, node 2's new workers see 1 while node 1 (restarted because a peer left) sees 0, and they
  wait for each other until the peer timeout. slurm/train.sbatch therefore sets the count itself
  (each worker's start count in the job step, which all nodes agree on), and
  launch/torchrun_multinode.sh refuses MAX_RESTARTS > 0.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    broadcast_object_list,
)

from dist_gru.config import Config

# How long a rank waits for its peers (rendezvous, collectives) before failing instead of hanging.
PEER_TIMEOUT = timedelta(seconds=int(os.environ.get("DIST_GRU_PEER_TIMEOUT_S", "300")))


class LaunchError(RuntimeError):
    """A launch environment that would train wrongly; the message says what to fix."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} must be an integer") from None


def launch_world() -> tuple[int, int, int, int]:
    """(rank, local_rank, world_size, local_world_size) as the launcher set them (torchrun, srun, none)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", 1)
    if not 0 <= rank < world_size:
        raise LaunchError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    return rank, local_rank, world_size, local_world_size


def _init_process_group(rank: int, world_size: int, backend: str) -> None:
    """Restart-safe process group (see the module docstring). No-op for one process."""
    if world_size == 1 or dist.is_initialized():
        return
    host = os.environ.get("MASTER_ADDR")
    port = os.environ.get("MASTER_PORT")
    if not host or not port:
        raise LaunchError(
            f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun or set them"
        )
    # Under torchrun the agent hosts the store; launched any other way (srun per task), rank 0 does.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        host,
        int(port),
        world_size=None if agent_store else world_size,
        is_master=not agent_store and rank == 0,
        timeout=PEER_TIMEOUT,
        wait_for_workers=False,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"dist_gru/attempt-{attempt}/", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=PEER_TIMEOUT)


def cuda_device_index(local_rank: int, device_count: int, env: Mapping[str, str]) -> int:
    """The GPU index this process uses: LOCAL_RANK when it sees the node's GPUs, 0 under a per-task binding.

    Slurm's `--gpus-per-task=1` / `--gpu-bind=single:1` / `map_gpu:...` give each task one GPU
    (CUDA_VISIBLE_DEVICES names one device), so a task with LOCAL_RANK=1 has no device 1: it uses
    the one it sees. Any other view that lacks a device for LOCAL_RANK (e.g. two GPUs per task) is
    ambiguous: ranks could share a GPU, so it is refused with the binding named."""
    if local_rank < device_count:
        return local_rank
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and device_count == 1 and len([d for d in visible.split(",") if d.strip()]) == 1:
        return 0
    binding = ", ".join(
        f"{name}={env[name]}"
        for name in ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_PER_TASK", "SLURM_GPU_BIND", "SLURM_STEP_GPUS")
        if name in env
    )
    raise LaunchError(
        f"LOCAL_RANK={local_rank} but this process sees {device_count} GPU(s)"
        f" ({binding or 'CUDA_VISIBLE_DEVICES unset'}): give every process of a node all its GPUs"
        " (e.g. --gpus-per-node) so rank uses cuda:LOCAL_RANK, or exactly one GPU per task (--gpus-per-task=1)"
    )


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere oneDNN emulates it."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def compute_precision(cfg: Config, use_gpu: bool) -> str:
    """The precision steps compute in: train.precision, except bf16 on a CPU without bf16
    instructions under train.cpu_bf16=auto, which computes fp32: emulated bf16 ran a GRU step 8x
    slower than fp32 (AMD EPYC with AVX2 only: 34-41 against 320-470 samples/s), for less accuracy."""
    if cfg.train.precision == "bf16" and not use_gpu and cfg.train.cpu_bf16 == "auto" and not cpu_has_bf16():
        return "fp32"
    return cfg.train.precision


def keep_freed_memory() -> bool:
    """Keep memory the process frees for its next allocations instead of returning it to the OS
    (glibc's allocator; elsewhere nothing changes). True if it took effect.

    A training step frees and reallocates the same large activation and gradient buffers every
    step. By default glibc serves such sizes with fresh mmap()ed pages and trims freed memory off
    the heap top, so every step writes to new pages, and each first write is a page fault (about
    5 us per 4 KiB page in a VM here: a 3 MB buffer of a GRU layer took 4.5 ms to fill fresh, 1.3
    ms reused). With mmap and trimming off, the heap keeps what a step used; the process's RSS
    stays at its peak, which every step reaches anyway."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def cpu_threads(cfg: Config, local_world_size: int) -> int:
    """Intra-op threads per process: train.threads, else OMP_NUM_THREADS, else this node's cores shared out.

    Over-subscription is costly here: a 2-thread GRU step that shares its cores with another busy
    process ran 30x slower (OpenMP threads spin at barriers), while 1 thread lost only 10%."""
    if cfg.train.threads:
        return cfg.train.threads
    omp_threads = _env_int("OMP_NUM_THREADS", 0)
    if omp_threads > 0:
        return omp_threads
    cores = len(os.sched_getaffinity(0))
    return max(1, cores // max(1, local_world_size))


def make_accelerator(cfg: Config, log_with: list[str] | None = None) -> Accelerator:
    """The Accelerator for this job, after every check that can fail fast."""
    rank, local_rank, world_size, local_world_size = launch_world()
    use_gpu = torch.cuda.is_available()
    if cfg.train.precision == "fp16" and not use_gpu:
        error = LaunchError(
            "train.precision=fp16: fp16 mixed precision needs a GPU (on CPU it is silently ignored); use bf16 or fp32"
        )
        error.same_on_every_rank = True  # every rank of a job without GPUs finds the same: rank 0 says it
        raise error
    if use_gpu:
        # Before any model is built, so cuDNN state and the GRU's weights land on this rank's GPU.
        torch.cuda.set_device(cuda_device_index(local_rank, torch.cuda.device_count(), os.environ))
    _init_process_group(rank, world_size, "nccl" if use_gpu else "gloo")
    if cfg.train.keep_freed_memory:
        keep_freed_memory()
    torch.set_num_threads(cpu_threads(cfg, local_world_size))
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    accelerator = Accelerator(
        cpu=not use_gpu,
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[compute_precision(cfg, use_gpu)],
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.train.grad_accum_steps, sync_with_dataloader=False
        ),
        # GRUModel's only buffers are normalisation constants, equal on every rank: no per-step broadcast.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False, gradient_as_bucket_view=True)],
        log_with=log_with or None,
        # TensorBoard event files go to <run_dir>/tensorboard/<log.project>/, apart from our own folders.
        project_config=ProjectConfiguration(
            project_dir=cfg.train.run_dir, logging_dir=os.path.join(cfg.train.run_dir, "tensorboard")
        ),
    )
    # Accelerate may have changed the thread count (MULTI_CPU without OMP_NUM_THREADS): ours wins.
    torch.set_num_threads(cpu_threads(cfg, local_world_size))
    if accelerator.num_processes != world_size or accelerator.process_index != rank:
        raise LaunchError(
            f"the launcher started rank {rank} of {world_size} processes but Accelerate sees rank "
            f"{accelerator.process_index} of {accelerator.num_processes}: refusing to train undistributed"
        )
    return accelerator


def summary(cfg: Config, accelerator: Accelerator, model: torch.nn.Module, per_rank_batch: int) -> str:
    """The one-line start-up summary printed by the main process (after `prepare`)."""
    backend = dist.get_backend() if dist.is_initialized() else "none"
    nodes = max(1, accelerator.num_processes // max(1, _env_int("LOCAL_WORLD_SIZE", 1)))
    compute = compute_precision(cfg, accelerator.device.type == "cuda")
    return (
        f"dist-gru: world_size={accelerator.num_processes} nodes={nodes} backend={backend} "
        f"device={_device_per_rank(accelerator)} wrapper={type(model).__name__} precision={cfg.train.precision} compute={compute} threads={torch.get_num_threads()} "
        f"global_batch={cfg.train.global_batch_size} per_rank_batch={per_rank_batch} "
        f"grad_accum={cfg.train.grad_accum_steps}"
    )


def _device_per_rank(accelerator: Accelerator) -> str:
    if accelerator.device.type == "cuda":
        return "cuda:LOCAL_RANK"
    return accelerator.device.type


def exit_process(code: int) -> None:
    """End a finished or preempted process with exactly `code`, every time. All ranks call it.

    Used by every command that may run under a launcher (train, evaluate, bench).

    Two things went wrong at exit on a loaded machine, both during interpreter finalisation:
    - gloo's worker threads outlive `destroy_process_group()` (DDP's C++ side keeps the group alive,
      so its threads are never joined). A worker that drops the last reference to a tensor made in
      Python must take the GIL; during finalisation CPython ends such a thread with pthread_exit,
      whose forced unwind through a noexcept C++ frame calls std::terminate: "terminate called
      without an active exception", exit -6, after a run that had finished.
    - finalisation restores the default action of signals Python handles: when one rank exits 75
      first, torchrun SIGTERMs the others, and a rank still finalising died with -15 instead of 75.
    So once the code is decided: ignore the launcher's follow-up signals, destroy the process
    group, flush everything Python would flush, and leave with os._exit, which skips finalisation.
    A single process without a process group has no such threads and returns normally."""
    if not dist.is_initialized():
        return
    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)  # SIG_IGN survives until the exit below
    dist.destroy_process_group()
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()  # its service process, which an atexit hook would stop
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main_decides(accelerator, outcome: Any) -> Any:
    """Global rank 0's `outcome` on every rank (all ranks participate; it doubles as a barrier).

    An exception is raised on every rank, marked `same_on_every_rank` so that rank 0 alone prints
    it: one rank's failure to write must stop all of them, not leave them waiting at a barrier."""
    payload = [outcome if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(payload)
    if isinstance(payload[0], Exception):
        payload[0].same_on_every_rank = True
        raise payload[0]
    return payload[0]
