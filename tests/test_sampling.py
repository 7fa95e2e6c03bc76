"""Sampling: greedy equals transformers' generate, the cached decode equals full recompute, samplers."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from viscodex_jax.testing.models import IMG, load_cached
from viscodex_jax.testing.prompts import inference_batch, left_padded_prompts

from viscodex_jax.model.causal_lm import CausalLM
from viscodex_jax.model.families.qwen2_5_vl import get_rope_index
from viscodex_jax.model.families.qwen2_5_vl import metadata_arrays, vision_metadata
from viscodex_jax.sampling.loop import DecodeSettings, generate_ids
from viscodex_jax.sampling.methods import Greedy, Temperature, TopK, TopP

NEW = 10
CASES = {
    "text_only": ("qwen2_untied", [], [[9]]),
    "vl_text_only": ("vl_b", [], [[12]]),
    "one_image": ("vl_a", [(1, 8, 12)], [[3, 4]]),
    "two_images": ("vl_c", [(1, 4, 6), (1, 6, 6)], [[2, 3, 2]]),
    "batch_different_lengths": ("vl_a", [(1, 4, 4), (1, 6, 8)], [[1, 9], [6, 2], [13]]),
}


def _batch(model_name, grids, lens, seed=0):
    rng = np.random.default_rng(seed)
    ids, mask = left_padded_prompts(grids, lens, rng)
    return inference_batch(ids, mask, grids, rng, multimodal=model_name.startswith("vl"))


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_transformers_generate(hf_checkpoint, case):
    model_name, grids, lens = CASES[case]
    path = hf_checkpoint(model_name)
    cfg, params = load_cached(path)
    batch = _batch(model_name, grids, lens)
    ours = generate_ids(cfg, params, batch, eos_ids=[319], pad_id=0,
                        settings=DecodeSettings(max_new_tokens=NEW, prompt_bucket=16, patch_bucket=64))
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if model_name.startswith("vl") else AutoModelForCausalLM
    hf = cls.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.tensor(batch["input_ids"])
    kw = dict(input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"]), max_new_tokens=NEW,
              do_sample=False, eos_token_id=319, pad_token_id=0)
    if model_name.startswith("vl"):
        kw["mm_token_type_ids"] = (ids == IMG).int()
    if grids:
        kw.update(pixel_values=torch.tensor(batch["pixel_values"]), image_grid_thw=torch.tensor(batch["image_grid_thw"]))
    with torch.no_grad():
        ref = hf.generate(**kw)[:, ids.shape[1]:].numpy()
    np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)


def test_cached_decode_equals_full_recompute_every_step(hf_checkpoint):
    path = hf_checkpoint("vl_a")
    cfg, params = load_cached(path)
    grids = [(1, 6, 8)]
    batch = _batch("vl_a", grids, [[4, 3], [9, 0]][:1])
    out = generate_ids(cfg, params, batch, eos_ids=[319], settings=DecodeSettings(max_new_tokens=6, prompt_bucket=8))
    model = CausalLM(cfg)
    meta = metadata_arrays(vision_metadata(grids, cfg.vision))
    ids = batch["input_ids"]
    for step in range(out.shape[1]):
        full = np.concatenate([ids, out[:, :step]], axis=1)
        pos, _ = get_rope_index(full, grids, IMG, 2)
        logits = model.apply({"params": params}, full, pos, np.ones_like(full), pixel_values=batch["pixel_values"],
                             vision_meta=meta)
        assert int(jnp.argmax(logits[0, -1])) == out[0, step], f"step {step}"


def test_stop_on_any_eos_per_row_and_pad_after(hf_checkpoint):
    path = hf_checkpoint("qwen2_untied")
    cfg, params = load_cached(path)
    batch = _batch("qwen2_untied", [], [[7], [11]])
    free = generate_ids(cfg, params, batch, eos_ids=[10**6], settings=DecodeSettings(max_new_tokens=8, prompt_bucket=8))
    eos = [int(free[0, 2]), int(free[1, 4])]  # make each row stop at a different step
    out = generate_ids(cfg, params, batch, eos_ids=eos, pad_id=-1,
                       settings=DecodeSettings(max_new_tokens=8, prompt_bucket=8))
    for row in range(2):
        first = next(i for i, t in enumerate(free[row]) if t in eos)
        np.testing.assert_array_equal(out[row, :first + 1], free[row, :first + 1])
        assert (out[row, first + 1:] == -1).all()


def test_streaming_gives_the_same_tokens(hf_checkpoint):
    path = hf_checkpoint("vl_a")
    cfg, params = load_cached(path)
    batch = _batch("vl_a", [(1, 4, 4)], [[3, 5]])
    settings = DecodeSettings(max_new_tokens=6, prompt_bucket=8)
    seen = []
    streamed = generate_ids(cfg, params, batch, eos_ids=[319], settings=settings,
                            stream=lambda toks, step: seen.append(int(toks[0])))
    plain = generate_ids(cfg, params, batch, eos_ids=[319], settings=settings)
    np.testing.assert_array_equal(streamed, plain)
    assert seen == list(plain[0, :len(seen)]) and len(seen) == 6


def test_fixed_key_is_reproducible_and_topk1_is_greedy(hf_checkpoint):
    path = hf_checkpoint("qwen2_tied_gqa3")
    cfg, params = load_cached(path)
    batch = _batch("qwen2", [], [[6], [10]])
    s = DecodeSettings(max_new_tokens=8, prompt_bucket=8)
    run = lambda sampler, seed: generate_ids(cfg, params, batch, [10**6], sampler=sampler, key=jax.random.PRNGKey(seed),
                                             settings=s)
    a, b = run(Temperature(1.5), 0), run(Temperature(1.5), 0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, run(Temperature(1.5), 1))
    np.testing.assert_array_equal(run(TopK(1, 2.0), 3), run(Greedy(), 0))


def test_top_p_distribution_on_known_logits():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(probs))[None]
    kept = TopP(0.7).filter(logits)
    assert np.isfinite(np.asarray(kept[0, :2])).all() and np.isneginf(np.asarray(kept[0, 2:])).all()
    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    draws = np.asarray(jax.vmap(lambda k: TopP(0.7)(logits, k))(keys)).ravel()
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.015)
    # p just above the first token's mass keeps exactly two; p below it keeps only the top token
    assert np.isfinite(np.asarray(TopP(0.51).filter(logits))).sum() == 2
    assert np.isfinite(np.asarray(TopP(0.4).filter(logits))).sum() == 1


def test_generate_api_streams_the_same_text(tmp_path):
    import viscodex_jax as vx
    from viscodex_jax.testing.images import demo_chart
    from viscodex_jax.testing.tiny import make_tiny_checkpoints

    model = vx.load(make_tiny_checkpoints(str(tmp_path / "t"), seed=2)["vlm"])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Write the code."}]}]
    pieces = []
    one = vx.generate(model, msgs, images=[demo_chart()], max_new_tokens=12, stream=pieces.append)
    batch = vx.generate(model, [msgs, [{"role": "user", "content": "hi"}]], images=[[demo_chart()], []],
                        max_new_tokens=12)
    assert len(one) == 1 and "".join(pieces) == one[0] and one[0]
    assert batch[0] == one[0]  # batching and padding do not change row 0
    # continuous batching through the same call: one slot, the two prompts one after the other
    from viscodex_jax.sampling.slots import SlotSettings

    slots = vx.generate(model, [msgs, [{"role": "user", "content": "hi"}]], images=[[demo_chart()], []],
                        max_new_tokens=12, settings=SlotSettings(slots=1, cache_len=2048, max_new_tokens=12))
    assert slots == batch
    # the per-layer inference layout: same texts, and no stacked layer params left behind
    assert model.for_inference() is model and "layers" not in model.params["model"]
    assert vx.generate(model, [msgs, [{"role": "user", "content": "hi"}]], images=[[demo_chart()], []],
                       max_new_tokens=12) == batch


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=1.0, top_k=-1), "top_k=-1"),
    (dict(temperature=1.0, top_p=0.0), "top_p=0.0"),
    (dict(temperature=1.0, top_p=1.5), "top_p=1.5"),
    (dict(temperature=float("nan")), "temperature=nan"),
])
def test_sampler_settings_refuse_nonsense(kwargs, match):
    from viscodex_jax.model.config import ConfigError
    from viscodex_jax.sampling.methods import from_settings

    with pytest.raises(ConfigError, match=match):
        from_settings(**kwargs)


def test_sampler_settings_pick_the_method():
    from viscodex_jax.sampling.methods import from_settings

    assert from_settings(0.0, 0.5, 3) == Greedy()
    assert from_settings(0.7, 0.9, 5) == TopK(5, 0.7)
    assert from_settings(0.7, 0.9, 0) == TopP(0.9, 0.7)
    assert from_settings(0.7) == Temperature(0.7)
