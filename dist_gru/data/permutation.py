"""A keyed permutation of [0, n) that costs O(1) memory: evaluate it on the positions you need.

    perm = FeistelPermutation(10**8, key=42)
    perm(np.arange(64))          # the first 64 entries of a random order of 10^8 sample ids

An epoch's order over 10^8 windows as an array (`rng.permutation`) is 800 MB per rank; this
computes any slice of the same kind of order on demand, vectorised in numpy. It is a Feistel
network over [0, 2^b), b the smallest bit width that holds n, split into a high and a low part
(unequal when b is odd) that take turns: each round XORs one part with SplitMix64 of the other part
and a round key, masked to its width, which is invertible whatever the widths. Values that land
outside [0, n) are encrypted again until they land inside ("cycle-walking", Black & Rogaway 2002),
which keeps it a bijection of [0, n); the domain is less than 2n, so on average fewer than 2
encryptions are needed per value.
"""

from __future__ import annotations

import numpy as np

from dist_gru.data.synthetic import sample_keys, splitmix64

_ROUNDS = 6  # each round updates one part; 4 make a pseudo-random permutation (Luby-Rackoff), 2 for margin


class FeistelPermutation:
    """A bijection of [0, n) that is a pure function of (n, key, stream)."""

    def __init__(self, n: int, key: int, stream: int = 0):
        if n < 1:
            raise ValueError(f"n={n}; a permutation needs at least one element")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self.low_bits = bits // 2
        self.low_mask = np.uint64((1 << self.low_bits) - 1)
        self.high_mask = np.uint64((1 << (bits - self.low_bits)) - 1)
        self.round_keys = sample_keys(key, np.arange(_ROUNDS, dtype=np.uint64), stream).tolist()

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.low_bits)
        high, low = x >> shift, x & self.low_mask
        for r, key in enumerate(self.round_keys):
            if r % 2 == 0:
                high = high ^ (splitmix64(low ^ np.uint64(key)) & self.high_mask)
            else:
                low = low ^ (splitmix64(high ^ np.uint64(key)) & self.low_mask)
        return (high << shift) | low

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The permuted values (int64) at `positions` (integers in [0, n), any shape)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.n):
            raise IndexError(f"positions must be in [0, {self.n})")
        out = self._encrypt(positions.astype(np.uint64).reshape(-1))
        n = np.uint64(self.n)
        outside = np.flatnonzero(out >= n)
        while outside.size:
            out[outside] = self._encrypt(out[outside])
            outside = outside[out[outside] >= n]
        return out.astype(np.int64).reshape(positions.shape)
