"""Synthetic sequence tasks, each sample a pure function of (seed, global index).

Random numbers come from a counter-based generator: value j of stream s of sample i is
`hash(seed, i, s, j)` (SplitMix64), so a dataset has any size in O(1) memory, every rank, world size
and resumed run sees the same sample i, and a whole batch is generated in a few vectorised numpy
operations (no per-sample generator objects: data loading stays off the training profile). The
validation split uses global indices `[train_size, train_size + val_size)`, so it never overlaps
the training split.

Tasks:
- `adding` (Hochreiter & Schmidhuber 1997; Bai et al. 2018): two channels, values U(0, 1) and two
  markers (one in each half); the target is the sum of the two marked values. Predicting 1 always
  gives MSE 1/6 = 0.167.
- `sine`: a noisy sine wave of random amplitude, period and phase; the target is the clean value
  one step after the window.
- `seed_example`: the seed document's shapes (input 10, length 10, output 1) with a target the
  network can learn (the seed trained on fresh noise, so its loss could not fall).
"""

from __future__ import annotations

import numpy as np
import torch

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser, vectorised: a bijective 64-bit mix."""
    with np.errstate(over="ignore"):
        x = (x + _GOLDEN) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def _keys(seed: int, index: np.ndarray, stream: int) -> np.ndarray:
    """One 64-bit key per sample for (seed, global sample index, stream)."""
    with np.errstate(over="ignore"):
        base = _splitmix64(np.uint64(seed) * _GOLDEN + np.uint64(stream))
        return _splitmix64(base ^ _splitmix64(np.asarray(index, dtype=np.uint64)))


def uniform(seed: int, index: np.ndarray, stream: int, shape: tuple[int, ...]) -> np.ndarray:
    """U[0, 1) float64 of shape [len(index), *shape]: element j is hash(key(seed, i, stream), j)."""
    keys = _keys(seed, index, stream)
    count = int(np.prod(shape, dtype=np.int64))
    with np.errstate(over="ignore"):
        bits = _splitmix64(keys[:, None] + np.arange(count, dtype=np.uint64)[None, :] * _GOLDEN)
    return ((bits >> np.uint64(11)).astype(np.float64) * 2.0**-53).reshape(len(keys), *shape)


def normal(seed: int, index: np.ndarray, stream: int, lengths: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 [len(index), max(lengths), *shape], zero past each sample's length.

    Each sample's [length, *shape] block comes from torch's generator seeded with the sample's key
    (about 10x faster than hashing every element; reseeding a torch.Generator costs a microsecond).
    Drawn at the sample's own length, so the values never depend on the rest of the batch."""
    out = torch.zeros(len(index), int(lengths.max()), *shape, dtype=torch.float32)
    generator = torch.Generator()
    for row, (key, length) in enumerate(zip(_keys(seed, index, stream).tolist(), lengths.tolist(), strict=True)):
        generator.manual_seed(key)
        out[row, :length] = torch.randn((length, *shape), generator=generator)
    return out.numpy()


class SyntheticDataset(torch.utils.data.Dataset):
    """Base class: subclasses implement `_generate(index, lengths, steps) -> (x [B, steps, F], y [B, O])`."""

    task = "regression"
    num_features = 1
    output_size = 1
    num_classes = None
    _LENGTH_STREAM = 1000  # a stream no task uses

    def __init__(self, size: int, seq_len: int, seed: int, offset: int = 0, variable_length: bool = False):
        self.size, self.seq_len, self.seed, self.offset = size, seq_len, seed, offset
        self.variable_length = variable_length
        if variable_length:
            low = max(1, seq_len // 2)
            u = uniform(seed, np.arange(offset, offset + size), self._LENGTH_STREAM, ())
            self.lengths = (low + np.floor(u * (seq_len - low + 1))).astype(np.int64)
        else:
            self.lengths = np.full(size, seq_len, dtype=np.int64)

    def __len__(self) -> int:
        return self.size

    def _generate(self, index: np.ndarray, lengths: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __getitems__(self, indices: list[int]) -> dict:
        """One padded batch (DataLoader's batched fast path; use `collate_identity`)."""
        local = np.asarray(indices, dtype=np.int64)
        if len(local) and (local.min() < 0 or local.max() >= self.size):
            raise IndexError(f"sample indices must be in [0, {self.size})")
        lengths = self.lengths[local]
        steps = int(lengths.max())
        x, y = self._generate(local + self.offset, lengths, steps)
        x[np.arange(steps)[None, :] >= lengths[:, None]] = 0.0  # padding is zeros
        return {
            "x": torch.from_numpy(x.astype(np.float32)),
            "lengths": torch.from_numpy(lengths),
            "y": torch.from_numpy(y.astype(np.float32)),
            "index": torch.from_numpy(local),
        }

    def __getitem__(self, i: int) -> dict:
        batch = self.__getitems__([i])
        return {"x": batch["x"][0], "y": batch["y"][0], "index": i}


class AddingDataset(SyntheticDataset):
    num_features = 2

    def _generate(self, index, lengths, steps):
        values = uniform(self.seed, index, 0, (steps,))
        half = np.maximum(1, lengths // 2)
        first = np.floor(uniform(self.seed, index, 1, ()) * half).astype(np.int64)
        second = half + np.floor(uniform(self.seed, index, 2, ()) * (lengths - half)).astype(np.int64)
        second = np.where(lengths > 1, second, first)  # a length-1 sequence has one marked value
        markers = np.zeros_like(values)
        rows = np.arange(len(index))
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        target = values[rows, first] + np.where(second != first, values[rows, second], 0.0)
        return np.stack([values, markers], axis=2), target[:, None]


class SineDataset(SyntheticDataset):
    def _generate(self, index, lengths, steps):
        amplitude = 0.5 + uniform(self.seed, index, 0, (1,))
        period = 8.0 + 24.0 * uniform(self.seed, index, 1, (1,))
        phase = 2 * np.pi * uniform(self.seed, index, 2, (1,))
        t = np.arange(steps, dtype=np.float64)[None, :]
        noisy = amplitude * np.sin(2 * np.pi * t / period + phase) + 0.05 * normal(self.seed, index, 3, lengths, ())
        target = amplitude * np.sin(2 * np.pi * lengths[:, None] / period + phase)
        return noisy[:, :, None], target


class SeedExampleDataset(SyntheticDataset):
    def __init__(self, *args, num_features: int = 10, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_features = num_features

    def _generate(self, index, lengths, steps):
        x = normal(self.seed, index, 0, lengths, (self.num_features,))
        valid = np.arange(steps)[None, :] < lengths[:, None]
        # A target that depends on the whole sequence: the mean of feature 0 over its valid steps.
        target = (x[:, :, 0] * valid).sum(1) / lengths
        return x, target[:, None]


SYNTHETIC = {"adding": AddingDataset, "sine": SineDataset, "seed_example": SeedExampleDataset}
