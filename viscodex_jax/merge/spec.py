"""MergeSpec: what to merge and how, checked on construction; MergeError names the bad setting or tensor."""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from viscodex_jax.merge.methods import METHODS, Method


class MergeError(ValueError):
    """A merge that cannot be done as asked (names the tensor or setting)."""


# Output dtypes a merged checkpoint may have: floats that safetensors, transformers and our loader all read.
OUT_DTYPES = ("bfloat16", "float16", "float32")
# The documented ranges (MergeSpec.allow_unusual_weights lifts them; finiteness is always required).
WEIGHT_RANGE = (0.0, 1.0)  # each per-model weight, closed
SCALE_RANGE = (0.0, 2.0)  # the final scale ``lam``: (0, 2]


def is_mergeable(dtype) -> bool:
    """Floating dtypes only (bfloat16 included): merging integer or bool tensors has no meaning."""
    return bool(jnp.issubdtype(dtype, jnp.floating))


def _out_dtype_problem(name: Any) -> str:
    try:
        dt = jnp.dtype(name)
    except (TypeError, ValueError):
        return "not a dtype"
    if not is_mergeable(dt):
        return f"{dt} is not a floating dtype, so merged weights would be truncated (task vectors to zeros)"
    return f"{dt} is not an output dtype we write"


def finite_number(value: Any, what: str) -> float:
    """``value`` as a finite float, or a MergeError naming ``what``."""
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
    out = tuple(finite_number(w, f"{what}[{i}]") for i, w in enumerate(ws))
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
    drop_largest: float = 0.0  # breadcrumbs: fraction of each task vector's largest magnitudes dropped
    drop_smallest: float = 0.0  # breadcrumbs: fraction of its smallest magnitudes dropped
    dare_rescale: str = "inverse_p"  # "inverse_p" | "l1"
    normalize: bool | None = None  # None: the method's default (see methods.METHODS)
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
        drops = [finite_number(getattr(self, f), f) for f in ("drop_largest", "drop_smallest")]
        if any(not 0.0 <= x < 1.0 for x in drops) or sum(drops) >= 1.0:
            raise MergeError(f"drop_largest={drops[0]:g}, drop_smallest={drops[1]:g}: each must be in [0, 1) "
                             "and their sum below 1")
        if any(drops) and self.method != "breadcrumbs":
            raise MergeError(f"drop_largest/drop_smallest are breadcrumbs settings; {self.method} does not use them")
        if self.dare_rescale not in ("inverse_p", "l1"):
            raise MergeError(f"dare_rescale must be 'inverse_p' or 'l1', got {self.dare_rescale!r}")
        if self.out_dtype not in OUT_DTYPES:
            raise MergeError(f"out_dtype={self.out_dtype!r}: {_out_dtype_problem(self.out_dtype)}; "
                             f"choose from {', '.join(OUT_DTYPES)}")
        unusual = self.allow_unusual_weights
        set_ = functools.partial(object.__setattr__, self)  # frozen: normalise the validated values in place
        set_("weights", _weights(self.weights, "weights", unusual, self.do_normalize))
        lam = finite_number(self.lam, "lam (the final scale)")
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
    def method_pieces(self) -> Method:
        return METHODS[self.method]

    @property
    def do_normalize(self) -> bool:
        if self.normalize is not None:
            return self.normalize
        return METHODS[self.method].normalise

    def merges(self, path: str) -> bool:
        return any(re.search(p, path) for p in self.include) and not any(re.search(p, path) for p in self.exclude)

    def weights_for(self, path: str) -> tuple[float, ...]:
        for pattern, w in self.group_weights:
            if re.search(pattern, path):
                return tuple(w)
        return tuple(self.weights)
