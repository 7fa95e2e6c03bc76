"""Merge drivers: params pytrees in memory, and HF checkpoint dirs streamed tensor by tensor.

The first fine-tuned model is the *primary* (the VLM for VisCodex): the output
has its structure, config and side files, and every tensor that is not merged
(the vision tower and the merger, by default) is copied from it bit for bit.
Both drivers call ``merge.merge_named`` on HF-layout tensors, so they agree
bit for bit.

Guards: copied tensors must be floating point and finite (the merged ones are
checked inside the merge); the primary must hold every tensor its config.json
describes, and with ``require_vision`` it must be a VLM. After merging, task
vectors are compared: models fine-tuned from the given base have nearly
orthogonal task vectors (mean cosine about 0, e.g. -0.008 on the tiny
checkpoints), while a base they were not trained from adds the same offset to
every task vector and pushes the cosine up (0.39 in the same test). A mean
cosine above ``UNRELATED_BASE_COSINE``, or a task vector that is zero
everywhere (a model that is the base itself), is logged as a warning with the
numbers and recorded in the report's ``warnings``; the output is still written,
since merging related-but-different bases can be deliberate.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import tqdm

from viscodex_jax.checkpoint import hf_map
from viscodex_jax.checkpoint.hf import copy_side_files, iter_hf_tensors
from viscodex_jax.utils import atomic_dir, flatten, unflatten
from viscodex_jax.checkpoint.safetensors_io import ShardedWriter
from viscodex_jax.checkpoint.validate import count_nonfinite, is_float_dtype
from viscodex_jax.merge.tensor import MergeError, MergeSpec, merge_named
from viscodex_jax.model.config import ModelConfig, config_from_dict, read_config_json
from viscodex_jax.model.causal_lm import param_shapes

log = logging.getLogger(__name__)

UNRELATED_BASE_COSINE = 0.2  # mean task-vector cosine above which the base looks unrelated (see module doc)


class _Report:
    def __init__(self, spec: MergeSpec, names: Sequence[str]):
        self.data: dict[str, Any] = {
            "method": spec.method, "weights": list(spec.weights), "lam": spec.lam, "density": spec.density,
            "seed": spec.seed, "dare_rescale": spec.dare_rescale, "normalize": spec.do_normalize,
            "group_weights": [[p, list(w)] for p, w in spec.group_weights],
            "include": list(spec.include), "exclude": list(spec.exclude), "out_dtype": spec.out_dtype,
            "allow_unusual_weights": spec.allow_unusual_weights,
            "models": list(names), "merged": {}, "copied": [], "warnings": [],
        }

    def merged(self, name: str, stats: dict[str, Any]):
        self.data["merged"][name] = {
            "task_vector_norms": [float(x) for x in stats["task_vector_norms"]],
            "cosine": np.asarray(stats["cosine"]).round(6).tolist(),
            "kept_fraction": [float(x) for x in stats["kept_fraction"]],
            "flipped_fraction": float(stats["flipped_fraction"]),
            **({"vocab_rows_merged": stats["vocab_rows_merged"]} if "vocab_rows_merged" in stats else {}),
        }

    def summary(self) -> dict[str, Any]:
        m = self.data["merged"].values()
        cos = [c[0][1] for c in (v["cosine"] for v in m) if len(c) > 1]
        return {"merged_tensors": len(self.data["merged"]), "copied_tensors": len(self.data["copied"]),
                "mean_cosine_model1_model2": float(np.mean(cos)) if cos else None}

    def check_task_vectors(self) -> list[str]:
        """Warnings (also logged and kept in the report) when the base looks wrong for these models."""
        merged = list(self.data["merged"].values())
        if not merged:
            return []
        base, models = self.data["models"][0], self.data["models"][1:]
        norms = np.sqrt(np.sum(np.square([v["task_vector_norms"] for v in merged]), axis=0))
        warnings = []
        for m, n in zip(models, norms):
            if n == 0:
                warnings.append(f"the task vector of {m} is zero in all {len(merged)} merged tensors: {m} is the base "
                                f"{base} itself, so it contributes nothing")
        for i in range(len(models)):
            for j in range(i + 1, len(models)):
                cos = float(np.mean([v["cosine"][i][j] for v in merged]))
                if cos > UNRELATED_BASE_COSINE:
                    warnings.append(
                        f"task vectors of {models[i]} and {models[j]} have mean cosine {cos:.3f} over {len(merged)} "
                        f"merged tensors (warning above {UNRELATED_BASE_COSINE}; models fine-tuned from their base "
                        f"give about 0): {base} looks unrelated to them. Task-vector norms: {models[i]} {norms[i]:.4g}, "
                        f"{models[j]} {norms[j]:.4g}"
                    )
        for w in warnings:
            log.warning("merge: %s", w)
        self.data["warnings"] = warnings
        return warnings

    def write(self, path: str):
        self.data["summary"] = self.summary()
        with open(path, "w") as f:
            json.dump(self.data, f, indent=1)


def _check_copied(arr: Any, name: str, where: str) -> None:
    """Tensors copied from the primary skip the merge's own NaN check: check them here."""
    dtype = np.asarray(arr).dtype
    if not is_float_dtype(dtype):
        raise MergeError(f"{where}: tensor {name} has dtype {dtype}, but model parameters are floating point")
    bad = count_nonfinite(arr)
    if bad:
        raise MergeError(f"{where}: tensor {name} (copied into the output) has NaN/Inf: {bad} of {np.size(arr)} "
                         "values")


def _expected_hf_names(cfg: ModelConfig) -> list[str]:
    """Canonical HF names of every tensor a model of ``cfg`` has (one per layer for stacked params)."""
    out = []
    for key, shape in flatten(param_shapes(cfg)).items():
        layers = range(shape.shape[0]) if hf_map.is_stacked(key) else [None]
        out += [hf_map.path_to_hf(key, i) for i in layers]
    return out


def _lm_head_or_tied(flat: dict[tuple[str, ...], Any], key: tuple[str, ...]):
    """A tied model has no lm_head; its output projection is the embedding."""
    if key == ("lm_head", "kernel") and key not in flat and ("model", "embed_tokens", "embedding") in flat:
        return np.asarray(flat[("model", "embed_tokens", "embedding")]).T
    return flat.get(key)


def merge_params(
    base: dict[str, Any], models: Sequence[dict[str, Any]], spec: MergeSpec, cfg: ModelConfig,
    model_names: Sequence[str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """In-memory merge of params pytrees; ``models[0]`` is the primary (its structure is kept)."""
    names = list(model_names or [f"model{i + 1}" for i in range(len(models))])
    if len(spec.weights) != len(models):
        raise MergeError(f"{len(models)} models to merge but {len(spec.weights)} weights given")
    report = _Report(spec, ["base"] + names)
    fb, fms = flatten(base), [flatten(m) for m in models]
    out = {}
    for key, prim in fms[0].items():
        path = "/".join(key)
        if not spec.merges(path):
            _check_copied(prim, path, names[0])
            out[key] = np.asarray(prim)
            report.data["copied"].append(path)
            continue
        srcs = [_lm_head_or_tied(fb, key)] + [_lm_head_or_tied(f, key) for f in fms]
        for src, who in zip(srcs, ["base"] + names):
            if src is None:
                raise MergeError(f"tensor {path} is in {names[0]} but not in {who} (exclude it to copy it instead)")
        stacked = hf_map.is_stacked(key)
        if stacked and any(np.shape(s)[0] != prim.shape[0] for s in srcs):
            raise MergeError(f"tensor {path}: layer counts differ: {[np.shape(s)[0] for s in srcs]}")
        layers = range(prim.shape[0]) if stacked else [None]
        res = None
        for i in layers:
            def hf(x, i=i):
                x = np.asarray(x[i] if i is not None else x)
                return hf_map.to_hf(key, x, hf_map.hf_shape(key, x.shape, cfg))
            name = hf_map.path_to_hf(key, i)
            merged, stats = merge_named(name, hf(srcs[0]), [hf(s) for s in srcs[1:]], hf(srcs[1]), spec, path)
            slot_shape = prim.shape[1:] if stacked else prim.shape
            value = hf_map.to_flax(key, np.asarray(merged), slot_shape)
            if res is None:
                res = np.empty(prim.shape, value.dtype)
            if i is None:
                res[...] = value
            else:
                res[i] = value
            report.merged(name, stats)
        out[key] = res
    for f, who in zip([fb] + fms[1:], ["base"] + names[1:]):
        extra = [k for k in f if k not in fms[0] and spec.merges("/".join(k))]
        if extra:
            raise MergeError(f"tensor {'/'.join(extra[0])} is in {who} but not in {names[0]}")
    report.check_task_vectors()
    return unflatten(out), report.data


def _index(ckpt_dir: str) -> dict[str, tuple[str, Callable[[], np.ndarray], tuple[int, ...]]]:
    out = {}
    for path, name, shape, read in iter_hf_tensors(ckpt_dir):
        canon = hf_map.canonical_name(name)
        if canon in out:
            raise MergeError(f"{path}: tensor {name!r} appears twice in {ckpt_dir}")
        out[canon] = (path, read, tuple(shape))
    return out


def merge_checkpoints(
    base_dir: str,
    model_dirs: Sequence[str],
    out_dir: str,
    spec: MergeSpec,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    require_vision: bool = False,
) -> dict[str, Any]:
    """Streams a merge of HF checkpoint dirs into a HF dir; returns the report.

    Peak host memory: one tensor from each model plus one output shard.
    ``model_dirs[0]`` is the primary: its config.json and side files are written.
    ``require_vision``: the primary must be a VLM (the VisCodex recipe copies its
    vision tower); a text-only primary means the dirs were swapped.
    """
    if len(spec.weights) != len(model_dirs):
        raise MergeError(f"{len(model_dirs)} models to merge but {len(spec.weights)} weights given")
    raw = read_config_json(model_dirs[0])
    cfg = config_from_dict(raw, os.path.join(model_dirs[0], "config.json"))
    if require_vision and not cfg.is_multimodal:
        raise MergeError(
            f"{model_dirs[0]}: model_type {cfg.model_type!r} has no vision tower, but the merge copies the vision "
            "tower from this model (the VLM); were the VLM and coder swapped, or the base given as the VLM?"
        )
    expected = flatten(param_shapes(cfg))
    idx = [_index(d) for d in [base_dir, *model_dirs]]
    absent = [n for n in _expected_hf_names(cfg) if n not in idx[1]]
    if absent:
        raise MergeError(
            f"{model_dirs[0]}: its config.json describes a {cfg.model_type} model but it has no tensor {absent[0]!r}"
            + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else "")
            + "; the output takes its structure and copied tensors from this model"
        )
    names = [os.path.basename(os.path.normpath(d)) for d in [base_dir, *model_dirs]]
    report = _Report(spec, names)
    total = sum(os.path.getsize(f) for f in {file for ix in idx for file, _, _ in ix.values()})
    t0 = time.time()
    try:
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            writer = ShardedWriter(tmp, max_shard_bytes)
            bar = tqdm.tqdm(total=int(total), unit="B", unit_scale=True, desc="merge (input read)", mininterval=1.0)
            for canon, (file, read, _) in idx[1].items():
                hit = hf_map.hf_to_path(canon, expected)
                if hit is None:
                    raise MergeError(f"{file}: tensor {canon!r} does not belong to a {cfg.model_type} model")
                path = "/".join(hit[0])
                if not spec.merges(path):
                    arr = read()
                    _check_copied(arr, repr(canon), file)
                    writer.add(canon, arr)  # copied untouched: the vision tower stays the VLM's
                    report.data["copied"].append(canon)
                    bar.update(arr.nbytes)
                else:
                    srcs = []
                    for j, ix in enumerate(idx):
                        src = ix.get(canon)
                        if src is None and canon == "lm_head.weight":
                            src = ix.get("model.embed_tokens.weight")  # tied model: the embedding is its head
                        if src is None:
                            raise MergeError(f"tensor {canon!r} is in {model_dirs[0]} but not in {[base_dir, *model_dirs][j]}"
                                             " (exclude it to copy it instead)")
                        srcs.append(src[1]())
                    merged, stats = merge_named(canon, srcs[0], srcs[1:], srcs[1], spec, path)
                    writer.add(canon, np.asarray(merged))
                    report.merged(canon, stats)
                    bar.update(sum(x.nbytes for x in srcs))
                    del srcs, merged
            bar.close()
            for j, ix in enumerate(idx):
                if j == 1:
                    continue
                for canon in ix:
                    hit = hf_map.hf_to_path(canon, expected)
                    if canon not in idx[1] and hit is not None and spec.merges("/".join(hit[0])) and not (
                            canon == "lm_head.weight" and cfg.text.tie_word_embeddings):
                        raise MergeError(f"tensor {canon!r} is in {[base_dir, *model_dirs][j]} but not in {model_dirs[0]}")
            report.check_task_vectors()
            writer.finish()
            out_cfg = dict(raw)
            out_cfg["dtype"] = spec.out_dtype
            out_cfg.pop("torch_dtype", None)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(out_cfg, f, indent=2)
            copy_side_files(model_dirs[0], tmp)
            report.data["seconds"] = time.time() - t0
            report.write(os.path.join(tmp, "merge_report.json"))
    except OSError as e:
        if isinstance(e, FileExistsError):
            raise
        raise MergeError(f"{out_dir}: cannot write the merged checkpoint ({e.strerror or e})") from e
    log.info("merged %d tensors, copied %d, in %.1fs -> %s", len(report.data["merged"]),
             len(report.data["copied"]), time.time() - t0, out_dir)
    return report.data
