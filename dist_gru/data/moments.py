"""Normalisation moments of a training split as a sharded sum: each rank reads only its slice.

    sums = moment_sums(train_set, shard=rank, num_shards=world_size)    # float64 [3, C]
    # the trainer sums `sums` over ranks (one all-reduce), then every rank computes the same:
    mean, std = moments_from_sums(total, train_set)

The channels C are the model's input channels (`dataset.num_features`: for forecast windows the
target history and then the covariates). The sums are over every valid time step of the stored
sequences (windows overlap, so the steps of the series, not of the windows, define the statistics),
in float64, of the values minus a shift that every rank reads the same way (the first step of the
first sample): sums of squares of shifted values do not cancel catastrophically when a feature's
mean is far larger than its spread. A shard is a contiguous range of time steps (or of samples, for
synthetic whole-sequence tasks), so the shards together cover each step exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

_CHUNK_STEPS = 1 << 20
_CHUNK_SAMPLES = 1024


def moment_shift(dataset: Any) -> np.ndarray:
    """float64 [C]: the input channels at the first step of the first sample (the same on every rank)."""
    return dataset.__getitems__([0])["x"][0, 0].numpy().astype(np.float64)


def moment_sums(dataset: Any, shard: int = 0, num_shards: int = 1, chunk_steps: int = _CHUNK_STEPS) -> np.ndarray:
    """float64 [3, C]: (count of steps, sum of (x - shift), sum of (x - shift)^2) over shard `shard`
    of `num_shards`; the element-wise sum over all shards is what `moments_from_sums` takes."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard={shard}; expected 0 <= shard < num_shards={num_shards}")
    if chunk_steps < 1:
        raise ValueError(f"chunk_steps={chunk_steps}; expected >= 1")
    shift = moment_shift(dataset)
    sums = np.zeros((3, len(shift)))
    for block in _blocks(dataset, shard, num_shards, chunk_steps):
        centred = block.astype(np.float64) - shift
        sums[0] += len(centred)
        sums[1] += centred.sum(axis=0)
        sums[2] += np.einsum("ij,ij->j", centred, centred)
    return sums


def moments_from_sums(sums: np.ndarray, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std, float32 [C] each, from the summed `moment_sums`."""
    sums = np.asarray(sums, dtype=np.float64)
    count = sums[0]
    centred_mean = sums[1] / count
    variance = np.maximum(sums[2] / count - centred_mean**2, 0.0)
    return (moment_shift(dataset) + centred_mean).astype(np.float32), np.sqrt(variance).astype(np.float32)


def feature_moments(dataset: Any, chunk_steps: int = _CHUNK_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over all valid time steps of a split, in one process."""
    return moments_from_sums(moment_sums(dataset, chunk_steps=chunk_steps), dataset)


def _share(total: int, shard: int, num_shards: int) -> tuple[int, int]:
    return total * shard // num_shards, total * (shard + 1) // num_shards


def _blocks(dataset: Any, shard: int, num_shards: int, chunk_steps: int) -> Iterator[np.ndarray]:
    """Blocks [rows, C] of the input channels of the shard's time steps."""
    from dist_gru.data.windows import WindowDataset

    forecast = isinstance(dataset, WindowDataset) and dataset.mode == "forecast"
    source = dataset.source if isinstance(dataset, WindowDataset) else dataset
    if hasattr(source, "step_blocks"):  # a seq/v1 split: its time steps straight from the file
        yield from _file_blocks(source, forecast, shard, num_shards, chunk_steps)
    elif isinstance(dataset, WindowDataset):
        yield from _series_blocks(source, forecast, shard, num_shards, chunk_steps)
    else:
        yield from _sample_blocks(dataset, shard, num_shards)


def _file_blocks(source: Any, forecast: bool, shard: int, num_shards: int, chunk_steps: int) -> Iterator[np.ndarray]:
    first, last = _share(int(source.meta["total_steps"]), shard, num_shards)
    width = source.num_features + (source.output_size if forecast else 0)
    step = max(1, min(chunk_steps, (1 << 22) // max(1, width)))
    for features, targets in source.step_blocks(first, last, step, with_targets=forecast):
        yield np.concatenate([targets.reshape(len(features), -1), features], axis=1) if forecast else features


def _series_blocks(source: Any, forecast: bool, shard: int, num_shards: int, chunk_steps: int) -> Iterator[np.ndarray]:
    """Generated series (synthetic per-step tasks): the shard's range of the concatenated steps."""
    lengths = np.asarray(source.lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    first, last = _share(int(offsets[-1]), shard, num_shards)
    seq = int(np.searchsorted(offsets, first, side="right")) - 1
    while first < last:
        end = min(last, int(offsets[seq + 1]), first + chunk_steps)
        start, steps = first - int(offsets[seq]), end - first
        features, targets = source.read_steps(np.array([seq]), np.array([start]), steps, steps)
        yield np.concatenate([targets[0].reshape(steps, -1), features[0]], axis=1) if forecast else features[0]
        first = end
        if first == offsets[seq + 1]:
            seq += 1


def _sample_blocks(dataset: Any, shard: int, num_shards: int) -> Iterator[np.ndarray]:
    """Any other dataset: its valid steps, read through `__getitems__`, a shard being a range of samples."""
    first, last = _share(len(dataset), shard, num_shards)
    for begin in range(first, last, _CHUNK_SAMPLES):
        batch = dataset.__getitems__(list(range(begin, min(begin + _CHUNK_SAMPLES, last))))
        x = batch["x"].numpy()
        yield x[np.arange(x.shape[1])[None, :] < batch["lengths"].numpy()[:, None]]
