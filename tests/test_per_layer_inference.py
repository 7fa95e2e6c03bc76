"""Inference on per-layer params (``causal_lm.unstack_layers``: the decoder runs its layers as a loop over
per-layer buffers instead of ``nn.scan`` over stacked ones): the same logits (float32 round-off), the same
greedy tokens in the lockstep loop, the slots and on a mesh, and no second copy of the weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from viscodex_jax.model.causal_lm import CausalLM, layers_unstacked, param_shapes, unstack_layers
from viscodex_jax.model.families.qwen2_5_vl import get_rope_index
from viscodex_jax.sampling import mesh as on_mesh
from viscodex_jax.sampling.loop import DecodeSettings, _prefill, generate_ids
from viscodex_jax.sampling.slots import SlotSampler, SlotSettings, requests_from_batch
from viscodex_jax.sharding import make_mesh
from viscodex_jax.testing.models import IMG, load_cached
from viscodex_jax.testing.prompts import left_padded_prompts

NEW = 7
DECODE = DecodeSettings(max_new_tokens=NEW, prompt_bucket=16, patch_bucket=64)


@pytest.fixture(scope="module")
def vl(hf_checkpoint):
    cfg, params = load_cached(hf_checkpoint("vl_a"))
    grids = [(1, 4, 4), (1, 4, 6)]
    ids, mask = left_padded_prompts(grids, [[3, 9], [1, 2]], np.random.default_rng(0))
    pos, _ = get_rope_index(ids, grids, IMG, 2, mask)
    pix = np.random.default_rng(1).standard_normal((16 + 24, 1176)).astype(np.float32)
    batch = {"input_ids": ids, "attention_mask": mask, "positions": pos, "pixel_values": pix,
             "image_grid_thw": np.asarray(grids)}
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return cfg, params, unstack_layers(params), batch


def test_layout_and_logits(vl):
    cfg, params, per, batch = vl
    n = cfg.text.num_layers
    assert not layers_unstacked(params) and layers_unstacked(per)
    assert sorted(k for k in per["model"] if k.startswith("layers")) == [f"layers_{i}" for i in range(n)]
    q = params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    for i in range(n):
        np.testing.assert_array_equal(per["model"][f"layers_{i}"]["self_attn"]["q_proj"]["kernel"], q[i])
    assert per["visual"] is params["visual"] and unstack_layers(per) is per
    # the forward pass without a cache (vision tower included) and a prefill with one
    from viscodex_jax.sampling.loop import _prepare

    ids, mask, pos, _, extra = _prepare(cfg, batch, DECODE)
    model = CausalLM(cfg)
    a = model.apply({"params": params}, ids, pos, mask, **extra)
    b = model.apply({"params": per}, ids, pos, mask, **extra)
    diff = float(jnp.max(jnp.abs(a - b)))
    assert diff <= 2e-5 * float(jnp.max(jnp.abs(a))), diff
    (la, ca, _), (lb, cb, _) = (_prefill(p, ids, mask, pos, extra, cfg=cfg, cache_len=48, cache_dtype=jnp.float32)
                                for p in (params, per))
    assert float(jnp.max(jnp.abs(la - lb))) <= 2e-5 * float(jnp.max(jnp.abs(la)))
    for k in ("k", "v"):
        assert ca[k].shape == cb[k].shape == (n, 2, 48, cfg.text.num_kv_heads, cfg.text.head_dim)
        assert float(jnp.max(jnp.abs(ca[k] - cb[k]))) <= 1e-5 * float(jnp.max(jnp.abs(ca[k])))


def test_greedy_tokens_equal_stacked_in_the_loop_and_the_slots(vl):
    cfg, params, per, batch = vl
    want = generate_ids(cfg, params, batch, eos_ids=[319], settings=DECODE)
    np.testing.assert_array_equal(generate_ids(cfg, per, batch, eos_ids=[319], settings=DECODE), want)
    slots = SlotSettings(slots=1, cache_len=64, max_new_tokens=NEW, prompt_bucket=16, patch_bucket=64, windows=1)
    a = SlotSampler(cfg, params, [319], settings=slots).run(requests_from_batch(cfg, batch))
    b = SlotSampler(cfg, per, [319], settings=slots).run(requests_from_batch(cfg, batch))
    for i, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(x, y, err_msg=f"row {i}")
        np.testing.assert_array_equal(x, want[i, :len(x)], err_msg=f"row {i} against the lockstep loop")


def test_on_a_mesh_per_layer_params_are_sharded_by_the_rules_and_give_the_same_tokens(vl):
    cfg, params, per, batch = vl
    cfg = cfg.replace(attention_impl="blockwise")
    mesh = make_mesh((2, 2, 2))
    # a copy nobody else holds (a replicated leaf placed on the mesh may share the original's buffer)
    fresh = jax.tree_util.tree_map(jnp.array, params)
    placed = on_mesh.place_params(cfg, fresh, mesh, on_mesh.resolve_rules(mesh, None))
    split = unstack_layers(placed, free=True)
    assert placed["model"]["layers"]["self_attn"]["q_proj"]["kernel"].is_deleted()  # no second copy
    # q_proj [embed, heads, head_dim]: the stacked rule less its layer axis
    q = split["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", "tensor", None)), 3)
    want = on_mesh.param_shardings(cfg, split, mesh, on_mesh.resolve_rules(mesh, None))
    for path, x in jax.tree_util.tree_flatten_with_path(split)[0]:
        s = want
        for k in path:
            s = s[k.key]
        assert x.sharding.is_equivalent_to(s, x.ndim), jax.tree_util.keystr(path)
    ref = generate_ids(cfg, params, batch, eos_ids=[319], settings=DECODE)
    np.testing.assert_array_equal(generate_ids(cfg, split, batch, eos_ids=[319], settings=DECODE, mesh=mesh), ref)
    slots = SlotSettings(slots=4, cache_len=64, max_new_tokens=NEW, prompt_bucket=16, patch_bucket=64, windows=1)
    got = SlotSampler(cfg, split, [319], settings=slots, mesh=mesh).run(requests_from_batch(cfg, batch))
    for i, row in enumerate(got):
        np.testing.assert_array_equal(row, ref[i, :len(row)], err_msg=f"slots row {i}")


def test_unstacking_frees_the_stacked_copy_and_keeps_the_bytes(vl):
    cfg, params, _, _ = vl
    fresh = jax.tree_util.tree_map(jnp.array, params)  # arrays nobody else holds
    nbytes = lambda t: sum(x.nbytes for x in jax.tree_util.tree_leaves(t))  # noqa: E731
    live = lambda: sum(x.nbytes for x in jax.live_arrays())  # noqa: E731
    before = live()
    split = unstack_layers(fresh, free=True)
    assert nbytes(split) == nbytes(params)
    assert live() == before  # the stacked layers are gone: what is live is the same bytes, split
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(fresh["model"]["layers"]))


def test_abstract_params_split_for_ahead_of_time_compilation():
    from viscodex_jax.model.config import config_from_dict

    cfg = config_from_dict(dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48,
                                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                tie_word_embeddings=True), "test")
    mesh = make_mesh((1, 2, 4))
    shapes = param_shapes(cfg)
    rules = on_mesh.resolve_rules(mesh, None)
    sharded = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                                     on_mesh.param_shardings(cfg, shapes, mesh, rules))
    split = unstack_layers(sharded)
    k = split["model"]["layers_2"]["mlp"]["up_proj"]["kernel"]
    assert k.shape == (32, 48) and k.sharding.spec == P("fsdp", "tensor")
    assert jax.tree_util.tree_structure(jax.tree_util.tree_map(lambda x: 0, on_mesh.param_shardings(
        cfg, split, mesh, rules))) == jax.tree_util.tree_structure(jax.tree_util.tree_map(lambda x: 0, split))


def test_greedy_argmax_is_jnp_argmax_with_ties_nans_and_infinities():
    from viscodex_jax.sampling.methods import argmax

    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, size=(6, 50)).astype(np.float32)  # many ties: the first maximum must win
    x[1, [7, 30]] = np.nan  # the first NaN wins, as in jnp.argmax
    x[2] = -np.inf
    x[3, 11] = np.inf
    x[4] = -1.0
    x[4, [3, 5]] = [-0.0, 0.0]  # equal maxima of either sign: the first
    for a in (x, x[0], x[:, None, :]):
        got = jax.jit(argmax)(jnp.asarray(a))
        want = jnp.argmax(jnp.asarray(a), axis=-1)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(jax.jit(argmax)(jnp.asarray(x)), [int(np.argmax(r)) for r in x])
