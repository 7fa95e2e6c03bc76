"""Model families (model.families): the registry is the one place config parsing, the causal LM, the HF
name map and the Processor look up what differs by model type, so a family added there is used by all."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from viscodex_jax.checkpoint import hf_map
from viscodex_jax.data.chat import ChatTemplate
from viscodex_jax.data.processor import Processor
from viscodex_jax.data.tokenizer import build_qwen2_tokenizer
from viscodex_jax.model.causal_lm import param_shapes
from viscodex_jax.model.config import ConfigError, ModelConfig, config_from_dict
from viscodex_jax.model.families import REGISTRY, get_family, qwen2, qwen2_5_vl
from viscodex_jax.testing.tiny import tiny_text_kwargs, tiny_vision_kwargs
from viscodex_jax.utils import flatten

TEXT = {"model_type": "qwen2", **tiny_text_kwargs(4160)}
VL = {**TEXT, "model_type": "qwen2_5_vl", "vision_config": tiny_vision_kwargs(64),
      "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}


def test_registry_names_both_families_and_configs_find_theirs():
    assert list(REGISTRY) == ["qwen2", "qwen2_5_vl"]
    for d, module in ((TEXT, qwen2), (VL, qwen2_5_vl)):
        cfg = config_from_dict(d, "c.json")
        assert cfg.family is module.FAMILY is get_family(d["model_type"])
    assert REGISTRY["qwen2"].tower is None and REGISTRY["qwen2_5_vl"].tower is not None
    with pytest.raises(ConfigError, match=r"c.json: unsupported architecture model_type='llama'.*qwen2, qwen2_5_vl"):
        config_from_dict({**TEXT, "model_type": "llama"}, "c.json")
    with pytest.raises(ConfigError, match="unsupported architecture model_type=\\['qwen2'\\]"):
        config_from_dict({**TEXT, "model_type": ["qwen2"]}, "c.json")
    with pytest.raises(KeyError, match="unknown model family 'llama'; known: qwen2, qwen2_5_vl"):
        get_family("llama")


def test_the_tower_comes_from_the_family():
    vl = config_from_dict(VL, "c.json")
    shapes = flatten(param_shapes(vl))
    assert any(k[0] == "visual" for k in shapes)
    assert not any(k[0] == "visual" for k in flatten(param_shapes(config_from_dict(TEXT, "c.json"))))
    # a vision config on a family without a tower is refused, not silently ignored
    odd = ModelConfig("qwen2", vl.text, vl.vision, image_token_id=vl.image_token_id)
    with pytest.raises(ValueError, match="model_type 'qwen2' has a vision config but its family has no tower"):
        param_shapes(odd)


def test_hf_names_come_from_the_families():
    vl = config_from_dict(VL, "c.json")
    # the VL family's aliases and stacked module lists
    assert hf_map.canonical_name("model.language_model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert hf_map.canonical_name("model.visual.blocks.1.attn.qkv.bias") == "visual.blocks.1.attn.qkv.bias"
    assert hf_map.path_to_hf(("visual", "blocks", "attn", "qkv", "bias"), 1) == "visual.blocks.1.attn.qkv.bias"
    assert hf_map.path_to_hf(("visual", "merger", "mlp_2", "kernel"), None) == "visual.merger.mlp.2.weight"
    # its Conv3d patch embedding ([out, C, T, p, p] in HF) is the family's kernel rule
    kernel = flatten(param_shapes(vl))[("visual", "patch_embed", "proj", "kernel")].shape
    assert hf_map.hf_shape(("visual", "patch_embed", "proj", "kernel"), kernel, vl) == (32, 3, 2, 14, 14)
    assert hf_map.hf_shape(("model", "layers", "mlp", "up_proj", "kernel"), (64, 128), vl) == (128, 64)


def test_a_registered_family_is_used_everywhere(monkeypatch):
    """What adding a family takes: a Family value (its own module in real life) and a registry entry."""
    template = ChatTemplate(default_system="You are a toy.")

    def parse(d, where, runtime):
        return dataclasses.replace(qwen2.parse_config(d, where, runtime), model_type="toy")

    def rope_index(input_ids, grids, mask, cfg):
        positions, _ = qwen2.rope_index(input_ids, grids, mask, cfg)
        return positions * 2, np.zeros(len(input_ids), np.int32)

    toy = dataclasses.replace(qwen2.FAMILY, model_type="toy", parse_config=parse, rope_index=rope_index,
                              chat_template=template)
    monkeypatch.setitem(REGISTRY, "toy", toy)
    cfg = config_from_dict({**TEXT, "model_type": "toy"}, "c.json")
    assert cfg.model_type == "toy" and cfg.family is toy
    tok = build_qwen2_tokenizer(num_ranks=4096)
    proc = Processor(tok, cfg)
    messages = [{"role": "user", "content": "hi"}]
    assert proc.render(messages) == template.render(messages, None, True).text
    assert "You are a toy." in proc.render(messages)
    batch = proc([messages])
    n = len(tok.encode(proc.render(messages), add_special_tokens=False))
    np.testing.assert_array_equal(batch["positions"], 2 * np.arange(n)[None])
    np.testing.assert_array_equal(batch["rope_deltas"], [0])
