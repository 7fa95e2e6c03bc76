"""Value checks shared by loading, converting and merging: float dtypes and finiteness."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from viscodex_jax.checkpoint.safetensors_io import CheckpointError

# numpy files bfloat16 and float8 as kind "V", so np.issubdtype(x, np.floating) misses them.
_EXTRA_FLOATS = frozenset(np.dtype(d) for d in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2))


def is_float_dtype(dtype: Any) -> bool:
    dt = np.dtype(dtype)
    return dt.kind == "f" or dt in _EXTRA_FLOATS


UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

# An IEEE float is NaN/Inf exactly when its exponent bits are all ones: with the sign bit masked off, its bits as
# an unsigned integer are at least the exponent mask. An integer max per block is several times faster than
# numpy's isfinite on bfloat16 (an ml_dtypes loop).
_EXPONENT = {np.dtype(ml_dtypes.bfloat16): 0x7F80, np.dtype(np.float16): 0x7C00, np.dtype(np.float32): 0x7F800000,
             np.dtype(np.float64): 0x7FF0000000000000}


def isfinite_blocks(array: np.ndarray, block: int = 2**20) -> bool:
    """No NaN/Inf, by ``np.isfinite`` a block at a time into one small mask (any float format, any layout).

    A whole-array ``np.isfinite`` allocates a fresh mask as large as the tensor: its page faults
    cost several times the test itself.
    """
    flat = np.asarray(array).reshape(-1)
    mask = np.empty(min(block, flat.size), bool)
    for i in range(0, flat.size, block):
        part = flat[i:i + block]
        if not np.isfinite(part, out=mask[:part.size]).all():
            return False
    return True


def all_finite(array: np.ndarray, block: int = 2**20) -> bool:
    """No NaN/Inf in a float array: an integer test of the exponent bits for contiguous IEEE floats,
    ``isfinite_blocks`` otherwise (float8 formats, strided views)."""
    array = np.asarray(array)
    exponent = _EXPONENT.get(array.dtype)
    if exponent is None or not array.flags.c_contiguous:
        return isfinite_blocks(array, block)
    uint = UINT_OF_SIZE[array.dtype.itemsize]
    flat = array.reshape(-1).view(uint)
    magnitude = uint(np.iinfo(uint).max >> 1)  # all bits but the sign
    scratch = np.empty(min(block, flat.size), uint)
    for i in range(0, flat.size, block):
        part = scratch[:min(block, flat.size - i)]
        np.bitwise_and(flat[i:i + block], magnitude, out=part)
        if part.max() >= exponent:
            return False
    return True


def count_nonfinite(array: Any) -> int:
    """NaN/Inf entries of a float array (0 for other dtypes, which cannot hold them)."""
    a = np.asarray(array)
    if not is_float_dtype(a.dtype) or all_finite(a):  # the common case without a full-size mask
        return 0
    return int(a.size - np.count_nonzero(np.isfinite(a)))


def check_tensor_finite(array: np.ndarray, where: str, source: np.ndarray | None = None) -> None:
    """Raises CheckpointError naming ``where`` if ``array`` holds NaN/Inf.

    ``source`` is the array before a dtype cast: when it was finite, the cast overflowed.
    """
    bad = count_nonfinite(array)
    if bad:
        cause = (f" after casting to {array.dtype} (the values overflow it)"
                 if source is not None and source.dtype != array.dtype and not count_nonfinite(source) else "")
        raise CheckpointError(f"{where}: {bad} of {array.size} values are NaN/Inf{cause} "
                              "(pass check_finite=False / --nocheck_finite to load it anyway)")
