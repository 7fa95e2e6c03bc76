"""Model configs read from a checkpoint's own ``config.json``.

Two on-disk forms exist for Qwen2.5-VL: transformers 5.x nests the language
model under ``text_config`` (with ``rope_parameters``); 4.x checkpoints (every
Qwen release on the hub) keep it flat at the top level with ``rope_theta`` and
``rope_scaling``. Both are read into the same frozen dataclasses so nothing
downstream cares which one it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen2_5_vl")


class ConfigError(ValueError):
    """A config.json that we cannot turn into a model config."""


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    # None: plain 1-D RoPE (Qwen2). A tuple: M-RoPE sections over head_dim // 2.
    mrope_section: tuple[int, ...] | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    window_size: int = 112
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    tokens_per_second: int = 2
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture (from config.json) plus how to run it (ours, not HF's)."""

    model_type: str
    text: TextConfig
    vision: VisionConfig | None = None
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    # Runtime settings: never written to config.json.
    dtype: str = "float32"  # compute dtype
    attention_impl: str = "xla"  # "xla" (reference) | "cudnn"
    remat_policy: str = "none"  # "none" | "full" | "dots" | "dots_no_batch"

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None


def _get(d: Mapping[str, Any], key: str, where: str, *alts: str, default: Any = dataclasses.MISSING):
    for k in (key,) + alts:
        if k in d and d[k] is not None:
            return d[k]
    if default is not dataclasses.MISSING:
        return default
    raise ConfigError(f"{where}: missing required key {key!r}")


def _rope(d: Mapping[str, Any]) -> tuple[float, tuple[int, ...] | None]:
    rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = rp.get("rope_theta", d.get("rope_theta", 1e6))
    section = rp.get("mrope_section")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ConfigError(f"rope type {rope_type!r} is not supported (only default/mrope)")
    return float(theta), (tuple(int(s) for s in section) if section else None)


def _text_config(d: Mapping[str, Any], top: Mapping[str, Any], where: str) -> TextConfig:
    if d.get("use_sliding_window"):
        raise ConfigError(f"{where}: use_sliding_window=true is not supported")
    theta, section = _rope(d)
    heads = int(_get(d, "num_attention_heads", where))
    hidden = int(_get(d, "hidden_size", where))
    if "head_dim" in d and d["head_dim"] not in (None, hidden // heads):
        raise ConfigError(f"{where}: head_dim={d['head_dim']} != hidden_size/num_attention_heads")
    if section is not None and 2 * sum(section) != hidden // heads:
        raise ConfigError(
            f"{where}: mrope_section {list(section)} must sum to head_dim/2 = {hidden // heads // 2}"
        )
    tie = top.get("tie_word_embeddings", d.get("tie_word_embeddings", False))
    return TextConfig(
        vocab_size=int(_get(d, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(_get(d, "intermediate_size", where)),
        num_layers=int(_get(d, "num_hidden_layers", where)),
        num_heads=heads,
        num_kv_heads=int(_get(d, "num_key_value_heads", where, default=heads)),
        rms_norm_eps=float(_get(d, "rms_norm_eps", where, default=1e-6)),
        rope_theta=theta,
        mrope_section=section,
        tie_word_embeddings=bool(tie or d.get("tie_word_embeddings", False)),
        max_position_embeddings=int(_get(d, "max_position_embeddings", where, default=32768)),
    )


def _vision_config(d: Mapping[str, Any], where: str) -> VisionConfig:
    theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: vision hidden_act {act!r} is not supported (Qwen2.5-VL uses silu)")
    return VisionConfig(
        depth=int(_get(d, "depth", where, "num_hidden_layers")),
        hidden_size=int(_get(d, "hidden_size", where, "embed_dim")),
        intermediate_size=int(_get(d, "intermediate_size", where)),
        num_heads=int(_get(d, "num_heads", where, "num_attention_heads")),
        out_hidden_size=int(_get(d, "out_hidden_size", where)),
        fullatt_block_indexes=tuple(int(i) for i in _get(d, "fullatt_block_indexes", where)),
        window_size=int(_get(d, "window_size", where, default=112)),
        patch_size=int(_get(d, "patch_size", where, "spatial_patch_size", default=14)),
        temporal_patch_size=int(_get(d, "temporal_patch_size", where, default=2)),
        spatial_merge_size=int(_get(d, "spatial_merge_size", where, default=2)),
        in_channels=int(_get(d, "in_channels", where, "in_chans", default=3)),
        tokens_per_second=int(_get(d, "tokens_per_second", where, default=2)),
        rope_theta=float(theta),
    )


def config_from_dict(d: Mapping[str, Any], where: str = "config.json", **runtime) -> ModelConfig:
    """Builds a ModelConfig from a parsed HF config.json (nested or flat form)."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = d.get("architectures")
        raise ConfigError(
            f"{where}: unsupported architecture model_type={model_type!r} architectures={arch}; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if d.get("hidden_act", (d.get("text_config") or {}).get("hidden_act", "silu")) != "silu":
        raise ConfigError(f"{where}: only hidden_act='silu' is supported")
    if model_type == "qwen2":
        return ModelConfig(model_type=model_type, text=_text_config(d, d, where), **runtime)
    text_d = d.get("text_config") or d  # flat (transformers 4.x) form keeps text keys at top level
    if "vision_config" not in d:
        raise ConfigError(f"{where}: model_type qwen2_5_vl needs a vision_config")
    text = _text_config(text_d, d, where)
    if text.mrope_section is None:
        raise ConfigError(f"{where}: qwen2_5_vl needs rope mrope_section")
    vision = _vision_config(d["vision_config"], where + ":vision_config")
    if vision.out_hidden_size != text.hidden_size:
        raise ConfigError(
            f"{where}: vision out_hidden_size {vision.out_hidden_size} != text hidden_size {text.hidden_size}"
        )
    return ModelConfig(
        model_type=model_type,
        text=text,
        vision=vision,
        image_token_id=int(_get(d, "image_token_id", where, default=151655)),
        video_token_id=int(_get(d, "video_token_id", where, default=151656)),
        vision_start_token_id=int(_get(d, "vision_start_token_id", where, default=151652)),
        vision_end_token_id=int(_get(d, "vision_end_token_id", where, default=151653)),
        **runtime,
    )


def read_config_json(ckpt_dir: str) -> dict[str, Any]:
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no config.json in checkpoint directory {ckpt_dir}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e


def load_config(ckpt_dir: str, **runtime) -> ModelConfig:
    """Reads ``<ckpt_dir>/config.json`` into a ModelConfig."""
    return config_from_dict(read_config_json(ckpt_dir), os.path.join(ckpt_dir, "config.json"), **runtime)
