"""Padded batches: the one place that turns a list of sequences into model input.

A batch is a dict: `x` float32 [B, T_max, F] zero-padded, `lengths` int64 [B] (kept on the CPU:
packing wants them there), `y` float32 [B, O] or int64 [B], `index` int64 [B] (global sample ids,
which tests use to prove that no sample is trained twice or skipped).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def pad_batch(sequences: Sequence[np.ndarray], targets: np.ndarray, indices: Sequence[int]) -> dict:
    """Copy each [T_i, F] sequence once into a preallocated zero-padded [B, T_max, F] array."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    x = np.zeros((len(sequences), int(lengths.max()), sequences[0].shape[1]), dtype=np.float32)
    for row, seq in enumerate(sequences):
        x[row, : len(seq)] = seq
    return {
        "x": torch.from_numpy(x),
        "lengths": torch.from_numpy(lengths),
        "y": torch.from_numpy(np.ascontiguousarray(targets)),
        "index": torch.as_tensor(np.asarray(indices, dtype=np.int64)),
    }


def collate_identity(batch: dict) -> dict:
    """The DataLoader collate_fn for datasets whose `__getitems__` already returns a batch."""
    return batch
