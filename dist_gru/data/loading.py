"""Datasets from the config, and the sharding contract as samplers.

The contract (DESIGN.md, "Sharding semantics"):
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

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dist_gru.config import ConfigError, DataConfig
from dist_gru.data.batching import collate_identity
from dist_gru.data.synthetic import SYNTHETIC

# With bucketing, sequences are sorted by length inside windows of this many micro-batches, so
# batches hold similar lengths while the epoch order stays random.
BUCKET_WINDOW = 64


def build_dataset(cfg: DataConfig, split: str) -> Dataset | None:
    """The `train` or `val` split named by the data config (None: a files job without val_path)."""
    if cfg.name == "files":
        from dist_gru.data.files import SequenceFileDataset

        path = cfg.train_path if split == "train" else cfg.val_path
        return SequenceFileDataset(path) if path else None
    size, offset = (cfg.train_size, 0) if split == "train" else (cfg.val_size, cfg.train_size)
    extra = {"num_features": cfg.num_features} if cfg.name == "seed_example" else {}
    return SYNTHETIC[cfg.name](size, cfg.seq_len, cfg.seed, offset=offset, variable_length=cfg.variable_length, **extra)


class TrainBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's slice of each global micro-batch, from a settable (epoch, batch) position."""

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
        self.steps_per_epoch = len(self.lengths) // (micro_batch_size * grad_accum_steps)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training split has {len(self.lengths)} samples, fewer than one global batch of "
                f"{micro_batch_size * grad_accum_steps}: lower train.global_batch_size or use more data"
            )
        self.epoch, self.start = 0, 0
        self._cache: tuple[int, np.ndarray] | None = None

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """All global micro-batches of `epoch`, shape [steps_per_epoch * accum, micro]: same on every rank."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng((self.seed, epoch))
        used = self.steps_per_epoch * self.accum * self.micro
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

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, micro-batch index within the epoch) where optimizer step `step` starts."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        return epoch, step_in_epoch * self.accum

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def rank_slice(self, batch: np.ndarray) -> list[int]:
        return batch[self.rank * self.per_rank : (self.rank + 1) * self.per_rank].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.epoch_batches(self.epoch)[self.start :]:
            yield self.rank_slice(batch)

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accum - self.start

    def padding_fraction(self, epoch: int = 0) -> float:
        """Fraction of padded time steps over all ranks' micro-batches of an epoch."""
        slices = self.lengths[self.epoch_batches(epoch)].reshape(-1, self.per_rank)
        return float(1.0 - slices.sum() / (slices.max(axis=1).sum() * self.per_rank))


def eval_batches(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Rank r evaluates samples r, r + W, r + 2W, ...: every sample exactly once, shards may differ by one."""
    shard = np.arange(rank, num_samples, world_size)
    return (
        [chunk.tolist() for chunk in np.array_split(shard, max(1, -(-len(shard) // batch_size)))] if len(shard) else []
    )


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
    )


def train_stream(loader: DataLoader, sampler: TrainBatchSampler, start_step: int) -> Iterator[tuple[int, dict]]:
    """Endless (epoch, batch) stream starting exactly at optimizer step `start_step`."""
    epoch, start = sampler.position(start_step)
    while True:
        sampler.set_position(epoch, start)
        for batch in loader:
            yield epoch, batch
        epoch, start = epoch + 1, 0


def feature_moments(dataset: Dataset, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over all valid time steps of a split, in one streaming pass."""
    if hasattr(dataset, "feature_moments"):
        return dataset.feature_moments()
    count, total, total_sq = 0, 0.0, 0.0
    for start in range(0, len(dataset), chunk):
        batch = dataset.__getitems__(list(range(start, min(start + chunk, len(dataset)))))
        x = batch["x"].double()
        mask = torch.arange(x.shape[1])[None, :] < batch["lengths"][:, None]
        valid = x[mask]
        count += valid.shape[0]
        total = total + valid.sum(0)
        total_sq = total_sq + (valid**2).sum(0)
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(0).sqrt()
    return mean.float().numpy(), std.float().numpy()
