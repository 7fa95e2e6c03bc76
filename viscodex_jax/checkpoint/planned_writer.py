"""A safetensors writer for outputs whose names, dtypes and shapes are known before any data: HF-named shards
laid out up front, each tensor (or a byte range of it) written straight to its place in its file.

``safetensors_io.ShardedWriter`` buffers a whole shard (500 MB-5 GB) before writing it; when the merge knows
every output tensor from the headers, it does not need to: ``PlannedWriter`` writes each piece with ``pwrite``
as soon as it exists, so host memory holds no output beyond the piece in hand, and there is one copy (into the
page cache) per byte. Shards are split exactly as ``ShardedWriter`` splits them (a new shard when the next
tensor would pass ``max_shard_bytes``), so the output files are the same. No ``fsync``: like the rest of the
project's writers, durability is the caller's ``atomic_dir`` rename.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from viscodex_jax.checkpoint.safetensors_io import CheckpointError, dtype_name


def open_shard(path: str) -> int:
    """Creates one shard file (a hook: tests make it fail as a full disk would)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)


class PlannedWriter:
    """``entries``: (name, dtype, shape) of every output tensor, in the order they will be written."""

    def __init__(self, out_dir: str, entries: Sequence[tuple[str, Any, Sequence[int]]],
                 max_shard_bytes: int = 5 * 2**30, metadata: Mapping[str, str] | None = None):
        if not entries:
            raise CheckpointError("no tensors were written")
        self.out_dir = out_dir
        metadata = dict(metadata or {"format": "pt"})
        shards: list[list[tuple[str, np.dtype, tuple[int, ...], int]]] = [[]]
        size = 0
        seen = set()
        for name, dtype, shape in entries:
            if name in seen:
                raise CheckpointError(f"tensor {name!r} written twice")
            seen.add(name)
            dt, shape = np.dtype(dtype), tuple(int(s) for s in shape)
            nbytes = math.prod(shape) * dt.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, dt, shape, nbytes))
            size += nbytes
        n = len(shards)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                           for i in range(n)]
        self.total_size = 0
        # name -> (shard index, absolute byte offset in its file, nbytes)
        self._where: dict[str, tuple[int, int, int]] = {}
        self._headers: list[bytes] = []
        self._left: list[int] = []  # bytes still to write per shard; the file is closed at 0
        for i, tensors in enumerate(shards):
            header: dict[str, Any] = {"__metadata__": metadata}
            offset = 0
            for name, dt, shape, nbytes in tensors:
                header[name] = {"dtype": dtype_name(dt), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * ((-len(raw)) % 8)  # tensor data 8-byte aligned for mmap readers, as write_safetensors
            head = len(raw).to_bytes(8, "little") + raw
            start = len(head)
            for name, dt, shape, nbytes in tensors:
                self._where[name] = (i, start, nbytes)
                start += nbytes
            self._headers.append(head)
            self._left.append(offset)
            self.total_size += offset
        self._expected = {name: (np.dtype(dt), tuple(int(s) for s in shape)) for name, dt, shape in entries}
        self._done: dict[str, int] = {}
        self._fds: dict[int, int] = {}
        self._created: set[int] = set()

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            if shard in self._created:
                raise CheckpointError(f"{self.names[shard]}: written to after it was complete")
            fd = self._fds[shard] = open_shard(os.path.join(self.out_dir, self.names[shard]))
            self._created.add(shard)
            self._pwrite(fd, self._headers[shard], 0)
        return fd

    @staticmethod
    def _pwrite(fd: int, data: Any, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def write(self, name: str, array: Any, start: int = 0) -> None:
        """Writes ``array`` (C-contiguous) as elements ``start..`` of tensor ``name`` (flat, C order)."""
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} is not in the planned output")
        dt, shape = self._expected[name]
        a = np.ascontiguousarray(array)
        if a.dtype != dt:
            raise CheckpointError(f"tensor {name!r}: planned as {dt}, written as {a.dtype}")
        shard, offset, nbytes = self._where[name]
        lo = start * dt.itemsize
        if lo + a.nbytes > nbytes:
            raise CheckpointError(f"tensor {name!r}: elements {start}..{start + a.size} are past its shape "
                                  f"{list(shape)}")
        if a.nbytes:
            self._pwrite(self._fd(shard), a.reshape(-1).view(np.uint8), offset + lo)
        self._done[name] = self._done.get(name, 0) + a.nbytes
        self._left[shard] -= a.nbytes
        if self._left[shard] == 0 and shard in self._fds:
            os.close(self._fds.pop(shard))

    def finish(self) -> list[str]:
        """Checks every tensor was written whole and writes the index; returns the file names."""
        for name, (shard, _, nbytes) in self._where.items():
            if self._done.get(name, 0) != nbytes:
                raise CheckpointError(f"tensor {name!r}: {self._done.get(name, 0)} of its {nbytes} bytes written")
        for shard in range(len(self.names)):
            if shard not in self._created:  # only empty tensors: the file is its header
                self._fd(shard)
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        if len(self.names) > 1:
            weight_map = {name: self.names[shard] for name, (shard, _, _) in self._where.items()}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        return list(self.names)

    def abort(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
