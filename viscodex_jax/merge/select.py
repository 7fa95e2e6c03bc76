"""Exact k-th largest magnitudes of a tensor too big to hold as float32: two streamed passes, bounded memory.

Non-negative float32 values order as their uint32 bit patterns, so the top 16 bits of each magnitude
(sign, exponent, 7 mantissa bits) are a monotone bucket key. Pass one counts the keys (a 65536-bin histogram
per model); the histogram names, for each rank, the one bucket that holds it and how many values lie below
that bucket. Pass two keeps only the values in those buckets (for TIES' median cut about 1% of the tensor),
and a partition of them gives the rank's value: the same float32 that ``methods.select_kth_largest`` finds by
partitioning the whole tensor, without the float32 copy of it (2 GB per model for a 7B embedding).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

BINS = 1 << 16


def key_of(values: np.ndarray) -> np.ndarray:
    """The bucket key (top 16 bits) of non-negative float32 values, as the jitted passes compute it."""
    return (np.ascontiguousarray(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def targets(hist: np.ndarray, size: int, ranks: Sequence[int]) -> list[tuple[int, int] | None]:
    """Per rank k (1-based, largest first): (bucket holding the k-th largest value, its index among that
    bucket's values in ascending order), or None for a rank outside 1..size (no bucket needed)."""
    cum = np.cumsum(hist)
    out = []
    for k in ranks:
        if not 1 <= k <= size:
            out.append(None)
            continue
        j = size - k  # ascending index of the k-th largest
        b = int(np.searchsorted(cum, j, side="right"))
        out.append((b, j - (int(cum[b - 1]) if b else 0)))
    return out


def pick(candidates: np.ndarray, size: int, ranks: Sequence[int],
         where: Sequence[tuple[int, int] | None]) -> np.ndarray:
    """The ranks' values from the values of their buckets (``candidates``, any order): float32 [len(ranks)],
    +inf for rank 0 and -inf past the size, as ``select_kth_largest``."""
    keys = key_of(candidates)
    out = np.empty(len(ranks), np.float32)
    for r, (k, t) in enumerate(zip(ranks, where)):
        if t is None:
            out[r] = np.inf if k < 1 else -np.inf
            continue
        bucket, index = t
        vals = candidates[keys == bucket]
        if index >= vals.size:
            raise RuntimeError(f"bucket {bucket} holds {vals.size} values but rank {k} needs index {index}: the two "
                               "passes saw different magnitudes")
        vals.partition(index)
        out[r] = vals[index]
    return out
