"""Prints a checkpoint's tree: names, shapes, dtypes, bytes (HF dir, orbax dir, or a params pytree)."""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from viscodex_jax.checkpoint.hf import iter_hf_tensors
from viscodex_jax.utils import flatten
from viscodex_jax.checkpoint.orbax_io import PARAMS_SUBDIR, is_orbax_dir


def _rows_hf(path: str) -> Iterable[tuple[str, tuple[int, ...], str, int]]:
    from viscodex_jax.checkpoint.safetensors_io import SafetensorsFile

    for file, name, shape, read in iter_hf_tensors(path):
        if file.endswith(".safetensors"):
            f = SafetensorsFile(file)
            yield name, tuple(shape), str(f.dtype(name)), f.nbytes(name)
        else:
            a = read()
            yield name, tuple(shape), str(a.dtype), a.nbytes


def _rows_tree(tree: dict[str, Any]) -> Iterable[tuple[str, tuple[int, ...], str, int]]:
    for k, v in flatten(tree).items():
        dt = np.dtype(v.dtype)
        yield "/".join(k), tuple(v.shape), str(dt), math.prod(v.shape) * dt.itemsize


def _rows_orbax(path: str):
    import os

    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(os.path.abspath(os.path.join(path, PARAMS_SUBDIR)))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    yield from _rows_tree(tree)


def inspect_rows(source: str | dict[str, Any]) -> list[tuple[str, tuple[int, ...], str, int]]:
    if isinstance(source, dict):
        return list(_rows_tree(source))
    return list(_rows_orbax(source) if is_orbax_dir(source) else _rows_hf(source))


def format_rows(rows: list[tuple[str, tuple[int, ...], str, int]]) -> str:
    w = max([len(r[0]) for r in rows] + [4])
    lines = [f"{'name':<{w}}  {'shape':<22} {'dtype':<9} {'bytes':>14}"]
    for name, shape, dt, nb in rows:
        lines.append(f"{name:<{w}}  {str(list(shape)):<22} {dt:<9} {nb:>14,}")
    total = sum(r[3] for r in rows)
    lines.append(f"{len(rows)} tensors, {total:,} bytes ({total / 2**30:.3f} GiB)")
    return "\n".join(lines)
