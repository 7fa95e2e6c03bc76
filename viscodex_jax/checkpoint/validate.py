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


def all_finite(array: np.ndarray, block: int = 2**20) -> bool:
    """No NaN/Inf in a float array, tested a block at a time into one small mask.

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
