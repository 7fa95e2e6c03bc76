"""The streamed k-th largest selection (merge.select) and the three ways merge_tensor finds its thresholds
(resident + whole partition, resident + streamed, re-read + streamed) give the same bits."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from viscodex_jax.merge import MergeSpec, select
from viscodex_jax.merge.file_tensor import FileTensor
from viscodex_jax.merge.methods import select_kth_largest
from viscodex_jax.merge.tensor import merge_tensor


def _streamed(values: np.ndarray, ranks, chunk: int) -> np.ndarray:
    """select's two passes over ``values`` in chunks, as merge_tensor runs them."""
    hist = np.zeros(select.BINS, np.int64)
    for lo in range(0, values.size, chunk):
        hist += np.bincount(select.key_of(values[lo:lo + chunk]), minlength=select.BINS)
    where = select.targets(hist, values.size, ranks)
    buckets = {t[0] for t in where if t is not None}
    found = [v[np.isin(select.key_of(v), list(buckets))] for v in
             (values[lo:lo + chunk] for lo in range(0, values.size, chunk))]
    return select.pick(np.concatenate(found), values.size, ranks, where)


@pytest.mark.parametrize("kind", ["gaussian", "few_values", "zeros_and_inf"])
def test_streamed_selection_equals_partition(kind):
    rng = np.random.default_rng(3)
    size = 50_000
    if kind == "gaussian":
        values = np.abs(rng.standard_normal(size)).astype(np.float32) * 0.002
    elif kind == "few_values":  # many ties at every cut, several buckets
        values = rng.choice(np.float32([0, 1e-3, 2e-3, 0.5, 3.0]), size)
    else:
        values = np.abs(rng.standard_normal(size)).astype(np.float32)
        values[rng.random(size) < 0.3] = 0
        values[:7] = np.inf
    ranks = (0, 1, 2, 7, 8, size // 3, size // 2 + 1, size - 1, size, size + 1)
    got = _streamed(values, ranks, chunk=4096)
    want = select_kth_largest(values.copy(), ranks)
    np.testing.assert_array_equal(got, want)


def _inputs(tmp_path, shape, n, seed, quantized):
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    noise = [rng.standard_normal(shape) * 0.002 for _ in range(n)]
    if quantized:  # ties at the cut: task vectors take few distinct values
        noise = [np.round(x * 2000) / 2000 for x in noise]
    arrays = [base.astype(ml_dtypes.bfloat16)] + [(base + x).astype(ml_dtypes.bfloat16) for x in noise]
    files = []
    for i, a in enumerate(arrays):
        path = tmp_path / f"t{i}.bin"
        path.write_bytes(b"\0" * 24 + a.tobytes())  # an offset, as in a safetensors file
        files.append(FileTensor(str(path), 24, a.dtype, a.shape))
    return arrays, files


@pytest.mark.parametrize("method,kw", [("ties", dict(density=0.3)), ("ties", dict(density=0.5)),
                                        ("breadcrumbs", dict(drop_largest=0.05, drop_smallest=0.4))])
@pytest.mark.parametrize("quantized", [False, True])
def test_threshold_paths_give_identical_merges(monkeypatch, tmp_path, method, kw, quantized):
    from viscodex_jax.merge import tensor as merge_mod

    monkeypatch.setattr(merge_mod, "UNKEYED_CHUNK_ELEMENTS", 1 << 12)  # 10 chunks, a padded tail
    monkeypatch.setattr(merge_mod, "SMALL_CHUNK_ELEMENTS", 1 << 8)
    arrays, files = _inputs(tmp_path, (37, 1000), 2, seed=5, quantized=quantized)
    spec = MergeSpec(method=method, weights=(0.7, 0.3), **kw)
    results = {}
    for name, resident, magnitudes, srcs in [
            ("resident, whole partition", 1 << 30, 1 << 30, files),
            ("resident, streamed selection", 1 << 30, 0, files),
            ("re-read, streamed selection", 0, 0, files),
            ("in memory", 1 << 30, 1 << 30, arrays)]:
        monkeypatch.setattr(merge_mod, "RESIDENT_BYTES", resident)
        monkeypatch.setattr(merge_mod, "MAGNITUDE_BYTES", magnitudes)
        results[name] = merge_tensor("w", srcs[0], srcs[1:], spec)
    (ref, ref_stats), *others = results.values()
    for out, stats in others:
        np.testing.assert_array_equal(out.view(np.uint16), ref.view(np.uint16))
        np.testing.assert_array_equal(stats["kept_fraction"], ref_stats["kept_fraction"])
        assert stats["flipped_fraction"] == ref_stats["flipped_fraction"]
    assert 0 < min(ref_stats["kept_fraction"]) < 1
