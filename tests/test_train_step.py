"""The train step: loss and gradients equal transformers', sharded steps equal one device, freezing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from viscodex_jax.checkpoint import hf_map
from viscodex_jax.utils import flatten
from viscodex_jax.model.families.qwen2_5_vl import get_rope_index
from viscodex_jax.model.families.qwen2_5_vl import metadata_arrays, vision_metadata
from viscodex_jax.sharding import DEFAULT_RULES, make_mesh
from viscodex_jax.testing.models import IMG, load_cached
from viscodex_jax.testing.prompts import pad_rows, vl_prompt
from viscodex_jax.train.loss import token_nll
from viscodex_jax.train.step import (OptimConfig, batch_loss, batch_shardings, init_state, make_optimizer,
                                     make_train_step, state_shardings, trainable_keys)

GRIDS = [[(1, 4, 6)], [(1, 6, 4)]]  # one image per row, same patch count (24)


def _batch(seed=0, rows=2):
    rng = np.random.default_rng(seed)
    seqs = [vl_prompt(GRIDS[r % 2], [3, 7 + r], rng) for r in range(rows)]
    ids, seg = pad_rows(seqs, "right", np.int32)  # right padding, as training batches are
    labels = np.where((ids != IMG) & (seg > 0), ids, -100).astype(np.int32)
    labels[:, :3] = -100  # a "prompt" part without labels
    grids = [g for r in range(rows) for g in GRIDS[r % 2]]
    pos, _ = get_rope_index(ids, grids, IMG, 2, seg)
    pix = rng.standard_normal((rows, 24, 1176)).astype(np.float32)
    return {"input_ids": ids, "labels": labels, "segment_ids": seg, "positions": pos, "pixel_values": pix,
            "grids": grids}


def _with_meta(b, cfg):
    metas = [metadata_arrays(vision_metadata([g], cfg.vision, pad_to=24)) for g in b["grids"]]
    out = {k: v for k, v in b.items() if k != "grids"}
    out["vision_meta"] = {k: np.stack([m[k] for m in metas]) for k in metas[0]}
    return out


def test_chunked_cross_entropy_equals_full_softmax():
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 37)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 37, (3, 5)))
    t = t.at[0, 0].set(-100)
    ref = -jnp.take_along_axis(jax.nn.log_softmax(h @ w, -1), jnp.clip(t, 0)[..., None], -1)[..., 0]
    ref = jnp.where(t == -100, 0.0, ref)
    for chunk in (8, 37, 64):  # 37 is not a multiple of 8: padded columns must not count
        np.testing.assert_allclose(token_nll(h, w, t, chunk), ref, atol=1e-5)
    g1 = jax.grad(lambda w: token_nll(h, w, t, 8).sum())(w)
    g2 = jax.grad(lambda w: jnp.where(t == -100, 0.0, -jnp.take_along_axis(
        jax.nn.log_softmax(h @ w, -1), jnp.clip(t, 0)[..., None], -1)[..., 0]).sum())(w)
    np.testing.assert_allclose(g1, g2, atol=1e-5)


@pytest.mark.parity
@pytest.mark.parametrize("impl", ["xla", "blockwise", "splash_interpret"])
def test_loss_and_gradients_equal_transformers(hf_checkpoint, impl):
    path = hf_checkpoint("vl_a")
    cfg, params = load_cached(path)
    cfg = cfg.replace(attention_impl=impl)
    b = _batch()
    batch = _with_meta(b, cfg)
    (s, n), grads = jax.value_and_grad(lambda p: batch_loss(p, batch, cfg, vocab_chunk=96)[:2], has_aux=True)(params)
    ours_loss = float(s / n)

    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager")
    hf.train(False)
    out = hf(input_ids=torch.tensor(b["input_ids"]).long(), attention_mask=torch.tensor(b["segment_ids"]),
             position_ids=torch.tensor(b["positions"]).long(), labels=torch.tensor(b["labels"]).long(),
             pixel_values=torch.tensor(b["pixel_values"].reshape(-1, 1176)),
             image_grid_thw=torch.tensor(b["grids"]))
    out.loss.backward()
    assert abs(ours_loss - out.loss.item()) / out.loss.item() <= 1e-4
    hf_grads = {hf_map.canonical_name(k): p.grad.numpy() for k, p in hf.named_parameters() if p.grad is not None}
    checked = 0
    for key, g in flatten(grads).items():
        g = np.asarray(g) / float(n)
        layers = range(g.shape[0]) if hf_map.is_stacked(key) else [None]
        for i in layers:
            name = hf_map.path_to_hf(key, i)
            x = g[i] if i is not None else g
            ours_hf = hf_map.to_hf(key, x, hf_map.hf_shape(key, x.shape, cfg))
            ref = hf_grads[name]
            scale = np.abs(ref).max()
            assert scale > 0, name
            assert np.abs(ours_hf - ref).max() / scale <= 1e-4, f"{name}: rel diff {np.abs(ours_hf - ref).max() / scale:.2e}"
            checked += 1
    assert checked == len(hf_grads)  # every HF parameter's gradient, vision tower included


def _run_steps(cfg, params, batch, mesh_shape, n_steps=2, trainable="llm"):
    keys = trainable_keys(params, trainable)
    opt = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=1, total_steps=10), keys)
    state = init_state(params, opt, keys)
    if mesh_shape is None:
        fn = jax.jit(make_train_step(cfg, opt, keys, vocab_chunk=96))
        put = lambda x: x
    else:
        mesh = make_mesh(mesh_shape)
        # with the mesh and rules: activation constraints and per-shard attention kernels are in the program
        step = make_train_step(cfg, opt, keys, vocab_chunk=96, mesh=mesh, rules=DEFAULT_RULES)
        abstract = jax.eval_shape(lambda: state)
        ssh = state_shardings(cfg, abstract, mesh, DEFAULT_RULES)
        bsh = batch_shardings(batch, mesh, DEFAULT_RULES)
        state = jax.device_put(state, ssh)
        fn = jax.jit(step, in_shardings=(ssh, bsh), out_shardings=(ssh, None))
        put = lambda b: jax.device_put(b, bsh)
    metrics = []
    for _ in range(n_steps):
        state, m = fn(state, put(batch))
        metrics.append(jax.device_get(m))
    return state, metrics


@pytest.fixture(scope="module")
def single_device_run(hf_checkpoint):
    cfg, params = load_cached(hf_checkpoint("vl_a"))
    batch = _with_meta(_batch(rows=8), cfg)
    state, metrics = _run_steps(cfg, params, batch, None, n_steps=3)  # step 0 has lr 0 (warmup)
    return cfg, params, batch, state, metrics


def _grads(cfg, params, batch, mesh_shape):
    keys = trainable_keys(params, "llm")
    fn = lambda p, b: jax.value_and_grad(lambda p: batch_loss(p, b, cfg, vocab_chunk=96)[:2], has_aux=True)(p)
    if mesh_shape is None:
        (s, n), g = jax.jit(fn)(params, batch)
    else:
        mesh = make_mesh(mesh_shape)
        opt = make_optimizer(OptimConfig(), keys)
        psh = state_shardings(cfg, jax.eval_shape(lambda: init_state(params, opt, keys)), mesh, DEFAULT_RULES)["params"]
        bsh = batch_shardings(batch, mesh, DEFAULT_RULES)
        (s, n), g = jax.jit(fn, in_shardings=(psh, bsh))(jax.device_put(params, psh), jax.device_put(batch, bsh))
    return float(s / n), {k: np.asarray(v) / float(n) for k, v in flatten(g).items()}


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_equals_single_device(single_device_run, mesh_shape):
    cfg, params, batch, ref_state, ref_metrics = single_device_run
    loss, grads = _grads(cfg, params, batch, mesh_shape)
    ref_loss, ref_grads = _grads(cfg, params, batch, None)
    assert abs(loss - ref_loss) / abs(ref_loss) <= 1e-5
    for k, g in ref_grads.items():
        rel = np.abs(grads[k] - g).max() / max(np.abs(g).max(), 1e-30)
        assert rel <= 1e-5, f"{'/'.join(k)}: relative grad diff {rel:.2e}"
    # a full optimizer step under the mesh: same loss, and params laid out as the rules say
    state, metrics = _run_steps(cfg, params, batch, mesh_shape, n_steps=1)
    assert abs(metrics[0]["loss"] - ref_metrics[0]["loss"]) / abs(ref_metrics[0]["loss"]) <= 1e-5
    q = state["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]  # (layers, embed, heads, head_dim)
    mlp = state["params"]["model"]["layers"]["mlp"]["up_proj"]["kernel"]  # (layers, embed, mlp)
    data, fsdp, tensor = mesh_shape
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp" if fsdp > 1 else None,
                                                         "tensor" if tensor > 1 else None, None)
    assert mlp.sharding.shard_shape(mlp.shape) == (mlp.shape[0], mlp.shape[1] // fsdp, mlp.shape[2] // tensor)
    mu = state["opt_state"][1][0].mu["model/layers/mlp/up_proj/kernel"]
    assert mu.sharding.shard_shape(mu.shape) == mlp.sharding.shard_shape(mlp.shape)


@pytest.mark.parametrize("impl", ["blockwise", "splash_interpret"])
def test_sharded_step_with_kernel_equals_single_device_reference(single_device_run, impl):
    """On a (2, 2, 2) mesh the kernels run per shard (shard_map) inside the constrained step."""
    cfg, params, batch, _, ref_metrics = single_device_run
    state, metrics = _run_steps(cfg.replace(attention_impl=impl), params, batch, (2, 2, 2), n_steps=2)
    for m, ref in zip(metrics, ref_metrics):
        assert abs(m["loss"] - ref["loss"]) / abs(ref["loss"]) <= 1e-5, impl
        assert abs(m["grad_norm"] - ref["grad_norm"]) / abs(ref["grad_norm"]) <= 1e-5, impl


def test_frozen_parts_bit_identical_trainable_change(single_device_run):
    cfg, params, _, state, metrics = single_device_run
    assert metrics[2]["loss"] < metrics[0]["loss"]
    new, old = flatten(state["params"]), flatten(params)
    for k in old:
        same = np.array_equal(np.asarray(new[k]), np.asarray(old[k]))
        if k[0] == "visual":
            assert same, "/".join(k)
        else:
            assert not same, "/".join(k)


def test_gradient_accumulation_equals_one_big_batch(hf_checkpoint):
    cfg, params = load_cached(hf_checkpoint("vl_a"))
    big = _with_meta(_batch(seed=3, rows=4), cfg)
    keys = trainable_keys(params, "llm")
    opt = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=1), keys)
    one = jax.jit(make_train_step(cfg, opt, keys, vocab_chunk=96))
    acc = jax.jit(make_train_step(cfg, opt, keys, accum_steps=2, vocab_chunk=96))
    micro = jax.tree.map(lambda x: x.reshape((2, x.shape[0] // 2) + x.shape[1:]), {k: v for k, v in big.items()
                                                                                  if k != "positions"})
    micro["positions"] = big["positions"].reshape(3, 2, 2, -1).transpose(1, 0, 2, 3)
    s1, m1 = one(init_state(params, opt, keys), big)
    s2, m2 = acc(init_state(params, opt, keys), micro)
    assert abs(float(m1["loss"]) - float(m2["loss"])) <= 1e-5 * abs(float(m1["loss"]))
    k = "model/layers/mlp/up_proj/kernel".split("/")
    np.testing.assert_allclose(np.asarray(flatten(s1["params"])[tuple(k)]), np.asarray(flatten(s2["params"])[tuple(k)]),
                               rtol=1e-4, atol=1e-6)


def test_nonfinite_step_is_flagged_or_skipped(hf_checkpoint):
    cfg, params = load_cached(hf_checkpoint("vl_a"))
    batch = _with_meta(_batch(), cfg)
    bad = jax.tree.map(lambda x: x, params)
    bad["model"]["norm"]["scale"] = np.full_like(bad["model"]["norm"]["scale"], np.nan)
    keys = trainable_keys(bad, "llm")
    opt = make_optimizer(OptimConfig(), keys)
    state = init_state(bad, opt, keys)
    s, m = jax.jit(make_train_step(cfg, opt, keys, skip_nonfinite=True, vocab_chunk=96))(state, batch)
    assert not bool(m["finite"])
    k = ("model", "layers", "mlp", "up_proj", "kernel")
    assert np.array_equal(np.asarray(flatten(s["params"])[k]), np.asarray(flatten(bad)[k]))  # update skipped
    assert int(s["step"]) == 1


def test_lr_scale_scales_one_groups_updates_and_checkpoints(hf_checkpoint, tmp_path):
    """optim.lr_scale: the vision tower's update is exactly 10x (same grads, same Adam moments), the LLM's is
    bit-identical to a run without groups; a pattern that matches nothing or a bad factor is refused; the
    state (with the scaling stage) saves and restores through orbax as the training loop does."""
    import orbax.checkpoint as ocp

    cfg, params = load_cached(hf_checkpoint("vl_a"))
    batch = _with_meta(_batch(seed=5, rows=2), cfg)
    keys = trainable_keys(params, "all")
    runs = {}
    for name, groups in (("plain", ()), ("scaled", (("^visual/", 10.0), ("^visual/merger/", 3.0)))):
        opt = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0, total_steps=10, lr_scale=groups), keys)
        step = jax.jit(make_train_step(cfg, opt, keys, vocab_chunk=96))
        state, _ = step(init_state(params, opt, keys), batch)
        runs[name] = state
    old = flatten(params)
    new = {n: flatten(s["params"]) for n, s in runs.items()}
    n_visual = 0
    for k in old:
        d_plain = np.asarray(new["plain"][k], np.float64) - np.asarray(old[k], np.float64)
        d_scaled = np.asarray(new["scaled"][k], np.float64) - np.asarray(old[k], np.float64)
        if k[0] == "visual":  # first match wins: the merger is under ^visual/ too, so it gets 10, not 3
            n_visual += 1
            np.testing.assert_allclose(d_scaled, 10.0 * d_plain, rtol=1e-4, atol=1e-6, err_msg="/".join(k))
        else:
            assert np.array_equal(np.asarray(new["scaled"][k]), np.asarray(new["plain"][k])), "/".join(k)
    assert n_visual > 0 and np.abs(d_plain).max() > 0

    with pytest.raises(ValueError, match=r"lr_scale\[0\]: pattern '\^vision/' matches no trainable parameter"):
        make_optimizer(OptimConfig(lr_scale=(("^vision/", 2.0),)), keys)
    for bad in (("^visual/",), ("^visual/", 0.0), ("^visual/", float("inf")), ("^visual/", True)):
        with pytest.raises(ValueError, match=r"lr_scale\[0\].*\(regex, factor > 0\)"):
            make_optimizer(OptimConfig(lr_scale=(bad,)), keys)

    state = runs["scaled"]
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(str(tmp_path / "state"), state)
        ckptr.wait_until_finished()
        back = ckptr.restore(str(tmp_path / "state"), jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
