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

Tasks with per-step targets (`target_kind = "step"`), whose step p of series i is a function of
(seed, i, p) alone, so any window `[t, t + L)` of a long series is generated directly (the window
machinery draws windows from them as from files, see `read_steps`):
- `running_count` (per-step labelling): the input is a random bit per step; the label of step p is
  the number of ones among steps p - 2 .. p (4 classes). A GRU can learn it exactly (a 3-step
  memory); the best rule that sees only the current step is right half the time (accuracy 0.5),
  and always predicting the most frequent class scores 3/8.
- `seasonal` (forecasting): series i is level + trend * p + a seasonal pattern of period `season`
  (two harmonics) + N(0, 0.05^2) noise, the parameters drawn from (seed, i); the covariates are the
  position in the season (sin, cos). The naive and seasonal-naive forecasts are the baselines.
- `promo` (forecasting with a future-known covariate): series i is a level + N(0, 0.1^2) noise +
  a lift of 1 to 2 on the steps of a planned promotion (each step one with probability 0.2, drawn
  from (seed, i, p)); the one covariate is the promotion flag, known for the future
  (`feature_roles = ("future",)`), so a forecast that reads the horizon's flags beats one that
  cannot by about the lift's share of the error.
- `stores` (static covariates): each series' level is set by its store type, a static category
  (with a numeric static size), which nothing in its steps' features reveals; the batches carry
  them (`static_categories`, `static_values`, see `dist_gru.data.statics`).
"""

from __future__ import annotations

import numpy as np
import torch

from dist_gru.data.statics import Statics

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser, vectorised: a bijective 64-bit mix."""
    with np.errstate(over="ignore"):
        x = (x + _GOLDEN) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def sample_keys(seed: int, index: np.ndarray, stream: int) -> np.ndarray:
    """One 64-bit key per sample for (seed, global sample index, stream)."""
    with np.errstate(over="ignore"):
        base = splitmix64(np.uint64(seed) * _GOLDEN + np.uint64(stream))
        return splitmix64(base ^ splitmix64(np.asarray(index, dtype=np.uint64)))


def uniform(seed: int, index: np.ndarray, stream: int, shape: tuple[int, ...]) -> np.ndarray:
    """U[0, 1) float64 of shape [len(index), *shape]: element j is hash(key(seed, i, stream), j)."""
    count = int(np.prod(shape, dtype=np.int64))
    return uniform_at(seed, index, stream, np.arange(count)[None, :]).reshape(len(index), *shape)


def uniform_at(seed: int, index: np.ndarray, stream: int, positions: np.ndarray) -> np.ndarray:
    """U[0, 1) float64: value `positions[b, ...]` of sample `index[b]`'s stream (the same values as
    `uniform`'s element j at position j), so any slice of a long series costs only its own size.
    `positions` (integers >= 0) has shape [len(index), ...] or broadcasts to it."""
    keys = sample_keys(seed, index, stream)
    positions = np.asarray(positions, dtype=np.int64)
    keys = keys.reshape(len(keys), *([1] * (positions.ndim - 1)))
    with np.errstate(over="ignore"):
        bits = splitmix64(keys + positions.astype(np.uint64) * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def normal_at(seed: int, index: np.ndarray, stream: int, positions: np.ndarray) -> np.ndarray:
    """N(0, 1) float64 at `positions` like `uniform_at` (Box-Muller on streams `stream`, `stream + 1`)."""
    radius = np.sqrt(-2.0 * np.log1p(-uniform_at(seed, index, stream, positions)))
    return radius * np.cos(2.0 * np.pi * uniform_at(seed, index, stream + 1, positions))


def normal(seed: int, index: np.ndarray, stream: int, lengths: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 [len(index), max(lengths), *shape], zero past each sample's length.

    Each sample's [length, *shape] block comes from torch's generator seeded with the sample's key
    (about 10x faster than hashing every element; reseeding a torch.Generator costs a microsecond).
    Drawn at the sample's own length, so the values never depend on the rest of the batch."""
    out = torch.zeros(len(index), int(lengths.max()), *shape, dtype=torch.float32)
    generator = torch.Generator()
    for row, (key, length) in enumerate(zip(sample_keys(seed, index, stream).tolist(), lengths.tolist(), strict=True)):
        generator.manual_seed(key)
        out[row, :length] = torch.randn((length, *shape), generator=generator)
    return out.numpy()


class SyntheticDataset(torch.utils.data.Dataset):
    """Base class: subclasses implement `_generate(index, lengths, steps) -> (x [B, steps, F], y [B, O])`."""

    task = "regression"
    target_kind = "sequence"
    num_features = 1
    output_size = 1
    num_classes = None
    statics: Statics | None = None  # the series' static columns, for tasks that have them
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
        padding = np.arange(steps)[None, :] >= lengths[:, None]
        x[padding] = 0.0  # padding is zeros
        y = y.astype(np.int64 if self.task == "classification" else np.float32)
        if self.target_kind == "step":
            y[padding] = 0
        return {
            "x": torch.from_numpy(x.astype(np.float32)),
            "lengths": torch.from_numpy(lengths),
            "y": torch.from_numpy(y),
            "index": torch.from_numpy(local),
            **(self.statics.rows(local) if self.statics is not None else {}),
        }

    def __getitem__(self, i: int) -> dict:
        batch = self.__getitems__([i])
        return {"x": batch["x"][0], "y": batch["y"][0], "index": i}


class AddingDataset(SyntheticDataset):
    num_features = 2
    # The end-of-training summary's yardstick: always predicting the expected sum 1 has MSE 1/6.
    mse_baseline = "predicting 1 always: 0.167"

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


class SyntheticSteps(SyntheticDataset):
    """Base class of per-step tasks: subclasses implement `_steps(index, positions)`, the features
    [B, L, F] and targets [B, L(, O)] of series `index` at absolute steps `positions` [B, L]."""

    target_kind = "step"

    def _steps(self, index: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _generate(self, index, lengths, steps):
        return self._steps(index, np.broadcast_to(np.arange(steps), (len(index), steps)))

    def read_steps(
        self, seq: np.ndarray, starts: np.ndarray, feature_steps: int, target_steps: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The window machinery's read (see `SequenceFileDataset.read_steps`), generated directly."""
        seq, starts = np.asarray(seq, dtype=np.int64), np.asarray(starts, dtype=np.int64)
        positions = starts[:, None] + np.arange(max(feature_steps, target_steps))[None, :]
        x, y = self._steps(seq + self.offset, positions)
        y = y[:, :target_steps].astype(np.int64 if self.task == "classification" else np.float32)
        return np.ascontiguousarray(x[:, :feature_steps], dtype=np.float32), y


class RunningCountDataset(SyntheticSteps):
    task = "classification"
    memory = 3  # the label counts the ones among this many latest steps
    num_classes = output_size = memory + 1

    def _steps(self, index, positions):
        # Bits from `memory - 1` steps before the first position on; steps before 0 count as zeros.
        first = positions[:, :1] - (self.memory - 1)
        reach = first + np.arange(positions.shape[1] + self.memory - 1)[None, :]
        bits = np.where(reach >= 0, uniform_at(self.seed, index, 0, np.maximum(reach, 0)) < 0.5, False)
        bits = bits.astype(np.int64)
        counts = sum(bits[:, d : d + positions.shape[1]] for d in range(self.memory))
        x = bits[:, self.memory - 1 :]
        return x[:, :, None].astype(np.float32), counts


class SeasonalDataset(SyntheticSteps):
    num_features = 2  # covariates: sin and cos of the position in the season
    noise = 0.05

    def __init__(self, *args, season: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.season = season

    def _steps(self, index, positions):
        level = -1.0 + 2.0 * uniform(self.seed, index, 0, (1,))
        trend = 0.03 * (-1.0 + 2.0 * uniform(self.seed, index, 1, (1,)))
        amplitude = 0.5 + uniform(self.seed, index, 2, (1,))
        phase = 2 * np.pi * uniform(self.seed, index, 3, (2,))
        angle = 2 * np.pi * positions / self.season
        pattern = np.sin(angle + phase[:, :1]) + 0.5 * np.sin(2 * angle + phase[:, 1:])
        value = level + trend * positions + amplitude * pattern + self.noise * normal_at(self.seed, index, 4, positions)
        x = np.stack([np.sin(angle), np.cos(angle)], axis=2)
        return x.astype(np.float32), value[:, :, None]


class PromoDataset(SyntheticSteps):
    num_features = 1  # the promotion flag
    feature_roles = ("future",)  # planned: known for the forecast horizon too
    noise = 0.1

    def _steps(self, index, positions):
        level = -1.0 + 2.0 * uniform(self.seed, index, 0, (1,))
        lift = 1.0 + uniform(self.seed, index, 1, (1,))
        promo = (uniform_at(self.seed, index, 2, positions) < 0.2).astype(np.float64)
        value = level + lift * promo + self.noise * normal_at(self.seed, index, 3, positions)
        return promo[:, :, None].astype(np.float32), value[:, :, None]


class StoresDataset(SyntheticSteps):
    """Series whose level is set by a static category: store i has a type (`mall`, `outlet`,
    `street`: level 1, -1, 0) and a size in [0.5, 1.5), both drawn from (seed, i); each step's
    value is the level + 0.3 * (size - 1) + 0.5 * traffic + N(0, 0.1^2) noise, where the one
    feature, traffic, is U(0, 1) per step."""

    num_features = 1  # traffic
    noise = 0.1
    TYPES = ("mall", "outlet", "street")  # sorted, as `prepare --table` stores a vocabulary
    LEVELS = (1.0, -1.0, 0.0)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        index = np.arange(self.offset, self.offset + self.size)
        columns = [{"name": "store_type", "kind": "category", "vocabulary": list(self.TYPES)}, {"name": "size", "kind": "value"}]
        self.statics = Statics(columns, self._types(index)[:, None], self._sizes(index)[:, None].astype(np.float32))

    def _types(self, index: np.ndarray) -> np.ndarray:
        return np.floor(uniform(self.seed, index, 0, ()) * len(self.TYPES)).astype(np.int64)

    def _sizes(self, index: np.ndarray) -> np.ndarray:
        return 0.5 + uniform(self.seed, index, 1, ())

    def _steps(self, index, positions):
        level = np.asarray(self.LEVELS)[self._types(index)] + 0.3 * (self._sizes(index) - 1.0)
        traffic = uniform_at(self.seed, index, 2, positions)
        value = level[:, None] + 0.5 * traffic + self.noise * normal_at(self.seed, index, 3, positions)
        return traffic[:, :, None].astype(np.float32), value[:, :, None]


SYNTHETIC = {
    "adding": AddingDataset,
    "sine": SineDataset,
    "seed_example": SeedExampleDataset,
    "running_count": RunningCountDataset,
    "seasonal": SeasonalDataset,
    "promo": PromoDataset,
    "stores": StoresDataset,
}
