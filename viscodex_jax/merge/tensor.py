"""Task-vector merging of one tensor as one jitted pipeline (the methods' pieces: see ``methods``).

Both drivers (params trees and HF dirs) call :func:`merge_with_vocab_policy`
on tensors in HF layout, one HF tensor at a time, so TIES' top-k is per HF
tensor and DARE's random mask (keyed by seed and tensor name) is the same in
both: their outputs are bit-identical.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from viscodex_jax.merge.methods import keyed_draw, kth_largest_magnitudes
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


def _name_hash(name: str) -> np.uint32:
    return np.uint32(int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little"))


def tensor_key(seed: int, name: str) -> jax.Array:
    """A PRNG key per (seed, tensor name): the same draw whatever order tensors come in."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), _name_hash(name))


class _Staging:
    """Reused 64-byte-aligned host buffers, one per input slot, that chunks are copied into before the jitted call.

    XLA:CPU takes a numpy argument without a copy only when it is 64-byte aligned; safetensors data (and a
    memory map of it) is only 8-byte aligned, so every call used to copy each input into a freshly allocated
    buffer, page-faulting it in (most of the merge's system time). One memcpy into a warm buffer replaces that.
    """

    def __init__(self):
        self._bufs: dict[int, np.ndarray] = {}

    def put(self, slot: int, x: np.ndarray) -> np.ndarray:
        if x.ctypes.data % 64 == 0 and x.flags.c_contiguous:
            return x
        buf = self._bufs.get(slot)
        if buf is None or buf.size < x.nbytes + 64:
            buf = self._bufs[slot] = np.empty(x.nbytes + 64, np.uint8)
        off = (-buf.ctypes.data) % 64
        out = buf[off:off + x.nbytes].view(x.dtype).reshape(x.shape)
        np.copyto(out, x)
        return out


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
    d = jnp.stack(thetas).astype(jnp.float32) - base32[None]
    return spec.method_pieces.sparsify.totals(d, keyed_draw(_chunk_key(spec, name_hash, chunk, True), spec), spec)


@functools.partial(jax.jit, static_argnames=("spec", "out_dtype", "chunked"))
def _merge_core(base, thetas, weights, name_hash, chunk, thresh, spec: MergeSpec, out_dtype, chunked: bool):
    """Merges one tensor (or a row chunk of it) as ``merge_math``, with the random mask drawn from its PRNG key.

    ``thetas`` is a tuple (stacked inside the fusion, not on the host). The tensor's PRNG key is derived here
    from ``name_hash`` (and ``chunk`` for a row chunk), as ``tensor_key`` does eagerly.
    """
    draw = keyed_draw(_chunk_key(spec, name_hash, chunk, chunked), spec)
    return merge_math(base, thetas, weights, thresh, draw, spec, out_dtype)


def merge_math(base, thetas, weights, thresh, draw, spec: MergeSpec, out_dtype):
    """The per-tensor merge, traced: one tensor (any layout: every step is elementwise but the sums) -> (merged
    in ``out_dtype``, sums for the report).

    Both the streamed merge (``_merge_core``, HF layout, host arrays) and the on-device merge
    (``merge.on_device``, our layout, sharded arrays) run this function, so their outputs agree bit for bit
    given the same ``thresh`` and ``draw`` (see ``methods.Sparsify``).
    """
    method = spec.method_pieces
    thetas = jnp.stack(thetas)
    base32 = base.astype(jnp.float32)
    d = thetas.astype(jnp.float32) - base32[None]  # [n, ...]
    n = d.shape[0]
    keep = jnp.ones(d.shape, bool)
    sparsified = method.sparsify.keep(d, thresh, draw, spec) if method.sparsify else None
    if sparsified is not None:
        d, keep = sparsified
    w = weights.reshape((n,) + (1,) * (d.ndim - 1)).astype(jnp.float32)
    wd = w * d
    contrib = jnp.broadcast_to(keep, d.shape)
    flipped = jnp.zeros((), jnp.float32)
    if method.consensus:
        elected = jnp.sign(_over_models(wd))
        agree = (jnp.sign(d) == elected[None]) & (d != 0)
        flipped = jnp.mean(((jnp.sign(d) != elected[None]) & (d != 0)).astype(jnp.float32))
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
    # Per-model and pairwise sums of products rather than axis reductions and ``flat @ flat.T``: XLA:CPU runs
    # those on materialised float32 copies of the task vectors (3-4x the merge's own time and memory).
    raw = d if sparsified is None else thetas.astype(jnp.float32) - base32[None]
    numel = int(np.prod(d.shape[1:]))
    gram = [[jnp.sum(d[i] * d[j]) if j >= i else None for j in range(n)] for i in range(n)]
    sums = {
        "sq_norms": jnp.stack([gram[i][i] if sparsified is None else jnp.sum(raw[i] * raw[i]) for i in range(n)]),
        "gram": jnp.stack([jnp.stack([gram[min(i, j)][max(i, j)] for j in range(n)]) for i in range(n)]),
        "kept": (jnp.full((n,), numel, jnp.int32) if sparsified is None
                 else jnp.stack([jnp.sum(keep[i], dtype=jnp.int32) for i in range(n)])),
        "flipped": flipped * numel,
        "nonfinite": jnp.sum(~jnp.isfinite(merged)),
    }
    return merged.astype(out_dtype), sums


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


def merge_tensor(name: str, base: Any, thetas: Sequence[Any], spec: MergeSpec, path: str | None = None):
    """Merges one tensor (HF layout); returns (merged array, stats dict of numpy values).

    ``path`` (our param path) selects per-group weights; defaults to ``name``.
    """
    weights = spec.weights_for(path or name)
    _check_inputs(name, base, thetas, weights)
    sparsify = spec.method_pieces.sparsify
    out_dtype = jnp.dtype(spec.out_dtype)
    n, shape = len(thetas), tuple(base.shape)
    numel = max(int(np.prod(shape)), 1)
    ranks = tuple(sparsify.ranks(spec, numel)) if sparsify and sparsify.ranks else ()
    thresh = kth_largest_magnitudes(base, thetas, ranks) if ranks else np.zeros((n, 0), np.float32)
    whole, bounds = row_chunks(shape, spec)
    name_hash = _name_hash(name)
    w = np.asarray(weights, np.float32)
    static = traced_spec(spec)

    def staged(lo, hi):
        # Staged inputs are borrowed by XLA (no copy): each call must finish before the buffers are reused.
        return [_STAGING.put(i, np.asarray(x) if whole else np.asarray(x[lo:hi]))
                for i, x in enumerate([base, *thetas])]

    if not whole and sparsify and sparsify.needs_totals(spec):
        sums = 0.0
        for c, (lo, hi) in enumerate(bounds):
            ins = staged(lo, hi)
            sums = sums + np.asarray(jax.device_get(_totals_core(ins[0], tuple(ins[1:]), name_hash, np.int32(c),
                                                                 static)), np.float64)
        thresh = sparsify.from_totals(sums)
    thresh = np.asarray(thresh, np.float32)
    out = None
    total: dict[str, np.ndarray] = {}
    for c, (lo, hi) in enumerate(bounds):
        ins = staged(lo, hi)
        merged, sums = _merge_core(ins[0], tuple(ins[1:]), w, name_hash, np.int32(c), thresh, static, out_dtype,
                                   chunked=not whole)
        merged, sums = jax.device_get((merged, sums))
        if whole:
            out = merged
        else:
            if out is None:
                out = np.empty(shape, out_dtype)
            out[lo:hi] = merged
        for k, v in sums.items():
            total[k] = total.get(k, 0) + np.asarray(v, np.float64)
    return out, stats_from_sums(name, total, numel)


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
                            path: str | None = None):
    """merge_tensor, plus the vocab policy for embeddings and lm_head.

    The VLM and the coder may have different vocab sizes. Rows that every model
    has are merged; the output keeps the primary model's (the VLM's) shape,
    and rows beyond the shared ones are the primary's, untouched.
    """
    if name in _VOCAB_ROWS:
        rows = min(int(t.shape[0]) for t in [base, *thetas])
        if any(t.shape[1:] != primary.shape[1:] for t in [base, *thetas]):
            raise MergeError(f"{name}: hidden sizes differ between models: "
                             f"{[list(t.shape) for t in [base, *thetas]]}")
        if any(t.shape[0] != rows for t in [base, *thetas]) or primary.shape[0] != rows:
            merged, stats = merge_tensor(name, base[:rows], [t[:rows] for t in thetas], spec, path)
            out = np.empty(primary.shape, np.dtype(spec.out_dtype))
            out[:rows] = np.asarray(merged)
            out[rows:] = np.asarray(primary[rows:]).astype(out.dtype)
            stats["vocab_rows_merged"] = rows
            return out, stats
    return merge_tensor(name, base, thetas, spec, path)
