"""Qwen2 / Qwen2.5 (text only): the decoder of ``model.text`` with 1-D RoPE and no tower."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from viscodex_jax.data.chat import QWEN_CHATML
from viscodex_jax.model.config import ModelConfig, parse_text_config
from viscodex_jax.model.families.base import Family, HFNames


def parse_config(d: Mapping[str, Any], where: str, runtime: dict[str, Any]) -> ModelConfig:
    return ModelConfig(model_type="qwen2", text=parse_text_config(d, d, where, where), **runtime)


def text_positions(attention_mask: np.ndarray) -> np.ndarray:
    """1-D positions [B, T] that skip padding (left or right), 0 on padding."""
    m = np.asarray(attention_mask).astype(np.int64)
    return (np.maximum(np.cumsum(m, axis=-1) - 1, 0) * m).astype(np.int32)


def rope_index(input_ids, grids, attention_mask, cfg: ModelConfig) -> tuple[np.ndarray, None]:
    mask = np.ones(np.shape(input_ids), np.int32) if attention_mask is None else attention_mask
    return text_positions(mask), None


FAMILY = Family(
    model_type="qwen2",
    parse_config=parse_config,
    rope_index=rope_index,
    chat_template=QWEN_CHATML,
    hf_names=HFNames(),
)
