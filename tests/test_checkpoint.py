"""Converters: HF -> ours -> HF bit-identical round trips, accepted input forms, and bad input."""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch

from viscodex_jax import checkpoint
from viscodex_jax.checkpoint import CheckpointError
from viscodex_jax.model.config import ConfigError
from viscodex_jax.testing.asserts import assert_bit_identical, atomic_leftovers
from viscodex_jax.testing.checkpoints import hf_tensors, rewrite_tensors
from viscodex_jax.testing.models import make_hf_model
from viscodex_jax.utils import flatten


@pytest.mark.parametrize("model_name,dtype", [("vl_a", "float32"), ("vl_b", "bfloat16"), ("qwen2_tied_gqa3", "float32")])
def test_round_trip_hf_ours_hf_is_bit_identical(hf_checkpoint, tmp_path, model_name, dtype):
    src = hf_checkpoint(model_name)
    if dtype == "bfloat16":  # a bf16 checkpoint, as released models are
        src = str(tmp_path / "src_bf16")
        make_hf_model(model_name).to(torch.bfloat16).save_pretrained(src)
    orbax_dir, out = str(tmp_path / "orbax"), str(tmp_path / "hf_out")
    checkpoint.convert_hf_to_orbax(src, orbax_dir)
    shards = checkpoint.convert_orbax_to_hf(orbax_dir, out, max_shard_bytes=200_000)
    assert len(shards) > 1 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    assert_bit_identical(hf_tensors(src, canonical=True), hf_tensors(out, canonical=True))

    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if model_name.startswith("vl") else AutoModelForCausalLM
    a = cls.from_pretrained(src, dtype=getattr(torch, dtype)).eval()
    b = cls.from_pretrained(out, dtype=getattr(torch, dtype)).eval()
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_sharded_bin_and_in_memory_names_load_the_same(hf_checkpoint, tmp_path):
    src = hf_checkpoint("vl_a")
    _, ref = checkpoint.load_hf_params(src)
    model = make_hf_model("vl_a")
    # 1) sharded safetensors through model.safetensors.index.json
    sharded = str(tmp_path / "sharded")
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    # 2) legacy pytorch_model.bin with the new in-memory key names (model.language_model.*, model.visual.*)
    legacy = str(tmp_path / "legacy")
    os.makedirs(legacy)
    shutil.copy(os.path.join(src, "config.json"), legacy)
    sd = model.state_dict()
    assert any(k.startswith("model.language_model.") for k in sd) and any(k.startswith("model.visual.") for k in sd)
    torch.save(sd, os.path.join(legacy, "pytorch_model.bin"))
    for d in (sharded, legacy):
        _, got = checkpoint.load_hf_params(d)
        fr, fg = flatten(ref), flatten(got)
        assert fr.keys() == fg.keys()
        for k in fr:
            np.testing.assert_array_equal(fr[k], fg[k], err_msg=f"{d}: {k}")


def test_load_with_dtype_cast(hf_checkpoint):
    _, p = checkpoint.load_hf_params(hf_checkpoint("vl_a"), dtype=ml_dtypes.bfloat16)
    assert {v.dtype for v in flatten(p).values()} == {np.dtype(ml_dtypes.bfloat16)}


# ----------------------------------------------------------------------------------------- bad input


@pytest.fixture
def broken(hf_checkpoint, tmp_path):
    """A writable copy of a tiny VL checkpoint plus helpers to damage it."""
    src = str(tmp_path / "src")
    shutil.copytree(hf_checkpoint("vl_a"), src)
    return src


def _expect_failure(src: str, tmp_path, exc, *patterns: str):
    out = str(tmp_path / "out")
    with pytest.raises(exc) as e:
        checkpoint.convert_hf_to_orbax(src, out)
    for p in patterns:
        assert p in str(e.value), f"{p!r} not in: {e.value}"
    assert not os.path.exists(out)
    assert atomic_leftovers(tmp_path, "out") == []


def test_missing_tensor(broken, tmp_path):
    path = rewrite_tensors(broken, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    del path
    _expect_failure(broken, tmp_path, CheckpointError, "missing tensor", "model.layers.1.mlp.up_proj.weight")


def test_unexpected_tensor(broken, tmp_path):
    path = rewrite_tensors(broken, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", np.ones(8, np.float32)))
    _expect_failure(broken, tmp_path, CheckpointError, path, "unexpected tensor", "rotary_emb.inv_freq")


def test_shape_disagrees_with_config(broken, tmp_path):
    cfg_path = os.path.join(broken, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["text_config"]["intermediate_size"] = 112
    json.dump(cfg, open(cfg_path, "w"))
    _expect_failure(broken, tmp_path, CheckpointError, "model.safetensors", "mlp", "112]", "config.json implies")


def test_truncated_safetensors(broken, tmp_path):
    path = os.path.join(broken, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    _expect_failure(broken, tmp_path, CheckpointError, path, "truncated")


def test_corrupt_safetensors_header(broken, tmp_path):
    path = os.path.join(broken, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(12)
        f.write(b"\x00garbage{{{")
    _expect_failure(broken, tmp_path, CheckpointError, path, "corrupt safetensors header")


def test_unsupported_architecture(broken, tmp_path):
    cfg_path = os.path.join(broken, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["model_type"], cfg["architectures"] = "llama", ["LlamaForCausalLM"]
    json.dump(cfg, open(cfg_path, "w"))
    _expect_failure(broken, tmp_path, ConfigError, cfg_path, "unsupported architecture", "llama")


def test_index_names_a_missing_shard(hf_checkpoint, tmp_path):
    src = str(tmp_path / "sharded")
    make_hf_model("vl_a").save_pretrained(src, max_shard_size="100KB")
    victim = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(src, victim))
    _expect_failure(src, tmp_path, CheckpointError, victim, "is missing")


def test_export_refuses_to_clobber_and_leaves_nothing_on_error(hf_checkpoint, tmp_path):
    cfg, params, raw = checkpoint.load_params(hf_checkpoint("qwen2_tied_gqa3"))
    out = str(tmp_path / "exported")
    os.makedirs(out)
    with pytest.raises(FileExistsError, match="already exists"):
        checkpoint.save_hf(params, cfg, raw, out)
    bad = dict(params)
    bad["model"] = dict(bad["model"], norm={"scale": np.ones(3, np.float32)})
    with pytest.raises(CheckpointError, match="model/norm/scale"):
        checkpoint.save_hf(bad, cfg, raw, str(tmp_path / "other"))
    assert not os.path.exists(tmp_path / "other") and atomic_leftovers(tmp_path, "other") == []
