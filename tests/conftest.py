"""Shared fixtures: tiny random HF checkpoints in several shapes, written once per session."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from viscodex_jax.testing.tiny import hf_text_model, hf_vl_model  # noqa: E402

VOCAB = 320
TOKENS = dict(image_token_id=300, video_token_id=301, vision_start_token_id=302, vision_end_token_id=303)
IMG, VSTART, VEND = 300, 302, 303

# Deliberately varied: head dims, GQA ratios, window sizes, full-attention blocks, tying.
# initializer_range is large so every sub-module moves the logits well above the tolerance.
VL_CONFIGS = {
    "vl_a": (
        dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=False, initializer_range=0.15),
        dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
             fullatt_block_indexes=[1], window_size=56),
    ),
    "vl_b": (
        dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=2,
             num_key_value_heads=1, tie_word_embeddings=True, initializer_range=0.15),
        dict(depth=2, hidden_size=48, intermediate_size=40, num_heads=3, out_hidden_size=64,
             fullatt_block_indexes=[0], window_size=112),
    ),
    "vl_c": (
        dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, tie_word_embeddings=False, initializer_range=0.15),
        dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=96,
             fullatt_block_indexes=[2, 3], window_size=84),
    ),
}
TEXT_CONFIGS = {
    "qwen2_tied_gqa3": dict(vocab_size=VOCAB, hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                            num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
                            initializer_range=0.15),
    "qwen2_untied": dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                         initializer_range=0.15),
}


def make_hf_model(name: str, seed: int = 0):
    if name in VL_CONFIGS:
        text, vision = VL_CONFIGS[name]
        return hf_vl_model(text, vision, seed, **TOKENS)
    return hf_text_model(TEXT_CONFIGS[name], seed)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """name -> directory with a saved tiny HF checkpoint (made on first use)."""
    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            d = str(tmp_path_factory.mktemp(name))
            make_hf_model(name).save_pretrained(d)
            made[name] = d
        return made[name]

    return get


def vl_prompt(n_images_grids: list[tuple[int, int, int]], text_lens: list[int], rng: np.random.Generator) -> list[int]:
    """Token ids: text, then for each image <vs><img>*n<ve> followed by text (images mid-text)."""
    ids = list(rng.integers(0, 290, text_lens[0]))
    for g, tl in zip(n_images_grids, text_lens[1:]):
        ids += [VSTART] + [IMG] * (g[0] * g[1] * g[2] // 4) + [VEND]
        ids += list(rng.integers(0, 290, tl))
    return ids


def left_padded_prompts(grids: list[tuple[int, int, int]], lens: list[list[int]], rng: np.random.Generator):
    """Rows of vl_prompt (images consumed from ``grids`` in order), left-padded: (ids, mask) int64 [B, T]."""
    rows, k = [], 0
    for row_lens in lens:
        n = len(row_lens) - 1
        rows.append(vl_prompt(grids[k:k + n], row_lens, rng))
        k += n
    t = max(map(len, rows))
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    return ids, mask
