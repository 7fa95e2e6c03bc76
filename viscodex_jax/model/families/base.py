"""The shape of a model family entry (see ``model.families``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from viscodex_jax.data.chat import ChatTemplate


@dataclasses.dataclass(frozen=True)
class Tower:
    """A vision tower and the host-computed, shape-static arrays it takes besides the patches."""

    module: type  # flax module, built as module(vision_cfg, dtype=..., impl=...)
    # (image grids [N, 3], VisionConfig, pad_to patches or None) -> {name: array}, the tower's ``meta``
    metadata: Callable[[Sequence[Sequence[int]], Any, int | None], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class HFNames:
    """How HF tensor names differ from our parameter paths, beyond the shared rules in ``checkpoint.hf_map``."""

    # (regex, replacement): accepted names (e.g. transformers' in-memory form) -> the on-disk form
    aliases: tuple[tuple[str, str], ...] = ()
    # module lists whose params we stack on axis 0 (``layers.3.`` in the HF name)
    stacked: tuple[str, ...] = ("layers",)
    # modules whose nn.Sequential children HF numbers (``merger.mlp.0`` <-> our ``merger/mlp_0``)
    sequential: tuple[str, ...] = ()
    # (path, flax kernel shape, ModelConfig) -> the HF shape when it is not the plain [out, in] matrix
    kernel_shape: Callable[[tuple[str, ...], tuple[int, ...], Any], tuple[int, ...] | None] | None = None


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    # (parsed config.json, file name for errors, runtime settings) -> ModelConfig
    parse_config: Callable[[Mapping[str, Any], str, dict[str, Any]], Any]
    # (input_ids [B, T], image grids, attention_mask [B, T] or None, ModelConfig)
    #   -> (positions: [B, T], or [3, B, T] for M-RoPE; per-row deltas [B] that continue them, or None)
    rope_index: Callable[[np.ndarray, Any, np.ndarray | None, Any], tuple[np.ndarray, np.ndarray | None]]
    chat_template: ChatTemplate
    hf_names: HFNames
    tower: Tower | None = None
