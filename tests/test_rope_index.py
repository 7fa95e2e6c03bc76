"""Our host-side M-RoPE index and vision window metadata against transformers' own code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from viscodex_jax.testing.models import IMG, make_hf_model
from viscodex_jax.testing.prompts import left_padded_prompts

from viscodex_jax.model.config import config_from_dict
from viscodex_jax.model.families.qwen2_5_vl import get_rope_index
from viscodex_jax.model.families.qwen2_5_vl import vision_metadata

CASES = {
    "text_only": ([], [[11], [7]]),
    "one_image": ([(1, 8, 12)], [[4, 3]]),
    "image_first": ([(1, 4, 4)], [[0, 5]]),
    "images_mid_text_different_sizes": ([(1, 4, 6), (1, 12, 4), (1, 6, 6)], [[3, 2, 4, 1]]),
    "batch_left_padded": ([(1, 6, 8), (1, 4, 4), (1, 2, 2)], [[2, 5], [9, 1, 3]]),
}


@pytest.fixture(scope="module")
def hf_vl():
    return make_hf_model("vl_a")


@pytest.mark.parametrize("case", list(CASES))
def test_get_rope_index_matches_transformers(hf_vl, case):
    grids, lens = CASES[case]
    rng = np.random.default_rng(1)
    ids, mask = left_padded_prompts(grids, lens, rng)
    ours, deltas = get_rope_index(ids, grids, IMG, 2, mask)
    tt = torch.tensor(ids)
    ref, ref_d = hf_vl.model.get_rope_index(
        tt, (tt == IMG).int(), torch.tensor(grids) if grids else None, attention_mask=torch.tensor(mask))
    np.testing.assert_array_equal(ours, ref.numpy())
    np.testing.assert_array_equal(deltas, ref_d.numpy().ravel())


def test_get_rope_index_errors():
    ids = np.array([[1, IMG, IMG, 2]])
    with pytest.raises(ValueError, match="needs 4 consecutive image tokens"):
        get_rope_index(ids, [(1, 4, 4)], IMG)
    with pytest.raises(ValueError, match="more <\\|image_pad\\|> runs than images"):
        get_rope_index(ids, [], IMG)
    with pytest.raises(ValueError, match="have no <\\|image_pad\\|> tokens"):
        get_rope_index(np.array([[1, 2]]), [(1, 2, 2)], IMG)


@pytest.mark.parametrize("window_size", [56, 84, 112])
def test_window_index_matches_transformers(window_size):
    from transformers.vision_utils import get_vision_window_index

    grids = [(1, 8, 12), (1, 10, 6), (1, 4, 4), (2, 6, 14)]
    cfg = config_from_dict({
        "model_type": "qwen2_5_vl", "vocab_size": 8, "hidden_size": 16, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        "vision_config": {"depth": 1, "hidden_size": 8, "intermediate_size": 8, "num_heads": 1, "out_hidden_size": 16,
                          "fullatt_block_indexes": [0], "window_size": window_size}})
    meta = vision_metadata(grids, cfg.vision)
    win_idx, cu = get_vision_window_index(torch.tensor(grids), 2, window_size, 14)
    win_idx = win_idx.numpy()
    np.testing.assert_array_equal(meta.window_perm.reshape(-1, 4)[:, 0] // 4, win_idx)
    np.testing.assert_array_equal(meta.merged_inverse, np.argsort(win_idx))
    # window segments: boundaries where the segment id changes == cu_window_seqlens
    seg = meta.window_segments
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(seg)) + 1, [len(seg)]])
    np.testing.assert_array_equal(bounds, cu.numpy())
    # full attention is per image frame (t frames of h*w patches each)
    sizes = np.bincount(meta.image_segments)
    np.testing.assert_array_equal(sizes, [h * w for t, h, w in grids for _ in range(t)])


def test_vision_metadata_padding_is_isolated():
    cfg = config_from_dict({
        "model_type": "qwen2_5_vl", "vocab_size": 8, "hidden_size": 16, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        "vision_config": {"depth": 1, "hidden_size": 8, "intermediate_size": 8, "num_heads": 1, "out_hidden_size": 16,
                          "fullatt_block_indexes": [0], "window_size": 56}})
    meta = vision_metadata([(1, 4, 4)], cfg.vision, pad_to=32)
    assert meta.num_valid_tokens == 4
    assert (meta.window_segments[16:] == -1).all() and (meta.image_segments[16:] == -1).all()
    with pytest.raises(ValueError, match="pad_to"):
        vision_metadata([(1, 4, 4)], cfg.vision, pad_to=8)
    # no images at all (a packed row of text records): only padding, in the identity order
    empty = vision_metadata([], cfg.vision, pad_to=8)
    assert empty.num_valid_tokens == 0
    np.testing.assert_array_equal(empty.window_perm, np.arange(8))
    np.testing.assert_array_equal(empty.merged_inverse, np.arange(2))
    assert (empty.window_segments == -1).all() and (empty.image_segments == -1).all()
    np.testing.assert_array_equal(empty.rotary_pos, np.zeros((8, 2)))
