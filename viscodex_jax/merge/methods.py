"""Merge methods: one table from a method name to the pieces of the per-tensor pipeline.

For every tensor, with task vectors ``d_i = theta_i - base`` (float32), ``tensor.merge_tensor`` runs

    sparsify (which entries of each d_i survive)  ->  weight  w_i * d_i
    -> sign consensus (elect the sign of sum_i w_i d_i; drop entries that disagree)
    -> sum -> normalise (divide by the summed weights that contributed)
    -> scale lam -> base + result, cast to the output dtype (bf16 by default)

| method            | sparsify | sign consensus | normalise |
|-------------------|----------|----------------|-----------|
| linear            | -        | -              | yes (sum w) -> sum_i w_i theta_i / sum_i w_i, base cancels |
| task_arithmetic   | -        | -              | no        |
| ties              | top-k    | yes            | yes (disjoint mean) |
| dare_linear       | DARE     | -              | no        |
| dare_ties         | DARE     | yes            | yes (disjoint mean) |
| breadcrumbs       | band     | -              | no        |

VisCodex is ``task_arithmetic`` with ``weights=[lam, 1 - lam]`` for (VLM, coder):
``base + lam * tau_vlm + (1 - lam) * tau_code``.

DARE rescaling: ``"inverse_p"`` (the DARE paper) divides kept entries by the
keep probability ``p``, which preserves each task vector in expectation;
``"l1"`` instead rescales so the kept entries have the same L1 norm as the
whole task vector, which preserves it exactly per tensor. They differ for any
single draw; both are offered.

Adding a method is a sparsify function (when no existing one fits) plus one
line in ``METHODS``; the pipeline, both drivers and the sweep pick it up.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _per_model(x: jax.Array, d: jax.Array) -> jax.Array:
    """A per-model value [n] shaped to broadcast against task vectors [n, ...]."""
    return x.reshape((d.shape[0],) + (1,) * (d.ndim - 1))


def _never(spec) -> bool:
    del spec
    return False


@dataclasses.dataclass(frozen=True)
class Sparsify:
    """Which entries of each task vector survive.

    ``keep(d, thresholds, draw, spec)`` is traced inside the jitted merge: ``d`` is
    the float32 task vectors [n_models, ...] (a row chunk of the tensor when it is
    big), ``thresholds`` float32 [n_models, len(ranks)], ``draw(d)`` this tensor's
    random keep mask (bool, d's shape; see ``keyed_draw``: the streamed merge draws it
    from the tensor's PRNG key, the on-device merge hands in the same bits drawn in
    HF layout). It returns ``(sparsified d, boolean keep mask)``, or None when the
    spec makes it a no-op (the exact weighted-sum path is then used).

    ``ranks(spec, numel)``: 1-based ranks k; per model the magnitude of the k-th
    largest ``|d|`` entry of the whole tensor (0 -> +inf) is found first (on the
    host by ``kth_largest_magnitudes``, on device by ``kth_largest_magnitudes_on_device``:
    the same float32 value), so row chunks see the thresholds of the whole tensor.

    ``needs_totals(spec)``: True when ``keep`` needs sums over the whole tensor. For a tensor cut into row
    chunks the host first runs ``totals(d, draw, spec)`` (float32 [n_models, k]) on every chunk, adds them up
    in float64 and hands ``from_totals(sums)`` to ``keep`` as ``thresholds``; a whole tensor gets an empty
    ``thresholds`` and ``keep`` sums itself. Memory stays one chunk's either way.

    ``keyed``: ``keep`` calls ``draw`` (a mask from the tensor's PRNG key), so its result depends on how a
    tensor is cut into chunks (each chunk has its own key); such methods keep the coarse chunking
    (``tensor.CHUNK_ELEMENTS``).
    """

    keep: Callable[..., Any]
    ranks: Callable[[Any, int], Sequence[int]] | None = None
    keyed: bool = False
    needs_totals: Callable[[Any], bool] = _never
    totals: Callable[..., Any] | None = None
    from_totals: Callable[[np.ndarray], np.ndarray] | None = None


def _topk_ranks(spec, numel: int) -> tuple[int, ...]:
    return (max(1, int(np.ceil(spec.density * numel))),) if spec.density < 1.0 else ()


def topk(d, thresholds, draw, spec):
    """TIES trim: keep each task vector's ``density`` fraction of largest magnitudes (ties at the cut kept)."""
    del draw
    if spec.density >= 1.0:
        return None
    keep = jnp.abs(d) >= _per_model(thresholds[:, 0], d)
    return jnp.where(keep, d, 0.0), keep


def dare_mask(key, n: int, shape, spec):
    """DARE's keep mask [n, *shape] for one tensor (or row chunk) with PRNG key ``key``."""
    keys = jax.random.split(key, n)
    return jax.vmap(lambda k: jax.random.bernoulli(k, spec.density, tuple(shape)))(keys)


def keyed_draw(key, spec) -> Callable[[jax.Array], jax.Array]:
    """``draw`` for a tensor drawn as it is laid out in ``d`` (the streamed merge: HF layout)."""
    return lambda d: dare_mask(key, d.shape[0], d.shape[1:], spec)


def dare(d, thresholds, draw, spec):
    """DARE: keep each entry with probability ``density`` (mask keyed by seed and tensor), then rescale.

    For ``l1`` on a row-chunked tensor, ``thresholds[:, 0]`` is each model's whole-tensor ratio
    L1(d) / L1(kept d) (see ``dare_l1_totals``); otherwise the ratio is summed here.
    """
    if spec.density >= 1.0:
        return None
    keep = draw(d)
    dropped = jnp.where(keep, d, 0.0)
    if spec.dare_rescale == "inverse_p":
        return dropped / spec.density, keep
    if thresholds.shape[1]:
        return dropped * _per_model(thresholds[:, 0], d), keep
    axes = tuple(range(1, d.ndim))
    l1_all = jnp.sum(jnp.abs(d), axis=axes, keepdims=True)
    l1_kept = jnp.sum(jnp.abs(dropped), axis=axes, keepdims=True)
    return dropped * jnp.where(l1_kept > 0, l1_all / jnp.where(l1_kept > 0, l1_kept, 1.0), 0.0), keep


def _dare_l1_is_per_tensor(spec) -> bool:
    return spec.dare_rescale == "l1" and spec.density < 1.0


def dare_l1_totals(d, draw, spec):
    """One chunk's L1 norm of each task vector and of its kept entries: float32 [n, 2]."""
    mag = jnp.abs(d)
    keep = draw(d)
    axes = tuple(range(1, d.ndim))
    return jnp.stack([jnp.sum(mag, axis=axes), jnp.sum(jnp.where(keep, mag, 0.0), axis=axes)], axis=1)


def dare_l1_ratio(sums: np.ndarray) -> np.ndarray:
    """The whole tensor's L1(d) / L1(kept d) per model (0 when nothing was kept): float32 [n, 1]."""
    l1_all, l1_kept = sums[:, 0], sums[:, 1]
    ratio = np.where(l1_kept > 0, l1_all / np.where(l1_kept > 0, l1_kept, 1.0), 0.0)
    return ratio.astype(np.float32)[:, None]


def _band_ranks(spec, numel: int) -> tuple[int, ...]:
    top, bottom = (int(np.floor(f * numel + 0.5)) for f in (spec.drop_largest, spec.drop_smallest))
    return (top, numel - bottom)


def breadcrumbs(d, thresholds, draw, spec):
    """Model Breadcrumbs: drop each task vector's ``drop_largest`` fraction of largest magnitudes (outliers)
    and ``drop_smallest`` fraction of smallest (noise), counted per tensor and rounded to whole entries
    (ties at a cut are kept). The survivors are not rescaled, as in the paper."""
    del draw
    if spec.drop_largest == 0.0 and spec.drop_smallest == 0.0:
        return None
    mag = jnp.abs(d)
    keep = (mag < _per_model(thresholds[:, 0], d)) & (mag >= _per_model(thresholds[:, 1], d))
    return jnp.where(keep, d, 0.0), keep


TOPK = Sparsify(topk, ranks=_topk_ranks)
DARE = Sparsify(dare, keyed=True, needs_totals=_dare_l1_is_per_tensor, totals=dare_l1_totals,
                from_totals=dare_l1_ratio)


@dataclasses.dataclass(frozen=True)
class Method:
    sparsify: Sparsify | None  # None: every entry of every task vector counts
    consensus: bool  # TIES sign election
    normalise: bool  # default of MergeSpec.normalize: divide by the weights that contributed


METHODS: dict[str, Method] = {
    "linear": Method(None, consensus=False, normalise=True),
    "task_arithmetic": Method(None, consensus=False, normalise=False),
    "ties": Method(TOPK, consensus=True, normalise=True),
    "dare_linear": Method(DARE, consensus=False, normalise=False),
    "dare_ties": Method(DARE, consensus=True, normalise=True),
    "breadcrumbs": Method(Sparsify(breadcrumbs, ranks=_band_ranks), consensus=False, normalise=False),
}


def kth_largest_magnitudes(base: Any, thetas: Sequence[Any], ranks: Sequence[int]) -> np.ndarray:
    """Per model and rank k, the magnitude of the k-th largest task-vector entry: float32 [n, len(ranks)].

    Computed on the host with numpy's linear-time selection (a full sort of a
    150k x 3584 embedding is the slow part of TIES otherwise). Rank 0 gives
    +inf, a rank past the tensor's size -inf.
    """
    base = np.asarray(base).reshape(-1)
    out = np.empty((len(thetas), len(ranks)), np.float32)
    mag = np.empty(base.size, np.float32)  # one float32 copy of the tensor, filled and partitioned in place
    step = 1 << 20
    for i, t in enumerate(thetas):
        t = np.asarray(t).reshape(-1)
        for lo in range(0, base.size, step):
            np.subtract(t[lo:lo + step], base[lo:lo + step], out=mag[lo:lo + step], dtype=np.float32)
        np.abs(mag, out=mag)
        out[i] = select_kth_largest(mag, ranks)
    return out


def select_kth_largest(mag: np.ndarray, ranks: Sequence[int]) -> np.ndarray:
    """The k-th largest entry of the flat ``mag`` for each rank k (partitions ``mag`` in place, linear time):
    rank 0 gives +inf, a rank past its size -inf."""
    kth = sorted({mag.size - k for k in ranks if 1 <= k <= mag.size})
    if kth:
        mag.partition(kth)
    return np.array([np.inf if k < 1 else -np.inf if k > mag.size else mag[mag.size - k] for k in ranks], np.float32)


def _kth_largest_bits(bits: jax.Array, k: int) -> jax.Array:
    """The k-th largest (1-based) of non-negative float32 values given as their uint32 bit patterns.

    Their order is the order of the patterns, so the answer is built bit by bit from the top: keep a bit
    when at least k values are >= the prefix with it set. 31 counting passes (the sign bit is 0), each a
    compare and a sum that XLA splits over the shards; exact, so equal to numpy's selection on the host.
    """
    def step(i, prefix):
        cand = prefix | jnp.left_shift(jnp.uint32(1), (30 - i).astype(jnp.uint32))
        return jnp.where(jnp.sum(bits >= cand, dtype=jnp.int32) >= k, cand, prefix)

    return jax.lax.bitcast_convert_type(jax.lax.fori_loop(0, 31, step, jnp.uint32(0)), jnp.float32)


def kth_largest_magnitudes_on_device(base: jax.Array, thetas: Sequence[jax.Array],
                                     ranks: Sequence[int]) -> jax.Array:
    """``kth_largest_magnitudes`` traced (inside a jit, on sharded arrays): float32 [n, len(ranks)], bit-identical.

    The magnitudes are the same float32 ``|theta - base|`` the host computes; the selection is exact.
    """
    base32 = base.astype(jnp.float32)
    size = int(np.prod(base.shape))
    rows = []
    for t in thetas:
        bits = jax.lax.bitcast_convert_type(jnp.abs(t.astype(jnp.float32) - base32), jnp.uint32)
        rows.append(jnp.stack([jnp.float32(np.inf) if k < 1 else jnp.float32(-np.inf) if k > size
                               else _kth_largest_bits(bits, k) for k in ranks]))
    return jnp.stack(rows)
