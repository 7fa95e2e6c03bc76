"""Value checks shared by loading, converting and merging: float dtypes and finiteness."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

# numpy files bfloat16 and float8 as kind "V", so np.issubdtype(x, np.floating) misses them.
_EXTRA_FLOATS = frozenset(np.dtype(d) for d in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2))


def is_float_dtype(dtype: Any) -> bool:
    dt = np.dtype(dtype)
    return dt.kind == "f" or dt in _EXTRA_FLOATS


def count_nonfinite(array: Any) -> int:
    """NaN/Inf entries of a float array (0 for other dtypes, which cannot hold them)."""
    a = np.asarray(array)
    if not is_float_dtype(a.dtype):
        return 0
    return int(a.size - np.count_nonzero(np.isfinite(a)))
