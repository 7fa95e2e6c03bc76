"""The public surface: ``vx.load``, ``Model.logits``, ``vx.save_hf``."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

from viscodex_jax import checkpoint
from viscodex_jax.data.processor import Processor
from viscodex_jax.model.config import ModelConfig
from viscodex_jax.model.model import CausalLM


@dataclasses.dataclass
class Model:
    """A loaded checkpoint: config, params (plain pytree), and its processor if it has a tokenizer."""

    config: ModelConfig
    params: dict[str, Any]
    raw_config: dict[str, Any]
    path: str | None = None
    processor: Processor | None = None

    @functools.cached_property
    def module(self) -> CausalLM:
        return CausalLM(self.config)

    @functools.cached_property
    def _logits_fn(self):
        return jax.jit(lambda p, b: self.module.apply({"params": p}, **b))

    def logits(self, batch: dict[str, Any]) -> jax.Array:
        """Logits [B, T, V] for a batch made by ``Processor`` (or the same keys by hand)."""
        keys = ("input_ids", "positions", "attention_mask", "pixel_values", "vision_meta", "segment_ids")
        args = {k: batch[k] for k in keys if batch.get(k) is not None}
        return self._logits_fn(self.params, args)


def load(path: str, param_dtype: Any = None, **runtime) -> Model:
    """HF dir (safetensors or .bin) or our orbax dir -> Model.

    ``param_dtype`` casts the params (None keeps the checkpoint's); ``runtime``
    sets ModelConfig run-time fields such as ``dtype="bfloat16"`` (compute) or
    ``attention_impl="cudnn"``.
    """
    cfg, params, raw = checkpoint.load_params(path, param_dtype=param_dtype, **runtime)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    processor = None
    if os.path.isfile(os.path.join(path, "tokenizer.json")) or os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        processor = Processor.from_pretrained(path, cfg)
    return Model(cfg, params, raw, path, processor)


def save_hf(model: Model, out_dir: str, dtype: Any = None, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False):
    """Writes ``model`` as a HF checkpoint that transformers (and vLLM) load as-is."""
    return checkpoint.save_hf(model.params, model.config, model.raw_config, out_dir, side_files_from=model.path,
                              dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
