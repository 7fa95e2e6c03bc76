"""The embedded default: seeded tiny checkpoints and the main job."""

from __future__ import annotations

import filecmp
import json
import os

from viscodex_jax.model.config import load_config
from viscodex_jax.tiny import make_tiny_checkpoints


def test_tiny_checkpoints_are_deterministic_and_share_the_text_architecture(tmp_path):
    a = make_tiny_checkpoints(str(tmp_path / "a"), seed=3)
    b = make_tiny_checkpoints(str(tmp_path / "b"), seed=3)
    for k in a:
        assert filecmp.cmp(os.path.join(a[k], "model.safetensors"), os.path.join(b[k], "model.safetensors"), shallow=False)
    c = make_tiny_checkpoints(str(tmp_path / "c"), seed=4)
    assert not filecmp.cmp(os.path.join(a["vlm"], "model.safetensors"), os.path.join(c["vlm"], "model.safetensors"),
                           shallow=False)
    cfgs = {k: load_config(p) for k, p in a.items()}
    assert cfgs["vlm"].model_type == "qwen2_5_vl" and cfgs["base"].model_type == cfgs["coder"].model_type == "qwen2"
    strip = lambda t: (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_kv_heads)
    assert strip(cfgs["vlm"].text) == strip(cfgs["base"].text) == strip(cfgs["coder"].text)
    tok_cfg = json.load(open(os.path.join(a["vlm"], "tokenizer_config.json")))
    assert "<|image_pad|>" in json.dumps(tok_cfg)
    assert cfgs["vlm"].image_token_id == 4096 + 12  # small vocab: specials right after the 4096 ranks


def test_demo_main_job(tmp_path):
    from viscodex_jax.demo import format_summary, run_demo

    s = run_demo(str(tmp_path / "demo"))
    assert s["max_abs_logit_diff"] <= 1e-4
    assert s["roundtrip_bit_identical"]
    assert s["image_tokens"] > 0
    assert "max |logit diff|" in format_summary(s)
    assert os.path.isfile(tmp_path / "demo" / "summary.json")
