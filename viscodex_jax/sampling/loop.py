"""Sampling with a KV cache: prefill (text + images, vision tower run once), then a jitted decode loop.

Shapes are static: prompts are left-padded to a length bucket, the cache is
sized ``bucket + max_new_tokens`` (rounded to the bucket) and image patches
are padded to a patch bucket, so a new prompt length or image size reuses a
compiled program unless it crosses a bucket. Rows advance in lockstep (one
cache write offset), each with its own M-RoPE position carried from prefill.

On a Mesh (``mesh=``) the params are placed by the training rules, rows are
padded to a multiple of the batch shards and split over them, the KV cache is
split over rows and kv-heads, and prefill/decode are traced inside the
activation-sharding context, so the attention kernels run per shard
(shard_map) instead of on gathered inputs. ``slots.py`` is the continuous-
batching sampler over the same prefill and cache layout.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

from jax.sharding import Mesh

import jax
import jax.numpy as jnp
import numpy as np

from viscodex_jax.model.config import ConfigError, ModelConfig
from viscodex_jax.model.causal_lm import CausalLM
from viscodex_jax.model.families.qwen2_5_vl import metadata_arrays, vision_metadata
from viscodex_jax.sampling import mesh as on_mesh
from viscodex_jax.sampling.methods import Greedy, Sampler
from viscodex_jax.sharding import constrain

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


def _prefill_fn(params, ids, mask, pos, extra, *, cfg, cache_len, cache_dtype, mesh=None, rules=None):
    """Runs the prompt (and its images) once, filling the cache; returns last-position logits."""
    b, t = ids.shape
    tc = cfg.text
    shape = (tc.num_layers, b, cache_len, tc.num_kv_heads, tc.head_dim)
    with on_mesh.context(mesh, rules):
        cache = on_mesh.constrain_cache({"k": jnp.zeros(shape, cache_dtype), "v": jnp.zeros(shape, cache_dtype)})
        kv_valid = constrain(jnp.zeros((b, cache_len), jnp.int32).at[:, :t].set(mask), ("batch", "cache_length"))
        logits, cache = CausalLM(cfg).apply({"params": params}, ids, pos, kv_valid, cache=cache, cache_index=0,
                                            last_only=True, **extra)
        return logits, on_mesh.constrain_cache(cache), kv_valid


def _step_fn(params, cache, kv_valid, logits, done, key, slot, position, eos, pad_id, *, cfg, sampler, mrope,
             mesh=None, rules=None):
    """Samples one token per row from ``logits`` and runs it through the model at cache ``slot``."""
    b = logits.shape[0]
    tok = sampler(logits[:, -1], key).astype(jnp.int32)
    tok = jnp.where(done, pad_id, tok)
    done = done | jnp.isin(tok, eos)
    kv_valid = kv_valid.at[:, slot].set(1)
    p = position[:, None]
    p = jnp.broadcast_to(p[None], (3, b, 1)) if mrope else p
    with on_mesh.context(mesh, rules):
        logits, cache = CausalLM(cfg).apply({"params": params}, tok[:, None], p, kv_valid, cache=cache,
                                            cache_index=slot)
        return tok, done, logits, on_mesh.constrain_cache(cache), kv_valid


_prefill = jax.jit(_prefill_fn, static_argnames=("cfg", "cache_len", "cache_dtype", "mesh", "rules"))
_step = jax.jit(_step_fn, static_argnames=("cfg", "sampler", "mrope", "mesh", "rules"))


@functools.partial(jax.jit, static_argnames=("cfg", "sampler", "max_new", "cache_len", "cache_dtype", "mesh",
                                             "rules"))
def _generate_jit(params, ids, mask, pos, next_pos, extra, key, eos, pad_id, *, cfg, sampler, max_new,
                  cache_len, cache_dtype, mesh=None, rules=None):
    b, t = ids.shape
    on = dict(mesh=mesh, rules=rules)
    logits, cache, kv_valid = _prefill_fn(params, ids, mask, pos, extra, cfg=cfg, cache_len=cache_len,
                                          cache_dtype=cache_dtype, **on)

    def body(state):
        step, cache, kv_valid, logits, done, out, key = state
        key, sub = jax.random.split(key)
        tok, done, logits, cache, kv_valid = _step_fn(params, cache, kv_valid, logits, done, sub, t + step,
                                                      next_pos + step, eos, pad_id, cfg=cfg, sampler=sampler,
                                                      mrope=pos.ndim == 3, **on)
        return step + 1, cache, kv_valid, logits, done, out.at[:, step].set(tok), key

    def cond(state):
        step, done = state[0], state[4]
        return (step < max_new) & ~jnp.all(done)

    out = jnp.full((b, max_new), pad_id, jnp.int32)
    init = (jnp.int32(0), cache, kv_valid, logits, _padding_rows(mask), out, key)
    return jax.lax.while_loop(cond, body, init)[5]


def _padding_rows(mask):
    """Rows without a prompt token (added to fill the batch shards) start finished."""
    return jnp.sum(mask, axis=-1) == 0


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
    mesh: Mesh | None = None,
    rules: Any = None,
) -> np.ndarray:
    """New token ids [B, max_new_tokens] (``pad_id`` after a row's EOS; the EOS itself is kept).

    ``stream(tokens [B], step)`` is called with each step's tokens when given
    (the loop then runs step by step from Python, same compiled step).
    ``mesh``/``rules``: run sharded (``rules`` default: ``sharding.DEFAULT_RULES``);
    rows are padded to a multiple of the batch shards (padding rows are dropped
    from the result), params not yet placed by the rules are placed on the way.

    Raises:
        ConfigError: ``max_new_tokens`` not positive, or the longest prompt
            plus ``max_new_tokens`` past ``max_position_embeddings``.
    """
    if not isinstance(settings, DecodeSettings):
        raise ConfigError(f"settings={settings!r}: expected a DecodeSettings")
    check_length(cfg, int(np.shape(batch["input_ids"])[1]), settings.max_new_tokens)
    ids, mask, pos, next_pos, extra = _prepare(cfg, batch, settings)
    rows = ids.shape[0]
    rules = on_mesh.resolve_rules(mesh, rules)
    ids, mask, pos, next_pos = _pad_rows(on_mesh.batch_shards(mesh, rules), ids, mask, pos, next_pos)
    params = on_mesh.place_params(cfg, params, mesh, rules)
    ids, mask, next_pos = (on_mesh.put_rows(x, mesh, rules) for x in (ids, mask, next_pos))
    pos = on_mesh.put_rows(pos, mesh, rules, axis=pos.ndim - 2)
    key = jax.random.PRNGKey(0) if key is None else key
    extra, key, eos = on_mesh.put_replicated((extra, key, np.asarray(list(eos_ids), np.int32)), mesh)
    cache_len = _round_up(ids.shape[1] + settings.max_new_tokens, settings.prompt_bucket)
    static = dict(cfg=cfg, sampler=sampler, cache_dtype=jnp.dtype(settings.cache_dtype), mesh=mesh, rules=rules)
    if stream is None:
        out = _generate_jit(params, ids, mask, pos, next_pos, extra, key, eos, pad_id,
                            max_new=settings.max_new_tokens, cache_len=cache_len, **static)
        return np.asarray(out)[:rows]
    return _generate_streaming(params, ids, mask, pos, next_pos, extra, key, eos, pad_id, settings, cache_len,
                               stream, rows, **static)


def _pad_rows(shards: int, ids, mask, pos, next_pos):
    """Appends empty rows (mask 0) so the rows split evenly over the batch shards."""
    extra = -ids.shape[0] % shards
    if not extra:
        return ids, mask, pos, next_pos
    grow = lambda x, axis: np.concatenate([x, np.zeros_like(np.take(x, [0] * extra, axis=axis))], axis=axis)
    return grow(ids, 0), grow(mask, 0), grow(pos, pos.ndim - 2), grow(next_pos, 0)


def _generate_streaming(params, ids, mask, pos, next_pos, extra, key, eos, pad_id, settings, cache_len, stream,
                        rows, *, cfg, sampler, cache_dtype, mesh, rules):
    on = dict(mesh=mesh, rules=rules)
    logits, cache, kv_valid = _prefill(params, ids, mask, pos, extra, cfg=cfg, cache_len=cache_len,
                                       cache_dtype=cache_dtype, **on)
    b, t = ids.shape
    done = _padding_rows(mask)
    out = np.full((b, settings.max_new_tokens), pad_id, np.int32)
    for step in range(settings.max_new_tokens):
        key, sub = jax.random.split(key)
        tok, done, logits, cache, kv_valid = _step(params, cache, kv_valid, logits, done, sub, t + step,
                                                   next_pos + step, eos, pad_id, cfg=cfg,
                                                   sampler=sampler, mrope=pos.ndim == 3, **on)
        out[:, step] = np.asarray(tok)
        stream(out[:rows, step], step)
        if bool(jnp.all(done)):
            break
    return out[:rows]
