"""Datasets from the config, and the sharding contract as samplers.

The sampling contract:
- an epoch's sample order is a permutation that depends only on (seed, epoch);
- training runs in global batches of `global_batch_size` samples, each made of `grad_accum_steps`
  global micro-batches; rank r of W takes the r-th of W equal contiguous slices of each
  micro-batch; the last incomplete global batch of an epoch is dropped;
- evaluation sees every sample exactly once across ranks.

So the samples of optimizer step s do not depend on the world size, and the data position is a
pure function of s: a run resumes at step s on any world size that divides the micro-batch, and
no sampler state needs saving. Each rank loads and pads only its own slice.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dist_gru.config import DataConfig
from dist_gru.data.batching import collate_identity
from dist_gru.data.permutation import FeistelPermutation
from dist_gru.data.synthetic import SYNTHETIC

# With bucketing, sequences are sorted by length inside windows of this many micro-batches, so
# batches hold similar lengths while the epoch order stays random.
BUCKET_WINDOW = 64
# Up to this many samples an epoch's order is an in-memory permutation (32 MiB at most); above, a
# keyed Feistel permutation computed per micro-batch (see TrainBatchSampler).
IN_MEMORY_ORDER_MAX = 1 << 22


def build_dataset(cfg: DataConfig, split: str, head: str | None = None) -> Dataset | None:
    """The `train` or `val` split named by the data config (None: a files job without val_path).

    With `data.window` set, the samples are windows drawn on the fly from the stored sequences
    (`WindowDataset`): forecast windows for `head="forecast"`, per-step windows for `"step"`, windows
    labelled by their last step for `"last"`; without `head`, forecast if `data.horizon > 0`, else step.
    """
    if cfg.name == "files":
        from dist_gru.data.files import SequenceFileDataset

        path = cfg.train_path if split == "train" else cfg.val_path
        if not path:
            return None
        source = SequenceFileDataset(path)
    else:
        size, offset = (cfg.train_size, 0) if split == "train" else (cfg.val_size, cfg.train_size)
        extra = {"num_features": cfg.num_features} if cfg.name == "seed_example" else {}
        if cfg.name == "seasonal":  # the other tasks have no options
            extra = {"season": cfg.season}
        source = SYNTHETIC[cfg.name](
            size, cfg.seq_len, cfg.seed, offset=offset, variable_length=cfg.variable_length, **extra
        )
    if not cfg.static_covariates:
        source.statics = None  # its batches carry no static columns
    if cfg.window is None:
        return source
    from dist_gru.data.windows import WindowDataset

    mode = None if head is None else {"forecast": "forecast", "step": "step", "last": "last"}[head]
    return WindowDataset(
        source, cfg.window, cfg.horizon, cfg.window_stride, mode=mode, future_covariates=cfg.future_covariates
    )


def training_data_fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """The fingerprint of the data a job trains on, which every checkpoint records: `{"train": ...}`
    (`dist_gru.data.files.data_fingerprint`) for a files job; nothing for synthetic data, whose
    generator is fully given by the config (which checkpoints record too)."""
    if cfg.name != "files":
        return {}
    from dist_gru.data.files import data_fingerprint

    return {"train": data_fingerprint(cfg.train_path)}


class TrainBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's slice of each global micro-batch, from a settable (epoch, batch) position.

    Up to `IN_MEMORY_ORDER_MAX` samples the epoch order is `rng.permutation` seeded by (seed,
    epoch), held in memory (8 bytes per sample). Above it (windows drawn from long series: 10^8
    samples would take 800 MB per rank) the order is a keyed `FeistelPermutation` of the sample ids,
    evaluated per micro-batch: O(1) memory, the same contract. `lengths` may be a broadcast view
    (`np.broadcast_to`), which a window dataset uses to give every window its length for free.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        micro_batch_size: int,
        grad_accum_steps: int,
        rank: int,
        world_size: int,
        seed: int,
        bucket_by_length: bool = False,
    ):
        self.lengths = np.asarray(lengths)
        self.micro, self.accum = micro_batch_size, grad_accum_steps
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.bucket_by_length = bucket_by_length
        self.per_rank = micro_batch_size // world_size
        # 0 when the split holds less than one global batch: Task.check_fits refuses such a job.
        self.steps_per_epoch = len(self.lengths) // (micro_batch_size * grad_accum_steps)
        self.batches_per_epoch = self.steps_per_epoch * self.accum
        self.in_memory = len(self.lengths) <= IN_MEMORY_ORDER_MAX
        self.epoch, self.start = 0, 0
        self._cache: tuple[int, np.ndarray] | None = None
        self._chunk_cache: tuple[tuple[int, int], np.ndarray] | None = None
        self._orders: tuple[int, FeistelPermutation, FeistelPermutation] | None = None

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """All global micro-batches of `epoch`, shape [steps_per_epoch * accum, micro]: same on every rank.

        Materialises the epoch (8 bytes per sample); training itself reads `micro_batch`."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        if not self.in_memory:
            return np.stack([self.micro_batch(epoch, j) for j in range(self.batches_per_epoch)])
        rng = np.random.default_rng((self.seed, epoch))
        used = self.batches_per_epoch * self.micro
        order = rng.permutation(len(self.lengths))[:used]
        if self.bucket_by_length:
            window = BUCKET_WINDOW * self.micro
            for start in range(0, used, window):
                chunk = order[start : start + window]
                order[start : start + window] = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches = order.reshape(-1, self.micro)
            batches = batches[rng.permutation(len(batches))]
        else:
            batches = order.reshape(-1, self.micro)
        self._cache = (epoch, batches)
        return batches

    def micro_batch(self, epoch: int, j: int) -> np.ndarray:
        """Global micro-batch `j` of `epoch` (int64 [micro]): row j of `epoch_batches(epoch)`."""
        if self.in_memory:
            return self.epoch_batches(epoch)[j]
        if self._orders is None or self._orders[0] != epoch:
            self._orders = (
                epoch,
                FeistelPermutation(len(self.lengths), self.seed, stream=2 * epoch),
                FeistelPermutation(self.batches_per_epoch, self.seed, stream=2 * epoch + 1),
            )
        _, order, batch_order = self._orders
        # As in memory: with bucketing, the order is sorted by length inside windows of
        # BUCKET_WINDOW micro-batches, cut into micro-batches, and those are shuffled (here by a
        # second keyed permutation). Without, the same windows are computed (and cached) a whole
        # window at a time, which makes the per-call cost of the permutation negligible.
        b = int(batch_order(np.array(j))) if self.bucket_by_length else j
        chunk, row = divmod(b, BUCKET_WINDOW)
        if self._chunk_cache is None or self._chunk_cache[0] != (epoch, chunk):
            window = BUCKET_WINDOW * self.micro
            ids = order(np.arange(chunk * window, min((chunk + 1) * window, self.batches_per_epoch * self.micro)))
            if self.bucket_by_length:
                ids = ids[np.argsort(self.lengths[ids], kind="stable")]
            self._chunk_cache = ((epoch, chunk), ids)
        return self._chunk_cache[1][row * self.micro : (row + 1) * self.micro]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, micro-batch index within the epoch) where optimizer step `step` starts."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        return epoch, step_in_epoch * self.accum

    def valid_steps(self, step: int) -> int:
        """Valid time steps (sum of lengths) of optimizer step `step`'s whole global batch, every
        rank and micro-batch: the denominator of a per-step mean loss, known to every rank without
        a collective because every rank can compute every rank's samples."""
        epoch, start = self.position(step)
        return int(sum(int(self.lengths[self.micro_batch(epoch, j)].sum()) for j in range(start, start + self.accum)))

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def rank_slice(self, batch: np.ndarray) -> list[int]:
        return batch[self.rank * self.per_rank : (self.rank + 1) * self.per_rank].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        for j in range(self.start, self.batches_per_epoch):
            yield self.rank_slice(self.micro_batch(epoch, j))

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def padding_fraction(self, epoch: int = 0, max_batches: int | None = None) -> float:
        """Fraction of padded time steps over all ranks' micro-batches of an epoch (of its first
        `max_batches` micro-batches, if given)."""
        count = self.batches_per_epoch if max_batches is None else min(max_batches, self.batches_per_epoch)
        valid = padded = 0
        for j in range(count):
            slices = self.lengths[self.micro_batch(epoch, j)].reshape(-1, self.per_rank)
            valid += int(slices.sum())
            padded += int(slices.max(axis=1).sum()) * self.per_rank
        return float(1.0 - valid / padded)


def eval_batches(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Rank r evaluates samples r, r + W, r + 2W, ...: every sample exactly once, shards may differ by one."""
    shard = np.arange(rank, num_samples, world_size)
    return (
        [chunk.tolist() for chunk in np.array_split(shard, max(1, -(-len(shard) // batch_size)))] if len(shard) else []
    )


class SampleEvalBatches:
    """Every sample once (`eval_batches`: rank r takes r, r + W, ...), each from a zero state:
    what the evaluator (`dist_gru.infer.evaluate.evaluate`) reads of sequences and windows."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int, num_workers: int = 0):
        self.loader = make_loader(dataset, eval_batches(len(dataset), batch_size, rank, world_size), num_workers)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.loader)

    def carried(self, batch: dict) -> None:
        return None

    def keep(self, state: torch.Tensor | None) -> None:
        pass


def predict_batches(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Contiguous batches of the dataset order, batch k on rank k mod W: every sample exactly once.

    Unlike `eval_batches` (strided shards), every batch holds the same samples on any world size,
    so a model's outputs, which can depend on the batch a sample is computed in (its padding, the
    kernels' blocking by batch size), are bitwise the same as in one process; and each batch is one
    contiguous block of rows of the output."""
    starts = range(rank * batch_size, num_samples, world_size * batch_size)
    return [list(range(start, min(start + batch_size, num_samples))) for start in starts]


def loader_workers(cfg: DataConfig, device: torch.device) -> int:
    """Background loader processes: as configured, else 2 on a GPU (keeps it fed) and 0 on a CPU,
    where every core already trains and a worker would only compete with it."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    return 2 if device.type == "cuda" else 0


def make_loader(dataset: Dataset, batch_sampler, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over a dataset whose `__getitems__` returns a padded batch."""
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate_identity,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
        worker_init_fn=ignore_interrupts if num_workers else None,
    )


def ignore_interrupts(worker_id: int) -> None:
    """Loader workers ignore SIGINT: Ctrl-C reaches the whole process group, the trainer turns it
    into a checkpoint, and a worker that died of it would fail the batches still to come."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_stream(loader: DataLoader, sampler: TrainBatchSampler, start_step: int) -> Iterator[tuple[int, dict]]:
    """Endless (epoch, batch) stream starting exactly at optimizer step `start_step`."""
    epoch, start = sampler.position(start_step)
    while True:
        sampler.set_position(epoch, start)
        for batch in loader:
            yield epoch, batch
        epoch, start = epoch + 1, 0
