"""Synthetic sequence tasks, each sample a pure function of (seed, global index).

Sample `i` comes from its own counter-based generator seeded by `(seed, i)`, so a dataset has any
size in O(1) memory and every rank, world size and resumed run sees the same sample `i`. The
validation split uses global indices `[train_size, train_size + val_size)`, so it never overlaps
the training split.

Tasks:
- `adding` (Hochreiter & Schmidhuber 1997; Bai et al. 2018): two channels, values U(0, 1) and two
  markers (one in each half); the target is the sum of the two marked values. Predicting 1 always
  gives MSE 1/6 = 0.167.
- `sine`: a noisy sine wave of random amplitude, frequency and phase; the target is the clean
  value one step after the window.
- `seed_example`: the seed document's shapes (input 10, length 10, output 1) with a target the
  network can learn (the seed trained on fresh noise, so its loss could not fall).
"""

from __future__ import annotations

import numpy as np
import torch

from dist_gru.data.batching import pad_batch

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised SplitMix64 finaliser: a counter-based hash for per-index lengths."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


class SyntheticDataset(torch.utils.data.Dataset):
    """Base class: subclasses implement `_sample(rng, length) -> (features [length, F], target)`."""

    task = "regression"
    num_features = 1
    output_size = 1
    num_classes = None

    def __init__(self, size: int, seq_len: int, seed: int, offset: int = 0, variable_length: bool = False):
        self.size, self.seq_len, self.seed, self.offset = size, seq_len, seed, offset
        self.variable_length = variable_length
        global_index = np.arange(offset, offset + size, dtype=np.uint64)
        if variable_length:
            low = max(1, seq_len // 2)
            hashed = _splitmix64(global_index ^ _splitmix64(np.full_like(global_index, seed)))
            self.lengths = (low + hashed % np.uint64(seq_len - low + 1)).astype(np.int64)
        else:
            self.lengths = np.full(size, seq_len, dtype=np.int64)

    def __len__(self) -> int:
        return self.size

    def _sample(self, rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} out of range for a dataset of {self.size}")
        rng = np.random.default_rng((self.seed, self.offset + i))
        return self._sample(rng, int(self.lengths[i]))

    def __getitem__(self, i: int) -> dict:
        x, y = self.sample(i)
        return {"x": torch.from_numpy(x), "y": torch.from_numpy(y), "index": i}

    def __getitems__(self, indices: list[int]) -> dict:
        """One padded batch (DataLoader's batched fast path; use `collate_identity`)."""
        xs, ys = zip(*(self.sample(int(i)) for i in indices), strict=True)
        return pad_batch(list(xs), np.stack(ys), indices)


class AddingDataset(SyntheticDataset):
    num_features = 2

    def _sample(self, rng, length):
        values = rng.random(length, dtype=np.float32)
        markers = np.zeros(length, dtype=np.float32)
        half = max(1, length // 2)
        first = rng.integers(0, half)
        second = rng.integers(half, length) if length > 1 else first
        markers[[first, second]] = 1.0
        target = np.array([values[first] + (values[second] if second != first else 0.0)], dtype=np.float32)
        return np.stack([values, markers], axis=1), target


class SineDataset(SyntheticDataset):
    def _sample(self, rng, length):
        amplitude = rng.uniform(0.5, 1.5)
        period = rng.uniform(8.0, 32.0)
        phase = rng.uniform(0.0, 2 * np.pi)
        t = np.arange(length + 1, dtype=np.float64)
        clean = amplitude * np.sin(2 * np.pi * t / period + phase)
        noisy = clean[:length] + rng.normal(0.0, 0.05, length)
        return noisy.astype(np.float32)[:, None], clean[length:].astype(np.float32)


class SeedExampleDataset(SyntheticDataset):
    def __init__(self, *args, num_features: int = 10, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_features = num_features

    def _sample(self, rng, length):
        x = rng.standard_normal((length, self.num_features), dtype=np.float32)
        # A target that depends on the whole sequence: the mean of feature 0 over time.
        return x, np.array([x[:, 0].mean()], dtype=np.float32)


SYNTHETIC = {"adding": AddingDataset, "sine": SineDataset, "seed_example": SeedExampleDataset}
