"""HF safetensors -> our orbax checkpoint, streamed tensor by tensor with bounded host memory.

The in-memory path (``load_hf_params`` then ``save_orbax``) holds the whole
params tree, orbax's defensive copy of it and the compressed chunks at once:
about 2.9x the checkpoint in host RAM. Here orbax's own PyTree save still
writes the directory (``_METADATA``, OCDBT manifest, commit marker, per-process
merge), but each leaf is a :class:`ParamSource`: a recipe naming the HF tensors
that fill it. A NumPy type handler that keeps orbax's ``np.ndarray`` type
string (so the metadata, and every restore, is that of a plain NumPy save)
reads those tensors one at a time from memory-mapped shards and writes each
into its slot of the zarr array, with at most ``budget_bytes`` of source data
in flight (tensors already in our layout go from the page cache to tensorstore
without a copy; kernels are transposed once, a block of rows at a time, into a
reused buffer). Reads go leaf after leaf, in order; writes commit behind them,
overlapping the next leaves' reads. Written files are not fsynced unless asked
(``fsync=True``): like the project's other writers, the atomic rename is the
guarantee, and on this VM's disk syncing cost no measurable time either way.

Stacked params (``nn.scan`` keeps layers on axis 0) are stored with one zarr
chunk per layer (orbax's own ``SaveArgs(chunk_byte_size=..., shard_axes=(0,))``
chunk choice), so each layer slice is a whole chunk: it is compressed and
committed on its own and the ``[L, ...]`` array never exists in memory. Other
params keep orbax's default single chunk. Readers see the chunking only in the
zarr metadata; ``load_orbax_params`` and ``StandardCheckpointer().restore``
return the same arrays as for the in-memory save.

Every check on names, shapes, dtypes, layer indices, duplicates and missing
tensors is made by ``plan_hf_params`` (which ``load_hf_params`` uses too) from
the headers before anything is written; NaN/Inf and the tied ``lm_head`` are
checked as the data streams, and any error removes the partial output
(``atomic_dir``).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import os
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from viscodex_jax.checkpoint import hf_map
from viscodex_jax.checkpoint.orbax_io import write_checkpoint_dir
from viscodex_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFile, iter_index
from viscodex_jax.checkpoint.torch_bin import BinFile
from viscodex_jax.checkpoint.validate import UINT_OF_SIZE, all_finite, check_tensor_finite, is_float_dtype
from viscodex_jax.model.causal_lm import param_shapes
from viscodex_jax.model.config import ModelConfig, config_from_dict, read_config_json
from viscodex_jax.utils import flatten, unflatten

# Source bytes read but not yet committed, across leaves: one or two layer slices of a 7B model (an MLP slice is
# 136 MB); on a 0.5B model (1 GB) 512 MB in flight, with their compressed copies, raised the peak RSS from 0.7 to
# 1.1 GB for no measurable speed. A tensor larger than this (a 7B embedding, 1.1 GB) still goes through, alone.
DEFAULT_BUDGET_BYTES = 256 * 2**20
# Off: zstd (level 1, orbax's) stores bf16 weights (random-normal, benchmarks/convert.py) in 78% of their bytes, and
# every restore then decompresses: a restore of the uncompressed 2.3 GB VL checkpoint took 0.6x the time and CPU.
# Converting, zstd's CPU is paid against fewer fresh page-cache pages; on this 2-core VM, two runs: 0.5B 1.36-1.42x
# the read floor without, 1.68-1.89x with; VL 1.33-1.67x without, 1.19-1.39x with. compress=True (converter
# --compress) writes what orbax writes by default; every reader restores both.
COMPRESS_DEFAULT = False
EMBED_KEY = ("model", "embed_tokens", "embedding")
# A stacked param gets one chunk per layer when a layer slice is at least this big (orbax warns that
# smaller chunks cost performance); smaller ones (norms, biases, small kernels) are gathered whole.
MIN_CHUNK_BYTES = 2**20


@dataclasses.dataclass(frozen=True)
class Part:
    """One HF tensor and where it goes: the whole param (layer None) or layer ``layer`` of a stacked one."""

    file: SafetensorsFile
    name: str
    layer: int | None

    @property
    def where(self) -> str:
        return f"{self.file.path}: tensor {self.name!r}"


@dataclasses.dataclass
class ParamSource:
    """A param leaf as a recipe: its shape and dtype, and the HF tensors that fill it.

    ``shape``/``dtype``/``size``/``ndim`` are what orbax asks of a NumPy leaf before it writes one.
    """

    key: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    parts: list[Part]
    check_finite: bool
    tied_lm_head: Part | None = None  # read and compared when the embedding is written

    @property
    def stacked(self) -> bool:
        return hf_map.is_stacked(self.key)

    @property
    def slot_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.stacked else self.shape

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def slot_bytes(self) -> int:
        return math.prod(self.slot_shape) * self.dtype.itemsize

    @property
    def chunked(self) -> bool:
        """Written one layer slice (one zarr chunk) at a time, never whole."""
        return self.stacked and self.slot_bytes >= MIN_CHUNK_BYTES

    def units(self) -> list[tuple[int | None, list[Part], int]]:
        """(layer index or None for the whole array, parts, bytes) for each write."""
        if self.chunked:
            return [(p.layer, [p], self.slot_bytes) for p in self.parts]
        return [(None, self.parts, self.size * self.dtype.itemsize)]

    def buffer_sizes(self) -> list[int]:
        """The byte sizes :meth:`read` takes from a :class:`Buffers` pool (a kernel's transpose, or a cast)."""
        copies = [p for p in self.parts if self.key[-1] == "kernel" or p.file.dtype(p.name) != self.dtype]
        return [math.prod(self.slot_shape) * self.dtype.itemsize] * len(copies)

    def assemble(self, parts: list[Part], buffers: Buffers) -> tuple[np.ndarray, list[np.ndarray]]:
        """The array one write unit covers (a part's slice, or the whole param gathered from its parts), and the
        pool buffers it lives in, to be given back once tensorstore is done with it."""
        if self.chunked or not self.stacked:
            return self.read(parts[0], buffers)
        out = np.empty(self.shape, self.dtype)
        for p in parts:
            value, held = self.read(p, buffers)
            out[p.layer] = value
            buffers.give(*held)
        return out, []

    def read(self, part: Part, buffers: Buffers) -> tuple[np.ndarray, list[np.ndarray]]:
        """The part's tensor in our layout and dtype, C-contiguous (so the writer can use it without a copy),
        and the pool buffers it lives in.

        The file is memory-mapped: a tensor already in our layout and dtype (embeddings, norms, biases) goes
        to tensorstore straight from the page cache; others are transposed or cast once, into a pool buffer.
        """
        raw = part.file.view(part.name)
        value = hf_map.to_flax(self.key, raw, self.slot_shape)
        if value.dtype == self.dtype and value.flags.c_contiguous:
            self._check(value, part, raw)
            return value, []
        held = [buffers.take(math.prod(self.slot_shape) * self.dtype.itemsize)]
        value = held[0].view(self.dtype).reshape(self.slot_shape)
        self._fill(value, part, raw)
        return value, held

    def read_into(self, part: Part, out: np.ndarray) -> None:
        """The part's tensor in our layout, cast into ``out`` (its slot of a preallocated param)."""
        self._fill(out, part, part.file.view(part.name))

    def _fill(self, out: np.ndarray, part: Part, raw: np.ndarray) -> None:
        if self.key[-1] == "kernel" and out.flags.c_contiguous:
            transpose_into(out, raw)
        else:
            np.copyto(out, hf_map.to_flax(self.key, raw, self.slot_shape), casting="unsafe")
        # Without a cast, the source holds the same values: it is read again while still in the page cache.
        self._check(out if out.dtype != raw.dtype else raw, part, raw)

    def _check(self, value: np.ndarray, part: Part, raw: np.ndarray) -> None:
        if self.check_finite and not all_finite(value):
            check_tensor_finite(value, part.where, raw)  # counts them and names the tensor
        self.check_tied(value)

    def check_tied(self, value: np.ndarray) -> None:
        """A tied checkpoint's stored lm_head must equal the embedding it is tied to (``value``)."""
        if self.tied_lm_head is not None:
            tied = self.tied_lm_head
            if not np.array_equal(tied.file.view(tied.name).astype(value.dtype), value):
                raise CheckpointError(
                    f"{tied.file.path}: tensor {tied.name!r} differs from model.embed_tokens.weight "
                    "but config.json sets tie_word_embeddings"
                )


# Source rows transposed per block: a whole-matrix strided copy misses the cache on nearly every element; 64 rows
# of a kernel (at most 64 x 4864 bf16 here, 600 KB) stay in cache while their columns are written out.
TRANSPOSE_ROWS = 64


def transpose_into(out: np.ndarray, raw: np.ndarray) -> None:
    """``hf_map.to_flax``'s kernel rule (``[out, in...]`` -> ``[in..., out]``) written into the C-contiguous
    ``out``, casting if the dtypes differ, a block of source rows at a time."""
    src = raw.reshape(raw.shape[0], -1)
    dst = out.reshape(src.shape[1], src.shape[0])
    if src.dtype == dst.dtype:  # bit patterns move unchanged: plain integer copies
        src, dst = src.view(UINT_OF_SIZE[src.dtype.itemsize]), dst.view(UINT_OF_SIZE[dst.dtype.itemsize])
    for i in range(0, src.shape[0], TRANSPOSE_ROWS):
        np.copyto(dst[:, i:i + TRANSPOSE_ROWS], src[i:i + TRANSPOSE_ROWS].T, casting="unsafe")


class Buffers:
    """Flat byte buffers for the transposed or cast copies, reused from one layer to the next.

    A fresh large array pays a page fault per 4 KiB page on first touch, which on a VM costs as much
    system time as the copy itself. A buffer given back is kept only while the plan still has a request
    of its size to come, so the pool never holds more than the copies ahead will use.
    """

    def __init__(self, sizes: list[int]):
        self._left = collections.Counter(sizes)
        self._free: dict[int, list[np.ndarray]] = collections.defaultdict(list)

    def take(self, nbytes: int) -> np.ndarray:
        self._left[nbytes] -= 1
        free = self._free[nbytes]
        return free.pop() if free else np.empty(nbytes, np.uint8)

    def give(self, *buffers: np.ndarray) -> None:
        for b in buffers:
            if len(self._free[b.nbytes]) < self._left[b.nbytes]:
                self._free[b.nbytes].append(b)


def tensor_files(ckpt_dir: str) -> list[SafetensorsFile | BinFile]:
    """The checkpoint's weight files, each checked to hold every tensor its index lists."""
    files = []
    for path, listed in iter_index(ckpt_dir):
        f = SafetensorsFile(path) if path.endswith(".safetensors") else BinFile(path)
        for name in listed:
            if name not in f:
                raise CheckpointError(f"{path}: missing tensor {name!r} (listed in the index)")
        files.append(f)
    return files


def is_safetensors_dir(ckpt_dir: str) -> bool:
    return all(path.endswith(".safetensors") for path, _ in iter_index(ckpt_dir))


def plan_hf_params(ckpt_dir: str, cfg: ModelConfig, dtype: Any = None,
                   check_finite: bool = False) -> dict[str, Any]:
    """A params tree of :class:`ParamSource` leaves, from the file headers alone (no tensor data read; a
    ``.bin`` shard is memory-mapped).

    The one place that checks a checkpoint against its config: an unexpected, misshaped, non-float,
    duplicate, out-of-range or missing tensor is refused, naming file and tensor, before any data is read.
    A param's dtype is ``dtype``, else that of its first tensor.
    """
    expected = flatten(param_shapes(cfg))
    parts: dict[tuple[str, ...], list[Part]] = {}
    first_dtype: dict[tuple[str, ...], np.dtype] = {}
    source: dict[tuple[tuple[str, ...], int | None], str] = {}
    tied = None
    for f in tensor_files(ckpt_dir):
        path = f.path
        for name in f.keys():
            if hf_map.canonical_name(name) == "lm_head.weight" and cfg.text.tie_word_embeddings:
                tied = Part(f, name, None)
                continue
            hit = hf_map.hf_to_path(name, expected)
            if hit is None:
                raise CheckpointError(
                    f"{path}: unexpected tensor {name!r}: no parameter of a {cfg.model_type} model maps to it")
            key, layer = hit
            full = expected[key].shape
            slot_shape = full[1:] if layer is not None else full
            if layer is not None and layer >= full[0]:
                raise CheckpointError(f"{path}: tensor {name!r}: layer {layer} but config.json has {full[0]} layers")
            want = hf_map.hf_shape(key, slot_shape, cfg)
            if tuple(f.shape(name)) != want:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has shape {list(f.shape(name))} but config.json implies {list(want)}")
            if (key, layer) in source:
                raise CheckpointError(f"{path}: tensor {name!r} duplicates {source[(key, layer)]!r}")
            source[(key, layer)] = name
            if not is_float_dtype(f.dtype(name)):
                raise CheckpointError(
                    f"{path}: tensor {name!r} has dtype {f.dtype(name)}, but {'/'.join(key)} is a floating-point "
                    "parameter")
            parts.setdefault(key, []).append(Part(f, name, layer))
            first_dtype.setdefault(key, f.dtype(name))
    missing = [
        hf_map.path_to_hf(k, i)
        for k, s in expected.items()
        for i in (range(s.shape[0]) if hf_map.is_stacked(k) else [None])
        if (k, i) not in source
    ]
    if missing:
        raise CheckpointError(
            f"{ckpt_dir}: missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    tree = {
        k: ParamSource(k, tuple(s.shape), np.dtype(dtype or first_dtype[k]), sorted(parts[k], key=lambda p: p.layer or 0),
                       check_finite, tied if k == EMBED_KEY else None)
        for k, s in expected.items()
    }
    return unflatten(tree)


class _Budget:
    """Bytes of source data read and not yet committed; a reader waits while the budget is spent."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.cond = asyncio.Condition()

    async def acquire(self, n: int) -> None:
        async with self.cond:
            await self.cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n

    async def release(self, n: int) -> None:
        async with self.cond:
            self.used -= n
            self.cond.notify_all()


class StreamingNumpyHandler(ocp.type_handlers.NumpyHandler):
    """Writes :class:`ParamSource` leaves part by part under orbax's NumPy type string and tensorstore spec.

    Orbax builds the zarr spec (kvstore, compression, chunks) exactly as for an ``np.ndarray``; only
    the final write differs: a part is read, written into its slot and dropped once tensorstore commits it.
    Reads go one leaf at a time, in order; writes overlap them, across leaves, within the byte budget.
    """

    def __init__(self, buffers: Buffers, budget_bytes: int = DEFAULT_BUDGET_BYTES, fsync: bool = False):
        super().__init__(deepcopy_host_arrays=False)
        self._buffers = buffers
        self._fsync = fsync
        self._contexts: dict[int, ts.Context] = {}
        self._budget_bytes = budget_bytes
        self._budget: _Budget | None = None
        self._one_leaf: asyncio.Lock | None = None
        self._failed: BaseException | None = None
        self._pending: set[asyncio.Future] = set()

    def _context(self, ts_context: ts.Context) -> ts.Context:
        """Orbax's context for this save (one for all its params: they share one OCDBT database), less the
        per-file fsync unless asked for; the child context shares every other resource with it."""
        if self._fsync:
            return ts_context
        if id(ts_context) not in self._contexts:
            self._contexts[id(ts_context)] = ts.Context(ts.Context.Spec({"file_io_sync": False}), ts_context)
        return self._contexts[id(ts_context)]

    async def _commit(self, write: Any, held: list[np.ndarray], nbytes: int) -> None:
        try:
            await write
            # tensorstore may have encoded straight from the array: its buffer is free only now
            self._buffers.give(*held)
        finally:
            await self._budget.release(nbytes)

    async def _issue(self, store: Any, value: ParamSource) -> list[asyncio.Future]:
        """Reads the leaf's units in order and starts their writes; returns the writes, not awaited."""
        writes = []
        for layer, parts, nbytes in value.units():
            await self._budget.acquire(nbytes)
            if self._failed is not None:  # another leaf failed meanwhile: write nothing more
                await self._budget.release(nbytes)
                break
            try:
                array, held = value.assemble(parts, self._buffers)
                target = store[layer] if layer is not None else store
                write = target.write(array, can_reference_source_data_indefinitely=True)
            except BaseException:
                await self._budget.release(nbytes)
                raise
            task = asyncio.ensure_future(self._commit(write, held, nbytes))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            writes.append(task)
        return writes

    async def _open_and_write(self, value: Any, tspec: dict[str, Any], ts_context: Any) -> None:
        if not isinstance(value, ParamSource):
            return await super()._open_and_write(value, tspec, ts_context)
        if self._one_leaf is None:  # created here, inside the event loop orbax runs the save on
            self._budget, self._one_leaf = _Budget(self._budget_bytes), asyncio.Lock()
        try:
            # Orbax starts every leaf at once; one leaf at a time keeps the source reads sequential (and lets a
            # failure stop the rest before they read anything). The lock is let go once the leaf's writes are
            # started, so the next leaf reads while they commit.
            async with self._one_leaf:
                if self._failed is not None:
                    return  # the failed param's error is the one the save raises
                store = await ts.open(ts.Spec(tspec), create=True, open=True, context=self._context(ts_context))
                writes = await self._issue(store, value)
            for result in await asyncio.gather(*writes, return_exceptions=True):
                if isinstance(result, BaseException):
                    raise result
        except (Exception, asyncio.CancelledError) as e:  # not GeneratorExit: a coroutine closed unrun awaits nothing
            self._failed = self._failed or e
            # The caller deletes the output once the save raises: every write of every leaf settles first, so
            # none lands in (or recreates) the directory after that.
            await asyncio.gather(*list(self._pending), return_exceptions=True)
            raise


def save_args_for(tree: dict[str, Any]) -> dict[str, Any]:
    """One zarr chunk per layer for chunked params (orbax's own chunk choice), orbax's default otherwise."""
    import jax

    def args(leaf: ParamSource) -> ocp.SaveArgs:
        if leaf.chunked:
            return ocp.SaveArgs(chunk_byte_size=leaf.slot_bytes, shard_axes=(0,))
        return ocp.SaveArgs()

    return jax.tree_util.tree_map(args, tree, is_leaf=lambda x: isinstance(x, ParamSource))


def write_params_streamed(tree: dict[str, Any], params_dir: str, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                          compress: bool = COMPRESS_DEFAULT, fsync: bool = False) -> None:
    """Writes a tree of :class:`ParamSource` leaves as an orbax PyTree checkpoint at ``params_dir``.

    The layout is StandardCheckpointer's (OCDBT, zarr v2, zstd level 1, or no compressor with
    ``compress=False``); _CHECKPOINT_METADATA names PyTreeCheckpointHandler, which StandardCheckpointHandler
    wraps, and either restores it.
    """
    import jax

    leaves = flatten(tree).values()
    buffers = Buffers([n for leaf in leaves for n in leaf.buffer_sizes()])
    # jax.Array's stock handler too, only so that orbax does not warn that array metadata is off.
    registry = ocp.type_handlers.create_type_handler_registry(
        (ParamSource, StreamingNumpyHandler(buffers, budget_bytes, fsync)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=compress)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(os.path.abspath(params_dir), args=ocp.args.PyTreeSave(tree, save_args=save_args_for(tree)))


def convert_hf_to_orbax_streamed(hf_dir: str, out_dir: str, dtype: Any = None, overwrite: bool = False,
                                 check_finite: bool = True, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                                 compress: bool = COMPRESS_DEFAULT, fsync: bool = False) -> ModelConfig:
    """HF safetensors dir -> our orbax dir, never holding more than ``budget_bytes`` of tensors (or one tensor).

    ``compress`` and ``fsync``: see ``checkpoint.convert_hf_to_orbax``.
    """
    raw = read_config_json(hf_dir)
    cfg = config_from_dict(raw, os.path.join(hf_dir, "config.json"))
    tree = plan_hf_params(hf_dir, cfg, dtype=dtype, check_finite=check_finite)
    write_checkpoint_dir(out_dir, raw, lambda path: write_params_streamed(tree, path, budget_bytes, compress, fsync),
                         side_files_from=hf_dir, overwrite=overwrite)
    return cfg
