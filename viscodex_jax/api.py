"""The public surface: ``vx.load``, ``Model.logits``, ``vx.save_hf``, ``vx.generate``."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from viscodex_jax import checkpoint
from viscodex_jax.checkpoint.sharded import read_sharded
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
    mesh: Mesh | None = None  # where the params live (``vx.load(mesh=...)``); generate runs there
    rules: Any = None

    @functools.cached_property
    def module(self) -> CausalLM:
        return CausalLM(self.config)

    @functools.cached_property
    def _logits_fn(self):
        return jax.jit(lambda p, b: self.module.apply({"params": p}, **b))

    def for_inference(self) -> "Model":
        """Puts the params, in place, in the layout sampling runs on this backend (``causal_lm.inference_layout``):
        on CPU the stacked ``[L, ...]`` layer params are split into per-layer buffers, each stacked array freed as
        it goes (never held twice), and decode steps run about 2x faster than under ``nn.scan`` with the same
        tokens; accelerators keep the stacked layout (its KV cache stays in place). ``save_hf`` and merging need
        the stacked layout: load again for those."""
        from viscodex_jax.model.causal_lm import inference_layout

        self.params = inference_layout(self.params, free=True)
        return self

    def logits(self, batch: dict[str, Any]) -> jax.Array:
        """Logits [B, T, V] for a batch made by ``Processor`` (or the same keys by hand)."""
        keys = ("input_ids", "positions", "attention_mask", "pixel_values", "vision_meta", "segment_ids")
        args = {k: batch[k] for k in keys if batch.get(k) is not None}
        return self._logits_fn(self.params, args)


def load(path: str, param_dtype: Any = None, mesh: Mesh | None = None, rules: Any = None, **runtime) -> Model:
    """HF dir (safetensors or .bin) or our orbax dir -> Model.

    ``param_dtype`` casts the params (None keeps the checkpoint's); ``runtime``
    sets ModelConfig run-time fields such as ``dtype="bfloat16"`` (compute) or
    ``attention_impl="cudnn"``.

    ``mesh`` (with ``rules``, default ``sharding.DEFAULT_RULES``, the training
    rules) places every param by its logical axes while reading it: safetensors
    are read tensor by tensor into each local device's shard (a host holds one
    tensor plus its own shards, never a replica it does not serve), orbax
    restores straight into the shardings. ``.bin`` checkpoints are read whole,
    then placed.
    """
    from viscodex_jax.model.config import config_from_dict, read_config_json
    from viscodex_jax.sampling import mesh as on_mesh

    if mesh is None:
        cfg, params, raw = checkpoint.load_params(path, param_dtype=param_dtype, **runtime)
        params = jax.tree_util.tree_map(jnp.asarray, params)
    else:
        rules = on_mesh.resolve_rules(mesh, rules)
        raw = read_config_json(path)
        cfg = config_from_dict(raw, os.path.join(path, "config.json"), **runtime)
        params = read_sharded(path, cfg, mesh, rules, param_dtype)
    processor = None
    if os.path.isfile(os.path.join(path, "tokenizer.json")) or os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        processor = Processor.from_pretrained(path, cfg)
    return Model(cfg, params, raw, path, processor, mesh, rules)


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
    mesh: Mesh | None = None,
    rules: Any = None,
) -> list[str]:
    """Chat prompts (message lists or rendered strings) + images -> generated texts.

    ``stream`` receives the text of row 0 piece by piece as it is generated.
    A single message list is accepted for one prompt. ``settings``: a
    ``DecodeSettings`` (all prompts as one lockstep batch) or a ``SlotSettings``
    (continuous batching: a fixed number of slots refilled as rows end; the
    better choice for many prompts of mixed lengths). ``mesh``/``rules``
    default to where ``vx.load`` put the params.

    Raises:
        ConfigError: ``max_new_tokens`` not a positive integer, or the prompt
            plus ``max_new_tokens`` past the model's ``max_position_embeddings``
            (checked before any image is processed or anything compiled).
    """
    from viscodex_jax.sampling.loop import DecodeSettings, generate_ids
    from viscodex_jax.sampling.methods import Greedy
    from viscodex_jax.sampling.slots import SlotSampler, SlotSettings, requests_from_batch
    from viscodex_jax.sampling.text import eos_and_pad, row_text

    settings = settings or DecodeSettings(max_new_tokens=max_new_tokens)
    mesh, rules = (mesh, rules) if mesh is not None else (model.mesh, model.rules)
    if isinstance(settings, SlotSettings) and stream is not None:
        raise ValueError("stream= needs DecodeSettings (one lockstep batch); SlotSettings generate without streaming")
    if model.processor is None:
        raise ValueError(f"{model.path}: checkpoint has no tokenizer files; cannot generate text")
    if prompts and isinstance(prompts[0], dict):  # one conversation given without the batch list
        prompts, images = [prompts], None if images is None else [images]
    tok = model.processor.tokenizer
    batch = model.processor(list(prompts), images=images)
    eos, pad = eos_and_pad(tok)
    callback = _text_streamer(tok, eos, stream) if stream is not None else None
    if isinstance(settings, SlotSettings):
        engine = SlotSampler(model.config, model.params, eos, pad, sampler or Greedy(), settings,
                             jax.random.PRNGKey(seed), mesh, rules)
        out = engine.run(requests_from_batch(model.config, batch, min(max_new_tokens, settings.max_new_tokens)))
    else:
        out = generate_ids(model.config, model.params, batch, eos, pad, sampler or Greedy(),
                           jax.random.PRNGKey(seed), settings, callback, mesh, rules)
    return [row_text(tok, row, eos) for row in out]
