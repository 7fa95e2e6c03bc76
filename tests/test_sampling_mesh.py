"""Sampling on a Mesh of 8 fake CPU devices: greedy tokens equal one device's, for the lockstep loop and the
continuous-batching slots, with params, KV cache and rows placed as the sharding rules say."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from viscodex_jax.testing.models import IMG
from viscodex_jax.testing.prompts import left_padded_prompts
from jax.sharding import NamedSharding, PartitionSpec as P

from viscodex_jax.checkpoint import load_hf_params
from viscodex_jax.model.causal_lm import logical_axes
from viscodex_jax.model.families.qwen2_5_vl import get_rope_index
from viscodex_jax.sampling.loop import DecodeSettings, generate_ids
from viscodex_jax.sampling.slots import SlotSampler, SlotSettings, requests_from_batch
from viscodex_jax.sharding import DEFAULT_RULES, logical_to_mesh_spec, make_mesh

# What DEFAULT_RULES give on each mesh (data, fsdp, tensor), written out: rows over data x fsdp, the KV cache
# over rows and kv-heads (tensor), q_proj [layers, embed, heads, head_dim] over fsdp (embed) and tensor (heads).
MESHES = {
    (8, 1, 1): dict(rows=("data",), cache=(None, "data", None, None, None), q_proj=(None, None, None, None)),
    (1, 8, 1): dict(rows=("fsdp",), cache=(None, "fsdp", None, None, None), q_proj=(None, "fsdp", None, None)),
    (2, 2, 2): dict(rows=(("data", "fsdp"),), cache=(None, ("data", "fsdp"), None, "tensor", None),
                    q_proj=(None, "fsdp", "tensor", None)),
    (1, 4, 2): dict(rows=("fsdp",), cache=(None, "fsdp", None, "tensor", None), q_proj=(None, "fsdp", "tensor", None)),
}
NEW = 6
DECODE = DecodeSettings(max_new_tokens=NEW, prompt_bucket=16, patch_bucket=64)
SLOTS = SlotSettings(slots=8, cache_len=48, max_new_tokens=NEW, prompt_bucket=16, patch_bucket=64)


@pytest.fixture(scope="module")
def setup(hf_checkpoint):
    cfg, params = load_hf_params(hf_checkpoint("vl_a"))
    cfg = cfg.replace(attention_impl="blockwise")  # a kernel that runs per shard (shard_map) on a mesh
    grids = [(1, 4, 4)] * 4
    ids, mask = left_padded_prompts(grids, [[1, 2], [4, 5], [3, 0], [2, 7]], np.random.default_rng(0))
    pos, _ = get_rope_index(ids, grids, IMG, 2, mask)
    pix = np.random.default_rng(1).standard_normal((64, 1176)).astype(np.float32)
    batch = {"input_ids": ids, "attention_mask": mask, "positions": pos, "pixel_values": pix,
             "image_grid_thw": np.asarray(grids)}
    return cfg, params, batch, generate_ids(cfg, params, batch, eos_ids=[319], settings=DECODE)


def _is(sharding, mesh, spec, ndim):
    return sharding.is_equivalent_to(NamedSharding(mesh, P(*spec)), ndim)


@pytest.mark.parametrize("shape", list(MESHES), ids=lambda s: "x".join(map(str, s)))
def test_greedy_on_a_mesh_equals_one_device(setup, shape):
    cfg, params, batch, ref = setup
    mesh = make_mesh(shape)
    want = MESHES[shape]
    np.testing.assert_array_equal(generate_ids(cfg, params, batch, eos_ids=[319], settings=DECODE, mesh=mesh), ref)

    engine = SlotSampler(cfg, params, [319], settings=SLOTS, mesh=mesh)
    got = engine.run(requests_from_batch(cfg, batch))
    for i, row in enumerate(got):
        np.testing.assert_array_equal(row, ref[i, :len(row)], err_msg=f"row {i}")
        assert len(row) == NEW or row[-1] == 319

    # placement: every param as the rules map its logical axes, and the rules' meaning spelled out
    logical = jax.tree_util.tree_leaves(logical_axes(cfg.replace(attention_impl="xla")),
                                        is_leaf=lambda x: x is None or isinstance(x, P))
    for leaf, axes in zip(jax.tree_util.tree_leaves(engine.params), logical):
        assert _is(leaf.sharding, mesh, logical_to_mesh_spec(axes, leaf.shape, mesh, DEFAULT_RULES), leaf.ndim)
    q = engine.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert _is(q.sharding, mesh, want["q_proj"], 4)
    for k in ("k", "v"):
        assert _is(engine.state["cache"][k].sharding, mesh, want["cache"], 5), engine.state["cache"][k].sharding
    for k in ("tok", "pos", "n", "active"):
        assert _is(engine.state[k].sharding, mesh, want["rows"], 1), (k, engine.state[k].sharding)
    assert _is(engine.state["kv_valid"].sharding, mesh, want["rows"] + (None,), 2)


def test_slots_must_split_over_the_batch_shards(setup):
    from viscodex_jax.model.config import ConfigError

    cfg, params, _, _ = setup
    with pytest.raises(ConfigError, match=r"slots=3: must be a multiple of the mesh's 4 batch shards"):
        SlotSampler(cfg, params, [319], settings=SlotSettings(slots=3, cache_len=48, max_new_tokens=NEW,
                                                              prompt_bucket=16), mesh=make_mesh((2, 2, 2)))


def _check_placed(params, ref, cfg, mesh):
    logical = jax.tree_util.tree_leaves(logical_axes(cfg.replace(attention_impl="xla")),
                                        is_leaf=lambda x: x is None or isinstance(x, P))
    leaves, ref_leaves = jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref)
    assert len(leaves) == len(ref_leaves) == len(logical)
    for leaf, want, axes in zip(leaves, ref_leaves, logical):
        assert _is(leaf.sharding, mesh, logical_to_mesh_spec(axes, leaf.shape, mesh, DEFAULT_RULES), leaf.ndim)
        for shard in leaf.addressable_shards:  # each device holds its own slice only, with the checkpoint's values
            assert shard.data.shape == leaf.sharding.shard_shape(leaf.shape)
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(want)[shard.index])


def test_load_on_a_mesh_reads_each_tensor_into_its_shards(hf_checkpoint, tmp_path):
    import viscodex_jax as vx
    from viscodex_jax.checkpoint import convert_hf_to_orbax

    path = hf_checkpoint("vl_a")
    cfg, ref = load_hf_params(path)
    mesh = make_mesh((1, 4, 2))
    model = vx.load(path, mesh=mesh)
    assert model.mesh is mesh
    _check_placed(model.params, ref, cfg, mesh)
    q = model.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.shard_shape(q.shape) == (q.shape[0], q.shape[1] // 4, q.shape[2] // 2, q.shape[3])
    convert_hf_to_orbax(path, str(tmp_path / "orbax"))
    _check_placed(vx.load(str(tmp_path / "orbax"), mesh=mesh).params, ref, cfg, mesh)
