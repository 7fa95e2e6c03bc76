"""The HF <-> Flax name map: a name rule plus a per-tensor transform.

HF names (on-disk form ``model.layers.3.self_attn.q_proj.weight``; the
in-memory form ``model.language_model.*`` / ``model.visual.*`` is accepted as
an alias) map onto our tree by dropping the layer index (layers are stacked on
axis 0) and renaming the leaf. Linear weights are stored [out, in] by PyTorch
and [in, out] (with heads kept as their own axes) by us.

What differs by model family (aliases, stacked module lists, numbered
nn.Sequential children, non-matrix kernels) comes from each family's
``HFNames`` in ``model.families``. Names are matched against the union of all
families' rules: a name only ever maps onto a parameter the model has, so one
family's alias cannot misplace another's tensor.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from viscodex_jax.model.config import ModelConfig
from viscodex_jax.model.families import REGISTRY

_NAMES = [f.hf_names for f in REGISTRY.values()]
# (regex, replacement) applied in order to turn any accepted name into the canonical on-disk form.
_ALIASES = tuple(dict.fromkeys((re.compile(p), r) for n in _NAMES for p, r in n.aliases))
_STACKED = {s for n in _NAMES for s in n.stacked}  # module lists stored stacked [L, ...]
_SEQUENTIAL = {s for n in _NAMES for s in n.sequential}  # parents of numbered nn.Sequential children
_LEAF_TO_FLAX = {"embed_tokens": "embedding"}


def canonical_name(hf_name: str) -> str:
    for pat, rep in _ALIASES:
        hf_name = pat.sub(rep, hf_name)
    return hf_name


def hf_to_path(hf_name: str, expected: dict[tuple[str, ...], Any]) -> tuple[tuple[str, ...], int | None] | None:
    """Canonical HF name -> (flax path, layer index or None); None if it maps to no param."""
    parts = canonical_name(hf_name).split(".")
    path: list[str] = []
    layer = None
    i = 0
    while i < len(parts) - 1:
        p = parts[i]
        if p in _STACKED and i + 1 < len(parts) - 1 and parts[i + 1].isdigit():
            path.append(p)
            layer = int(parts[i + 1])
            i += 2
            continue
        if p.isdigit() and path:  # nn.Sequential children: merger.mlp.0 -> mlp_0
            path[-1] = f"{path[-1]}_{p}"
        else:
            path.append(p)
        i += 1
    leaf = parts[-1]
    if leaf == "bias":
        cands = ["bias"]
    elif leaf == "weight":
        cands = [_LEAF_TO_FLAX.get(path[-1] if path else "", "kernel"), "scale"]
    else:
        return None
    for c in cands:
        key = tuple(path + [c])
        if key in expected:
            stacked = any(s in key for s in _STACKED)
            if stacked != (layer is not None):
                return None
            return key, layer
    return None


def path_to_hf(path: tuple[str, ...], layer: int | None) -> str:
    out: list[str] = []
    for p in path[:-1]:
        m = re.fullmatch(r"(.+)_(\d+)", p)
        if m and out and out[-1] in _SEQUENTIAL:
            out += [m.group(1), m.group(2)]
        else:
            out.append(p)
        if p in _STACKED:
            out.append(str(layer))
    leaf = path[-1]
    out.append("bias" if leaf == "bias" else "weight")
    return ".".join(out)


def hf_shape(path: tuple[str, ...], flax_shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...]:
    """The HF tensor shape that corresponds to one (unstacked) flax param."""
    leaf = path[-1]
    if leaf == "kernel":
        special = cfg.family.hf_names.kernel_shape
        shape = special(path, flax_shape, cfg) if special is not None else None
        if shape is not None:
            return shape
        n_in = 2 if path[-2] == "o_proj" else 1
        return (math.prod(flax_shape[n_in:]), math.prod(flax_shape[:n_in]))
    if leaf == "bias":
        return (math.prod(flax_shape),)
    return tuple(flax_shape)


def to_flax(path: tuple[str, ...], hf: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    if path[-1] == "kernel":
        return hf.reshape(hf.shape[0], -1).T.reshape(flax_shape)
    return hf.reshape(flax_shape)


def to_hf(path: tuple[str, ...], flax: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if path[-1] == "kernel":
        return np.ascontiguousarray(flax.reshape(-1, shape[0]).T).reshape(shape)
    return flax.reshape(shape)


def is_stacked(path: tuple[str, ...]) -> bool:
    return any(s in path for s in _STACKED)
