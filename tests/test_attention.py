"""Memory-efficient attention (blockwise, splash in interpret mode, cuDNN argument construction) against the XLA reference.

Outputs are compared on rows that have at least one allowed key; the loss
weights the other rows by zero, as the model does (their outputs are ignored),
so gradients are comparable everywhere. Tolerance: 1e-5 absolute, float32.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from viscodex_jax.model import attention as A

TOL = 1e-5


def _ids(*runs):
    """Segment ids from (id, length) runs."""
    return np.concatenate([np.full(n, i, np.int32) for i, n in runs])


def _case(name):
    """(q_shape, kv_len, kv_heads, q_seg [B,T], kv_seg [B,S], causal, q_offset)."""
    if name == "causal_left_pad":
        seg = np.stack([_ids((-1, 5), (0, 35)), _ids((0, 40))])
        return (2, 40, 4, 16), 40, 4, seg, seg, True, 0
    if name == "packed_three_segments":
        seg = np.stack([_ids((0, 11), (1, 20), (2, 9), (-1, 8)), _ids((-1, 6), (0, 30), (1, 12))])
        return (2, 48, 4, 16), 48, 4, seg, seg, True, 0
    if name == "vision_windows":
        seg = _ids((0, 16), (1, 16), (2, 8), (3, 24), (-1, 8))[None]
        return (1, 72, 4, 16), 72, 4, seg, seg, False, 0
    if name == "gqa_h4_k2":
        seg = np.stack([_ids((-1, 3), (0, 17), (1, 12)), _ids((0, 20), (1, 12))])
        return (2, 32, 4, 16), 32, 2, seg, seg, True, 0
    if name == "gqa_h4_k1":
        seg = np.stack([_ids((0, 9), (1, 23)), _ids((-1, 10), (0, 22))])
        return (2, 32, 4, 16), 32, 1, seg, seg, True, 0
    if name.startswith("decode_t"):
        # Cache of 40 slots, left padding of 3, queries written at slot 20 (or 25),
        # slots after the last query are invalid (never written yet).
        t = int(name.split("_")[1][1:])
        off = 25 if t == 1 else 20
        kv = np.stack([_ids((-1, 3), (0, off + t - 3), (-1, 40 - off - t)), _ids((0, off + t), (-1, 40 - off - t))])
        qs = np.zeros((2, t), np.int32)
        q_offset = np.array([off, off], np.int32) if name.endswith("array_offset") else off
        return (2, t, 4, 16), 40, 2, qs, kv, True, q_offset
    if name == "uneven_causal":
        seg = np.stack([_ids((0, 13), (1, 24)), _ids((-1, 4), (0, 33))])
        return (2, 37, 4, 16), 37, 2, seg, seg, True, 0
    if name == "uneven_cross":
        # Non-causal, T != S, neither a multiple of the tiles.
        qs = np.stack([_ids((0, 12), (1, 9)), _ids((0, 21))])
        kv = np.stack([_ids((0, 30), (1, 20), (-1, 3)), _ids((-1, 7), (0, 46))])
        return (2, 21, 4, 16), 53, 2, qs, kv, False, 0
    raise KeyError(name)


CASES = ["causal_left_pad", "packed_three_segments", "vision_windows", "gqa_h4_k2", "gqa_h4_k1", "decode_t1",
         "decode_t8", "decode_t8_array_offset", "uneven_causal", "uneven_cross"]


@functools.lru_cache(maxsize=None)
def _inputs(name):
    (b, t, h, d), s, kh, qs, ks, causal, off = _case(name)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((b, t, h, d), (b, s, kh, d), (b, s, kh, d)))
    qs, ks = jnp.asarray(qs), jnp.asarray(ks)
    has_key = np.asarray(jnp.any(A.dense_mask(qs, ks, causal=causal, q_offset=off)[:, 0], axis=-1))  # [B, T]
    w = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) * has_key[:, :, None, None]
    return (q, k, v), dict(q_segment_ids=qs, kv_segment_ids=ks, causal=causal, q_offset=off), w, has_key


def _value_and_grads(name, impl, **kw):
    (q, k, v), mask_kw, w, _ = _inputs(name)
    mask_kw = dict(mask_kw)
    offset = mask_kw.pop("q_offset")
    if not isinstance(offset, int):
        offset = jnp.asarray(offset)  # traced below: the dynamic-offset path

    def loss(q, k, v, offset):
        out = A.attention(q, k, v, q_offset=offset, impl=impl, **mask_kw, **kw)
        return jnp.sum(out * w), out

    f = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    if isinstance(offset, int):
        (_, out), grads = jax.jit(lambda q, k, v: f(q, k, v, offset))(q, k, v)
    else:
        (_, out), grads = jax.jit(f)(q, k, v, offset)
    return np.asarray(out), [np.asarray(g) for g in grads]


@functools.lru_cache(maxsize=None)
def _reference(name):
    return _value_and_grads(name, "xla")


def _max_diffs(name, impl, **kw):
    out, grads = _value_and_grads(name, impl, **kw)
    ref_out, ref_grads = _reference(name)
    has_key = _inputs(name)[3]
    assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in grads)
    d_out = float(np.max(np.abs(out - ref_out)[has_key]))
    return d_out, [float(np.max(np.abs(g - r))) for g, r in zip(grads, ref_grads)]


@pytest.mark.parametrize("name", CASES)
def test_blockwise_matches_reference(name):
    # Tiles of 16 so every case spans several q and kv tiles, with ragged last tiles.
    d_out, d_grads = _max_diffs(name, "blockwise", block_q=16, block_kv=16)
    assert d_out <= TOL and max(d_grads) <= TOL, (d_out, d_grads)


@pytest.mark.parametrize("name", CASES)
def test_splash_interpret_matches_reference(name):
    d_out, d_grads = _max_diffs(name, "splash", interpret=True, block_q=128, block_kv=128)
    assert d_out <= TOL and max(d_grads) <= TOL, (d_out, d_grads)


def test_rows_without_keys_are_finite_and_blockwise_gives_zeros():
    (q, k, v), kw, _, has_key = _inputs("packed_three_segments")
    assert not has_key.all()  # the case does have padding rows
    for impl, extra in (("xla", {}), ("blockwise", dict(block_q=16, block_kv=16)), ("splash", dict(interpret=True))):
        out = np.asarray(jax.jit(functools.partial(A.attention, impl=impl, **kw, **extra))(q, k, v))
        assert np.all(np.isfinite(out)), impl
        if impl == "blockwise":
            assert np.all(out[~has_key] == 0.0)


def test_unknown_impl_names_accepted_values():
    (q, k, v), kw, _, _ = _inputs("gqa_h4_k2")
    with pytest.raises(ValueError, match="blockwise"):
        A.attention(q, k, v, impl="flash", **kw)


def test_blockwise_skips_tiles_outside_causal_and_segments():
    # Row tiles of 16: in a causal 48-token sequence the tiles above the diagonal are skipped.
    seg = jnp.asarray(np.stack([_ids((0, 16), (1, 16), (2, 16))] * 2))
    blocks = lambda x: x.reshape(2, 3, 16).transpose(1, 0, 2)  # noqa: E731
    slot = blocks(jnp.broadcast_to(jnp.arange(48, dtype=jnp.int32), (2, 48)))
    needed = np.asarray(A._needed_tiles(blocks(seg), blocks(seg), slot, causal=True))
    np.testing.assert_array_equal(needed, np.eye(3, dtype=bool))  # three segments, one tile each
    needed = np.asarray(A._needed_tiles(blocks(seg * 0), blocks(seg * 0), slot, causal=True))
    np.testing.assert_array_equal(needed, np.tril(np.ones((3, 3), bool)))


def test_cudnn_segments_describe_the_reference_mask():
    seg = jnp.asarray(np.stack([_ids((-1, 3), (0, 5), (1, 4), (4, 4)), _ids((7, 10), (-1, 6))]))
    seqlen, offsets = (np.asarray(x) for x in jax.jit(A.cudnn_segments)(seg))
    assert seqlen.shape == (2, 16) and offsets.shape == (2, 17)
    np.testing.assert_array_equal(seqlen[0, :4], [5, 4, 4, -1])
    np.testing.assert_array_equal(offsets[0, :4], [3, 8, 12, -1])
    np.testing.assert_array_equal(seqlen[1, :2], [10, -1])
    np.testing.assert_array_equal(offsets[1, :2], [0, -1])
    # cuDNN's reading of (seqlen, offsets): tokens in the same segment attend each other.
    member = np.full((2, 16), -1)
    for b in range(2):
        for j in range(16):
            if seqlen[b, j] >= 0:
                member[b, offsets[b, j]: offsets[b, j] + seqlen[b, j]] = j
    rebuilt = (member[:, :, None] == member[:, None, :]) & (member[:, None, :] >= 0)
    np.testing.assert_array_equal(rebuilt, np.asarray(A.dense_mask(seg, seg, causal=False)[:, 0]))
    # jax's own packing fix-up (run before the cuDNN call) accepts these shapes.
    from jax._src.cudnn import fused_attention_stablehlo as fa

    q = jnp.zeros((2, 16, 2, 8), jnp.bfloat16)
    qlen, _, qoff, _ = jax.jit(fa._fix_seqlen_offsets)(seqlen, seqlen, offsets, offsets, q, q)
    np.testing.assert_array_equal(np.asarray(qlen).reshape(-1)[:4], [5, 4, 4, 10])
    np.testing.assert_array_equal(np.asarray(qoff).reshape(-1)[:5] // (2 * 8), [3, 8, 12, 16, 32])


def test_cudnn_without_gpu_falls_back_to_blockwise():
    d_out, d_grads = _max_diffs("packed_three_segments", "cudnn")
    assert d_out <= TOL and max(d_grads) <= TOL, (d_out, d_grads)


def test_blockwise_at_4096_matches_reference_in_a_quarter_of_the_memory():
    b, t, h, kh, d = 1, 4096, 2, 1, 16
    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, kh, d)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(_ids((-1, 100), (0, 1500), (1, 2000), (2, 496))[None])
    w = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) * (seg >= 0)[:, :, None, None]

    def step(impl, seg=seg, w=w, q=q, k=k, v=v):
        def loss(q, k, v):
            out = A.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, impl=impl)
            return jnp.sum(out * w), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)).lower(q, k, v).compile()

    ref, blk = step("xla"), step("blockwise")
    (_, ref_out), ref_grads = ref(q, k, v)
    (_, out), grads = blk(q, k, v)
    valid = np.asarray(seg[0] >= 0)
    assert float(np.max(np.abs(np.asarray(out - ref_out))[:, valid])) <= TOL
    for g, r in zip(grads, ref_grads):
        assert float(np.max(np.abs(np.asarray(g - r)))) <= TOL
    ref_tmp = ref.memory_analysis().temp_size_in_bytes
    blk_tmp = blk.memory_analysis().temp_size_in_bytes
    print(f"T=4096 temporaries: reference {ref_tmp / 2**20:.1f} MiB, blockwise {blk_tmp / 2**20:.1f} MiB")
    assert ref_tmp >= 4 * blk_tmp, (ref_tmp, blk_tmp)
    # Linear, not quadratic: a quarter of the length (compiled only) leaves most of the
    # temporaries (the per-tile buffers), where the reference's would shrink 16x.
    quarter = step("blockwise", seg=seg[:, :1024], w=w[:, :1024], q=q[:, :1024], k=k[:, :1024], v=v[:, :1024])
    small_tmp = quarter.memory_analysis().temp_size_in_bytes
    print(f"blockwise temporaries: T=1024 {small_tmp / 2**20:.1f} MiB")
    assert blk_tmp <= 2 * small_tmp, (blk_tmp, small_tmp)


@pytest.mark.parametrize("impl", ["blockwise", "splash"])
def test_attention_on_mesh_matches_unsharded(impl):
    # conftest gives 8 CPU devices: rows over data x fsdp, heads (4 q, 2 kv) over tensor.
    if len(jax.devices()) < 8:
        pytest.fail("needs the 8 fake CPU devices that tests/conftest.py sets up")
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    (q, k, v), kw, w, has_key = _inputs("gqa_h4_k2")
    q, k, v, w = (jnp.concatenate([x, x[::-1]]) for x in (q, k, v, w))  # 4 rows: one per data x fsdp shard
    kw = {n: jnp.concatenate([x, x[::-1]]) if n.endswith("ids") else x for n, x in kw.items()}
    extra = dict(interpret=True) if impl == "splash" else dict(block_q=16, block_kv=16)

    def loss(fn, q, k, v):
        out = fn(q, k, v, impl=impl, **kw, **extra)
        return jnp.sum(out * w), out

    on_mesh = functools.partial(A.attention_on_mesh, mesh)
    (_, out), grads = jax.jit(jax.value_and_grad(functools.partial(loss, on_mesh), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    (_, ref), ref_grads = jax.jit(jax.value_and_grad(functools.partial(loss, A.attention), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    spec = jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)
    assert out.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), 4), out.sharding
    valid = np.concatenate([has_key, has_key[::-1]])
    assert float(np.max(np.abs(np.asarray(out - ref))[valid])) <= TOL
    for g, r in zip(grads, ref_grads):
        assert float(np.max(np.abs(np.asarray(g - r)))) <= TOL
