"""Model shapes without weights: the published Qwen2.5-VL-7B / -32B config.json, or any config.json.

VisCodex-8B and -33B are merges of Qwen2.5-VL-7B/-32B with coders of the same
text shape, so these two dicts are their architectures. They are the
transformers 4.x (flat) form the Qwen releases ship, trimmed to the keys our
reader uses plus the identifying ones. The 7B values match the released
checkpoint's module shapes (vision 32 x 1280 / 3420 / 16 heads, merger
5120 -> 3584; LLM 3584 / 18944, 28 heads, 4 KV heads of 128, vocab 152064).
The 32B's are quoted from its published config.json (LLM of Qwen2.5-32B:
5120 / 27648, 64 layers, 40 heads, 8 KV heads, vocab 152064) with the same
vision tower projecting to 5120.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from viscodex_jax.model.config import ConfigError, ModelConfig, config_from_dict

_VISION = {
    "depth": 32,
    "hidden_act": "silu",
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_chans": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "spatial_patch_size": 14,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "temporal_patch_size": 2,
}
_COMMON = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "hidden_act": "silu",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "vocab_size": 152064,
}

BUILTIN: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-7b": {
        **_COMMON,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vision_config": {**_VISION, "out_hidden_size": 3584},
    },
    "qwen2.5-vl-32b": {
        **_COMMON,
        "hidden_size": 5120,
        "intermediate_size": 27648,
        "num_hidden_layers": 64,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "vision_config": {**_VISION, "out_hidden_size": 5120},
    },
}
# The VisCodex names point at the base they were merged from.
ALIASES = {"viscodex-8b": "qwen2.5-vl-7b", "viscodex-33b": "qwen2.5-vl-32b"}


def builtin_names() -> list[str]:
    return sorted(BUILTIN) + sorted(ALIASES)


def config_json(spec: str) -> tuple[dict[str, Any], str]:
    """A built-in name, a config.json path or a checkpoint directory -> (parsed dict, where it came from)."""
    key = ALIASES.get(spec.lower(), spec.lower())
    if key in BUILTIN:
        return copy.deepcopy(BUILTIN[key]), f"builtin:{key}"
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ConfigError(f"--model_config={spec!r}: not a built-in shape ({', '.join(builtin_names())}), "
                          "a config.json file or a directory holding one")
    try:
        with open(path) as f:
            return json.load(f), path
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e


def model_config(spec: str, **runtime) -> ModelConfig:
    """The ModelConfig for ``spec`` (see config_json) with run-time settings (dtype, attention_impl, ...)."""
    d, where = config_json(spec)
    return config_from_dict(d, where, **runtime)
