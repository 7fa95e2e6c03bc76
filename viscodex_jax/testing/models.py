"""The tests' tiny HF model zoo: several shapes of Qwen2 and Qwen2.5-VL with fixed special token ids.

Unlike ``tiny.py`` (real tokenizer, one shape, used by the demo), these use a 320-token vocab with the
image/video/vision-start/end ids at 300..303, so prompts can be written as plain id lists.
"""

from __future__ import annotations

import functools
from typing import Any

from viscodex_jax.testing.tiny import hf_text_model, hf_vl_model

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
    """A seeded transformers model of the zoo shape ``name`` (a key of VL_CONFIGS or TEXT_CONFIGS)."""
    if name in VL_CONFIGS:
        text, vision = VL_CONFIGS[name]
        return hf_vl_model(text, vision, seed, **TOKENS)
    if name not in TEXT_CONFIGS:
        raise KeyError(f"no tiny test model {name!r}: choose from {', '.join([*VL_CONFIGS, *TEXT_CONFIGS])}")
    return hf_text_model(TEXT_CONFIGS[name], seed)


@functools.lru_cache(maxsize=None)
def load_cached(path: str, dtype: str | None = None) -> tuple[Any, Any]:
    """(ModelConfig, params) of a HF checkpoint, read once per (path, dtype) for the whole test session.

    ``dtype`` None keeps the stored dtypes and the default compute dtype; a name sets both.
    """
    from viscodex_jax.checkpoint import load_hf_params

    if dtype is None:
        return load_hf_params(path)
    import jax.numpy as jnp

    from viscodex_jax.model.config import load_config

    cfg = load_config(path, dtype=dtype)
    _, params = load_hf_params(path, cfg, dtype=jnp.dtype(dtype))
    return cfg, params
