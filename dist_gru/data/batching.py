"""Padded batches: the one place that turns a list of sequences into model input.

A batch is a dict: `x` float32 [B, T_max, F] zero-padded, `lengths` int64 [B] (kept on the CPU:
packing wants them there), `y` float32 [B, O] or int64 [B] per sequence, or per step float32
[B, T_max, O] or int64 [B, T_max] zero-padded (consumers mask with `lengths`), `index` int64 [B]
(global sample ids, which tests use to prove that no sample is trained twice or skipped), and for
forecast windows with future-known covariates `future` float32 [B, horizon, Ff], and for series
with static columns `static_categories` int64 [B, Sc] and `static_values` float32 [B, Sn].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def pad_steps(arrays: Sequence[np.ndarray], lengths: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Copy each [T_i, ...] array once into a preallocated zero-padded [B, T_max, ...] array."""
    x = np.zeros((len(arrays), int(lengths.max()), *arrays[0].shape[1:]), dtype=dtype)
    for row, seq in enumerate(arrays):
        x[row, : len(seq)] = seq
    return x


def pad_batch(
    sequences: Sequence[np.ndarray], targets: np.ndarray | Sequence[np.ndarray] | None, indices: Sequence[int]
) -> dict:
    """One batch: sequences zero-padded; `targets` an array [B, ...] (one per sequence) or a list of
    per-step arrays [T_i] / [T_i, O], padded like the sequences; None: unlabelled, no `y`."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    if targets is None:
        return {
            "x": torch.from_numpy(pad_steps(sequences, lengths)),
            "lengths": torch.from_numpy(lengths),
            "index": torch.as_tensor(np.asarray(indices, dtype=np.int64)),
        }
    if isinstance(targets, np.ndarray):
        y = np.ascontiguousarray(targets)
    else:
        y = pad_steps(targets, lengths, dtype=targets[0].dtype)
    return {
        "x": torch.from_numpy(pad_steps(sequences, lengths)),
        "lengths": torch.from_numpy(lengths),
        "y": torch.from_numpy(y),
        "index": torch.as_tensor(np.asarray(indices, dtype=np.int64)),
    }


# The batch entries that go to the model as they are, where a batch has them.
OPTIONAL_INPUTS = ("future", "static_categories", "static_values")


def model_inputs(batch: dict, device: torch.device) -> dict[str, Any]:
    """A batch's keyword arguments of the model: `x` (and `future`, `static_categories`,
    `static_values`, where the batch has them) on `device`, `lengths` on the CPU (packing reads
    them there)."""
    non_blocking = device.type == "cuda"
    inputs = {"x": batch["x"].to(device, non_blocking=non_blocking), "lengths": batch["lengths"]}
    for name in OPTIONAL_INPUTS:
        if name in batch:
            inputs[name] = batch[name].to(device, non_blocking=non_blocking)
    return inputs


def collate_identity(batch: dict) -> dict:
    """The DataLoader collate_fn for datasets whose `__getitems__` already returns a batch."""
    return batch
