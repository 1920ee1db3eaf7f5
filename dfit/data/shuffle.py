"""The shuffle of a pass as a function: ``row = perm(position; n, seed, pass)``, computed only where it is needed.

``perm`` is a pseudorandom bijection of ``[0, n)``: a keyed Feistel network over ``[0, 2**bits)``, with
``2**bits`` the smallest power of two >= ``n`` (the two halves take ``bits // 2`` and ``bits - bits // 2``
bits and swap widths each round, so no domain is more than twice ``n``), then cycle walking: a result
``>= n`` is enciphered again until it falls in ``[0, n)``, which keeps the map a bijection of ``[0, n)``.
The round keys come from ``(seed mod 2**32, pass)`` through splitmix64, the round function is a
multiply-xorshift hash, and everything is 64-bit unsigned integer arithmetic (NumPy, wrapping), so the
result is the same bits on every machine, rank and world size, with no setup and no state per pass.

Why not Grain's ``index_shuffle`` (a Simon-cipher Feistel with cycle walking, the same idea): it is a C++
function of ONE index per call (a Python loop per row), behind a new dependency with its own wheels, and it
takes a 32-bit seed, so ``(seed, pass)`` would need hashing anyway; written out here it is ~40 lines of
vectorised NumPy that computes a whole part of a global batch in one call and that we can test exhaustively.
"""
from __future__ import annotations

import numpy as np
import torch

ROUNDS = 8
MAX_ROWS = 2 ** 62
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def round_keys(seed: int, pass_index: int) -> tuple[int, ...]:
    """The ``ROUNDS`` 64-bit keys of pass ``pass_index``: splitmix64 started at ``(seed mod 2**32) << 32 | pass``."""
    if not 0 <= pass_index < 2 ** 32:
        raise ValueError(f"pass_index must be in [0, 2**32), got {pass_index}")
    state = ((int(seed) & 0xFFFFFFFF) << 32) | int(pass_index)
    keys = []
    for _ in range(ROUNDS):
        state = (state + _GOLDEN) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        keys.append(z ^ (z >> 31))
    return tuple(keys)


def _encipher(x: np.ndarray, bits: int, keys: tuple[int, ...]) -> np.ndarray:
    """The Feistel permutation of ``[0, 2**bits)`` applied to ``x`` (uint64, modified in place and returned).

    Each round splits ``x`` into a high part ``L`` of ``hi`` bits and a low part ``R`` of ``lo`` bits and makes
    ``(R, L ^ F(R))``: ``R`` becomes the high part, so the widths swap every round."""
    hi, lo = bits // 2, bits - bits // 2
    for key in keys:
        left = x >> np.uint64(lo)
        x &= np.uint64((1 << lo) - 1)                  # x is now R
        if hi:
            f = x ^ np.uint64(key)                     # F(R) = the top `hi` bits of a multiply-xorshift hash
            f *= _MIX1
            f ^= f >> np.uint64(32)
            f *= _MIX2
            f >>= np.uint64(64 - hi)
            left ^= f
            x <<= np.uint64(hi)
            x |= left
        else:                                          # a 1-bit domain: L is empty, the round is a key-chosen flip
            x ^= np.uint64(key >> 63)
        hi, lo = lo, hi
    return x


def perm(positions, n: int, seed: int, pass_index: int):
    """Rows at ``positions`` (ints in ``[0, n)``) of the shuffle of pass ``pass_index``: a bijection of ``[0, n)``.

    ``positions`` is a NumPy array or a torch tensor of integers; the result is int64 of the same kind and
    shape. The cost is linear in ``len(positions)`` and independent of ``n``; nothing is kept between calls."""
    as_torch = isinstance(positions, torch.Tensor)
    pos = positions.numpy() if as_torch else np.asarray(positions)
    if not 0 <= n <= MAX_ROWS:
        raise ValueError(f"n must be in [0, 2**62], got {n}")
    if pos.dtype.kind not in "iu":
        raise TypeError(f"positions must be integers, got dtype {pos.dtype}")
    if pos.size and (int(pos.min()) < 0 or int(pos.max()) >= n):
        raise ValueError(f"positions must lie in [0, {n}); got values in [{int(pos.min())}, {int(pos.max())}]")
    out = pos.reshape(-1).astype(np.uint64)            # a copy: the caller's array is never modified
    bits = (n - 1).bit_length()
    if bits:
        keys = round_keys(seed, pass_index)
        _encipher(out, bits, keys)
        walking = np.flatnonzero(out >= np.uint64(n))  # cycle walking, only where still out of range
        while walking.size:
            again = _encipher(out[walking], bits, keys)
            out[walking] = again
            walking = walking[again >= np.uint64(n)]
    out = out.astype(np.int64).reshape(pos.shape)
    return torch.from_numpy(out) if as_torch else out
