"""The sweep's merge on a mesh (merge/on_device.py): bit for bit the streamed merge, sharded by the rules.

On conftest's 8 fake CPU devices: base, VLM and coder are read once into their shardings, each lam is merged
by one jitted program, and the merged params equal ``merge_checkpoints``' output converted to params.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from viscodex_jax import checkpoint
from viscodex_jax.checkpoint import hf_map
from viscodex_jax.merge import MergeSpec, merge_checkpoints
from viscodex_jax.merge import tensor as tensor_lib
from viscodex_jax.merge.methods import kth_largest_magnitudes, kth_largest_magnitudes_on_device
from viscodex_jax.merge.on_device import EMBED, LM_HEAD, MeshMerge, merge_leaf, plan_leaves
from viscodex_jax.merge.recipe import merge_config
from viscodex_jax.merge.sweep import memory_needed
from viscodex_jax.merge.tensor import merge_with_vocab_policy
from viscodex_jax.model.config import load_config
from viscodex_jax.sampling import mesh as on_mesh
from viscodex_jax.sharding import make_mesh
from viscodex_jax.utils import flatten, unflatten


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    return tiny_checkpoints(11)  # shared with test_merge_sweep; read-only here


def _assert_sharded_by_the_rules(tree, cfg, mesh, rules, what):
    want = flatten(on_mesh.param_shardings(cfg, tree, mesh, rules))
    for k, v in flatten(tree).items():
        name = f"{what} {'/'.join(k)}"
        assert v.sharding.is_equivalent_to(want[k], v.ndim), (name, v.sharding, want[k])
        if k[0] != "visual" and k[-1] in ("kernel", "embedding"):  # the language model's matrices are split:
            assert not want[k].is_fully_replicated, name  # no device holds a whole one
            assert all(s.data.shape != v.shape for s in v.addressable_shards), name


@pytest.mark.parametrize("method,density", [("task_arithmetic", 1.0), ("ties", 0.5),
                                            pytest.param("dare_ties", 0.5, marks=pytest.mark.slow)])
def test_on_device_merge_equals_the_streamed_checkpoint_bit_for_bit(tiny, tmp_path, method, density):
    mesh = make_mesh((1, 4, 2))
    rules = on_mesh.resolve_rules(mesh, None)
    dirs = [tiny["vlm"], tiny["coder"]]
    merger = MeshMerge(tiny["base"], dirs, MergeSpec(method=method, density=density), mesh, rules,
                       require_vision=True)
    for d, tree in zip([tiny["base"], *dirs], merger.trees):  # the inputs too: read straight into their shards
        _assert_sharded_by_the_rules(unflatten({tuple(k.split("/")): v for k, v in tree.items()}), load_config(d),
                                     mesh, rules, d)
    for lam in (0.7, 0.85):
        spec = MergeSpec(method=method, weights=(lam, 1.0 - lam), density=density)
        params, report = merger.merge(spec)
        _assert_sharded_by_the_rules(params, merger.cfg, mesh, rules, f"merged lam={lam}")
        out = tmp_path / f"lam_{lam}"
        streamed = merge_checkpoints(tiny["base"], dirs, str(out), spec)
        want, got = flatten(checkpoint.load_hf_params(str(out))[1]), flatten(params)
        assert got.keys() == want.keys()
        for k in want:
            g = np.asarray(got[k])
            assert g.dtype == want[k].dtype and g.tobytes() == want[k].tobytes(), ("/".join(k), lam)
        # the report is the streamed one's: same tensors, the statistics from on-device sums
        assert report["merged"].keys() == streamed["merged"].keys() and report["copied"] == streamed["copied"]
        for name, s in streamed["merged"].items():
            np.testing.assert_allclose(report["merged"][name]["task_vector_norms"], s["task_vector_norms"], rtol=1e-5)
            assert report["merged"][name]["kept_fraction"] == s["kept_fraction"], name
    # the copied vision tower is the VLM's own arrays, not a copy
    copied = [(k, v) for k, v in flatten(params).items() if k[0] == "visual"]
    assert copied and all(v is merger.trees[1]["/".join(k)] for k, v in copied)
    # the memory printed up front, from the headers and the shardings, is what the devices then hold
    c = merge_config()
    c.base_dir, c.vlm_dir, c.coder_dir = tiny["base"], *dirs
    mem = memory_needed(c, spec, mesh, rules)
    held = {}
    merged = [flatten(params)[p.key] for p in merger.plans]
    for x in [v for t in merger.trees for v in t.values()] + merged:
        for shard in x.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    assert max(held.values()) == mem["device_total"] < mem["host_total"] / 4


def test_on_device_thresholds_equal_the_host_selection():
    """The exact selection: ties, zeros, ranks 0 (+inf), 1, the size, past the size (-inf); bf16 and f32 inputs."""
    mesh = make_mesh((1, 4, 2))
    rng = np.random.default_rng(0)
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor"))
    for dtype in (np.float32, jax.numpy.bfloat16):
        base = rng.standard_normal((16, 24)).astype(dtype)
        thetas = [base + (rng.integers(-3, 4, base.shape) * 0.25).astype(dtype), base.copy()]  # ties; all zero
        n = base.size
        ranks = (0, 1, 2, 7, n // 2, n - 1, n, n + 1)
        want = kth_largest_magnitudes(base, thetas, ranks)
        got = jax.jit(lambda b, t: kth_largest_magnitudes_on_device(b, t, ranks))(
            jax.device_put(base, sh), [jax.device_put(t, sh) for t in thetas])
        assert np.asarray(got).tobytes() == want.tobytes(), (dtype, np.asarray(got), want)


# Small params of real names (the names key DARE's masks and select the layout): a stacked MLP kernel, a
# stacked o_proj kernel (two input axes), the embedding and lm_head, with vocab sizes that differ.
_SHAPES = {
    ("model", "layers", "mlp", "up_proj", "kernel"): (2, 8, 24),
    ("model", "layers", "self_attn", "o_proj", "kernel"): (2, 2, 4, 8),
    EMBED: (40, 8),
    LM_HEAD: (8, 40),
}


@pytest.mark.parametrize("method,extra", [
    ("ties", dict(density=0.4)),
    ("dare_ties", dict(density=0.5, seed=3)),
    ("breadcrumbs", dict(drop_largest=0.1, drop_smallest=0.3)),
])
def test_merge_leaf_equals_merge_with_vocab_policy(tiny, monkeypatch, method, extra):
    """Per param against the streamed per-tensor function: row chunks (DARE draws per chunk), vocab sizes that
    differ (base 48 rows, VLM 40, coder 44: 40 merged, the VLM's own beyond), a tied base (its embedding
    is its lm_head), kernels laid out as ours."""
    monkeypatch.setattr(tensor_lib, "CHUNK_ELEMENTS", 64)  # 8 rows of 8 per chunk: every tensor here is cut
    cfg = load_config(tiny["vlm"])
    rng = np.random.default_rng(1)
    vocab = {0: 48, 1: 40, 2: 44}
    trees = []
    for i in range(3):
        tree = {}
        for key, shape in _SHAPES.items():
            if key == LM_HEAD and i == 0:
                continue  # the base is tied
            shape = (vocab[i], 8) if key == EMBED else (8, vocab[i]) if key == LM_HEAD else shape
            tree[key] = (rng.standard_normal(shape) * (1.0 if i == 0 else 0.05)).astype(np.float32)
        trees.append(tree)
    for i in (1, 2):  # fine-tuned from the base: base plus a small task vector on the shared rows
        for key in trees[i]:
            src = trees[0][key] if key in trees[0] else trees[0][EMBED].T
            idx = tuple(slice(0, min(a, b)) for a, b in zip(trees[i][key].shape, src.shape))
            trees[i][key][idx] += src[idx]
    spec = MergeSpec(method=method, weights=(0.7, 0.3), out_dtype="float32", **extra)
    plans = plan_leaves(cfg, trees, spec)
    assert {p.key: p.tied for p in plans}[LM_HEAD] == (True, False, False)
    assert {p.key: p.vocab_rows for p in plans}[EMBED] == 40
    sources = [[t[EMBED] if tied else t[p.key] for t, tied in zip(trees, p.tied)] for p in plans]
    merged = jax.jit(lambda s, w: [merge_leaf(p, spec, x, w)[0] for p, x in zip(plans, s)])(
        sources, np.asarray(spec.weights, np.float32))
    for p, srcs, got in zip(plans, sources, merged):
        got = np.asarray(got)
        assert got.shape == trees[1][p.key].shape, p.key
        layers = range(got.shape[0]) if p.stacked else [None]
        for i in layers:
            def hf(x, key=p.key, i=i):
                x = x if i is None else x[i]
                return hf_map.to_hf(key, x, hf_map.hf_shape(key, x.shape, cfg))
            srcs_i = [hf(s.T if tied else s) for s, tied in zip(srcs, p.tied)]
            want, _ = merge_with_vocab_policy(p.names[i or 0], srcs_i[0], srcs_i[1:], srcs_i[1], spec, p.path)
            assert hf(got).tobytes() == np.asarray(want).tobytes(), (method, p.path, i)


def test_bad_copied_tensor_and_a_changed_spec_are_refused(tiny, tmp_path):
    """A NaN in the VLM's vision tower (copied, not merged) is named at load; a spec that differs in more
    than its weights is refused (the program was compiled for the first)."""
    import shutil

    from viscodex_jax.merge import MergeError
    from viscodex_jax.testing.checkpoints import rewrite_tensors

    mesh = make_mesh((1, 4, 2))
    rules = on_mesh.resolve_rules(mesh, None)
    vlm = str(tmp_path / "vlm")
    shutil.copytree(tiny["vlm"], vlm)

    def poison(tensors):
        name = next(k for k in tensors if "visual" in k and "patch_embed" in k)
        tensors[name] = tensors[name].copy()
        tensors[name].reshape(-1)[3] = np.nan

    rewrite_tensors(vlm, poison)
    with pytest.raises(MergeError, match=r"param visual/patch_embed/\S+ \(copied into the output\) has NaN/Inf: 1 of"):
        MeshMerge(tiny["base"], [vlm, tiny["coder"]], MergeSpec(), mesh, rules)
    merger = MeshMerge(tiny["base"], [tiny["vlm"], tiny["coder"]], MergeSpec(), mesh, rules)
    with pytest.raises(MergeError, match="differs in more than its weights"):
        merger.merge(MergeSpec(method="ties", density=0.5))
