"""Checkpoint I/O: HF safetensors/.bin <-> params pytree <-> orbax, streamed per tensor."""

from __future__ import annotations

import importlib
import os
from typing import Any

import jax

from viscodex_jax.checkpoint.hf import load_hf_params, save_hf
from viscodex_jax.checkpoint.validate import check_tensor_finite
from viscodex_jax.utils import flatten
from viscodex_jax.checkpoint.safetensors_io import CheckpointError
from viscodex_jax.model.config import ModelConfig, config_from_dict, read_config_json

# Orbax (and tensorstore) take a quarter of a second to import: the modules that need them are imported on
# first use, so a merge or an HF-only load never pays for them. name -> module, for ``checkpoint.<name>``.
_LAZY = {"PARAMS_SUBDIR": "orbax_io", "is_orbax_dir": "orbax_io", "load_orbax_params": "orbax_io",
         "save_orbax": "orbax_io", "COMPRESS_DEFAULT": "stream", "convert_hf_to_orbax_streamed": "stream",
         "is_safetensors_dir": "stream"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'viscodex_jax.checkpoint' has no attribute {name!r}")
    return getattr(importlib.import_module(f"viscodex_jax.checkpoint.{_LAZY[name]}"), name)

__all__ = [
    "CheckpointError",
    "convert_hf_to_orbax",
    "convert_orbax_to_hf",
    "load_params",
    "save_hf",
    "save_orbax",
]


def load_params(path: str, param_dtype: Any = None, check_finite: bool = False,
                **runtime) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """Reads an HF or orbax checkpoint dir -> (ModelConfig, params, raw config.json dict).

    ``param_dtype`` casts the params (None keeps the stored dtype); ``check_finite``
    rejects NaN/Inf params, naming the tensor and file; ``runtime`` sets
    ModelConfig run-time fields (compute ``dtype``, ``attention_impl``, ...).
    """
    from viscodex_jax.checkpoint.orbax_io import PARAMS_SUBDIR, is_orbax_dir, load_orbax_params

    raw = read_config_json(path)
    cfg = config_from_dict(raw, os.path.join(path, "config.json"), **runtime)
    if is_orbax_dir(path):
        params = load_orbax_params(path, as_numpy=True)
        if param_dtype is not None:
            params = jax.tree_util.tree_map(lambda x: x.astype(param_dtype), params)
        if check_finite:
            where = os.path.join(path, PARAMS_SUBDIR)
            for key, leaf in flatten(params).items():
                check_tensor_finite(leaf, f"{where}: param {'/'.join(key)}")
    else:
        _, params = load_hf_params(path, cfg, dtype=param_dtype, check_finite=check_finite)
    return cfg, params, raw


def convert_hf_to_orbax(hf_dir: str, out_dir: str, dtype: Any = None, overwrite: bool = False,
                        check_finite: bool = True, compress: bool | None = None, fsync: bool = False) -> ModelConfig:
    """HF dir -> our orbax dir. NaN/Inf weights are refused unless ``check_finite=False``.

    Safetensors checkpoints stream tensor by tensor (see ``checkpoint/stream.py``: host memory stays
    near the tensors in flight, not the model); legacy ``.bin`` checkpoints are read whole first.
    ``compress`` stores the chunks zstd-compressed (smaller, slower; None: ``stream.COMPRESS_DEFAULT``); every
    reader restores either. ``fsync`` syncs each written file (orbax's own default) on the streamed path;
    without it, like the project's other writers, the output is only as durable as the page cache until
    the OS flushes it (the directory still appears only when complete).
    """
    from viscodex_jax.checkpoint.orbax_io import save_orbax
    from viscodex_jax.checkpoint.stream import COMPRESS_DEFAULT, convert_hf_to_orbax_streamed, is_safetensors_dir

    compress = COMPRESS_DEFAULT if compress is None else compress
    raw = read_config_json(hf_dir)
    if is_safetensors_dir(hf_dir):
        return convert_hf_to_orbax_streamed(hf_dir, out_dir, dtype=dtype, overwrite=overwrite,
                                            check_finite=check_finite, compress=compress, fsync=fsync)
    cfg, params = load_hf_params(hf_dir, dtype=dtype, check_finite=check_finite)
    save_orbax(params, raw, out_dir, side_files_from=hf_dir, overwrite=overwrite, compress=compress)
    return cfg


def convert_orbax_to_hf(
    ckpt_dir: str, out_dir: str, dtype: Any = None, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
    check_finite: bool = True,
) -> list[str]:
    """Our (or any loadable) dir -> HF dir. NaN/Inf weights (also after the ``dtype`` cast) are refused
    unless ``check_finite=False``."""
    cfg, params, raw = load_params(ckpt_dir, check_finite=check_finite)
    return save_hf(params, cfg, raw, out_dir, side_files_from=ckpt_dir, max_shard_bytes=max_shard_bytes,
                   dtype=dtype, overwrite=overwrite, check_finite=check_finite and dtype is not None)
