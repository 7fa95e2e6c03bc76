"""The decoder's KV-cache path and the vision tower's patch padding give the same numbers as a plain forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from viscodex_jax.testing.models import IMG
from viscodex_jax.testing.prompts import vl_prompt

from viscodex_jax.checkpoint import load_hf_params
from viscodex_jax.model.causal_lm import CausalLM
from viscodex_jax.model.families.qwen2_5_vl import get_rope_index
from viscodex_jax.model.families.qwen2_5_vl import VisionTower, metadata_arrays, vision_metadata


def test_incremental_decode_with_cache_equals_full_forward(hf_checkpoint):
    cfg, params = load_hf_params(hf_checkpoint("vl_a"))
    model = CausalLM(cfg)
    rng = np.random.default_rng(0)
    grids = [(1, 4, 6)]
    ids = np.array([vl_prompt(grids, [3, 6], rng)])
    t = ids.shape[1]
    pos, _ = get_rope_index(ids, grids, IMG, 2)
    pix = rng.standard_normal((24, cfg.vision.patch_dim)).astype(np.float32)
    meta = metadata_arrays(vision_metadata(grids, cfg.vision))
    full = model.apply({"params": params}, ids, pos, np.ones_like(ids), pixel_values=pix, vision_meta=meta)

    s = t + 4  # cache longer than the sequence: unused slots must stay masked
    kvh, hd, L = cfg.text.num_kv_heads, cfg.text.head_dim, cfg.text.num_layers
    cache = {"k": jnp.zeros((L, 1, s, kvh, hd)), "v": jnp.zeros((L, 1, s, kvh, hd))}
    p = t - 4
    valid = np.zeros((1, s), np.int32)
    valid[:, :p] = 1
    feats = model.apply({"params": params}, pix, meta, method=CausalLM.encode_images)
    out, cache = model.apply({"params": params}, ids[:, :p], pos[:, :, :p], valid, image_features=feats,
                             cache=cache, cache_index=0)
    steps = [out]
    step = jax.jit(lambda c, tok, ps, m, i: model.apply({"params": params}, tok, ps, m, cache=c, cache_index=i))
    for i in range(p, t):
        valid[:, i] = 1
        o, cache = step(cache, ids[:, i:i + 1], pos[:, :, i:i + 1], valid, i)
        steps.append(o)
    inc = np.concatenate([np.asarray(x) for x in steps], axis=1)
    np.testing.assert_allclose(inc, np.asarray(full), atol=1e-5, rtol=0)


def test_padded_patches_do_not_change_image_features(hf_checkpoint):
    cfg, params = load_hf_params(hf_checkpoint("vl_c"))
    grids = [(1, 6, 6), (1, 4, 8)]
    n = 36 + 32
    pix = np.random.default_rng(0).standard_normal((n, cfg.vision.patch_dim)).astype(np.float32)
    tower = VisionTower(cfg.vision)
    plain = tower.apply({"params": params["visual"]}, pix, metadata_arrays(vision_metadata(grids, cfg.vision)))
    padded_meta = vision_metadata(grids, cfg.vision, pad_to=n + 20)
    pix_pad = np.concatenate([pix, np.full((20, cfg.vision.patch_dim), 7.0, np.float32)])
    padded = tower.apply({"params": params["visual"]}, pix_pad, metadata_arrays(padded_meta))
    assert padded.shape[0] == (n + 20) // 4
    np.testing.assert_allclose(np.asarray(padded[: padded_meta.num_valid_tokens]), np.asarray(plain), atol=1e-5, rtol=0)
