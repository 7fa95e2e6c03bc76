"""One tensor of a safetensors file, read by element range straight into a caller's buffer.

The streamed merge reads each input chunk into a reused, 64-byte-aligned staging buffer (the alignment
XLA:CPU needs to take a numpy argument without a copy). ``pread`` into that buffer is the one copy out of
the page cache; a memory map instead page-faults every page in and out again (most of the merge's
system time), and still needs the copy to align it.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from viscodex_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFile


class FileTensor:
    """Shape, dtype and byte range of a tensor (or of a run of its rows) in a file, read on demand."""

    def __init__(self, path: str, offset: int, dtype: Any, shape: tuple[int, ...]):
        self.path, self.offset, self.dtype, self.shape = path, offset, np.dtype(dtype), tuple(shape)

    @classmethod
    def of(cls, f: SafetensorsFile, name: str) -> "FileTensor":
        # The header was validated by SafetensorsFile (offsets inside the file, shape matching the bytes).
        dt, shape, begin, _ = f._entries[name]
        return cls(f.path, f._data_start + begin, dt, shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def rows(self, lo: int, hi: int) -> "FileTensor":
        """Rows ``lo:hi`` (axis 0): a contiguous byte range of the same file."""
        lo, hi = max(0, min(lo, self.shape[0])), max(0, min(hi, self.shape[0]))
        hi = max(hi, lo)
        row = math.prod(self.shape[1:]) * self.dtype.itemsize
        return FileTensor(self.path, self.offset + lo * row, self.dtype, (hi - lo,) + self.shape[1:])

    def __getitem__(self, index):
        if isinstance(index, slice) and index.step in (None, 1) and self.ndim:
            lo, hi, _ = index.indices(self.shape[0])
            return self.rows(lo, hi)
        return np.asarray(self)[index]

    def read_into(self, out: np.ndarray, lo: int = 0, hi: int | None = None) -> None:
        """Elements ``lo:hi`` (flat, C order) into ``out`` (contiguous, ``hi - lo`` elements of this dtype)."""
        hi = self.size if hi is None else hi
        view = memoryview(out.reshape(-1).view(np.uint8))
        want = (hi - lo) * self.dtype.itemsize
        if view.nbytes != want:
            raise ValueError(f"{self.path}: buffer of {view.nbytes} bytes for {want}")
        pos = self.offset + lo * self.dtype.itemsize
        fd = os.open(self.path, os.O_RDONLY)
        try:
            while view.nbytes:
                got = os.preadv(fd, [view], pos)
                if got <= 0:
                    raise CheckpointError(f"{self.path}: short read at byte {pos} ({view.nbytes} bytes missing)")
                view, pos = view[got:], pos + got
        finally:
            os.close(fd)

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.shape, self.dtype)
        self.read_into(out)
        return out if dtype is None else out.astype(dtype)

    def astype(self, dtype) -> np.ndarray:
        return np.asarray(self).astype(dtype)
