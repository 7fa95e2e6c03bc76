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
from viscodex_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFile, ShardedWriter, iter_index
from viscodex_jax.checkpoint.validate import count_nonfinite, is_float_dtype
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




def _read_bin(path: str) -> dict[str, np.ndarray]:
    import torch  # legacy .bin only; weights_only forbids arbitrary pickles

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"{path}: cannot read PyTorch weights ({type(e).__name__}: {e})") from e
    return sd


def _torch_to_numpy(t) -> np.ndarray:
    import ml_dtypes
    import torch

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


def iter_hf_tensors(ckpt_dir: str) -> Iterator[tuple[str, str, tuple[int, ...], Any]]:
    """Yields (file, name, shape, read()) for every tensor in a HF checkpoint directory."""
    for path, listed in iter_index(ckpt_dir):
        if path.endswith(".safetensors"):
            f = SafetensorsFile(path)
            for name in listed:
                if name not in f:
                    raise CheckpointError(f"{path}: missing tensor {name!r} (listed in the index)")
            for name in f.keys():
                yield path, name, f.shape(name), (lambda f=f, n=name: f.read(n))
        else:
            sd = _read_bin(path)
            for name in listed:
                if name not in sd:
                    raise CheckpointError(f"{path}: missing tensor {name!r} (listed in the index)")
            for name, t in sd.items():
                yield path, name, tuple(t.shape), (lambda t=t: _torch_to_numpy(t))


def check_tensor_finite(array: np.ndarray, where: str, source: np.ndarray | None = None) -> None:
    """Raises CheckpointError naming ``where`` if ``array`` holds NaN/Inf.

    ``source`` is the array before a dtype cast: when it was finite, the cast overflowed.
    """
    bad = count_nonfinite(array)
    if bad:
        cause = (f" after casting to {array.dtype} (the values overflow it)"
                 if source is not None and source.dtype != array.dtype and not count_nonfinite(source) else "")
        raise CheckpointError(f"{where}: {bad} of {array.size} values are NaN/Inf{cause} "
                              "(pass check_finite=False / --nocheck_finite to load it anyway)")


def load_hf_params(ckpt_dir: str, cfg: ModelConfig | None = None, dtype: Any = None,
                   check_finite: bool = False) -> tuple[ModelConfig, dict]:
    """Reads a HF checkpoint into a params pytree of numpy arrays.

    Tensors are read one at a time and written into preallocated (stacked)
    outputs, so peak host memory is the output plus about one tensor.
    ``dtype`` None keeps each tensor's checkpoint dtype. ``check_finite``
    rejects NaN/Inf (after the cast, so an overflowing cast is caught too);
    it costs one pass over each tensor, so it is on in the converters and
    opt-in for plain loading.
    """
    if cfg is None:
        cfg = config_from_dict(read_config_json(ckpt_dir), os.path.join(ckpt_dir, "config.json"))
    expected = {k: v for k, v in flatten(param_shapes(cfg)).items()}
    out: dict[tuple[str, ...], np.ndarray] = {}
    filled: dict[tuple[str, ...], np.ndarray] = {}
    source: dict[tuple[tuple[str, ...], int | None], str] = {}
    tied_lm_head = None
    t0, nbytes = time.time(), 0
    total = sum(os.path.getsize(p) for p, _ in iter_index(ckpt_dir))
    bar = tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=f"read {os.path.basename(os.path.normpath(ckpt_dir))}",
                    disable=total < 2**28, mininterval=2.0)  # only for checkpoints big enough to wait on
    for path, name, shape, read in iter_hf_tensors(ckpt_dir):
        canon = hf_map.canonical_name(name)
        if canon == "lm_head.weight" and cfg.text.tie_word_embeddings:
            tied_lm_head = (path, name, read)  # checked against the embedding once that is loaded
            continue
        hit = hf_map.hf_to_path(name, expected)
        if hit is None:
            raise CheckpointError(f"{path}: unexpected tensor {name!r}: no parameter of a {cfg.model_type} model maps to it")
        key, layer = hit
        full = expected[key].shape
        slot_shape = full[1:] if layer is not None else full
        if layer is not None and layer >= full[0]:
            raise CheckpointError(
                f"{path}: tensor {name!r}: layer {layer} but config.json has {full[0]} layers"
            )
        want = hf_map.hf_shape(key, slot_shape, cfg)
        if tuple(shape) != want:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(shape)} but config.json implies {list(want)}"
            )
        if (key, layer) in source:
            raise CheckpointError(f"{path}: tensor {name!r} duplicates {source[(key, layer)]!r}")
        source[(key, layer)] = name
        arr = read()
        if not is_float_dtype(arr.dtype):  # a header can claim I32 for float bits; every param is float
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {arr.dtype}, but {'/'.join(key)} is a floating-point parameter"
            )
        if key not in out:
            out[key] = np.empty(full, dtype or arr.dtype)
            filled[key] = np.zeros(full[0] if layer is not None else 1, bool)
        value = hf_map.to_flax(key, arr, slot_shape)
        if layer is None:
            out[key][...] = value
            filled[key][0] = True
        else:
            out[key][layer] = value
            filled[key][layer] = True
        if check_finite:
            check_tensor_finite(out[key][layer] if layer is not None else out[key], f"{path}: tensor {name!r}", arr)
        nbytes += arr.nbytes
        bar.update(arr.nbytes)
        del arr, value
    bar.close()
    missing = [
        hf_map.path_to_hf(k, i if hf_map.is_stacked(k) else None)
        for k in expected
        for i in (np.flatnonzero(~filled[k]) if k in filled else range(expected[k].shape[0] if hf_map.is_stacked(k) else 1))
    ]
    if missing:
        raise CheckpointError(
            f"{ckpt_dir}: missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if tied_lm_head is not None:
        path, name, read = tied_lm_head
        emb = out[("model", "embed_tokens", "embedding")]
        if not np.array_equal(read().astype(emb.dtype), emb):
            raise CheckpointError(
                f"{path}: tensor {name!r} differs from model.embed_tokens.weight but config.json sets tie_word_embeddings"
            )
    dt = max(time.time() - t0, 1e-9)
    log.info("read %d tensors, %.2f GB in %.1fs (%.2f GB/s) from %s", len(source), nbytes / 1e9, dt, nbytes / 1e9 / dt, ckpt_dir)
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
