"""Continuous batching (sampling/slots.py): every request equals transformers' generate on it alone, whatever
its neighbours and slot; new prompts within the buckets reuse the compiled programs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from viscodex_jax.testing.models import IMG
from viscodex_jax.testing.prompts import left_padded_prompts

from viscodex_jax.checkpoint import load_hf_params
from viscodex_jax.model.config import ConfigError
from viscodex_jax.model.families.qwen2_5_vl import get_rope_index
from viscodex_jax.sampling import slots
from viscodex_jax.sampling.slots import SlotSampler, SlotSettings, requests_from_batch

# (image grids, text lengths around the images, max_new_tokens): 1 to 120 prompt tokens, 0 to 2 images
PROMPTS = [
    ([], [3], 12),
    ([(1, 8, 12)], [30, 10], 5),
    ([], [50], 9),
    ([(1, 4, 6), (1, 6, 6)], [2, 3, 2], 14),
    ([], [120], 3),
    ([(1, 4, 4)], [1, 5], 11),
    ([], [1], 7),
]
# more prompts inside the same buckets (64/128 tokens; 128 patches) and limits
MORE = [([], [60], 6), ([(1, 6, 8)], [20, 0], 10), ([], [100], 4), ([(1, 4, 4)], [9, 9], 8)]
SETTINGS = SlotSettings(slots=3, cache_len=176, max_new_tokens=16, prompt_bucket=64, patch_bucket=128,
                        steps_per_call=64)


def _one(grids, lens, seed):
    ids, mask = left_padded_prompts(grids, [lens], np.random.default_rng(seed))
    batch = {"input_ids": ids, "attention_mask": mask}
    batch["positions"], _ = get_rope_index(ids, grids, IMG, 2, mask)
    if grids:
        n = sum(a * b * c for a, b, c in grids)
        batch["pixel_values"] = np.random.default_rng(seed + 100).standard_normal((n, 1176)).astype(np.float32)
        batch["image_grid_thw"] = np.asarray(grids)
    return batch


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    from transformers import AutoModelForImageTextToText

    path = hf_checkpoint("vl_a")
    cfg, params = load_hf_params(path)
    return cfg, params, AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()


def _hf(hf, batch, new, eos):
    ids = torch.tensor(batch["input_ids"])
    kw = dict(input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"]), max_new_tokens=new,
              do_sample=False, eos_token_id=eos, pad_token_id=0, mm_token_type_ids=(ids == IMG).int())
    if "pixel_values" in batch:
        kw.update(pixel_values=torch.tensor(batch["pixel_values"]), image_grid_thw=torch.tensor(batch["image_grid_thw"]))
    with torch.no_grad():
        out = hf.generate(**kw)[0, ids.shape[1]:].numpy()
    return out[:np.flatnonzero(out == eos)[0] + 1] if (out == eos).any() else out


def _requests(cfg, specs, seed0):
    batches = [_one(g, lens, seed0 + i) for i, (g, lens, _) in enumerate(specs)]
    reqs = [requests_from_batch(cfg, b, new)[0] for b, (_, _, new) in zip(batches, specs)]
    return batches, reqs


def test_three_slots_seven_prompts_equal_transformers_generate(model):
    cfg, params, hf = model
    batches, reqs = _requests(cfg, PROMPTS, 0)
    free = [_hf(hf, b, new, 1000) for b, (_, _, new) in zip(batches, PROMPTS)]
    # an EOS the 4th prompt meets mid-way, so one row also ends early on EOS and is refilled
    eos = int(free[3][5])
    ref = [_hf(hf, b, new, eos) for b, (_, _, new) in zip(batches, PROMPTS)]
    assert len(ref[3]) <= 6 < PROMPTS[3][2]
    engine = SlotSampler(cfg, params, [eos], settings=SETTINGS)
    got = engine.run(reqs)
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        np.testing.assert_array_equal(g, r, err_msg=f"prompt {i}")
    # 7 prompts through 3 slots: refills happened, and the cache pointer was rolled back at least once
    assert engine.stats["inserts"] == 7 and engine.stats["rebases"] >= 1

    # New prompts within the buckets: same answers as transformers and no new compiled program.
    sizes = {f: getattr(slots, f)._cache_size() for f in ("_decode", "_insert", "_rebase")}
    batches, reqs = _requests(cfg, MORE, 50)
    got = engine.run(reqs)
    for i, (b, g, (_, _, new)) in enumerate(zip(batches, got, MORE)):
        np.testing.assert_array_equal(g, _hf(hf, b, new, eos), err_msg=f"second run, prompt {i}")
    assert {f: getattr(slots, f)._cache_size() for f in sizes} == sizes


def test_requests_from_batch_cuts_rows_and_images(model):
    cfg = model[0]
    grids = [(1, 4, 4), (1, 6, 8), (1, 4, 6)]
    ids, mask = left_padded_prompts(grids, [[1, 9], [3], [6, 2, 1]], np.random.default_rng(0))
    pos, _ = get_rope_index(ids, grids, IMG, 2, mask)
    pix = np.arange(sum(a * b * c for a, b, c in grids))[:, None] * np.ones((1, 4))
    reqs = requests_from_batch(cfg, {"input_ids": ids, "attention_mask": mask, "positions": pos,
                                     "pixel_values": pix, "image_grid_thw": np.asarray(grids)}, 5)
    assert [len(r.input_ids) for r in reqs] == [int(m.sum()) for m in mask]
    assert reqs[1].pixel_values is None and reqs[1].positions.shape == (3, 3)
    np.testing.assert_array_equal(reqs[0].pixel_values[:, 0], np.arange(16))
    np.testing.assert_array_equal(reqs[2].pixel_values[:, 0], np.arange(16, 16 + 48 + 24))
    assert reqs[2].image_grid_thw.tolist() == [[1, 6, 8], [1, 4, 6]] and reqs[0].max_new_tokens == 5
    np.testing.assert_array_equal(reqs[2].positions, pos[:, 2][:, mask[2].astype(bool)])


@pytest.mark.parametrize("kwargs, match", [
    (dict(cache_len=100, prompt_bucket=64, max_new_tokens=64), "cache_len=100"),
    (dict(slots=0), "slots=0"),
    (dict(cache_dtype="int8"), "cache_dtype='int8'"),
])
def test_slot_settings_refuse_what_cannot_run(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SlotSettings(**kwargs)


def test_a_request_past_the_limits_is_refused_before_anything_runs(model):
    cfg, params, _ = model
    engine = SlotSampler(cfg, params, [319], settings=SlotSettings(slots=1, cache_len=80, max_new_tokens=16,
                                                                   prompt_bucket=64))
    _, reqs = _requests(cfg, [([], [70], 4), ([], [5], 17)], 0)
    with pytest.raises(ConfigError, match="request 0: prompt bucket 128"):
        engine.run(reqs[:1])
    ok = slots.Request(reqs[1].input_ids, reqs[1].positions)  # the settings' default limit
    with pytest.raises(ConfigError, match=r"request 1: max_new_tokens=17 must be in 1\.\.16"):
        engine.run([ok, reqs[1]])
    assert engine.stats["inserts"] == 0  # checked before the first prompt ran


def test_sampled_tokens_do_not_depend_on_slots_or_neighbours(model):
    import jax

    from viscodex_jax.sampling.methods import Temperature

    cfg, params, _ = model
    _, reqs = _requests(cfg, [([], [5], 9), ([], [40], 3), ([], [60], 12), ([], [12], 6)], 7)

    def run(n_slots, seed):
        settings = SlotSettings(slots=n_slots, cache_len=96, max_new_tokens=12, prompt_bucket=64)
        return SlotSampler(cfg, params, [1000], sampler=Temperature(1.0), settings=settings,
                           key=jax.random.PRNGKey(seed)).run(reqs)

    one, three = run(1, 0), run(3, 0)
    for i, (a, b) in enumerate(zip(one, three)):
        np.testing.assert_array_equal(a, b, err_msg=f"request {i}")
    assert [len(a) for a in one] == [9, 3, 12, 6]
    other = run(3, 1)
    assert any(not np.array_equal(a, b) for a, b in zip(three, other))  # the key matters
