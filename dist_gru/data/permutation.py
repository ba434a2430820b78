"""A keyed permutation of [0, n) that costs O(1) memory: evaluate it on the positions you need.

    perm = FeistelPermutation(10**8, key=42)
    perm(np.arange(64))          # the first 64 entries of a random order of 10^8 sample ids

An epoch's order over 10^8 windows as an array (`rng.permutation`) is 800 MB per rank; this
computes any slice of the same kind of order on demand, vectorised in numpy. It is a balanced
Feistel network over [0, 2^(2h)) (the smallest even bit width that holds n) whose round function is
SplitMix64 of the half-block and a round key; values that land outside [0, n) are encrypted again
until they land inside ("cycle-walking", Black & Rogaway 2002), which keeps it a bijection of
[0, n). The domain is less than 4n, so on average fewer than 4 encryptions are needed per value.
"""

from __future__ import annotations

import numpy as np

from dist_gru.data.synthetic import _keys, _splitmix64

_ROUNDS = 6  # 4 rounds already give a pseudo-random permutation (Luby-Rackoff); 2 more for margin


class FeistelPermutation:
    """A bijection of [0, n) that is a pure function of (n, key, stream)."""

    def __init__(self, n: int, key: int, stream: int = 0):
        if n < 1:
            raise ValueError(f"n={n}; a permutation needs at least one element")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.round_keys = _keys(key, np.arange(_ROUNDS, dtype=np.uint64), stream)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half)
        left, right = x >> shift, x & self.mask
        for key in self.round_keys:
            left, right = right, left ^ (_splitmix64(right ^ key) & self.mask)
        return (left << shift) | right

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
