"""Each merge method against an independent numpy float64 reference."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from viscodex_jax.merge import MergeError, MergeSpec
from viscodex_jax.merge.tensor import merge_tensor, tensor_key


def _ref(base, thetas, w, method, lam=1.0, density=1.0, masks=None, rescale="inverse_p"):
    """float64 reference, written from the method definitions (not from our code)."""
    base = base.astype(np.float64)
    d = [t.astype(np.float64) - base for t in thetas]
    w = np.asarray(w, np.float64)
    if method == "linear":
        return sum(wi * t.astype(np.float64) for wi, t in zip(w, thetas)) / w.sum()
    if method in ("ties",) and density < 1:
        out = []
        for x in d:
            k = int(np.ceil(density * x.size))
            thr = np.sort(np.abs(x).ravel())[::-1][k - 1]
            out.append(np.where(np.abs(x) >= thr, x, 0.0))
        d = out
    if method in ("dare_linear", "dare_ties") and density < 1:
        out = []
        for x, m in zip(d, masks):
            kept = np.where(m, x, 0.0)
            if rescale == "inverse_p":
                out.append(kept / density)
            else:
                out.append(kept * (np.abs(x).sum() / np.abs(kept).sum()))
        d = out
    if method in ("task_arithmetic", "dare_linear"):
        return base + lam * sum(wi * x for wi, x in zip(w, d))
    # ties / dare_ties: elect sign by weighted mass, disjoint weighted mean
    s = sum(wi * x for wi, x in zip(w, d))
    sign = np.sign(s)
    num = np.zeros_like(base)
    den = np.zeros_like(base)
    for wi, x in zip(w, d):
        agree = (np.sign(x) == sign) & (x != 0)
        num += np.where(agree, wi * x, 0)
        den += np.where(agree, wi, 0)
    return base + lam * np.where(den != 0, num / np.where(den != 0, den, 1), 0)


def _rand(seed, shape=(33, 17), n=2):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(np.float32)
    return base, [base + rng.standard_normal(shape).astype(np.float32) * 0.1 for _ in range(n)]


def _dare_masks(name, spec, n, shape):
    keys = jax.random.split(tensor_key(spec.seed, name), n)
    return [np.asarray(jax.random.bernoulli(k, spec.density, shape)) for k in keys]


@pytest.mark.parametrize("method,n,lam,density,rescale", [
    ("linear", 2, 1.0, 1.0, "inverse_p"),
    ("linear", 3, 1.0, 1.0, "inverse_p"),
    ("task_arithmetic", 2, 1.0, 1.0, "inverse_p"),
    ("task_arithmetic", 3, 0.8, 1.0, "inverse_p"),
    ("ties", 2, 1.0, 0.3, "inverse_p"),
    ("ties", 3, 0.9, 0.5, "inverse_p"),
    ("dare_linear", 2, 1.0, 0.4, "inverse_p"),
    ("dare_linear", 2, 1.0, 0.4, "l1"),
    ("dare_ties", 3, 1.0, 0.6, "inverse_p"),
    ("dare_ties", 2, 0.7, 0.5, "l1"),
])
def test_methods_match_float64_reference(method, n, lam, density, rescale):
    base, thetas = _rand(n + int(density * 10), n=n)
    w = list(np.linspace(0.9, 0.3, n))
    spec = MergeSpec(method=method, weights=tuple(w), lam=lam, density=density, dare_rescale=rescale,
                     out_dtype="float32", seed=5)
    out, stats = merge_tensor("t", base, thetas, spec)
    masks = _dare_masks("t", spec, n, base.shape) if "dare" in method else None
    ref = _ref(base, thetas, w, method, lam, density, masks, rescale)
    assert np.abs(np.asarray(out, np.float64) - ref).max() <= 1e-6
    if "dare" in method:  # masks really dropped about 1 - p of the entries
        assert abs(np.mean(masks) - density) < 0.1
        np.testing.assert_allclose(stats["kept_fraction"], [m.mean() for m in masks], atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_task_arithmetic_with_weights_summing_to_one_is_interpolation_whatever_the_base(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((2, 40, 9)).astype(np.float32)
    for base in (np.zeros_like(a), rng.standard_normal(a.shape).astype(np.float32) * 5):
        spec = MergeSpec(method="task_arithmetic", weights=(0.7, 0.3), out_dtype="float32")
        out, _ = merge_tensor("x", base, [a, b], spec)
        assert np.abs(np.asarray(out, np.float64) - (0.7 * a.astype(np.float64) + 0.3 * b)).max() <= 1e-6


def test_dare_is_reproducible_and_density_one_is_task_arithmetic():
    base, thetas = _rand(7)
    spec = MergeSpec(method="dare_linear", weights=(0.6, 0.4), density=0.5, seed=3, out_dtype="float32")
    a, _ = merge_tensor("w", base, thetas, spec)
    b, _ = merge_tensor("w", base, thetas, spec)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c, _ = merge_tensor("w", base, thetas, MergeSpec(**{**spec.__dict__, "seed": 4}))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    full, _ = merge_tensor("w", base, thetas, MergeSpec(**{**spec.__dict__, "density": 1.0}))
    ta, _ = merge_tensor("w", base, thetas, MergeSpec(method="task_arithmetic", weights=(0.6, 0.4), out_dtype="float32"))
    np.testing.assert_array_equal(np.asarray(full), np.asarray(ta))


def test_output_dtype_default_is_bf16_and_compute_is_fp32():
    base, thetas = _rand(1)
    out, _ = merge_tensor("w", base.astype(np.float16), [t.astype(np.float16) for t in thetas], MergeSpec())
    assert str(out.dtype) == "bfloat16"


def test_errors():
    base, thetas = _rand(0)
    with pytest.raises(MergeError, match="3 weights"):
        merge_tensor("w", base, thetas, MergeSpec(weights=(0.2, 0.3, 0.5)))
    with pytest.raises(MergeError, match="w: model 2 has shape"):
        merge_tensor("w", base, [thetas[0], thetas[1][:3]], MergeSpec())
    with pytest.raises(MergeError, match="dtype int32"):
        merge_tensor("w", base, [thetas[0], thetas[1].astype(np.int32)], MergeSpec())
    with pytest.raises(MergeError, match="unknown merge method"):
        MergeSpec(method="slerp")
    with pytest.raises(MergeError, match="non-finite"):
        merge_tensor("w", base, [thetas[0], np.full_like(base, np.inf)], MergeSpec())


@pytest.mark.parametrize("method,density", [("task_arithmetic", 1.0), ("ties", 0.3), ("linear", 1.0)])
def test_row_chunked_merge_equals_whole_tensor(monkeypatch, method, density):
    """Big tensors are merged in row chunks (bounded memory); the result must not depend on it."""
    from viscodex_jax.merge import tensor as merge_mod

    base, thetas = _rand(11, shape=(40, 9))
    spec = MergeSpec(method=method, weights=(0.6, 0.5), density=density, out_dtype="float32")
    whole, s1 = merge_tensor("emb", base, thetas, spec)
    monkeypatch.setattr(merge_mod, "CHUNK_ELEMENTS", 9 * 7)  # 7 rows per chunk, 6 chunks
    chunked, s2 = merge_tensor("emb", base, thetas, spec)
    assert isinstance(chunked, np.ndarray) and chunked.shape == (40, 9)
    np.testing.assert_array_equal(np.asarray(whole), chunked)
    np.testing.assert_allclose(s1["task_vector_norms"], s2["task_vector_norms"], rtol=1e-6)
    np.testing.assert_allclose(s1["kept_fraction"], s2["kept_fraction"])


def _breadcrumbs_ref(base, thetas, w, lam, drop_largest, drop_smallest):
    """float64, by rank: sort each task vector's magnitudes and zero its largest and smallest entries."""
    base = base.astype(np.float64)
    total, kept = np.zeros_like(base), []
    for wi, t in zip(w, thetas):
        x = t.astype(np.float64) - base
        order = np.argsort(-np.abs(x).ravel(), kind="stable")
        n_top, n_bottom = (int(np.floor(f * x.size + 0.5)) for f in (drop_largest, drop_smallest))
        keep = np.zeros(x.size, bool)
        keep[order[n_top:x.size - n_bottom]] = True
        total += wi * np.where(keep.reshape(x.shape), x, 0.0)
        kept.append(keep.mean())
    return base + lam * total, kept


@pytest.mark.parametrize("n,lam,drop_largest,drop_smallest", [
    (2, 1.0, 0.1, 0.2), (3, 0.8, 0.05, 0.5), (2, 1.0, 0.0, 0.3), (2, 1.0, 0.2, 0.0)])
def test_breadcrumbs_matches_float64_reference(monkeypatch, n, lam, drop_largest, drop_smallest):
    from viscodex_jax.merge import tensor as merge_mod

    base, thetas = _rand(40 + n, n=n)
    w = list(np.linspace(0.9, 0.3, n))
    spec = MergeSpec(method="breadcrumbs", weights=tuple(w), lam=lam, drop_largest=drop_largest,
                     drop_smallest=drop_smallest, out_dtype="float32")
    out, stats = merge_tensor("t", base, thetas, spec)
    ref, kept = _breadcrumbs_ref(base, thetas, w, lam, drop_largest, drop_smallest)
    assert np.abs(np.asarray(out, np.float64) - ref).max() <= 1e-6
    np.testing.assert_array_equal(stats["kept_fraction"], kept)
    monkeypatch.setattr(merge_mod, "CHUNK_ELEMENTS", 17 * 5)  # row chunks see the whole tensor's cut-offs
    chunked, _ = merge_tensor("t", base, thetas, spec)
    np.testing.assert_array_equal(np.asarray(out), chunked)


def test_breadcrumbs_settings_are_checked():
    with pytest.raises(MergeError, match="each must be in \\[0, 1\\) and their sum below 1"):
        MergeSpec(method="breadcrumbs", drop_largest=0.6, drop_smallest=0.4)
    with pytest.raises(MergeError, match="breadcrumbs settings; ties does not use them"):
        MergeSpec(method="ties", drop_largest=0.1)


def test_bfloat16_inputs_merge_like_their_float32_values():
    """Released checkpoints are bf16: they must merge (computed in float32)."""
    import ml_dtypes

    base, thetas = _rand(5)
    bf = lambda x: x.astype(ml_dtypes.bfloat16)
    spec = MergeSpec(method="ties", weights=(0.7, 0.3), density=0.5, out_dtype="float32")
    got, _ = merge_tensor("w", bf(base), [bf(t) for t in thetas], spec)
    want, _ = merge_tensor("w", bf(base).astype(np.float32), [bf(t).astype(np.float32) for t in thetas], spec)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _bf16_steps(x, y):
    """How many bfloat16 values apart x and y are (both bf16, finite): their bit patterns on one ordered line."""
    def ordered(a):
        i = np.asarray(a).view(np.uint16).astype(np.int32)
        return np.where(i & 0x8000, 0x8000 - i, i)  # negatives mirrored below zero, -0 == +0
    return np.abs(ordered(x) - ordered(y))


def test_task_arithmetic_bf16_output_is_the_rounded_float64_reference(monkeypatch):
    """Every bf16 output element of a bf16 task_arithmetic merge is the bf16 rounding of the float64 result,
    or one step from it (the float32 compute rounds once before the final cast), in whole and in chunks."""
    import ml_dtypes

    from viscodex_jax.merge import tensor as merge_mod

    rng = np.random.default_rng(21)
    bf = ml_dtypes.bfloat16
    base = (rng.standard_normal((96, 40)) * 0.02).astype(bf)
    thetas = [(base.astype(np.float32) + rng.standard_normal(base.shape).astype(np.float32) * 2e-3).astype(bf)
              for _ in range(2)]
    spec = MergeSpec(method="task_arithmetic", weights=(0.7, 0.3))
    b64 = base.astype(np.float64)
    ref = b64 + sum(w * (t.astype(np.float64) - b64) for w, t in zip((0.7, 0.3), thetas))
    # float64 -> bfloat16 in one rounding (to nearest, ties to even), not through float32: of the two bf16
    # values around it (float32's bits cut to 16, and the next one out), the nearer in float64
    lo_bits = (ref.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    lo = lo_bits.view(bf).astype(np.float64)
    hi = (lo_bits + np.uint16(1)).view(bf).astype(np.float64)
    d_lo, d_hi = np.abs(ref - lo), np.abs(hi - ref)
    up = (d_hi < d_lo) | ((d_hi == d_lo) & (lo_bits % 2 == 1))
    rounded = (lo_bits + up.astype(np.uint16)).view(bf)
    for chunk in (None, 40 * 7):
        if chunk:
            monkeypatch.setattr(merge_mod, "UNKEYED_CHUNK_ELEMENTS", chunk)
        out, _ = merge_tensor("w", base, thetas, spec)
        out = np.asarray(out)
        assert out.dtype == bf
        steps = _bf16_steps(out, rounded)
        assert steps.max() <= 1, f"{int((steps > 1).sum())} elements more than one bf16 step from float64"
        assert (steps == 0).mean() >= 0.99  # a step off is the rare double-rounding case, not the rule


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_l1_in_row_chunks_rescales_by_the_whole_tensor(monkeypatch, method):
    """A big tensor's DARE-l1 merge runs in row chunks (memory bounded like the other methods): each chunk
    draws its own mask, and the rescale still uses the L1 norms of the whole tensor."""
    from viscodex_jax.merge import tensor as merge_mod

    base, thetas = _rand(31, shape=(40, 9), n=2)
    spec = MergeSpec(method=method, weights=(0.6, 0.4), density=0.5, dare_rescale="l1", out_dtype="float32")
    monkeypatch.setattr(merge_mod, "CHUNK_ELEMENTS", 9 * 7)  # 7 rows per chunk, 6 chunks
    out, stats = merge_tensor("emb", base, thetas, spec)
    masks = [np.zeros((40, 9), bool) for _ in thetas]
    for c, lo in enumerate(range(0, 40, 7)):
        keys = jax.random.split(jax.random.fold_in(tensor_key(spec.seed, "emb"), c), len(thetas))
        for m, k in zip(masks, keys):
            m[lo:lo + 7] = np.asarray(jax.random.bernoulli(k, spec.density, (min(7, 40 - lo), 9)))
    ref = _ref(base, thetas, spec.weights, method, density=0.5, masks=masks, rescale="l1")
    assert np.abs(np.asarray(out, np.float64) - ref).max() <= 1e-6
    np.testing.assert_allclose(stats["kept_fraction"], [m.mean() for m in masks])
    assert 0.3 < min(stats["kept_fraction"]) and max(stats["kept_fraction"]) < 0.7
