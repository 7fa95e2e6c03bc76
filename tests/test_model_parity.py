"""Logit parity with transformers (eager attention): fp32 max |diff| <= 1e-4, bf16 KL <= 1e-3."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from viscodex_jax.testing.models import TEXT_CONFIGS, VL_CONFIGS, load_cached
from viscodex_jax.testing.prompts import inference_batch, pad_rows, vl_prompt
from viscodex_jax.testing.reference import transformers_logits

from viscodex_jax.model.causal_lm import CausalLM
from viscodex_jax.model.families.qwen2_5_vl import metadata_arrays, vision_metadata

# Grids in patches (t, h, w): several sizes, incl. ones that do not fill a window.
SCENARIOS = {
    "text_only": ([], [[13]]),
    "one_image": ([(1, 8, 12)], [[5, 4]]),
    "three_images": ([(1, 4, 6), (1, 10, 8), (1, 6, 6)], [[3, 2, 4, 1]]),
    "batch_padded": ([(1, 6, 8), (1, 4, 4)], [[2, 5], [9, 1]]),  # two prompts, one image each
}


def _batch(scenario: str, cfg, seed: int = 0):
    grids, lens = SCENARIOS[scenario]
    rng = np.random.default_rng(seed)
    rows, k = [], 0
    for row_lens in lens:
        n_img = len(row_lens) - 1
        rows.append(vl_prompt(grids[k : k + n_img], row_lens, rng) if cfg.is_multimodal else
                    list(rng.integers(0, 290, sum(row_lens) + 6)))
        k += n_img
    ids, mask = pad_rows(rows, "left")  # left padding, as for generation
    return inference_batch(ids, mask, grids, rng, cfg.is_multimodal)


@functools.lru_cache(maxsize=None)
def _hf_model(path: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoConfig

    cls = AutoModelForImageTextToText if AutoConfig.from_pretrained(path).model_type == "qwen2_5_vl" else AutoModelForCausalLM
    return cls.from_pretrained(path, attn_implementation="eager", dtype=getattr(torch, dtype)).eval()


def _hf_logits(path: str, batch, dtype: str) -> np.ndarray:
    return transformers_logits(_hf_model(path, dtype), batch)


def _our_logits(path: str, batch, dtype: str, impl: str = "xla") -> np.ndarray:
    cfg, params = load_cached(path, dtype)
    cfg = cfg.replace(attention_impl=impl)
    kw = {}
    if "pixel_values" in batch:
        kw = dict(pixel_values=batch["pixel_values"],
                  vision_meta=metadata_arrays(vision_metadata(batch["image_grid_thw"], cfg.vision)))
    fn = jax.jit(lambda p, ids, pos, m, kw: CausalLM(cfg).apply({"params": p}, ids, pos, m, **kw))
    out = fn(params, batch["input_ids"], batch["positions"], batch["attention_mask"], kw)
    return np.asarray(out.astype(jnp.float32))


CASES = [(m, s) for m in VL_CONFIGS for s in SCENARIOS] + [(m, "batch_padded") for m in TEXT_CONFIGS] + \
        [(m, "text_only") for m in TEXT_CONFIGS]


# The memory-efficient kernels that run on CPU, on the cases that stress masks most
# (several images: window and per-image segments; left padding; GQA 3).
KERNEL_CASES = [(impl, m, s) for impl in ("blockwise", "splash_interpret")
                for m, s in (("vl_a", "three_images"), ("vl_b", "batch_padded"), ("qwen2_tied_gqa3", "batch_padded"))]


@pytest.mark.parametrize("impl,model_name,scenario", [("xla", m, s) for m, s in CASES] + KERNEL_CASES)
def test_fp32_logits_match_transformers(hf_checkpoint, impl, model_name, scenario):
    path = hf_checkpoint(model_name)
    cfg, _ = load_cached(path, "float32")
    batch = _batch(scenario, cfg)
    ours = _our_logits(path, batch, "float32", impl)
    ref = _hf_logits(path, batch, "float32")
    valid = batch["attention_mask"].astype(bool)
    diff = np.abs(ours - ref)[valid].max()
    # The test is only meaningful if logits are far from trivially equal.
    assert np.std(ref[valid]) > 0.1
    assert diff <= 1e-4, f"{impl}/{model_name}/{scenario}: max |logit diff| {diff:.3g}"


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    lp = jax.nn.log_softmax(jnp.asarray(p_logits, jnp.float32), -1)
    lq = jax.nn.log_softmax(jnp.asarray(q_logits, jnp.float32), -1)
    return np.asarray(jnp.sum(jnp.exp(lp) * (lp - lq), -1))


@pytest.mark.parametrize("model_name,scenario", [("vl_a", s) for s in SCENARIOS] + [("qwen2_tied_gqa3", "batch_padded")])
def test_bf16_kl_to_transformers(hf_checkpoint, model_name, scenario):
    path = hf_checkpoint(model_name)
    cfg, _ = load_cached(path, "bfloat16")
    batch = _batch(scenario, cfg)
    ours = _our_logits(path, batch, "bfloat16")
    ref = _hf_logits(path, batch, "bfloat16")
    valid = batch["attention_mask"].astype(bool)
    kl = _kl(ref, ours)[valid]
    assert np.isfinite(kl).all()
    assert kl.max() <= 1e-3, f"{model_name}/{scenario}: max per-position KL {kl.max():.3g}"


def test_parity_test_detects_wrong_positions(hf_checkpoint):
    """Wrong M-RoPE positions must break parity: the tolerance is tight enough to matter.

    (A constant shift would not: RoPE only sees relative positions.) Swapping
    the h and w axes on a non-square image changes relative positions.
    """
    path = hf_checkpoint("vl_a")
    cfg, _ = load_cached(path, "float32")
    batch = _batch("one_image", cfg)
    ref = _hf_logits(path, batch, "float32")
    wrong = dict(batch, positions=np.asarray(batch["positions"]).copy())
    wrong["positions"][[1, 2]] = wrong["positions"][[2, 1]]
    ours = _our_logits(path, wrong, "float32")
    assert np.abs(ours - ref).max() > 1e-2
