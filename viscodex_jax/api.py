"""The public surface: ``vx.load``, ``Model.logits``, ``vx.save_hf``."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from viscodex_jax import checkpoint
from viscodex_jax.data.processor import Processor
from viscodex_jax.model.config import ModelConfig
from viscodex_jax.model.causal_lm import CausalLM


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
    """Writes ``model`` as a HF checkpoint that transformers (and vLLM) load as-is.

    Raises NonFiniteError (naming the tensor) for params holding NaN/Inf,
    before anything is written.
    """
    from viscodex_jax.train.guards import check_finite

    check_finite(model.params, f"not exporting to {out_dir}")
    return checkpoint.save_hf(model.params, model.config, model.raw_config, out_dir, side_files_from=model.path,
                              dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def _text_streamer(tok, eos: Sequence[int], stream: Callable[[str], None]):
    """Turns row 0's token stream into text pieces (holding back half of a multi-byte character)."""
    emitted: list[int] = []
    printed = [""]

    def callback(tokens, step):
        del step
        if emitted and emitted[-1] in eos:
            return
        emitted.append(int(tokens[0]))
        if tokens[0] in eos:
            return
        text = tok.decode(emitted, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            stream(text[len(printed[0]):])
            printed[0] = text

    return callback


def generate(
    model: Model,
    prompts: Sequence[Any],
    images: Sequence[Sequence[Any]] | None = None,
    max_new_tokens: int = 256,
    sampler: Any = None,
    seed: int = 0,
    stream: Callable[[str], None] | None = None,
    settings: Any = None,
) -> list[str]:
    """Chat prompts (message lists or rendered strings) + images -> generated texts.

    ``stream`` receives the text of row 0 piece by piece as it is generated.
    A single message list is accepted for one prompt.

    Raises:
        ConfigError: ``max_new_tokens`` not a positive integer, or the prompt
            plus ``max_new_tokens`` past the model's ``max_position_embeddings``
            (checked before any image is processed or anything compiled).
    """
    from viscodex_jax.sampling.loop import DecodeSettings, generate_ids
    from viscodex_jax.sampling.methods import Greedy

    settings = settings or DecodeSettings(max_new_tokens=max_new_tokens)
    if model.processor is None:
        raise ValueError(f"{model.path}: checkpoint has no tokenizer files; cannot generate text")
    if prompts and isinstance(prompts[0], dict):  # one conversation given without the batch list
        prompts, images = [prompts], None if images is None else [images]
    tok = model.processor.tokenizer
    batch = model.processor(list(prompts), images=images)
    eos = sorted({i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")) if i is not None})
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    callback = _text_streamer(tok, eos, stream) if stream is not None else None
    out = generate_ids(model.config, model.params, batch, eos, pad, sampler or Greedy(),
                       jax.random.PRNGKey(seed), settings, callback)
    texts = []
    for row in out:
        row = list(row)
        for i, t in enumerate(row):
            if t in eos:
                row = row[:i]
                break
        texts.append(tok.decode(row, skip_special_tokens=True))
    return texts
