"""Sampling with a KV cache: prefill (text + images, vision tower run once), then a jitted decode loop.

Shapes are static: prompts are left-padded to a length bucket, the cache is
sized ``bucket + max_new_tokens`` (rounded to the bucket) and image patches
are padded to a patch bucket, so a new prompt length or image size reuses a
compiled program unless it crosses a bucket. Rows advance in lockstep (one
cache write offset), each with its own M-RoPE position carried from prefill.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from viscodex_jax.model.config import ConfigError, ModelConfig
from viscodex_jax.model.causal_lm import CausalLM
from viscodex_jax.model.families.qwen2_5_vl import metadata_arrays, vision_metadata
from viscodex_jax.sampling.methods import Greedy, Sampler

Array = jax.Array


# ----------------------------------------------------------------------------------------- decode


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    max_new_tokens: int = 128
    prompt_bucket: int = 64
    patch_bucket: int = 256
    cache_dtype: str = "float32"

    def __post_init__(self):
        for name in ("max_new_tokens", "prompt_bucket", "patch_bucket"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"{name}={v!r}: expected a positive integer")
        if self.cache_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"cache_dtype={self.cache_dtype!r}: expected float32, bfloat16 or float16")


def check_length(cfg: ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
    """Refuses a generation that would run past the positions the model was trained for."""
    limit = cfg.text.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise ConfigError(
            f"max_new_tokens={max_new_tokens}: the prompt ({prompt_len} tokens) plus max_new_tokens exceeds the "
            f"model's max_position_embeddings={limit}; at most {max(limit - prompt_len, 0)} new tokens fit")


def _prepare(cfg: ModelConfig, batch: dict[str, Any], settings: DecodeSettings):
    """Left-pads the prompt to its bucket and pads patches; returns arrays for prefill."""
    ids = np.asarray(batch["input_ids"], np.int32)
    mask = np.asarray(batch["attention_mask"], np.int32)
    pos = np.asarray(batch["positions"], np.int32)
    b, t = ids.shape
    tb = _round_up(t, settings.prompt_bucket)
    pad = tb - t
    ids = np.pad(ids, ((0, 0), (pad, 0)))
    mask = np.pad(mask, ((0, 0), (pad, 0)))
    pos = np.pad(pos, [(0, 0)] * (pos.ndim - 2) + [(0, 0), (pad, 0)])
    # next position per row: after the largest prompt position (M-RoPE images advance less than tokens)
    next_pos = (pos.max(axis=tuple(range(pos.ndim - 2)) + (-1,)) if pos.ndim == 3 else pos.max(-1)) + 1
    extra = {}
    if batch.get("pixel_values") is not None:
        grids = np.asarray(batch["image_grid_thw"])
        n = int(np.asarray(batch["pixel_values"]).shape[0])
        unit = cfg.vision.spatial_merge_size**2
        pad_to = _round_up(n, max(settings.patch_bucket, unit))
        meta = vision_metadata(grids, cfg.vision, pad_to=pad_to)
        pix = np.zeros((pad_to, cfg.vision.patch_dim), np.float32)
        pix[:n] = batch["pixel_values"]
        extra = {"pixel_values": pix, "vision_meta": metadata_arrays(meta)}
    return ids, mask, pos, next_pos.astype(np.int32), extra


def _prefill_fn(params, ids, mask, pos, extra, *, cfg, cache_len, cache_dtype):
    """Runs the prompt (and its images) once, filling the cache; returns last-position logits."""
    b, t = ids.shape
    tc = cfg.text
    shape = (tc.num_layers, b, cache_len, tc.num_kv_heads, tc.head_dim)
    cache = {"k": jnp.zeros(shape, cache_dtype), "v": jnp.zeros(shape, cache_dtype)}
    kv_valid = jnp.zeros((b, cache_len), jnp.int32).at[:, :t].set(mask)
    logits, cache = CausalLM(cfg).apply({"params": params}, ids, pos, kv_valid, cache=cache, cache_index=0,
                                        last_only=True, **extra)
    return logits, cache, kv_valid


def _step_fn(params, cache, kv_valid, logits, done, key, slot, position, eos, pad_id, *, cfg, sampler, mrope):
    """Samples one token per row from ``logits`` and runs it through the model at cache ``slot``."""
    b = logits.shape[0]
    tok = sampler(logits[:, -1], key).astype(jnp.int32)
    tok = jnp.where(done, pad_id, tok)
    done = done | jnp.isin(tok, eos)
    kv_valid = kv_valid.at[:, slot].set(1)
    p = position[:, None]
    p = jnp.broadcast_to(p[None], (3, b, 1)) if mrope else p
    logits, cache = CausalLM(cfg).apply({"params": params}, tok[:, None], p, kv_valid, cache=cache, cache_index=slot)
    return tok, done, logits, cache, kv_valid


_prefill = jax.jit(_prefill_fn, static_argnames=("cfg", "cache_len", "cache_dtype"))
_step = jax.jit(_step_fn, static_argnames=("cfg", "sampler", "mrope"))


@functools.partial(jax.jit, static_argnames=("cfg", "sampler", "max_new", "cache_len", "cache_dtype"))
def _generate_jit(params, ids, mask, pos, next_pos, extra, key, eos, pad_id, *, cfg, sampler, max_new,
                  cache_len, cache_dtype):
    b, t = ids.shape
    logits, cache, kv_valid = _prefill_fn(params, ids, mask, pos, extra, cfg=cfg, cache_len=cache_len,
                                          cache_dtype=cache_dtype)

    def body(state):
        step, cache, kv_valid, logits, done, out, key = state
        key, sub = jax.random.split(key)
        tok, done, logits, cache, kv_valid = _step_fn(params, cache, kv_valid, logits, done, sub, t + step,
                                                      next_pos + step, eos, pad_id, cfg=cfg, sampler=sampler,
                                                      mrope=pos.ndim == 3)
        return step + 1, cache, kv_valid, logits, done, out.at[:, step].set(tok), key

    def cond(state):
        step, done = state[0], state[4]
        return (step < max_new) & ~jnp.all(done)

    out = jnp.full((b, max_new), pad_id, jnp.int32)
    init = (jnp.int32(0), cache, kv_valid, logits, jnp.zeros((b,), bool), out, key)
    return jax.lax.while_loop(cond, body, init)[5]


def generate_ids(
    cfg: ModelConfig,
    params: dict[str, Any],
    batch: dict[str, Any],
    eos_ids: Sequence[int],
    pad_id: int = 0,
    sampler: Sampler = Greedy(),
    key: Array | None = None,
    settings: DecodeSettings = DecodeSettings(),
    stream: Callable[[np.ndarray, int], None] | None = None,
) -> np.ndarray:
    """New token ids [B, max_new_tokens] (``pad_id`` after a row's EOS; the EOS itself is kept).

    ``stream(tokens [B], step)`` is called with each step's tokens when given
    (the loop then runs step by step from Python, same compiled step).

    Raises:
        ConfigError: ``max_new_tokens`` not positive, or the longest prompt
            plus ``max_new_tokens`` past ``max_position_embeddings``.
    """
    if not isinstance(settings, DecodeSettings):
        raise ConfigError(f"settings={settings!r}: expected a DecodeSettings")
    check_length(cfg, int(np.shape(batch["input_ids"])[1]), settings.max_new_tokens)
    ids, mask, pos, next_pos, extra = _prepare(cfg, batch, settings)
    key = jax.random.PRNGKey(0) if key is None else key
    cache_len = _round_up(ids.shape[1] + settings.max_new_tokens, settings.prompt_bucket)
    eos = jnp.asarray(list(eos_ids), jnp.int32)
    if stream is None:
        out = _generate_jit(params, ids, mask, pos, next_pos, extra, key, eos, pad_id, cfg=cfg, sampler=sampler,
                               max_new=settings.max_new_tokens, cache_len=cache_len,
                               cache_dtype=jnp.dtype(settings.cache_dtype))
        return np.asarray(out)
    return _generate_streaming(cfg, params, ids, mask, pos, next_pos, extra, key, eos, pad_id, sampler, settings,
                               cache_len, stream)


def _generate_streaming(cfg, params, ids, mask, pos, next_pos, extra, key, eos, pad_id, sampler, settings,
                        cache_len, stream):
    logits, cache, kv_valid = _prefill(params, ids, mask, pos, extra, cfg=cfg, cache_len=cache_len,
                                       cache_dtype=jnp.dtype(settings.cache_dtype))
    b, t = ids.shape
    done = jnp.zeros((b,), bool)
    out = np.full((b, settings.max_new_tokens), pad_id, np.int32)
    for step in range(settings.max_new_tokens):
        key, sub = jax.random.split(key)
        tok, done, logits, cache, kv_valid = _step(params, cache, kv_valid, logits, done, sub, t + step,
                                                   jnp.asarray(next_pos + step), eos, pad_id, cfg=cfg,
                                                   sampler=sampler, mrope=pos.ndim == 3)
        out[:, step] = np.asarray(tok)
        stream(out[:, step], step)
        if bool(jnp.all(done)):
            break
    return out
