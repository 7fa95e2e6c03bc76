"""Reading and rewriting HF checkpoints' tensors in tests: the bad inputs the guards must name."""

from __future__ import annotations

import os
import shutil
from typing import Callable, Iterable

import numpy as np


def hf_tensors(ckpt_dir: str, canonical: bool = False, prefix: str = "") -> dict[str, np.ndarray]:
    """Every tensor of a HF checkpoint (all shards) by name, or by canonical name (``hf_map``), whose
    stored name starts with ``prefix``."""
    from viscodex_jax.checkpoint.hf import iter_hf_tensors
    from viscodex_jax.checkpoint.hf_map import canonical_name

    key = canonical_name if canonical else (lambda n: n)
    return {key(name): read() for _, name, _, read in iter_hf_tensors(ckpt_dir) if name.startswith(prefix)}


def rewrite_tensors(ckpt: str, edit: Callable[[dict[str, np.ndarray]], object]) -> str:
    """Edits a single-file checkpoint's tensors in place (``edit`` mutates the name -> array dict)."""
    from viscodex_jax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors

    path = os.path.join(ckpt, "model.safetensors")
    f = SafetensorsFile(path)
    tensors = {k: f.read(k) for k in f.keys()}
    edit(tensors)
    write_safetensors(path, tensors, {"format": "pt"})
    return path


def reshard(src: str, dst: str, max_bytes: int, drop: Iterable[str] = (),
            edit: Callable[[str, np.ndarray], np.ndarray] | None = None) -> None:
    """Copies a HF checkpoint into shards of at most ``max_bytes``, leaving out ``drop`` and passing each
    tensor through ``edit(name, array)``; config and side files are copied."""
    from viscodex_jax.checkpoint.hf import SIDE_FILES, iter_hf_tensors
    from viscodex_jax.checkpoint.safetensors_io import ShardedWriter

    os.makedirs(dst)
    w = ShardedWriter(dst, max_bytes)
    for _, name, _, read in iter_hf_tensors(src):
        if name in drop:
            continue
        a = read()
        w.add(name, edit(name, a) if edit else a)
    w.finish()
    for f in ("config.json",) + SIDE_FILES:
        if os.path.isfile(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), dst)
