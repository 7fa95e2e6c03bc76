"""HF checkpoint directories <-> our params pytree, streamed one tensor at a time."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Iterator

import jax
import numpy as np
import tqdm

from viscodex_jax.checkpoint import hf_map
from viscodex_jax.utils import atomic_dir, flatten, unflatten
from viscodex_jax.checkpoint.safetensors_io import CheckpointError, ShardedWriter
from viscodex_jax.checkpoint.validate import check_tensor_finite
from viscodex_jax.model.config import ModelConfig, config_from_dict, read_config_json
from viscodex_jax.model.causal_lm import param_shapes

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Files that travel with a checkpoint but are not weights: tokenizer, processor, generation settings.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "generation_config.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
)




def iter_hf_tensors(ckpt_dir: str) -> Iterator[tuple[str, str, tuple[int, ...], Any]]:
    """Yields (file, name, shape, read()) for every tensor in a HF checkpoint directory."""
    from viscodex_jax.checkpoint.stream import tensor_files  # not at the top: stream -> orbax_io -> this module

    for f in tensor_files(ckpt_dir):
        for name in f.keys():
            yield f.path, name, f.shape(name), (lambda f=f, n=name: f.read(n))


def load_hf_params(ckpt_dir: str, cfg: ModelConfig | None = None, dtype: Any = None,
                   check_finite: bool = False) -> tuple[ModelConfig, dict]:
    """Reads a HF checkpoint (safetensors or ``.bin``) into a params pytree of numpy arrays.

    Every name, shape and dtype is checked from the headers first (``stream.plan_hf_params``); then each
    tensor is cast and transposed straight into its slot of the preallocated (stacked) outputs, so peak
    host memory is the output alone. ``dtype`` None keeps each param's checkpoint dtype. ``check_finite``
    rejects NaN/Inf (after the cast, so an overflowing cast is caught too); it costs one pass over each
    tensor, so it is on in the converters and opt-in for plain loading.
    """
    from viscodex_jax.checkpoint.stream import plan_hf_params

    if cfg is None:
        cfg = config_from_dict(read_config_json(ckpt_dir), os.path.join(ckpt_dir, "config.json"))
    plan = flatten(plan_hf_params(ckpt_dir, cfg, dtype, check_finite))
    total = sum(p.file.nbytes(p.name) for src in plan.values() for p in src.parts)
    bar = tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=f"read {os.path.basename(os.path.normpath(ckpt_dir))}",
                    disable=total < 2**28, mininterval=2.0)  # only for checkpoints big enough to wait on
    t0, out = time.time(), {}
    for key, src in plan.items():
        out[key] = np.empty(src.shape, src.dtype)
        for p in src.parts:
            src.read_into(p, out[key] if p.layer is None else out[key][p.layer])
            bar.update(p.file.nbytes(p.name))
    bar.close()
    dt = max(time.time() - t0, 1e-9)
    log.info("read %d params, %.2f GB in %.1fs (%.2f GB/s) from %s", len(out), total / 1e9, dt, total / 1e9 / dt,
             ckpt_dir)
    return cfg, unflatten(out)


def hf_tensors(params: dict[str, Any], cfg: ModelConfig, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, array) for every tensor of ``params``, one layer slice at a time."""
    for key, leaf in flatten(params).items():
        layers = range(leaf.shape[0]) if hf_map.is_stacked(key) else [None]
        for i in layers:
            x = np.asarray(leaf[i] if i is not None else leaf)
            if dtype is not None:
                x = x.astype(dtype)
            yield hf_map.path_to_hf(key, i), hf_map.to_hf(key, x, hf_map.hf_shape(key, x.shape, cfg))


def copy_side_files(src_dir: str | None, dst_dir: str) -> list[str]:
    copied = []
    if src_dir:
        for name in SIDE_FILES:
            src = os.path.join(src_dir, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(dst_dir, name))
                copied.append(name)
    return copied


def _dtype_label(dtype: Any) -> str:
    return {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}.get(np.dtype(dtype).name, np.dtype(dtype).name)


def save_hf(
    params: dict[str, Any],
    cfg: ModelConfig,
    config_json: dict[str, Any],
    out_dir: str,
    side_files_from: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    dtype: Any = None,
    overwrite: bool = False,
    check_finite: bool = False,
) -> list[str]:
    """Writes params as a HF checkpoint directory (sharded safetensors + index + config + side files).

    The directory appears only when complete. Returns the shard file names.
    ``check_finite`` rejects NaN/Inf in the written tensors (after the ``dtype`` cast).
    """
    expected = flatten(param_shapes(cfg))
    got = flatten(params)
    if set(expected) != set(got):
        extra, miss = sorted(set(got) - set(expected)), sorted(set(expected) - set(got))
        raise CheckpointError(f"params do not match the config: missing {miss[:3]} unexpected {extra[:3]}")
    for k, s in expected.items():
        if tuple(got[k].shape) != tuple(s.shape):
            raise CheckpointError(f"param {'/'.join(k)} has shape {list(got[k].shape)}, config implies {list(s.shape)}")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        first_dtype = None
        total = sum(np.dtype(dtype or v.dtype).itemsize * v.size for v in got.values())
        bar = tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=f"write {os.path.basename(out_dir)}",
                        disable=total < 2**28, mininterval=2.0)
        for name, arr in hf_tensors(params, cfg, dtype):
            first_dtype = first_dtype or arr.dtype
            if check_finite:
                cast = f" cast to {np.dtype(dtype)}" if dtype is not None else ""
                check_tensor_finite(arr, f"tensor {name!r}{cast}")
            writer.add(name, arr)
            bar.update(arr.nbytes)
        bar.close()
        names = writer.finish()
        config_json = dict(config_json)
        config_json["dtype"] = _dtype_label(dtype or first_dtype)
        config_json.pop("torch_dtype", None)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2)
        copy_side_files(side_files_from, tmp)
    return names


def tree_to_device(params: dict[str, Any]) -> dict[str, Any]:
    return jax.tree_util.tree_map(jax.numpy.asarray, params)
