"""Dropout between GRU layers whose masks are a function of the sample, not of the process.

    python -c "import torch; from dist_gru.model.dropout import KeyedDropout, sample_keys; \
d = KeyedDropout(0.5, sample_keys(0, 3, torch.tensor([7, 8])), torch.tensor([2, 3])); print(d(1, torch.ones(3, 2, 4)))"

``F.dropout`` (and ``nn.GRU``'s own dropout) draw masks from the process's RNG, so with N
processes every rank draws its own: N processes would no longer train what 1 process trains, and a
resume on another world size would be another run. Here each sequence's mask comes from a generator
of its own, seeded by its key (``sample_keys``: a function of the seed, the optimizer step and the
sample's global index) and the layer, and covers the sequence's valid steps only. So the mask a
sample gets does not depend on the rank, the micro-batch, the other sequences of its batch or the
padding. The cost is one small generator call per sequence and layer.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

_MASK = (1 << 63) - 1  # seeds stay in torch.manual_seed's non-negative int64 range
_SAMPLE = 0x9E3779B97F4A7C15  # odd multipliers (splitmix64's): neighbouring ids get distant seeds
_LAYER = 0xBF58476D1CE4E5B9


def sample_keys(seed: int, step: int, index: Tensor) -> Tensor:
    """int64 [B]: the key of each sample ``index`` [B] (global ids) at optimizer step ``step``."""
    base = np.uint64(((seed * 1_000_003 + step) * 4099) & _MASK)
    ids = index.numpy().astype(np.uint64)  # uint64 arithmetic wraps modulo 2**64, by definition
    return torch.from_numpy(((ids * np.uint64(_SAMPLE) + base) & np.uint64(_MASK)).astype(np.int64))


class KeyedDropout:
    """``drop(layer, x)``: dropout with probability ``p`` on a time-major layer input ``x`` [T, B, W],
    row b's mask drawn from (``keys[b]``, ``layer``) over its first ``lengths[b]`` steps (None: all
    T); steps past a sequence's length are left as they are (nothing reads them)."""

    def __init__(self, p: float, keys: Tensor, lengths: Tensor | None) -> None:
        self.p, self.keys, self.lengths = p, keys.tolist(), None if lengths is None else lengths.tolist()

    def __call__(self, layer: int, x: Tensor) -> Tensor:
        steps, batch, width = x.shape
        if len(self.keys) != batch:
            raise ValueError(f"{len(self.keys)} dropout keys for a batch of {batch} sequences")
        keep = torch.ones(steps, batch, width, dtype=torch.bool, device=x.device)
        generator = torch.Generator(device=x.device)
        for row, key in enumerate(self.keys):
            valid = steps if self.lengths is None else self.lengths[row]
            generator.manual_seed((key + layer * _LAYER) & _MASK)
            keep[:valid, row] = torch.rand(valid, width, generator=generator, device=x.device) >= self.p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))
