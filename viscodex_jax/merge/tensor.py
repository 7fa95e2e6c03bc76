"""Task-vector merging as one jitted per-tensor pipeline.

For every tensor, with task vectors ``d_i = theta_i - base`` (float32):

    sparsify (TIES top-k magnitude | DARE Bernoulli drop)  ->  weight  w_i * d_i
    -> sign consensus (elect the sign of sum_i w_i d_i; drop entries that disagree)
    -> sum -> normalise (divide by the summed weights that contributed)
    -> scale lambda -> base + result, cast to the output dtype (bf16 by default)

Methods are settings of that pipeline:

| method            | sparsify | sign consensus | normalise |
|-------------------|----------|----------------|-----------|
| linear            | -        | -              | yes (sum w) -> sum_i w_i theta_i / sum_i w_i, base cancels |
| task_arithmetic   | -        | -              | no        |
| ties              | top-k    | yes            | yes (disjoint mean) |
| dare_linear       | DARE     | -              | no        |
| dare_ties         | DARE     | yes            | yes (disjoint mean) |

VisCodex is ``task_arithmetic`` with ``weights=[lam, 1 - lam]`` for (VLM, coder):
``base + lam * tau_vlm + (1 - lam) * tau_code``.

DARE rescaling: ``"inverse_p"`` (the DARE paper) divides kept entries by the
keep probability ``p``, which preserves each task vector in expectation;
``"l1"`` instead rescales so the kept entries have the same L1 norm as the
whole task vector, which preserves it exactly per tensor. They differ for any
single draw; both are offered.

The same function merges an in-memory params pytree and streams HF
checkpoints from disk (see ``merge_stream``); both call :func:`merge_tensor`
on tensors in HF layout, one HF tensor at a time, so TIES' top-k is per HF
tensor and DARE's random mask (keyed by seed and tensor name) is the same in
both paths: their outputs are bit-identical.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")


def _mergeable(dtype) -> bool:
    """Floating dtypes only (bfloat16 included): merging integer or bool tensors has no meaning."""
    return bool(jnp.issubdtype(dtype, jnp.floating))


def _over_models(x: jax.Array) -> jax.Array:
    """Sum over the (small, static) model axis 0, unrolled.

    XLA:CPU lowers a reduction over a leading axis of 2-3 into a slow loop
    (seconds per MLP weight); a chain of adds is as fast as the memory allows.
    """
    total = x[0]
    for i in range(1, x.shape[0]):
        total = total + x[i]
    return total


class MergeError(ValueError):
    """A merge that cannot be done as asked (names the tensor or setting)."""


# Output dtypes a merged checkpoint may have: floats that safetensors, transformers and our loader all read.
OUT_DTYPES = ("bfloat16", "float16", "float32")
# The documented ranges (MergeSpec.allow_unusual_weights lifts them; finiteness is always required).
WEIGHT_RANGE = (0.0, 1.0)  # each per-model weight, closed
SCALE_RANGE = (0.0, 2.0)  # the final scale ``lam``: (0, 2]


def _out_dtype_problem(name: Any) -> str:
    try:
        dt = jnp.dtype(name)
    except (TypeError, ValueError):
        return "not a dtype"
    if not _mergeable(dt):
        return f"{dt} is not a floating dtype, so merged weights would be truncated (task vectors to zeros)"
    return f"{dt} is not an output dtype we write"


def _finite(value: Any, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise MergeError(f"{what} must be a number, got {value!r}") from None
    if not np.isfinite(x):
        raise MergeError(f"{what} must be finite, got {x}")
    return x


def _weights(ws: Any, what: str, allow_unusual: bool, normalize: bool) -> tuple[float, ...]:
    if isinstance(ws, (str, bytes)) or not hasattr(ws, "__len__") or len(ws) == 0:
        raise MergeError(f"{what} must be a non-empty sequence with one weight per model, got {ws!r}")
    out = tuple(_finite(w, f"{what}[{i}]") for i, w in enumerate(ws))
    lo, hi = WEIGHT_RANGE
    if not allow_unusual and any(not lo <= w <= hi for w in out):
        raise MergeError(f"{what}={list(out)}: each weight must be in [{lo:g}, {hi:g}] "
                         "(set allow_unusual_weights to merge with others)")
    if normalize and sum(out) == 0:
        raise MergeError(f"{what}={list(out)} sum to 0, but this method divides by their sum")
    return out


@dataclasses.dataclass(frozen=True)
class MergeSpec:
    """What to merge and how. ``weights`` has one entry per fine-tuned model.

    Checked on construction: ``weights`` (and per-group weights) finite and each
    in [0, 1], ``lam`` finite and in (0, 2], ``density`` in (0, 1],
    ``out_dtype`` one of OUT_DTYPES. ``allow_unusual_weights`` lifts the two
    ranges (negative weights negate a task, lam > 2 extrapolates) but never
    finiteness: a merge with 1e30 or NaN weights has no useful output.
    """

    method: str = "task_arithmetic"
    weights: tuple[float, ...] = (0.7, 0.3)
    lam: float = 1.0  # the final scale
    density: float = 1.0  # ties: fraction kept by magnitude; dare: keep probability p
    seed: int = 0
    dare_rescale: str = "inverse_p"  # "inverse_p" | "l1"
    normalize: bool | None = None  # None: the method's default (see table)
    # Which params are merged: regexes on '/'-joined param paths (our tree, e.g. model/layers/mlp/up_proj/kernel).
    include: tuple[str, ...] = (r"^model/", r"^lm_head/")
    exclude: tuple[str, ...] = ()
    # Per-group weights: (regex, weights) pairs; the first match wins over ``weights``.
    group_weights: tuple[tuple[str, tuple[float, ...]], ...] = ()
    out_dtype: str = "bfloat16"
    allow_unusual_weights: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise MergeError(f"unknown merge method {self.method!r}; choose from {', '.join(METHODS)}")
        if not 0.0 < self.density <= 1.0:
            raise MergeError(f"density must be in (0, 1], got {self.density}")
        if self.dare_rescale not in ("inverse_p", "l1"):
            raise MergeError(f"dare_rescale must be 'inverse_p' or 'l1', got {self.dare_rescale!r}")
        if self.out_dtype not in OUT_DTYPES:
            raise MergeError(f"out_dtype={self.out_dtype!r}: {_out_dtype_problem(self.out_dtype)}; "
                             f"choose from {', '.join(OUT_DTYPES)}")
        unusual = self.allow_unusual_weights
        set_ = functools.partial(object.__setattr__, self)  # frozen: normalise the validated values in place
        set_("weights", _weights(self.weights, "weights", unusual, self.do_normalize))
        lam = _finite(self.lam, "lam (the final scale)")
        lo, hi = SCALE_RANGE
        if not unusual and not lo < lam <= hi:
            raise MergeError(f"lam (the final scale) must be in ({lo:g}, {hi:g}], got {lam:g} "
                             "(set allow_unusual_weights to merge with others)")
        set_("lam", lam)
        groups = []
        for pattern, w in self.group_weights:
            w = _weights(w, f"group_weights[{pattern!r}]", unusual, self.do_normalize)
            if len(w) != len(self.weights):
                raise MergeError(
                    f"group_weights[{pattern!r}] has {len(w)} weights but {len(self.weights)} models are merged"
                )
            groups.append((pattern, w))
        set_("group_weights", tuple(groups))
        for what, patterns in (("include", self.include), ("exclude", self.exclude),
                               ("group_weights", [p for p, _ in self.group_weights])):
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as e:
                    raise MergeError(f"{what}: {pattern!r} is not a valid regex ({e})") from None

    @property
    def sparsify(self) -> str | None:
        return {"ties": "topk", "dare_linear": "dare", "dare_ties": "dare"}.get(self.method)

    @property
    def sign_consensus(self) -> bool:
        return self.method in ("ties", "dare_ties")

    @property
    def do_normalize(self) -> bool:
        if self.normalize is not None:
            return self.normalize
        return self.method in ("linear", "ties", "dare_ties")

    def merges(self, path: str) -> bool:
        return any(re.search(p, path) for p in self.include) and not any(re.search(p, path) for p in self.exclude)

    def weights_for(self, path: str) -> tuple[float, ...]:
        for pattern, w in self.group_weights:
            if re.search(pattern, path):
                return tuple(w)
        return tuple(self.weights)


def tensor_key(seed: int, name: str) -> jax.Array:
    """A PRNG key per (seed, tensor name): the same draw whatever order tensors come in."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    return jax.random.fold_in(jax.random.PRNGKey(seed), h)


# Big tensors (embeddings, lm_head) are merged in row chunks of at most this many elements, so the
# float32 temporaries stay a few hundred MB whatever the vocab and hidden size.
CHUNK_ELEMENTS = 1 << 24


def topk_thresholds(base: np.ndarray, thetas: Sequence[np.ndarray], density: float) -> np.ndarray:
    """Per model, the magnitude of its ``ceil(density * n)``-th largest task-vector entry.

    Computed on the host with numpy's linear-time selection (a full sort of a
    150k x 3584 embedding is the slow part of TIES otherwise). Entries with
    magnitude >= the threshold are kept, ties included.
    """
    base32 = np.asarray(base, np.float32)
    out = []
    for t in thetas:
        mag = np.abs(np.asarray(t, np.float32) - base32).reshape(-1)
        k = max(1, int(np.ceil(density * mag.size)))
        out.append(np.partition(mag, mag.size - k)[mag.size - k])
    return np.asarray(out, np.float32)


@functools.partial(jax.jit, static_argnames=("spec", "out_dtype"))
def _merge_core(base, thetas, weights, key, thresh, spec: MergeSpec, out_dtype):
    """Merges one tensor (or a row chunk of it); returns it and sums for the report."""
    base32 = base.astype(jnp.float32)
    d = thetas.astype(jnp.float32) - base32[None]  # [n, ...]
    n = d.shape[0]
    bshape = (n,) + (1,) * (d.ndim - 1)
    keep = jnp.ones(d.shape, bool)
    sparse = spec.sparsify is not None and spec.density < 1.0
    if spec.sparsify == "topk" and spec.density < 1.0:
        keep = jnp.abs(d) >= thresh.reshape(bshape)
        d = jnp.where(keep, d, 0.0)
    elif spec.sparsify == "dare" and spec.density < 1.0:
        keys = jax.random.split(key, n)
        keep = jax.vmap(lambda k: jax.random.bernoulli(k, spec.density, d.shape[1:]))(keys)
        dropped = jnp.where(keep, d, 0.0)
        if spec.dare_rescale == "inverse_p":
            d = dropped / spec.density
        else:
            axes = tuple(range(1, d.ndim))
            l1_all = jnp.sum(jnp.abs(d), axis=axes, keepdims=True)
            l1_kept = jnp.sum(jnp.abs(dropped), axis=axes, keepdims=True)
            d = dropped * jnp.where(l1_kept > 0, l1_all / jnp.where(l1_kept > 0, l1_kept, 1.0), 0.0)
    w = weights.reshape((n,) + (1,) * (d.ndim - 1)).astype(jnp.float32)
    wd = w * d
    contrib = jnp.broadcast_to(keep, d.shape)
    flipped = jnp.zeros((), jnp.float32)
    if spec.sign_consensus:
        elected = jnp.sign(_over_models(wd))
        agree = (jnp.sign(d) == elected[None]) & (d != 0)
        flipped = jnp.mean(((jnp.sign(d) != elected[None]) & (d != 0)).astype(jnp.float32))
        wd = jnp.where(agree, wd, 0.0)
        contrib = agree
    if not sparse and not spec.sign_consensus:
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
    raw = (thetas.astype(jnp.float32) - base32[None]).reshape(n, -1)
    flat = d.reshape(n, -1)
    sums = {
        "sq_norms": jnp.sum(raw * raw, axis=1),
        "gram": flat @ flat.T,
        "kept": jnp.sum(keep.reshape(n, -1), axis=1),
        "flipped": flipped * flat.shape[1],
        "nonfinite": jnp.sum(~jnp.isfinite(merged)),
    }
    return merged.astype(out_dtype), sums


def merge_tensor(name: str, base: Any, thetas: Sequence[Any], spec: MergeSpec, path: str | None = None):
    """Merges one tensor (HF layout); returns (merged array, stats dict of numpy values).

    ``path`` (our param path) selects per-group weights; defaults to ``name``.
    """
    weights = spec.weights_for(path or name)
    if len(thetas) != len(weights):
        raise MergeError(f"{name}: {len(thetas)} models to merge but {len(weights)} weights given")
    for i, t in enumerate(thetas):
        if tuple(t.shape) != tuple(base.shape):
            raise MergeError(f"{name}: model {i + 1} has shape {list(t.shape)} but the base has {list(base.shape)}")
    for i, t in enumerate([base, *thetas]):
        if not _mergeable(t.dtype):
            raise MergeError(f"{name}: dtype {np.dtype(t.dtype)} of {'the base' if i == 0 else f'model {i}'} cannot be merged")
    out_dtype = jnp.dtype(spec.out_dtype)
    n, shape = len(thetas), tuple(base.shape)
    thresh = np.zeros((n,), np.float32)
    if spec.sparsify == "topk" and spec.density < 1.0:
        thresh = topk_thresholds(base, thetas, spec.density)
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(row, 1))
    whole = len(shape) < 2 or shape[0] <= rows_per_chunk or (spec.sparsify == "dare" and spec.dare_rescale == "l1"
                                                             and spec.density < 1.0)  # L1 rescale is per tensor
    bounds = [(0, shape[0] if shape else 1)] if whole else [
        (i, min(i + rows_per_chunk, shape[0])) for i in range(0, shape[0], rows_per_chunk)]
    key = tensor_key(spec.seed, name)
    w = jnp.asarray(weights, jnp.float32)
    out = None
    total: dict[str, np.ndarray] = {}
    for c, (lo, hi) in enumerate(bounds):
        sl = (lambda x: x) if whole else (lambda x: x[lo:hi])
        merged, sums = _merge_core(jnp.asarray(sl(base)), jnp.stack([jnp.asarray(sl(t)) for t in thetas]), w,
                                   key if whole else jax.random.fold_in(key, c), jnp.asarray(thresh), spec, out_dtype)
        if whole:
            out = merged
        else:
            if out is None:
                out = np.empty(shape, out_dtype)
            out[lo:hi] = np.asarray(merged)
        for k, v in sums.items():
            total[k] = total.get(k, 0) + np.asarray(v, np.float64)
    if total["nonfinite"]:
        raise MergeError(f"{name}: merge produced {int(total['nonfinite'])} non-finite values (inf/NaN in an input?)")
    numel = max(int(np.prod(shape)), 1)
    norms = np.sqrt(total["sq_norms"])
    kept_norms = np.sqrt(np.diag(total["gram"]))
    stats = {
        "task_vector_norms": norms,
        "cosine": total["gram"] / np.maximum(kept_norms[:, None] * kept_norms[None, :], 1e-30),
        "kept_fraction": total["kept"] / numel,
        "flipped_fraction": float(total["flipped"]) / numel,
    }
    return out, stats


# --------------------------------------------------------------------------- vocab policy

_VOCAB_ROWS = {"model.embed_tokens.weight", "lm_head.weight"}  # HF layout: vocab on axis 0


def merge_named(name: str, base, thetas: Sequence[Any], primary, spec: MergeSpec, path: str | None = None):
    """merge_tensor plus the vocab policy for embeddings and lm_head.

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
