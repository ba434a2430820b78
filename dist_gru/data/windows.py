"""Windows drawn on the fly from stored sequences with per-step targets: no window is ever copied to disk.

    from dist_gru.data.files import SequenceFileDataset
    from dist_gru.data.windows import WindowDataset
    ds = WindowDataset(SequenceFileDataset("data/load/train"), window=168, horizon=24)  # forecast windows
    batch = ds.__getitems__([0, 5, 10**7])   # x [3, 168, O + F], y [3, 24, O]

The memory bound (peak RSS independent of the series length) is measured by
`python -m dist_gru.bench.rss --rss-bench --dir /tmp`.

Sample k of a window dataset is the window `(sequence i, start t)`: sequence i has
`max(0, (len_i - window - horizon) // stride + 1)` windows, and a cumulative sum of those counts plus
`searchsorted` maps k to (i, t) in O(number of sequences) memory, whatever the number of windows
(Megatron-LM's GPT dataset indexes documents the same way). Reading a batch copies only its own
windows out of the memory map (or generates them, for synthetic series). Every window has length
`window`, so `lengths` is a broadcast view that costs nothing for 10^8 windows.

A validation split written with its history (`eval_from.npy`, see docs/tables.md) draws only the
windows whose targets reach its evaluation period: per sequence the first start is
`max(0, eval_from - window)` (forecast: the first forecast step is in the period) or
`max(0, eval_from - window + 1)` (step, last: the window's last step is), rounded up to the stride
grid, and the count and index arithmetic above start from there.

Modes:
- `step` (model head `step`): x = the window's features [B, W, F], y = its per-step targets
  [B, W, O] float32 or [B, W] int64;
- `forecast` (head `forecast`, horizon H >= 1, regression): x = the target history followed by the
  covariates, concat(targets[t : t + W], features[t : t + W]) [B, W, O + F]; y = the H steps of the
  targets that follow the window [B, H, O]; with future-known covariates (the source's
  `feature_roles` marks them "future"), also `future` = their values over those H steps [B, H, Ff];
- `last` (head `last`): x as in `step`, y = the targets of the window's last step [B, O] or [B].

In every mode a batch also carries its windows' series' static columns (`static_categories`,
`static_values`, see `dist_gru.data.statics`) where the source has them.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch

from dist_gru.data.files import DataFormatError

MODES = ("step", "forecast", "last")


def describe(source: Any) -> str:
    """How messages name a dataset: its folder, or the synthetic task's name."""
    path = getattr(source, "path", None)
    return str(path) if path is not None else f"synthetic {type(source).__name__}"


class WindowDataset(torch.utils.data.Dataset):
    """Every window `[t, t + window)` (start t a multiple of `stride`, with `horizon` steps after it
    inside the sequence) of every sequence of `source`, as a map-style dataset of padded batches.

    `source` is any dataset with per-step targets (`target_kind == "step"`), `lengths` and
    `read_steps(seq, starts, feature_steps, target_steps)`: a `SequenceFileDataset` of a step
    dataset, or a synthetic per-step task.
    """

    def __init__(
        self,
        source: Any,
        window: int,
        horizon: int = 0,
        stride: int = 1,
        mode: str | None = None,
        future_covariates: bool = True,
    ):
        # The argument checks guard the Python API (ValueError); a job's config has been validated
        # with the same rules before any dataset is built.
        mode = mode if mode is not None else ("forecast" if horizon > 0 else "step")
        where = describe(source)
        if mode not in MODES:
            raise ValueError(f"window mode {mode!r}; expected one of {', '.join(map(repr, MODES))}")
        for key, value, low in (("data.window", window, 1), ("data.horizon", horizon, 0), ("data.window_stride", stride, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key}={value!r}; expected an integer >= {low}")
        if getattr(source, "target_kind", "sequence") != "step":
            raise DataFormatError(
                f"{where}: has one target per sequence; data.window draws windows from sequences with per-step "
                "targets (write them with per-step target arrays, or `dist-gru prepare --csv ... --series`)"
            )
        if mode == "forecast":
            if horizon < 1:
                raise ValueError("data.horizon=0: forecast windows need data.horizon >= 1 steps to forecast")
            if source.task != "regression":
                raise DataFormatError(f"{where}: has {source.task} targets; forecasting needs regression targets")
        elif horizon:
            raise ValueError(
                f"data.horizon={horizon} with {mode} windows: a horizon means forecasting (model.head=forecast)"
            )
        if mode != "forecast" and source.num_features == 0:
            raise DataFormatError(
                f"{where}: has no input features (F = 0); {mode} windows read the features (only forecasting "
                "uses the target history as input)"
            )
        self.source, self.window, self.horizon, self.stride, self.mode = source, window, horizon, stride, mode
        lengths = np.asarray(source.lengths, dtype=np.int64)
        need = window + horizon
        self._first_start = _first_starts(getattr(source, "eval_from", None), len(lengths), window, stride, mode)
        counts = np.maximum(0, (lengths - need - self._first_start) // stride + 1)
        if counts.sum() == 0 and self._first_start.any():
            raise DataFormatError(
                f"{where}: no window of data.window={window} + data.horizon={horizon} steps has its targets in the "
                "evaluation period of any series (eval_from.npy); lower data.window or data.horizon"
            )
        if counts.sum() == 0:
            raise DataFormatError(
                f"{where}: data.window={window} + data.horizon={horizon} = {need} steps is longer than every "
                f"sequence (the longest has {int(lengths.max())} steps); lower data.window or data.horizon"
            )
        self._first = np.zeros(len(lengths) + 1, dtype=np.int64)  # window number of each sequence's first window
        np.cumsum(counts, out=self._first[1:])
        self.task: str = source.task
        self.num_classes: int | None = source.num_classes
        self.output_size: int = source.output_size
        self.target_kind = "sequence" if mode == "last" else "step"
        self.num_features: int = source.num_features + (source.output_size if mode == "forecast" else 0)
        # The feature columns whose values over the horizon come with a forecast window's batch.
        roles = getattr(source, "feature_roles", None) or ()
        read_future = mode == "forecast" and future_covariates
        self.future_columns = [i for i, role in enumerate(roles) if role == "future"] if read_future else []
        # The series' static columns, which every window of a series carries (dist_gru.data.statics).
        self.statics = getattr(source, "statics", None)

    def __len__(self) -> int:
        return int(self._first[-1])

    @property
    def future_channels(self) -> list[int]:
        """The channels of `x` (target history first) whose horizon values a batch's `future` holds."""
        return [self.output_size + column for column in self.future_columns]

    @property
    def lengths(self) -> np.ndarray:
        """int64 [num_windows]: every window's length (a read-only broadcast view, O(1) memory)."""
        return np.broadcast_to(np.int64(self.window), (len(self),))

    def __repr__(self) -> str:
        return (
            f"WindowDataset({describe(self.source)!r}, windows={len(self)}, window={self.window}, "
            f"horizon={self.horizon}, stride={self.stride}, mode={self.mode!r})"
        )

    def locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sequence, start step) of each window number in `index`."""
        index = np.asarray(index, dtype=np.int64)
        seq = np.searchsorted(self._first, index, side="right") - 1
        return seq, self._first_start[seq] + (index - self._first[seq]) * self.stride

    def __getitems__(self, indices: list[int]) -> dict:
        """One batch of windows (DataLoader's batched fast path; use `collate_identity`)."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if index.size and (index.min() < 0 or index.max() >= n):
            bad = int(index[(index < 0) | (index >= n)][0])
            raise IndexError(f"window {bad} out of range for a dataset of {n} windows")
        seq, starts = self.locate(index)
        return self.read_windows(seq, starts, index)

    def read_windows(self, seq: np.ndarray, starts: np.ndarray, index: np.ndarray) -> dict:
        """The batch of the windows that start at step `starts` of sequences `seq`, as a window of
        this dataset is read (any start, on the stride grid or not, with `window + horizon` steps
        inside its sequence); `index` [B] is the batch's `index`. Backtests read their origins here."""
        index = np.asarray(index, dtype=np.int64)
        window = self.window
        target_steps = window + self.horizon
        feature_steps = target_steps if self.future_columns else window
        features, targets = self.source.read_steps(seq, starts, feature_steps, target_steps)
        extra = {}
        if self.future_columns:
            future = features[:, window:, self.future_columns]
            extra["future"] = torch.from_numpy(np.ascontiguousarray(future, dtype=np.float32))
            features = features[:, :window]
        if self.mode == "forecast":
            x = np.concatenate([targets[:, :window], features], axis=2)
            y = targets[:, window:]
        elif self.mode == "step":
            x, y = features, targets
        else:
            x, y = features, targets[:, window - 1]
        return {
            "x": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            "lengths": torch.full((len(index),), window, dtype=torch.int64),
            "y": torch.from_numpy(np.ascontiguousarray(y)),
            "index": torch.from_numpy(index),
            **extra,
            **(self.statics.rows(seq) if self.statics is not None else {}),
        }

    def __getitem__(self, i: int) -> dict:
        i = operator.index(i)
        batch = self.__getitems__([i + len(self) if i < 0 else i])
        return {"x": batch["x"][0], "y": batch["y"][0], "index": int(batch["index"][0])}


def _first_starts(eval_from: np.ndarray | None, n: int, window: int, stride: int, mode: str) -> np.ndarray:
    """Per sequence, the first window start: 0, or with `eval_from` (a validation split that carries
    its history) the first start on the stride grid whose window reaches the evaluation period:
    forecast windows whose first forecast step t + window is >= eval_from, step and last windows
    whose last step t + window - 1 is >= eval_from."""
    if eval_from is None:
        return np.zeros(n, dtype=np.int64)
    lead = window if mode == "forecast" else window - 1
    first = np.maximum(0, np.asarray(eval_from, dtype=np.int64) - lead)
    return -(-first // stride) * stride  # rounded up to the stride grid



def context_at_end(source: Any, seq: np.ndarray, window: int) -> dict:
    """The forecast context at the end of each series `seq` of `source`, as a forecast window's
    batch holds it: `x` = its last `window` steps of target history and covariates [B, W, O + F]
    (every series at least `window` steps long), `lengths`, `index` = the series, and the series'
    static columns where `source.statics` holds them."""
    seq = np.asarray(seq, dtype=np.int64)
    lengths = np.asarray(source.lengths, dtype=np.int64)[seq]
    features, targets = source.read_steps(seq, lengths - window, window, window)
    history = targets.reshape(len(seq), window, -1)
    return {
        "x": torch.from_numpy(np.ascontiguousarray(np.concatenate([history, features], axis=-1), dtype=np.float32)),
        "lengths": torch.full((len(seq),), window, dtype=torch.int64),
        "index": torch.from_numpy(seq),
        **(source.statics.rows(seq) if getattr(source, "statics", None) is not None else {}),
    }

# ------------------------------------------------------------------------------ memory benchmark
