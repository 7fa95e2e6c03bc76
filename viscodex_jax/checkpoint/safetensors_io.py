"""Safetensors read/write, one tensor at a time, with strict validation.

The format is an 8-byte little-endian header length, a JSON header mapping
tensor names to dtype/shape/byte offsets, then raw little-endian data. We parse
it ourselves (rather than safe_open(framework="numpy")) because numpy has no
bfloat16 there, and because validating the header up front lets a truncated or
corrupt file fail with its name and the offending tensor before any work.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or directory that does not hold what it should."""


def dtype_name(dtype: Any) -> str:
    dt = np.dtype(dtype)
    if dt not in _NAMES:
        raise CheckpointError(f"dtype {dt} cannot be stored in safetensors")
    return _NAMES[dt]


class SafetensorsFile:
    """Lazy reader: parses and validates the header; reads tensors on demand."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open safetensors file ({e.strerror})") from e
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            n = int.from_bytes(head, "little")
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: corrupt safetensors header length {n} (file has {size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
        self._data_start = 8 + n
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            self._entries[name] = self._parse_entry(name, e, size)
        self._check_disjoint()

    def _parse_entry(self, name: str, e: Any, size: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise CheckpointError(f"{where}: malformed header entry {e!r} (needs dtype, shape, data_offsets)")
        if e["dtype"] not in DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {e['dtype']!r} (expected one of {', '.join(DTYPES)})")
        dt = DTYPES[e["dtype"]]
        shape, offsets = e["shape"], e["data_offsets"]
        # bool is an int subclass, and int() would quietly accept 2.5 or "3": demand real integers.
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of integers")
        if any(s < 0 for s in shape):
            raise CheckpointError(f"{where}: shape {shape} has a negative dimension")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a [begin, end] pair of integers")
        begin, end = offsets
        if begin < 0 or end < begin:
            raise CheckpointError(f"{where}: data_offsets {offsets} is not a byte range (need 0 <= begin <= end)")
        if end - begin != math.prod(shape) * dt.itemsize:
            raise CheckpointError(
                f"{where}: byte range {begin}..{end} ({end - begin} bytes) does not fit shape {shape} of {e['dtype']} "
                f"({math.prod(shape) * dt.itemsize} bytes)"
            )
        if self._data_start + end > size:
            raise CheckpointError(
                f"{where}: truncated file: data ends at byte {self._data_start + end} but the file has {size} bytes"
            )
        return dt, tuple(shape), begin, end

    def _check_disjoint(self) -> None:
        """Two tensors sharing bytes would each read the other's data: refuse overlapping ranges."""
        spans = sorted((b, e, n) for n, (_, _, b, e) in self._entries.items() if e > b)
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise CheckpointError(
                    f"{self.path}: tensors {n0!r} (bytes {b0}..{e0}) and {n1!r} (bytes {b1}..{e1}) overlap; "
                    "each tensor needs its own byte range"
                )

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def nbytes(self, name: str) -> int:
        _, _, b, e = self._entries[name]
        return e - b

    def read(self, name: str) -> np.ndarray:
        """Reads one tensor into a fresh array (a single copy from the file)."""
        if name not in self._entries:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        dt, shape, begin, end = self._entries[name]
        out = np.empty(shape, dt)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != end - begin:
            raise CheckpointError(f"{self.path}: tensor {name!r}: short read ({got} of {end - begin} bytes)")
        return out


    def view(self, name: str) -> np.ndarray:
        """The tensor as a read-only array over a memory map of its bytes: no copy, pages are read from the
        page cache on first touch, and the mapping lives as long as the array (or a view of it) does."""
        if name not in self._entries:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        dt, shape, begin, end = self._entries[name]
        if end == begin:
            return np.empty(shape, dt)
        start = self._data_start + begin
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), self._data_start + end - aligned, offset=aligned, access=mmap.ACCESS_READ)
        return np.frombuffer(mapped, dt, count=math.prod(shape), offset=start - aligned).reshape(shape)


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Writes tensors to ``path`` (the caller makes the directory atomic)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, a in tensors.items():
        nbytes = a.size * a.dtype.itemsize
        header[name] = {"dtype": dtype_name(a.dtype), "shape": list(a.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)  # keep tensor data 8-byte aligned for mmap readers
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for a in tensors.values():
            f.write(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))


class ShardedWriter:
    """Buffers tensors up to ``max_shard_bytes`` and flushes them as HF-named shards.

    Peak memory is one shard. Names are provisional until :meth:`finish`,
    because HF shard names carry the total count (model-00001-of-00004).
    """

    def __init__(self, out_dir: str, max_shard_bytes: int = 5 * 2**30, metadata: Mapping[str, str] | None = None):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.metadata = dict(metadata or {"format": "pt"})
        self._buf: dict[str, np.ndarray] = {}
        self._buf_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.total_size = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self._buf or any(name in names for _, names in self._shards):
            raise CheckpointError(f"tensor {name!r} written twice")
        nbytes = array.size * array.dtype.itemsize
        if self._buf and self._buf_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._buf[name] = array
        self._buf_bytes += nbytes
        self.total_size += nbytes

    def flush(self) -> None:
        if not self._buf:
            return
        tmp = os.path.join(self.out_dir, f".shard-{len(self._shards):05d}.safetensors")
        write_safetensors(tmp, self._buf, self.metadata)
        self._shards.append((tmp, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0

    def finish(self) -> list[str]:
        """Renames shards to their final names and writes the index; returns the file names."""
        self.flush()
        n = len(self._shards)
        if n == 0:
            raise CheckpointError("no tensors were written")
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (tmp, tensors), final in zip(self._shards, names):
            os.replace(tmp, os.path.join(self.out_dir, final))
            weight_map.update({t: final for t in tensors})
        if n > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        return names


def _check_inside(index_path: str, name: str, fname: Any) -> None:
    """Index entries name files in the checkpoint dir: no absolute paths and no ``..`` out of it.

    Judged on the name, not on realpath: the HF hub cache keeps each file as a
    symlink into ``../../blobs``, and those are the checkpoint's own files.
    """
    if not isinstance(fname, str) or not fname:
        raise CheckpointError(f"{index_path}: tensor {name!r}: file name {fname!r} is not a string")
    norm = os.path.normpath(fname)
    if os.path.isabs(fname) or norm == ".." or norm.startswith(".." + os.sep):
        raise CheckpointError(
            f"{index_path}: tensor {name!r} is mapped to {fname!r}, outside the checkpoint directory "
            "(index entries must be file names inside it)"
        )


def iter_index(ckpt_dir: str) -> Iterator[tuple[str, list[str]]]:
    """Yields (file path, tensor names in it) for a HF checkpoint directory's weight files."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index_path = os.path.join(ckpt_dir, index_name)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a valid index ({e!r})") from e
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: weight_map is not an object")
            by_file: dict[str, list[str]] = {}
            for name, fname in weight_map.items():
                _check_inside(index_path, name, fname)
                by_file.setdefault(fname, []).append(name)
            for fname, names in sorted(by_file.items()):
                path = os.path.join(ckpt_dir, fname)
                if not os.path.isfile(path):
                    raise CheckpointError(f"{index_path}: lists {fname} (for tensor {names[0]!r}) but {path} is missing")
                yield path, names
            return
        if os.path.isfile(os.path.join(ckpt_dir, single)):
            yield os.path.join(ckpt_dir, single), []
            return
    raise CheckpointError(f"{ckpt_dir}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json) found")
