"""Task-vector merging of one tensor as one jitted pipeline (the methods' pieces: see ``methods``).

Both drivers (params trees and HF dirs) call :func:`merge_with_vocab_policy`
on tensors in HF layout, one HF tensor at a time, so TIES' top-k is per HF
tensor and DARE's random mask (keyed by seed and tensor name) is the same in
both: their outputs are bit-identical.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from viscodex_jax.merge import select
from viscodex_jax.merge.file_tensor import FileTensor
from viscodex_jax.merge.methods import keyed_draw, select_kth_largest
from viscodex_jax.merge.spec import MergeError, MergeSpec, is_mergeable


def _over_models(x: jax.Array) -> jax.Array:
    """Sum over the (small, static) model axis 0, unrolled.

    XLA:CPU lowers a reduction over a leading axis of 2-3 into a slow loop
    (seconds per MLP weight); a chain of adds is as fast as the memory allows.
    """
    total = x[0]
    for i in range(1, x.shape[0]):
        total = total + x[i]
    return total


def _stacked(thetas) -> jax.Array:
    """The models' tensors as one [n, ...] array: given so by the host pipeline (see ``_block_args``), or a
    sequence of arrays (the on-device merge, a block of mixed dtypes)."""
    return jnp.stack(thetas) if isinstance(thetas, (tuple, list)) else thetas


def _name_hash(name: str) -> np.uint32:
    return np.uint32(int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little"))


def tensor_key(seed: int, name: str) -> jax.Array:
    """A PRNG key per (seed, tensor name): the same draw whatever order tensors come in."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), _name_hash(name))


class _Staging:
    """Reused 64-byte-aligned host buffers that chunks are read or copied into before the jitted call.

    XLA:CPU takes a numpy argument without a copy only when it is 64-byte aligned; safetensors data (and a
    memory map of it) is only 8-byte aligned, so every call used to copy each input into a freshly allocated
    buffer, page-faulting it in. One read into a warm buffer replaces that. A chunk's inputs are one block
    [base, model 1, ..., model n] (XLA:CPU fuses the models' rows of one array well and a stack of separate
    arrays badly: the stacked float32 copy was materialised); blocks rotate through ``RING`` slots so the
    next chunk is read (on the I/O thread) while XLA still works on, and borrows, the last ones.
    """

    def __init__(self):
        self._bufs: dict[Any, np.ndarray] = {}

    def buf(self, slot, nbytes: int) -> np.ndarray:
        """``nbytes`` of the 64-byte-aligned buffer of ``slot`` (kept for the next call with that slot)."""
        buf = self._bufs.get(slot)
        if buf is None or buf.size < nbytes + 64:
            buf = self._bufs[slot] = np.empty(nbytes + 64, np.uint8)
        off = (-buf.ctypes.data) % 64
        return buf[off:off + nbytes]

    def clear(self) -> None:
        """Drops the buffers (a merge ends with this: a long-lived process keeps no chunk-sized buffers)."""
        self._bufs = {}

    def fill(self, slot, src: Any, lo: int, hi: int, shape: tuple[int, ...]) -> np.ndarray:
        """Elements ``lo:hi`` of ``src`` (flat, C order) in an aligned buffer of ``shape``, zeros after them."""
        out = self.buf(slot, int(np.prod(shape)) * np.dtype(src.dtype).itemsize).view(src.dtype)
        _read(src, out, lo, hi)
        return out.reshape(shape)

    def block(self, slot, srcs: Sequence[Any], lo: int, hi: int, shape: tuple[int, ...]) -> np.ndarray:
        """Elements ``lo:hi`` of each source as rows of one aligned [len(srcs), *shape] block (zero padded);
        sources of different dtypes get a tuple of separate buffers instead."""
        if not _one_dtype(srcs):
            return tuple(self.fill((slot, i), x, lo, hi, shape) for i, x in enumerate(srcs))
        return _fill_block(self.buf(slot, _block_bytes(srcs, shape)), srcs, lo, hi, shape)


def _read(src: Any, out: np.ndarray, lo: int, hi: int) -> None:
    """Elements ``lo:hi`` of ``src`` (flat) into the flat ``out``, zeros after them."""
    if isinstance(src, FileTensor):
        src.read_into(out[:hi - lo], lo, hi)
    else:
        np.copyto(out[:hi - lo], np.asarray(src).reshape(-1)[lo:hi])
    out[hi - lo:] = 0


def _one_dtype(srcs: Sequence[Any]) -> bool:
    """Whether the sources share a dtype (so a chunk's inputs fit one block)."""
    return len({np.dtype(x.dtype) for x in srcs}) == 1


def _block_bytes(srcs: Sequence[Any], shape: tuple[int, ...]) -> int:
    return len(srcs) * int(np.prod(shape)) * np.dtype(srcs[0].dtype).itemsize


def _fill_block(raw: np.ndarray, srcs: Sequence[Any], lo: int, hi: int, shape: tuple[int, ...]) -> np.ndarray:
    block = raw[:_block_bytes(srcs, shape)].view(srcs[0].dtype).reshape(len(srcs), -1)
    for row, src in zip(block, srcs):
        _read(src, row, lo, hi)
    return block.reshape((len(srcs),) + tuple(shape))


def _block_args(block: np.ndarray):
    """(base, thetas) of a block for the jitted merge: the models as one [n, ...] array when its rows start on
    64-byte boundaries (XLA then borrows it), else as a tuple of rows (stacked inside the program)."""
    if isinstance(block, tuple):
        return block[0], block[1:]
    aligned = (block[0].nbytes % 64) == 0
    return block[0], (block[1:] if aligned else tuple(block[1:]))


_STAGING = _Staging()


# Big tensors (embeddings, lm_head) are merged in row chunks of at most this many elements, so the
# float32 temporaries stay a few hundred MB whatever the vocab and hidden size.
CHUNK_ELEMENTS = 1 << 24
# Methods whose result does not depend on the chunking (no random draw) use chunks of at most this many
# elements: XLA:CPU's temporaries then stay under glibc's 32 MB mmap threshold and are reused from the heap,
# instead of being mapped, page-faulted in and unmapped on every call (that was most of the merge's sys time).
UNKEYED_CHUNK_ELEMENTS = 1 << 20


def traced_spec(spec: MergeSpec) -> MergeSpec:
    """The spec as the jitted merge sees it (a static argument): the weights are traced inputs, so they are
    left out and merges that differ only in their weights (a lam sweep) share one compiled program."""
    return dataclasses.replace(spec, weights=(1.0,) * len(spec.weights), group_weights=())


def _chunk_key(spec: MergeSpec, name_hash, chunk, chunked: bool) -> jax.Array:
    key = jax.random.fold_in(jax.random.PRNGKey(spec.seed), name_hash)
    return jax.random.fold_in(key, chunk) if chunked else key


@functools.partial(jax.jit, static_argnames=("spec",))
def _totals_core(base, thetas, name_hash, chunk, spec: MergeSpec):
    """The sparsifier's whole-tensor sums (``Sparsify.totals``) over one row chunk, keyed as ``_merge_core``."""
    base32 = base.astype(jnp.float32)
    d = _stacked(thetas).astype(jnp.float32) - base32[None]
    return spec.method_pieces.sparsify.totals(d, keyed_draw(_chunk_key(spec, name_hash, chunk, True), spec), spec)


@functools.partial(jax.jit, static_argnames=("spec", "out_dtype", "chunked"))
def _host_core(base, thetas, weights, name_hash, chunk, thresh, spec: MergeSpec, out_dtype, chunked: bool):
    """Merges one tensor, a row chunk of it, or (methods without a random draw) a flat chunk of its elements as
    ``_host_math``, with DARE's mask drawn from the tensor's (and row chunk's) PRNG key.

    ``thetas`` is a tuple (stacked inside the fusion, not on the host). The tensor's PRNG key is derived here
    from ``name_hash`` (and ``chunk`` for a row chunk), as ``tensor_key`` does eagerly.
    """
    draw = keyed_draw(_chunk_key(spec, name_hash, chunk, chunked), spec)
    return _host_math(base, thetas, weights, thresh, draw, spec, out_dtype)


def _merge_values(base, thetas, weights, thresh, draw, spec: MergeSpec):
    """The merged values in float32 and what the statistics are taken from: (merged, d, raw, keep, flipped).

    ``d``: the task vectors the merge used (sparsified, before the sign election); ``raw``: before the
    sparsifier; ``keep``/``flipped``: boolean [n, ...] masks, None when every entry is kept / nothing is elected.
    """
    method = spec.method_pieces
    thetas = _stacked(thetas)
    base32 = base.astype(jnp.float32)
    d = thetas.astype(jnp.float32) - base32[None]  # [n, ...]
    n = d.shape[0]
    keep = None
    sparsified = method.sparsify.keep(d, thresh, draw, spec) if method.sparsify else None
    if sparsified is not None:
        d, keep = sparsified
    w = weights.reshape((n,) + (1,) * (d.ndim - 1)).astype(jnp.float32)
    wd = w * d
    contrib = jnp.broadcast_to(keep if keep is not None else True, d.shape)
    flipped = None
    if method.consensus:
        elected = jnp.sign(_over_models(wd))
        agree = (jnp.sign(d) == elected[None]) & (d != 0)
        flipped = (jnp.sign(d) != elected[None]) & (d != 0)
        wd = jnp.where(agree, wd, 0.0)
        contrib = agree
    if sparsified is None and not method.consensus:
        # Pure weighted sum: base + s * sum_i w_i (theta_i - base) rewritten as
        # (1 - s * sum w) * base + s * sum_i w_i theta_i, so when s * sum w == 1 the
        # base cancels exactly instead of leaving fp32 rounding of |base|.
        wsum = jnp.sum(weights.astype(jnp.float32))
        s = spec.lam / wsum if spec.do_normalize else jnp.float32(spec.lam)
        wt = _over_models(w * thetas.astype(jnp.float32))
        merged = (1.0 - s * wsum) * base32 + s * wt
    else:
        total = _over_models(wd)
        if spec.do_normalize:
            denom = _over_models(jnp.where(contrib, w, 0.0))  # disjoint mean: only contributors count
            total = jnp.where(denom != 0, total / jnp.where(denom != 0, denom, 1.0), 0.0)
        merged = base32 + spec.lam * total
    raw = d if sparsified is None else thetas.astype(jnp.float32) - base32[None]
    return merged, d, raw, keep, flipped


def _float_sums(d, raw, sparsified: bool):
    """Per-model squared norms of ``raw`` [n] and the Gram matrix of ``d`` [n, n], as sums of products (not
    axis reductions or ``flat @ flat.T``: XLA:CPU runs those on materialised float32 copies)."""
    n = d.shape[0]
    gram = [[jnp.sum(d[i] * d[j]) if j >= i else None for j in range(n)] for i in range(n)]
    return (jnp.stack([gram[i][i] if not sparsified else jnp.sum(raw[i] * raw[i]) for i in range(n)]),
            jnp.stack([jnp.stack([gram[min(i, j)][max(i, j)] for j in range(n)]) for i in range(n)]))


def merge_math(base, thetas, weights, thresh, draw, spec: MergeSpec, out_dtype):
    """The per-tensor merge, traced: one tensor (any layout: every step is elementwise but the sums) -> (merged
    in ``out_dtype``, sums for the report).

    Both the streamed merge (``_host_core``, HF layout, host arrays) and the on-device merge
    (``merge.on_device``, our layout, sharded arrays) compute the merged values with ``_merge_values``, so their
    outputs agree bit for bit given the same ``thresh`` and ``draw`` (see ``methods.Sparsify``).
    """
    merged, d, raw, keep, flipped = _merge_values(base, thetas, weights, thresh, draw, spec)
    n = d.shape[0]
    numel = int(np.prod(d.shape[1:]))
    sq_norms, gram = _float_sums(d, raw, keep is not None)
    sums = {
        "sq_norms": sq_norms,
        "gram": gram,
        "kept": (jnp.full((n,), numel, jnp.int32) if keep is None
                 else jnp.stack([jnp.sum(keep[i], dtype=jnp.int32) for i in range(n)])),
        "flipped": (jnp.zeros((), jnp.float32) if flipped is None
                    else jnp.mean(flipped.astype(jnp.float32))) * numel,
        "nonfinite": jnp.sum(~jnp.isfinite(merged)),
    }
    return merged.astype(out_dtype), sums


def _host_math(base, thetas, weights, thresh, draw, spec: MergeSpec, out_dtype):
    """``merge_math`` for the host pipeline: the same merged values, the float sums, and the boolean masks
    (nonfinite, keep, flipped) returned for numpy to count.

    XLA:CPU counts a mask 5-10x slower than it merges (each count is its own pass that recomputes the mask);
    ``np.count_nonzero`` on the materialised masks costs a fraction of the merge, and counts exactly.
    """
    merged, d, raw, keep, flipped = _merge_values(base, thetas, weights, thresh, draw, spec)
    sq_norms, gram = _float_sums(d, raw, keep is not None)
    masks = {"nonfinite": ~jnp.isfinite(merged)}
    if keep is not None:
        masks["keep"] = keep
    if flipped is not None:
        masks["flipped"] = flipped
    return merged.astype(out_dtype), {"sq_norms": sq_norms, "gram": gram}, masks


def _check_inputs(name: str, base: Any, thetas: Sequence[Any], weights: Sequence[float]) -> None:
    if len(thetas) != len(weights):
        raise MergeError(f"{name}: {len(thetas)} models to merge but {len(weights)} weights given")
    for i, t in enumerate(thetas):
        if tuple(t.shape) != tuple(base.shape):
            raise MergeError(f"{name}: model {i + 1} has shape {list(t.shape)} but the base has {list(base.shape)}")
    for i, t in enumerate([base, *thetas]):
        if not is_mergeable(t.dtype):
            raise MergeError(f"{name}: dtype {np.dtype(t.dtype)} of {'the base' if i == 0 else f'model {i}'} "
                             "cannot be merged")


# Below this many elements a tensor (or a chunk's tail) goes through a small padded chunk instead of a full one:
# two compiled programs per method serve every tensor shape.
SMALL_CHUNK_ELEMENTS = 1 << 14


def _chunks(shape: tuple[int, ...], spec: MergeSpec) -> tuple[bool, list[tuple[int, int, tuple[int, ...]]]]:
    """(row-chunked, [(first element, end element, the chunk's shape in the jitted call)]).

    Methods with a random draw keep ``row_chunks`` (the mask is drawn per tensor or row chunk, in its shape,
    as the on-device merge draws it). The others are elementwise but for the sums, so any cut gives the same
    values: flat chunks of ``UNKEYED_CHUNK_ELEMENTS``, padded with zeros to one of two sizes.
    """
    sparsify = spec.method_pieces.sparsify
    numel = int(np.prod(shape))
    if sparsify and sparsify.keyed:
        whole, bounds = row_chunks(shape, spec)
        if whole:
            return False, [(0, numel, shape)]
        row = int(np.prod(shape[1:]))
        return True, [(lo * row, hi * row, (hi - lo,) + tuple(shape[1:])) for lo, hi in bounds]
    size = max(1, min(CHUNK_ELEMENTS, UNKEYED_CHUNK_ELEMENTS))
    small = min(SMALL_CHUNK_ELEMENTS, size)
    return False, [(lo, min(lo + size, numel), (small if min(lo + size, numel) - lo <= small else size,))
                   for lo in range(0, max(numel, 1), size)]


# A rank-based sparsifier (TIES, breadcrumbs) reads a tensor for its thresholds and again for the merge. Inputs
# of up to this many bytes (all models) are read once and kept for both passes; a bigger tensor (an embedding)
# is read per pass, so memory stays at chunks whatever the vocab. Not more: touching fresh memory costs more
# than re-reading from the page cache (on the 2-core benchmark VM, 1-2 s per GB against 0.2).
RESIDENT_BYTES = 1 << 28
# Chunk blocks in flight: XLA borrows a block until its result is fetched, one behind the chunk being merged,
# while the I/O thread reads the next.
RING = 3
# Resident tensors whose float32 magnitudes (all models) fit this are partitioned whole, in parallel; the rest
# are selected in two streamed passes (see ``select``).
MAGNITUDE_BYTES = 1 << 28
_THREADS: dict[str, concurrent.futures.ThreadPoolExecutor] = {}


def _pool(kind: str, workers: int = 1) -> concurrent.futures.ThreadPoolExecutor:
    if kind not in _THREADS:
        _THREADS[kind] = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"merge-{kind}")
    return _THREADS[kind]


def io_thread(kind: str = "read") -> concurrent.futures.ThreadPoolExecutor:
    """The merge's I/O threads, one for reads and one for writes (the drivers'): they run while XLA and the
    main thread work (``preadv``/``pwrite`` release the GIL), and reads never queue behind writes."""
    return _pool(kind)


def _resident_blocks(srcs: Sequence[Any], chunks) -> list[concurrent.futures.Future]:
    """Every chunk block of the tensor in one reused buffer, read in order on the I/O thread (futures)."""
    sizes = [-(-_block_bytes(srcs, shape) // 64) * 64 for _, _, shape in chunks]
    raw = _STAGING.buf("resident", sum(sizes))
    starts = np.cumsum([0] + sizes)
    return [io_thread().submit(_fill_block, raw[starts[c]:starts[c] + sizes[c]], srcs, lo, hi, shape)
            for c, (lo, hi, shape) in enumerate(chunks)]


@functools.partial(jax.jit, static_argnames=("out_shape",))
def _magnitudes(base, theta, out_shape):
    return jnp.abs(theta.astype(jnp.float32) - base.astype(jnp.float32)).reshape(out_shape)


def _magnitudes_of(base, thetas):
    thetas = _stacked(thetas)
    return jnp.abs(thetas.astype(jnp.float32) - base.astype(jnp.float32)[None])


def _keys(mag):
    """``select.key_of``, traced: the top 16 bits of non-negative float32 values (uint32)."""
    return jnp.right_shift(jax.lax.bitcast_convert_type(mag, jnp.uint32), jnp.uint32(16))


@functools.partial(jax.jit, static_argnames=("out_shape",))
def _magnitude_keys(base, thetas, out_shape):
    """``select.key_of`` of every model's magnitudes: [n, ...] uint16."""
    return _keys(_magnitudes_of(base, thetas)).astype(jnp.uint16).reshape(out_shape)


@functools.partial(jax.jit, static_argnames=("out_shape",))
def _bucket_values(base, thetas, buckets, out_shape):
    """Every model's magnitudes and whether each lies in one of that model's ``buckets`` [n, r] (-1: none)."""
    mag = _magnitudes_of(base, thetas)
    key = _keys(mag).astype(jnp.int32)
    hit = key == buckets[:, :1]
    for j in range(1, buckets.shape[1]):  # unrolled: XLA:CPU loops slowly over a small reduced axis
        hit = hit | (key == buckets[:, j:j + 1])
    return mag.reshape(out_shape), hit.reshape(out_shape)


def _select_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for the models' selections: ``ndarray.partition`` releases the GIL, so they run side by side."""
    return _pool("select", os.cpu_count() or 1)


def _kth_magnitudes(srcs: Sequence[Any], ranks: Sequence[int], chunks, resident) -> np.ndarray:
    """``methods.kth_largest_magnitudes`` (the same float32 values, the same selection) with the magnitudes
    computed by XLA chunk by chunk from blocks of all models (numpy's bfloat16 casts were most of TIES'
    threshold time).

    Inputs kept in memory (``resident``) whose magnitudes fit ``MAGNITUDE_BYTES`` are partitioned whole, one
    thread per model; anything bigger is selected in two streamed passes (``select``), so host memory stays at
    chunks and a histogram whatever the tensor. Buffers are reused across tensors (never page-faulted in again).
    """
    size, n = int(np.prod(srcs[0].shape)), len(srcs) - 1
    if resident is not None and n * size * 4 <= MAGNITUDE_BYTES:
        mags = _STAGING.buf("magnitudes", n * size * 4).view(np.float32).reshape(n, size)

        def one(i):
            # Each model on its own thread: one's XLA call overlaps the other's copy and partition (both
            # release the GIL), which on the main thread alone were a third of TIES' time.
            for c, (lo, hi, shape) in enumerate(chunks):
                block = resident[c].result()
                mags[i, lo:hi] = np.asarray(_magnitudes(block[0], block[1 + i], shape))[:hi - lo]
            return select_kth_largest(mags[i], ranks)

        return np.stack(list(_select_pool().map(one, range(n))))
    hist = np.zeros((n, select.BINS), np.int64)
    get = _blocks(srcs, chunks, resident)
    for c, (lo, hi, shape) in enumerate(chunks):
        b, ts = _block_args(get(c))
        keys = np.asarray(_magnitude_keys(b, ts, (n,) + shape))
        for i in range(n):
            hist[i] += np.bincount(keys[i, :hi - lo], minlength=select.BINS)
    where = [select.targets(hist[i], size, ranks) for i in range(n)]
    buckets = np.asarray([[-1 if t is None else t[0] for t in w] for w in where], np.int32)
    found: list[list[np.ndarray]] = [[] for _ in range(n)]
    get = _blocks(srcs, chunks, resident)
    for c, (lo, hi, shape) in enumerate(chunks):
        b, ts = _block_args(get(c))
        mags, hit = (np.asarray(x) for x in _bucket_values(b, ts, buckets, (n,) + shape))
        for i in range(n):
            found[i].append(mags[i, :hi - lo][hit[i, :hi - lo]])
    return np.stack([select.pick(np.concatenate(found[i]), size, ranks, where[i]) for i in range(n)])


def _blocks(srcs: Sequence[Any], chunks, resident) -> Callable[[int], np.ndarray]:
    """``get(c)``: chunk ``c``'s block, from the ``resident`` reads when given, else read ahead (one pass)."""
    if resident is not None:
        return lambda c: resident[c].result()
    return _ring_blocks(srcs, chunks)


def _ring_blocks(srcs: Sequence[Any], chunks) -> Callable[[int], np.ndarray]:
    """``get(c)``: chunk ``c``'s block, read on the I/O thread while the previous chunk merges. Call in order;
    block ``c`` must no longer be borrowed by XLA when chunk ``c + RING - 1`` is asked for."""
    futs: dict[int, concurrent.futures.Future] = {}

    def submit(c):
        lo, hi, shape = chunks[c]
        futs[c] = io_thread().submit(_STAGING.block, ("ring", c % RING), srcs, lo, hi, shape)

    def get(c):
        if c not in futs:
            submit(c)
        if c + 1 < len(chunks):
            submit(c + 1)
        return futs.pop(c).result()

    return get


def merge_tensor(name: str, base: Any, thetas: Sequence[Any], spec: MergeSpec, path: str | None = None,
                 sink: Callable[[int, np.ndarray], Any] | None = None):
    """Merges one tensor (HF layout); returns (merged array, stats dict of numpy values).

    ``path`` (our param path) selects per-group weights; defaults to ``name``. Inputs are numpy arrays or
    ``FileTensor``s (read chunk by chunk). With ``sink``, each merged chunk goes to ``sink(first element,
    flat chunk)`` as soon as it is ready and no whole output is built (the returned array is None); the
    chunk is never written to again, so the sink may keep it until it is written.
    """
    weights = spec.weights_for(path or name)
    _check_inputs(name, base, thetas, weights)
    sparsify = spec.method_pieces.sparsify
    out_dtype = jnp.dtype(spec.out_dtype)
    n, shape = len(thetas), tuple(base.shape)
    numel = int(np.prod(shape))
    ranks = tuple(sparsify.ranks(spec, max(numel, 1))) if sparsify and sparsify.ranks else ()
    srcs = [x if isinstance(x, FileTensor) else np.ascontiguousarray(x) for x in [base, *thetas]]
    chunked, chunks = _chunks(shape, spec)
    resident = None
    if ranks and _one_dtype(srcs) and _block_bytes(srcs, (numel,)) <= RESIDENT_BYTES:
        resident = _resident_blocks(srcs, chunks)
    thresh = _kth_magnitudes(srcs, ranks, chunks, resident) if ranks else np.zeros((n, 0), np.float32)
    get = _blocks(srcs, chunks, resident)
    name_hash = _name_hash(name)
    w = np.asarray(weights, np.float32)
    static = traced_spec(spec)

    if chunked and sparsify.needs_totals(spec):
        sums = 0.0
        for c, (lo, hi, kshape) in enumerate(chunks):
            b, ts = _block_args(_STAGING.block(("ring", 0), srcs, lo, hi, kshape))
            sums = sums + np.asarray(jax.device_get(_totals_core(b, ts, name_hash, np.int32(c), static)), np.float64)
        thresh = sparsify.from_totals(sums)
    thresh = np.asarray(thresh, np.float32)
    out = None if sink is not None else np.empty(shape, out_dtype)
    total: dict[str, Any] = {"sq_norms": 0.0, "gram": 0.0, "kept": np.zeros(n, np.int64), "flipped": 0,
                             "nonfinite": 0}

    def finish(lo, hi, result):
        merged, fsums, masks = jax.device_get(result)
        m = np.asarray(merged).reshape(-1)[:hi - lo]
        if sink is not None:
            sink(lo, m)
        else:
            out.reshape(-1)[lo:hi] = m
        for k, v in fsums.items():
            total[k] = total[k] + np.asarray(v, np.float64)
        total["nonfinite"] += np.count_nonzero(np.asarray(masks["nonfinite"]).reshape(-1)[:hi - lo])
        if "keep" in masks:
            # Row by row: count_nonzero(axis=1) is a generic reduction, several times slower than each row's count.
            total["kept"] += [np.count_nonzero(row[:hi - lo]) for row in np.asarray(masks["keep"]).reshape(n, -1)]
        else:
            total["kept"] += hi - lo
        if "flipped" in masks:
            total["flipped"] += np.count_nonzero(np.asarray(masks["flipped"]).reshape(n, -1)[:, :hi - lo])

    pending = None
    for c, (lo, hi, kshape) in enumerate(chunks):
        b, ts = _block_args(get(c))
        result = _host_core(b, ts, w, name_hash, np.int32(c), thresh, static, out_dtype, chunked=chunked)
        if pending is not None:
            finish(*pending)  # XLA works on chunk c meanwhile
        pending = (lo, hi, result)
    finish(*pending)
    total["flipped"] = total["flipped"] / n  # merge_math's convention: the mean over models, times numel
    return out, stats_from_sums(name, total, max(numel, 1))


def row_chunks(shape: Sequence[int], spec: MergeSpec) -> tuple[bool, list[tuple[int, int]]]:
    """(whole, row bounds) of a tensor (HF layout) for ``merge_tensor``; keyed methods draw per chunk, so the
    on-device merge cuts its masks the same way."""
    shape = tuple(shape)
    sparsify = spec.method_pieces.sparsify
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    limit = CHUNK_ELEMENTS if sparsify and sparsify.keyed else min(CHUNK_ELEMENTS, UNKEYED_CHUNK_ELEMENTS)
    rows_per_chunk = max(1, limit // max(row, 1))
    whole = len(shape) < 2 or shape[0] <= rows_per_chunk
    bounds = [(0, shape[0] if shape else 1)] if whole else [
        (i, min(i + rows_per_chunk, shape[0])) for i in range(0, shape[0], rows_per_chunk)]
    return whole, bounds


def stats_from_sums(name: str, total: dict[str, Any], numel: int) -> dict[str, Any]:
    """A tensor's report statistics from ``merge_math``'s sums (float64, added over its chunks); a non-finite
    merged value is an error naming the tensor."""
    if total["nonfinite"]:
        raise MergeError(f"{name}: merge produced {int(total['nonfinite'])} non-finite values (inf/NaN in an input?)")
    norms = np.sqrt(total["sq_norms"])
    kept_norms = np.sqrt(np.diag(total["gram"]))
    return {
        "task_vector_norms": norms,
        "cosine": total["gram"] / np.maximum(kept_norms[:, None] * kept_norms[None, :], 1e-30),
        "kept_fraction": total["kept"] / numel,
        "flipped_fraction": float(total["flipped"]) / numel,
    }


# --------------------------------------------------------------------------- vocab policy

_VOCAB_ROWS = {"model.embed_tokens.weight", "lm_head.weight"}  # HF layout: vocab on axis 0


def merge_with_vocab_policy(name: str, base, thetas: Sequence[Any], primary, spec: MergeSpec,
                            path: str | None = None, sink: Callable[[int, np.ndarray], None] | None = None):
    """merge_tensor, plus the vocab policy for embeddings and lm_head.

    The VLM and the coder may have different vocab sizes. Rows that every model
    has are merged; the output keeps the primary model's (the VLM's) shape,
    and rows beyond the shared ones are the primary's, untouched. ``sink``: see ``merge_tensor``.
    """
    if name in _VOCAB_ROWS:
        rows = min(int(t.shape[0]) for t in [base, *thetas])
        if any(t.shape[1:] != primary.shape[1:] for t in [base, *thetas]):
            raise MergeError(f"{name}: hidden sizes differ between models: "
                             f"{[list(t.shape) for t in [base, *thetas]]}")
        if any(t.shape[0] != rows for t in [base, *thetas]) or primary.shape[0] != rows:
            merged, stats = merge_tensor(name, base[:rows], [t[:rows] for t in thetas], spec, path, sink)
            rest = np.asarray(primary[rows:]).astype(np.dtype(spec.out_dtype))
            stats["vocab_rows_merged"] = rows
            if sink is not None:
                sink(rows * int(np.prod(primary.shape[1:])), rest.reshape(-1))
                return None, stats
            out = np.empty(primary.shape, np.dtype(spec.out_dtype))
            out[:rows] = np.asarray(merged)
            out[rows:] = rest
            return out, stats
    return merge_tensor(name, base, thetas, spec, path, sink)
