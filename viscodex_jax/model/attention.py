"""Attention with segment ids: one entry point, four implementations.

Masks are described by segment ids instead of a dense [T, S] boolean, so the
memory-efficient kernels never have to build one. Query t may attend key s iff
``q_seg[t] == kv_seg[s]``, ``kv_seg[s] >= 0`` and, when causal,
``s <= t + q_offset``. Negative ids are padding; a query with no allowed key
gets a finite output that callers must ignore (the XLA reference gives the
uniform average of v there, the others give zeros).

Implementations (``IMPLS``):
  xla        the numerical reference: builds the dense mask, forms [B, K, G, T, S]
             float32 logits. Tests and tiny models only.
  blockwise  plain JAX online softmax over KV blocks with a flash-style
             custom VJP; memory linear in T and S, forward and backward. The
             default off-TPU; runs anywhere.
  splash     Pallas TPU splash attention (``interpret=True`` runs it on CPU).
  splash_interpret
             the same kernel, always interpreted: how a model config runs splash
             on CPU (tests of the model and the train step with this kernel).
  cudnn      cuDNN fused attention on GPU, packed (ragged) layout for segments.

Cases an implementation cannot express run blockwise instead, with the same
results: splash with a causal ``q_offset`` that is not a Python int (its
causal mask is a static object, so decode with a traced cache index cannot
use it); cudnn for float32 inputs, for T != S, for causal with q_offset != 0
(cuDNN's causal mask is top-left aligned), and where cuDNN rejects the
configuration at trace time (logged as a warning: no cuDNN, packed layout
before Hopper, head dim over the limit).

On a multi-device mesh call ``attention_on_mesh``: a Pallas kernel is opaque
to XLA's sharding propagation.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

IMPLS = ("xla", "blockwise", "splash", "splash_interpret", "cudnn")

# Large finite negative instead of -inf: a fully masked row then gives
# a uniform softmax instead of NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

_log = logging.getLogger(__name__)


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    q_segment_ids: Array,
    kv_segment_ids: Array,
    causal: bool,
    q_offset: int | Array = 0,
    impl: str = "xla",
    block_q: int = 512,
    block_kv: int = 512,
    interpret: bool = False,
) -> Array:
    """Grouped-query attention. q [B,T,H,D]; k, v [B,S,K,D]; H % K == 0; output [B,T,H,D] in q.dtype.

    q_segment_ids [B,T] and kv_segment_ids [B,S] are int32; q_offset is the cache
    slot of query 0 (python int, int32 scalar or [B]); block_q/block_kv size the
    tiles of blockwise and splash; interpret runs splash's Pallas kernel on CPU.
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    _check_shapes(q, k, v, q_segment_ids, kv_segment_ids)
    q_segment_ids = q_segment_ids.astype(jnp.int32)
    kv_segment_ids = kv_segment_ids.astype(jnp.int32)
    if impl == "xla":
        mask = dense_mask(q_segment_ids, kv_segment_ids, causal=causal, q_offset=q_offset)
        return reference_attention(q, k, v, mask)
    if impl == "splash_interpret":
        impl, interpret = "splash", True
    if impl == "splash":
        if causal and not _is_static_int(q_offset):
            # Splash's causal mask is a static numpy-level object; a traced
            # offset (decode with a cache) cannot be expressed in it.
            impl = "blockwise"
        else:
            return _splash(q, k, v, q_segment_ids, kv_segment_ids, causal, int(q_offset) if causal else 0,
                           block_q, block_kv, interpret)
    if impl == "cudnn":
        out = _cudnn(q, k, v, q_segment_ids, kv_segment_ids, causal, q_offset)
        if out is not None:
            return out
    return blockwise_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, q_offset=q_offset,
                               block_q=block_q, block_kv=block_kv)


def attention_on_mesh(
    mesh: jax.sharding.Mesh,
    q: Array,
    k: Array,
    v: Array,
    *,
    q_segment_ids: Array,
    kv_segment_ids: Array,
    q_offset: int | Array = 0,
    batch_axes: tuple[str, ...] = ("data", "fsdp"),
    head_axis: str | None = "tensor",
    **kwargs,
) -> Array:
    """``attention`` under shard_map: rows split over ``batch_axes``, heads over ``head_axis``.

    A Pallas kernel is opaque to XLA's sharding propagation, which would
    otherwise gather q/k/v onto every chip; every implementation here is
    independent per row and per kv-head group, so each shard runs it on its
    own slice. Axes that do not divide the batch (or, for heads, both H and K,
    which keeps each query head with its kv head) are left out rather than
    failing. ``kwargs`` are the rest of ``attention``'s (causal, impl, ...).
    """
    from jax.sharding import PartitionSpec as P

    b, h, kh = q.shape[0], q.shape[2], k.shape[2]
    rows, n = [], 1
    for a in batch_axes:
        if mesh.shape.get(a, 1) > 1 and b % (n * mesh.shape[a]) == 0:
            rows.append(a)
            n *= mesh.shape[a]
    row = tuple(rows) if rows else None
    hs = mesh.shape.get(head_axis, 1) if head_axis else 1
    head = head_axis if hs > 1 and h % hs == 0 and kh % hs == 0 else None
    qkv, seg = P(row, None, head, None), P(row, None)
    static_offset = _is_static_int(q_offset)
    offsets = jnp.zeros((b,), jnp.int32) if static_offset else _offsets(q_offset, b)

    def body(q, k, v, q_seg, kv_seg, off):
        return attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                         q_offset=q_offset if static_offset else off, **kwargs)

    f = jax.shard_map(body, mesh=mesh, in_specs=(qkv, qkv, qkv, seg, seg, P(row)), out_specs=qkv, check_vma=False)
    return f(q, k, v, q_segment_ids, kv_segment_ids, offsets)


def _check_shapes(q, k, v, q_seg, kv_seg):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects q [B,T,H,D], k/v [B,S,K,D]; got q {q.shape}, k {k.shape}, v {v.shape}")
    b, t, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: k {k.shape} and v {v.shape} must be [B={b}, S, K, D={d}]")
    if h % k.shape[2]:
        raise ValueError(f"attention: query heads {h} must be a multiple of key/value heads {k.shape[2]}")
    if q_seg.shape != (b, t) or kv_seg.shape != (b, k.shape[1]):
        raise ValueError(f"attention: q_segment_ids {q_seg.shape} must be {(b, t)} and kv_segment_ids "
                         f"{kv_seg.shape} must be {(b, k.shape[1])}")


def _is_static_int(x) -> bool:
    return isinstance(x, (int, np.integer))


def _offsets(q_offset, b: int) -> Array:
    return jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (b,))


# ----------------------------------------------------------------------------- reference


def dense_mask(q_segment_ids: Array, kv_segment_ids: Array, *, causal: bool, q_offset=0) -> Array:
    """bool [B, 1, T, S] (True = attend) with the module's rule. Forms [T, S]: reference only."""
    b, t = q_segment_ids.shape
    s = kv_segment_ids.shape[1]
    m = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] >= 0)
    if causal:
        slot = jnp.arange(t, dtype=jnp.int32)[None, :, None] + _offsets(q_offset, b)[:, None, None]
        m = m & (jnp.arange(s, dtype=jnp.int32)[None, None, :] <= slot)
    return m[:, None]


def reference_attention(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
    """The XLA reference: float32 logits and softmax over the dense mask (the numerical reference).

    mask: bool broadcastable to [B, 1, T, S]. Softmax in float32.
    """
    b, t, h, d = q.shape
    kh = k.shape[2]
    g = h // kh
    qg = q.reshape(b, t, kh, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * d**-0.5
    if mask is not None:
        m = jnp.broadcast_to(mask, (b, 1, t, k.shape[1]))[:, :, None]
        logits = jnp.where(m, logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


# ----------------------------------------------------------------------------- blockwise


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def blockwise_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool, q_offset=0,
                        block_q: int = 512, block_kv: int = 512) -> Array:
    """Online-softmax attention over [block_q, block_kv] tiles; see module docstring for the mask rule.

    T and S are padded to whole blocks (padding ids are -1, so padded keys are
    never attended); blocks are cut no larger than the sequence, so decode
    (T=1) does not pay for a 512-row tile.
    """
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = h // kh
    bq, bkv = min(block_q, t), min(block_kv, s)
    tp, sp = _round_up(t, bq), _round_up(s, bkv)
    nq, nk = tp // bq, sp // bkv
    qs = jnp.pad(q_segment_ids, ((0, 0), (0, tp - t)), constant_values=-1)
    ks = jnp.pad(kv_segment_ids, ((0, 0), (0, sp - s)), constant_values=-1)
    qp = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    kp = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    # Blocks on the leading axis so the loops index them with one dynamic index.
    qb = qp.reshape(b, nq, bq, kh, g, d).transpose(1, 0, 3, 4, 2, 5)  # [nq, B, K, G, bq, D]
    kb = kp.reshape(b, nk, bkv, kh, d).transpose(1, 0, 3, 2, 4)  # [nk, B, K, bkv, D]
    vb = vp.reshape(b, nk, bkv, kh, d).transpose(1, 0, 3, 2, 4)
    qsb = qs.reshape(b, nq, bq).transpose(1, 0, 2)  # [nq, B, bq]
    ksb = ks.reshape(b, nk, bkv).transpose(1, 0, 2)  # [nk, B, bkv]
    slot = jnp.arange(tp, dtype=jnp.int32)[None, :] + _offsets(q_offset, b)[:, None]
    slotb = slot.reshape(b, nq, bq).transpose(1, 0, 2)  # [nq, B, bq]
    out = _flash(qb, kb, vb, qsb, ksb, slotb, causal)  # [nq, B, K, G, bq, D]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, tp, h, d)
    return out[:, :t]


def _tile_mask(qs, ks, slot, kv_start, causal):
    """bool [B, 1, 1, bq, bkv] for one tile."""
    m = (qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] >= 0)
    if causal:
        kpos = kv_start + jnp.arange(ks.shape[1], dtype=jnp.int32)
        m = m & (kpos[None, None, :] <= slot[:, :, None])
    return m[:, None, None]


def _needed_tiles(qsb, ksb, slotb, causal):
    """bool [nq, nk]: the tile may hold an allowed pair for some row (else skipped).

    Conservative: segment-id ranges overlap, and (causal) the tile's first key
    is not after the tile's last query slot.
    """
    big = jnp.iinfo(jnp.int32).max
    q_lo = jnp.min(jnp.where(qsb >= 0, qsb, big), axis=2)  # [nq, B]
    q_hi = jnp.max(jnp.where(qsb >= 0, qsb, -1), axis=2)
    k_lo = jnp.min(jnp.where(ksb >= 0, ksb, big), axis=2)  # [nk, B]
    k_hi = jnp.max(jnp.where(ksb >= 0, ksb, -1), axis=2)
    ok = (q_lo[:, None] <= k_hi[None, :]) & (k_lo[None, :] <= q_hi[:, None])  # [nq, nk, B]
    if causal:
        bkv = ksb.shape[2]
        kv_start = jnp.arange(ksb.shape[0], dtype=jnp.int32) * bkv
        ok = ok & (kv_start[None, :, None] <= jnp.max(slotb, axis=2)[:, None, :])
    return jnp.any(ok, axis=2)


def _scores(qi, kj, qs, ks, slot, kv_start, causal, scale):
    s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
    m = _tile_mask(qs, ks, slot, kv_start, causal)
    return jnp.where(m, s, MASK_VALUE), m


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(qb, kb, vb, qsb, ksb, slotb, causal):
    return _flash_fwd(qb, kb, vb, qsb, ksb, slotb, causal)[0]


def _flash_fwd(qb, kb, vb, qsb, ksb, slotb, causal):
    nk, bkv = kb.shape[0], kb.shape[3]
    scale = qb.shape[-1] ** -0.5
    needed = _needed_tiles(qsb, ksb, slotb, causal)

    def q_block(_, xs):
        qi, qs, slot, need = xs
        shape = qi.shape[:-1]

        def kv_block(j, carry):
            def compute(carry):
                m_prev, l_prev, acc = carry
                s, mask = _scores(qi, kb[j], qs, ksb[j], slot, j * bkv, causal, scale)
                m_new = jnp.maximum(m_prev, s.max(axis=-1))
                # Masked entries are zeroed, not just pushed down, so a row whose
                # first tiles are all masked does not average their values in.
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                alpha = jnp.exp(m_prev - m_new)
                pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vb.dtype), vb[j], preferred_element_type=jnp.float32)
                return m_new, alpha * l_prev + p.sum(axis=-1), alpha[..., None] * acc + pv

            return jax.lax.cond(need[j], compute, lambda c: c, carry)

        init = (jnp.full(shape, MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(qi.shape, jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, nk, kv_block, init)
        empty = l == 0.0  # no allowed key: zeros out, and a finite logsumexp
        out = jnp.where(empty[..., None], 0.0, acc / jnp.where(empty, 1.0, l)[..., None])
        lse = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))
        return None, (out.astype(qi.dtype), lse)

    _, (out, lse) = jax.lax.scan(q_block, None, (qb, qsb, slotb, needed))
    return out, (qb, kb, vb, qsb, ksb, slotb, out, lse)


def _flash_bwd(causal, res, dout):
    """One pass over KV tiles; dK/dV accumulate per tile, dQ in a carried float32 buffer."""
    qb, kb, vb, qsb, ksb, slotb, out, lse = res
    nq, bkv = qb.shape[0], kb.shape[3]
    scale = qb.shape[-1] ** -0.5
    needed = _needed_tiles(qsb, ksb, slotb, causal)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [nq, B, K, G, bq]

    def kv_block(dq, xs):
        j, kj, vj, ks, need = xs

        def q_block(i, carry):
            def compute(carry):
                dq, dk, dv = carry
                qi, doi = qb[i], dout[i]
                s, mask = _scores(qi, kj, qsb[i], ks, slotb[i], j * bkv, causal, scale)
                p = jnp.where(mask, jnp.exp(s - lse[i][..., None]), 0.0)
                dv = dv + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
                dp = jnp.einsum("bkgqd,bksd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
                ds = p * (dp - delta[i][..., None]) * scale
                dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32)
                dqi = jnp.einsum("bkgqs,bksd->bkgqd", ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32)
                return dq.at[i].add(dqi), dk, dv

            return jax.lax.cond(need[i], compute, lambda c: c, carry)

        zeros = jnp.zeros(kj.shape, jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(0, nq, q_block, (dq, zeros, zeros))
        return dq, (dk, dv)

    nk = kb.shape[0]
    xs = (jnp.arange(nk, dtype=jnp.int32), kb, vb, ksb, needed.T)
    dq, (dk, dv) = jax.lax.scan(kv_block, jnp.zeros(qb.shape, jnp.float32), xs)
    return dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- splash (TPU)


def _splash_modules():
    """Pallas' splash kernel and mask modules, imported on first use: importing Pallas' TPU lowering takes
    0.2 s, which every process that never runs splash (a merge, a conversion) would otherwise pay."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    return sk, sm


def _splash(q, k, v, q_seg, kv_seg, causal, q_offset, block_q, block_kv, interpret):
    """Pallas splash attention, one kernel call per batch row (vmap), GQA native.

    The kernel's segment test is plain equality, so padding is remapped to two
    different negative ids (queries -1, keys -2) that never match each other or
    a real id. T and S are padded to the tile sizes, which must be multiples of
    128 lanes.
    """

    b, t, h, d = q.shape
    s = k.shape[1]
    bq = min(_round_up(block_q, 128), _round_up(t, 128))
    bkv = min(_round_up(block_kv, 128), _round_up(s, 128))
    tp, sp = _round_up(t, bq), _round_up(s, bkv)
    qs = jnp.pad(jnp.where(q_seg >= 0, q_seg, -1), ((0, 0), (0, tp - t)), constant_values=-1)
    ks = jnp.pad(jnp.where(kv_seg >= 0, kv_seg, -2), ((0, 0), (0, sp - s)), constant_values=-2)
    # Scale q up front: the kernel computes plain q.k.
    qh = jnp.pad((q * jnp.asarray(d**-0.5, q.dtype)).transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, tp - t), (0, 0)))
    kh = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    vh = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    kernel = _splash_kernel(h, tp, sp, causal, q_offset, bq, bkv, interpret)
    out = jax.vmap(kernel)(qh, kh, vh, segment_ids=_splash_modules()[0].SegmentIds(q=qs, kv=ks))
    return out[:, :, :t].transpose(0, 2, 1, 3).astype(q.dtype)


def _splash_kernel(h, tp, sp, causal, q_offset, bq, bkv, interpret):
    """A splash kernel for one shape, built afresh for every trace.

    The kernel holds its block-sparsity tables as arrays; a kernel cached across
    traces leaks the tracers of whichever transformation (grad under remat, scan)
    first built it, so it is not cached. Building it is host work once per trace.
    """

    sk, sm = _splash_modules()
    one = sm.CausalMask((tp, sp), offset=q_offset) if causal else sm.FullMask((tp, sp))
    sizes = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, use_fused_bwd_kernel=True)
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(sm.MultiHeadMask([one] * h), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


# ----------------------------------------------------------------------------- cuDNN (GPU)


def cudnn_segments(segment_ids: Array) -> tuple[Array, Array]:
    """Packed-layout description of contiguous segments for cuDNN: (seqlen [B, M], offsets [B, M+1]).

    Segment k of row b covers tokens offsets[b, k] .. offsets[b, k] + seqlen[b, k] - 1;
    unused entries are -1. A segment is a maximal run of one non-negative id;
    padding runs (negative ids) are not segments. M = number of tokens, the
    most a row can hold, so the shape is static.
    """
    b, t = segment_ids.shape
    valid = segment_ids >= 0
    prev = jnp.pad(segment_ids, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    start = valid & (segment_ids != prev)
    idx = jnp.cumsum(start, axis=1) - 1  # segment index of each token (valid tokens)
    pos = jnp.arange(t, dtype=jnp.int32)
    rows = jnp.arange(b)[:, None]
    seg_of = jnp.where(valid, idx, t)  # out-of-range index: dropped by the scatter below
    seqlen = jnp.zeros((b, t), jnp.int32).at[rows, seg_of].add(1, mode="drop")
    offsets = jnp.full((b, t + 1), -1, jnp.int32).at[rows, jnp.where(start, idx, t + 1)].set(
        jnp.broadcast_to(pos, (b, t)), mode="drop")
    n = jnp.sum(start, axis=1, keepdims=True)
    seqlen = jnp.where(jnp.arange(t)[None, :] < n, seqlen, -1)
    return seqlen, offsets


def _cudnn(q, k, v, q_seg, kv_seg, causal, q_offset):
    """cuDNN fused attention with segments in cuDNN's packed layout; None means "use blockwise".

    Segments come from kv_segment_ids alone and apply to queries at the same
    positions, so this path needs self-attention (T == S) with q ids equal to kv
    ids wherever kv ids are valid, and each id in one contiguous run (true of
    packed rows and of window-permuted vision patches). cuDNN's causal mask is
    top-left aligned, hence no offset. Rows outside every segment are zeroed,
    and where() keeps any unwritten values out of the gradients.
    """
    t, s = q.shape[1], k.shape[1]
    if q.dtype not in (jnp.bfloat16, jnp.float16) or t != s:
        return None
    if causal and not (_is_static_int(q_offset) and int(q_offset) == 0):
        return None
    # Segments (packed layout) are only reachable through jax's internal cuDNN
    # module; jax.nn.dot_product_attention takes a dense mask or lengths only.
    from jax._src.cudnn import fused_attention_stablehlo as fa

    seqlen, offsets = cudnn_segments(kv_seg)
    valid = kv_seg >= 0
    zero = lambda x: jnp.where(valid[:, :, None, None], x, jnp.zeros((), x.dtype))  # noqa: E731
    mask_type = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
    try:
        out = fa.dot_product_attention(zero(q), zero(k), zero(v), q_seqlen=seqlen, kv_seqlen=seqlen,
                                       q_offsets=offsets, kv_offsets=offsets, scale=q.shape[-1] ** -0.5,
                                       mask_type=mask_type, qkv_layout="BTNH")
    except (NotImplementedError, RuntimeError) as e:
        # e.g. packed layout before Hopper, head dim over the limit, no cuDNN.
        _log.warning("cudnn attention unavailable (%s); using blockwise", e)
        return None
    q_valid = (q_seg == kv_seg) & valid
    return jnp.where(q_valid[:, :, None, None], out, jnp.zeros((), out.dtype))
