"""Model configs read from a checkpoint's own ``config.json``.

Two on-disk forms exist for Qwen2.5-VL: transformers 5.x nests the language
model under ``text_config`` (with ``rope_parameters``); 4.x checkpoints (every
Qwen release on the hub) keep it flat at the top level with ``rope_theta`` and
``rope_scaling``. Both are read into the same frozen dataclasses so nothing
downstream cares which one it was.

What varies by model type (which sections a config has, what they must hold)
is the family's ``parse_config`` (``model.families``); the field readers here
are shared by all families.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

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
    attention_impl: str = "xla"  # one of model.attention.IMPLS ("xla" is the numerical reference)
    remat_policy: str = "none"  # "none" or a policy of model.text (e.g. "full", "proj", "dots")

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    @property
    def family(self):
        """The ``model.families.Family`` of this model type (its tower, rope index, chat template, HF names)."""
        # Imported here: the family modules import this one for the config classes.
        from viscodex_jax.model.families import get_family

        return get_family(self.model_type)


def _object(d: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__} {str(d)[:60]}")
    return d


def _lookup(d: Mapping[str, Any], where: str, keys: tuple[str, ...], default: Any) -> tuple[str, Any]:
    """(the key that was found, its value); a missing key without a default is an error."""
    for k in keys:
        if k in d and d[k] is not None:
            return k, d[k]
    if default is dataclasses.MISSING:
        raise ConfigError(f"{where}: missing required key {keys[0]!r}")
    return keys[0], default


def read_int(d: Mapping[str, Any], where: str, *keys: str, default: Any = dataclasses.MISSING, lo: int = 1) -> int:
    k, v = _lookup(d, where, keys, default)
    if isinstance(v, float) and v.is_integer():  # 64.0 from a JSON writer that only knows floats
        v = int(v)
    # bool is an int subclass, and int("3") or int(2.5) would quietly accept a wrong type.
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{where}: {k} must be an integer, got {v!r}")
    if v < lo:
        raise ConfigError(f"{where}: {k} must be >= {lo}, got {v}")
    return v


def _positive_float(d: Mapping[str, Any], where: str, *keys: str, default: Any = dataclasses.MISSING) -> float:
    k, v = _lookup(d, where, keys, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{where}: {k} must be a positive finite number, got {v!r}")
    return float(v)


def _bool(v: Any, where: str, key: str) -> bool:
    if not isinstance(v, bool):  # bool("false") is True: refuse strings and numbers
        raise ConfigError(f"{where}: {key} must be true or false, got {v!r}")
    return v


def _int_list(v: Any, where: str, key: str, lo: int = 0, hi: int | None = None) -> tuple[int, ...]:
    ok = isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    if not ok or any(x < lo or (hi is not None and x >= hi) for x in v):
        bound = f"in [{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ConfigError(f"{where}: {key} must be a list of integers {bound}, got {v!r}")
    return tuple(v)


def _rope(d: Mapping[str, Any], where: str) -> tuple[float, tuple[int, ...] | None]:
    key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    rp = _object(d.get(key) or {}, f"{where}: {key}")
    theta = _positive_float({**d, **rp}, where, "rope_theta", default=1e6)
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ConfigError(f"{where}: rope type {rope_type!r} is not supported (only default/mrope)")
    section = rp.get("mrope_section")
    return theta, (_int_list(section, where, f"{key}.mrope_section") if section else None)


def parse_text_config(d: Mapping[str, Any], top: Mapping[str, Any], where: str, top_where: str) -> TextConfig:
    if d.get("use_sliding_window"):
        raise ConfigError(f"{where}: use_sliding_window=true is not supported")
    theta, section = _rope(d, where)
    heads = read_int(d, where, "num_attention_heads")
    kv_heads = read_int(d, where, "num_key_value_heads", default=heads)
    hidden = read_int(d, where, "hidden_size")
    if heads % kv_heads:
        raise ConfigError(f"{where}: num_key_value_heads={kv_heads} must divide num_attention_heads={heads}")
    if hidden % heads or (hidden // heads) % 2:
        raise ConfigError(
            f"{where}: hidden_size={hidden} / num_attention_heads={heads} must be an even integer (the head dim, "
            "which RoPE rotates in pairs)"
        )
    if "head_dim" in d and d["head_dim"] not in (None, hidden // heads):
        raise ConfigError(f"{where}: head_dim={d['head_dim']} != hidden_size/num_attention_heads")
    if section is not None and 2 * sum(section) != hidden // heads:
        raise ConfigError(
            f"{where}: mrope_section {list(section)} must sum to head_dim/2 = {hidden // heads // 2}"
        )
    tie = any(_bool(src["tie_word_embeddings"], w, "tie_word_embeddings")
              for src, w in ((top, top_where), (d, where)) if src.get("tie_word_embeddings") is not None)
    return TextConfig(
        vocab_size=read_int(d, where, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=read_int(d, where, "intermediate_size"),
        num_layers=read_int(d, where, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        rms_norm_eps=_positive_float(d, where, "rms_norm_eps", default=1e-6),
        rope_theta=theta,
        mrope_section=section,
        tie_word_embeddings=tie,
        max_position_embeddings=read_int(d, where, "max_position_embeddings", default=32768),
    )


def parse_vision_config(d: Mapping[str, Any], where: str) -> VisionConfig:
    d = _object(d, where)
    theta = _positive_float(_object(d.get("rope_parameters") or {}, f"{where}: rope_parameters"), where, "rope_theta",
                            default=10000.0)
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: vision hidden_act {act!r} is not supported (Qwen2.5-VL uses silu)")
    depth = read_int(d, where, "depth", "num_hidden_layers")
    hidden = read_int(d, where, "hidden_size", "embed_dim")
    heads = read_int(d, where, "num_heads", "num_attention_heads")
    if hidden % heads:
        raise ConfigError(f"{where}: num_heads={heads} must divide hidden_size={hidden}")
    k, full = _lookup(d, where, ("fullatt_block_indexes",), dataclasses.MISSING)
    return VisionConfig(
        depth=depth,
        hidden_size=hidden,
        intermediate_size=read_int(d, where, "intermediate_size"),
        num_heads=heads,
        out_hidden_size=read_int(d, where, "out_hidden_size"),
        fullatt_block_indexes=_int_list(full, where, k, lo=0, hi=depth),
        window_size=read_int(d, where, "window_size", default=112),
        patch_size=read_int(d, where, "patch_size", "spatial_patch_size", default=14),
        temporal_patch_size=read_int(d, where, "temporal_patch_size", default=2),
        spatial_merge_size=read_int(d, where, "spatial_merge_size", default=2),
        in_channels=read_int(d, where, "in_channels", "in_chans", default=3),
        tokens_per_second=read_int(d, where, "tokens_per_second", default=2),
        rope_theta=theta,
    )


def text_section(d: Mapping[str, Any], where: str) -> tuple[Mapping[str, Any], str]:
    """The language model's keys and their place for errors: transformers 5.x nests them under
    ``text_config``; 4.x (flat) keeps them at the top level."""
    if d.get("text_config") not in (None, {}):
        return _object(d["text_config"], f"{where}: text_config"), f"{where}:text_config"
    return d, where


def config_from_dict(d: Mapping[str, Any], where: str = "config.json", **runtime) -> ModelConfig:
    """Builds a ModelConfig from a parsed HF config.json (nested or flat form).

    Every field is type- and range-checked: a bad value is a ConfigError that
    names the file and the field, never a TypeError from deep in the model.
    """
    from viscodex_jax.model.families import REGISTRY  # the families import this module

    d = _object(d, where)
    model_type = d.get("model_type")
    family = REGISTRY.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        arch = d.get("architectures")
        raise ConfigError(
            f"{where}: unsupported architecture model_type={model_type!r} architectures={arch}; "
            f"supported model types: {', '.join(REGISTRY)}"
        )
    text_d, _ = text_section(d, where)
    if d.get("hidden_act", text_d.get("hidden_act", "silu")) != "silu":
        raise ConfigError(f"{where}: only hidden_act='silu' is supported")
    return family.parse_config(d, where, runtime)


def read_config_json(ckpt_dir: str) -> dict[str, Any]:
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no config.json in checkpoint directory {ckpt_dir}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    return dict(_object(raw, path))


def load_config(ckpt_dir: str, **runtime) -> ModelConfig:
    """Reads ``<ckpt_dir>/config.json`` into a ModelConfig."""
    return config_from_dict(read_config_json(ckpt_dir), os.path.join(ckpt_dir, "config.json"), **runtime)
