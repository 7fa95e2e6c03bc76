"""Merging real (tiny) checkpoints: streamed == in-memory, vision copied, transformers loads the result."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

from viscodex_jax import checkpoint
from viscodex_jax.merge import MergeError, MergeSpec, merge_checkpoints, merge_params
from viscodex_jax.testing.asserts import assert_no_output
from viscodex_jax.testing.checkpoints import hf_tensors, reshard
from viscodex_jax.utils import flatten


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("merge")
    paths = tiny_checkpoints(11)
    out = {}
    for k, p in paths.items():  # several shards per model
        out[k] = str(root / k)
        reshard(p, out[k], 400_000)
        assert len([f for f in os.listdir(out[k]) if f.endswith(".safetensors")]) > 2
    return out


@pytest.mark.parametrize("spec", [
    MergeSpec(method="task_arithmetic", weights=(0.7, 0.3)),
    MergeSpec(method="ties", weights=(0.6, 0.5), density=0.4, lam=0.9),
    MergeSpec(method="dare_ties", weights=(0.7, 0.3), density=0.5, seed=2),
    MergeSpec(method="task_arithmetic", weights=(0.7, 0.3), exclude=(r"/mlp/",),
              group_weights=((r"/self_attn/", (0.5, 0.5)),)),
    MergeSpec(method="breadcrumbs", weights=(0.7, 0.3), drop_largest=0.05, drop_smallest=0.3),
], ids=["task_arithmetic", "ties", "dare_ties", "groups", "breadcrumbs"])
def test_streamed_equals_in_memory_and_vision_is_copied(tiny, tmp_path, spec):
    out = str(tmp_path / "merged")
    report = merge_checkpoints(tiny["base"], [tiny["vlm"], tiny["coder"]], out, spec, max_shard_bytes=500_000)
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    cfg, streamed = checkpoint.load_hf_params(out)
    _, base = checkpoint.load_hf_params(tiny["base"])
    _, vlm = checkpoint.load_hf_params(tiny["vlm"])
    _, coder = checkpoint.load_hf_params(tiny["coder"])
    mem, mem_report = merge_params(base, [vlm, coder], spec, cfg)
    fs, fm, fv = flatten(streamed), flatten(mem), flatten(vlm)
    assert fs.keys() == fm.keys()
    for k in fs:
        assert fs[k].dtype == fm[k].dtype and fs[k].tobytes() == fm[k].tobytes(), "/".join(k)
    # the vision tower and merger are the VLM's, bit for bit, in streamed output files too
    src, got = hf_tensors(tiny["vlm"]), hf_tensors(out)
    vis = [n for n in src if n.startswith("visual.")]
    assert vis and all(got[n].dtype == src[n].dtype and got[n].tobytes() == src[n].tobytes() for n in vis)
    assert sorted(report["copied"]) == sorted(n for n in src if n.startswith("visual.") or
                                              (spec.exclude and ".mlp." in n and not n.startswith("visual.")))
    assert set(report["merged"]) == set(mem_report["merged"])
    saved = json.load(open(os.path.join(out, "merge_report.json")))
    assert saved["method"] == spec.method and len(saved["merged"]) == len(report["merged"])
    if spec.exclude:  # excluded MLPs are the VLM's
        k = ("model", "layers", "mlp", "up_proj", "kernel")
        assert fs[k].tobytes() == fv[k].astype(fs[k].dtype).tobytes()
    if spec.method == "task_arithmetic":
        # VisCodex: base + 0.7 tau_vlm + 0.3 tau_code; attention uses the group weights when given
        k = ("model", "layers", "self_attn", "q_proj", "kernel")
        w = (0.5, 0.5) if spec.group_weights else (0.7, 0.3)
        ref = flatten(base)[k] + w[0] * (fv[k] - flatten(base)[k]) + w[1] * (flatten(coder)[k] - flatten(base)[k])
        np.testing.assert_allclose(fs[k].astype(np.float32), ref, atol=1e-2)  # bf16 output


def test_merged_checkpoint_loads_in_transformers_with_our_logits(tiny, tmp_path):
    out = str(tmp_path / "merged32")
    merge_checkpoints(tiny["base"], [tiny["vlm"], tiny["coder"]], out, MergeSpec(out_dtype="float32"))
    from transformers import AutoModelForImageTextToText

    import viscodex_jax as vx
    from viscodex_jax.testing.images import demo_chart
    from viscodex_jax.testing.reference import transformers_logits

    model = vx.load(out)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "plot it"}]}]
    batch = model.processor([msgs], images=[[demo_chart()]])
    ours = np.asarray(model.logits(batch))
    hf = AutoModelForImageTextToText.from_pretrained(out, attn_implementation="eager").eval()
    ref = transformers_logits(hf, batch)
    assert np.abs(ours - ref).max() <= 1e-4


def test_merge_models_is_merge_params_on_loaded_models(tiny):
    import viscodex_jax as vx
    from viscodex_jax.merge import merge_models

    base, vlm, coder = (vx.load(tiny[k]) for k in ("base", "vlm", "coder"))
    spec = MergeSpec(method="ties", weights=(0.6, 0.5), density=0.4)
    merged = merge_models(base, [vlm, coder], method="ties", weights=(0.6, 0.5), density=0.4)
    want, _ = merge_params(base.params, [vlm.params, coder.params], spec, vlm.config)
    got, fw = flatten(merged.params), flatten(want)
    assert got.keys() == fw.keys() and all(np.asarray(got[k]).tobytes() == fw[k].tobytes() for k in fw)
    assert merged.config == vlm.config and merged.processor is vlm.processor and merged.raw_config["dtype"] == "bfloat16"
    with pytest.raises(MergeError, match="not both"):
        merge_models(base, [vlm, coder], spec, lam=0.5)


def test_vocab_mismatch_merges_shared_rows_and_keeps_vlm_extra_rows(tiny):
    cfg, base = checkpoint.load_hf_params(tiny["base"])
    vcfg, vlm = checkpoint.load_hf_params(tiny["vlm"])
    _, coder = checkpoint.load_hf_params(tiny["coder"])
    v = vcfg.text.vocab_size
    small = lambda p: {**p, "model": {**p["model"], "embed_tokens": {"embedding": p["model"]["embed_tokens"]["embedding"][: v - 64]}},
                       "lm_head": {"kernel": p["lm_head"]["kernel"][:, : v - 64]}}
    spec = MergeSpec(out_dtype="float32")
    merged, report = merge_params(base, [vlm, small(coder)], spec, vcfg)
    emb = merged["model"]["embed_tokens"]["embedding"]
    ve, be, ce = (p["model"]["embed_tokens"]["embedding"] for p in (vlm, base, coder))
    np.testing.assert_array_equal(emb[v - 64:], ve[v - 64:])
    np.testing.assert_allclose(emb[: v - 64], 0.7 * ve[: v - 64] + 0.3 * ce[: v - 64], atol=1e-6)
    assert report["merged"]["model.embed_tokens.weight"]["vocab_rows_merged"] == v - 64
    np.testing.assert_array_equal(merged["lm_head"]["kernel"][:, v - 64:], vlm["lm_head"]["kernel"][:, v - 64:])
    del cfg, be


def test_error_missing_tensor(tiny, tmp_path):
    coder = str(tmp_path / "coder_missing")
    reshard(tiny["coder"], coder, 10**9, drop=("model.layers.1.self_attn.k_proj.bias",))
    with pytest.raises(MergeError, match=r"model.layers.1.self_attn.k_proj.bias.*not in .*coder_missing"):
        merge_checkpoints(tiny["base"], [tiny["vlm"], coder], str(tmp_path / "out"), MergeSpec())
    assert_no_output(tmp_path, "out")


def test_error_shape_mismatch(tiny, tmp_path):
    coder = str(tmp_path / "coder_shape")
    reshard(tiny["coder"], coder, 10**9,
             edit=lambda n, a: a[:, :-2] if n == "model.layers.0.mlp.down_proj.weight" else a)
    with pytest.raises(MergeError, match=r"model.layers.0.mlp.down_proj.weight: model 2 has shape \[64, 126\]"):
        merge_checkpoints(tiny["base"], [tiny["vlm"], coder], str(tmp_path / "out"), MergeSpec())
    assert_no_output(tmp_path, "out")


def test_error_dtype_cannot_be_merged(tiny, tmp_path):
    coder = str(tmp_path / "coder_int")
    reshard(tiny["coder"], coder, 10**9,
             edit=lambda n, a: a.astype(np.int32) if n == "model.norm.weight" else a)
    with pytest.raises(MergeError, match=r"model.norm.weight: dtype int32"):
        merge_checkpoints(tiny["base"], [tiny["vlm"], coder], str(tmp_path / "out"), MergeSpec())
    assert_no_output(tmp_path, "out")


def test_error_weights_wrong_length(tiny, tmp_path):
    with pytest.raises(MergeError, match="2 models to merge but 3 weights"):
        merge_checkpoints(tiny["base"], [tiny["vlm"], tiny["coder"]], str(tmp_path / "out"),
                          MergeSpec(weights=(0.5, 0.3, 0.2)))
    assert_no_output(tmp_path, "out")


def test_error_unwritable_output(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises((MergeError, OSError), match="file"):
        merge_checkpoints(tiny["base"], [tiny["vlm"], tiny["coder"]], str(blocker / "out"), MergeSpec())
    assert blocker.read_text() == "not a directory"


def test_error_disk_full_leaves_nothing(tiny, tmp_path, monkeypatch):
    from viscodex_jax.checkpoint import planned_writer

    calls = {"n": 0}
    real = planned_writer.open_shard

    def failing(path):
        calls["n"] += 1
        if calls["n"] == 2:  # the second shard hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(planned_writer, "open_shard", failing)
    with pytest.raises(MergeError, match="No space left on device"):
        merge_checkpoints(tiny["base"], [tiny["vlm"], tiny["coder"]], str(tmp_path / "out"), MergeSpec(),
                          max_shard_bytes=300_000)
    assert calls["n"] == 2
    assert_no_output(tmp_path, "out")


def test_config_recipe_and_lambda_sweep(tiny, tmp_path):
    import importlib.util

    from viscodex_jax.merge.recipe import run_merge, spec_from_config
    from viscodex_jax.merge.sweep import lambda_sweep

    spec = importlib.util.spec_from_file_location("cfg", os.path.join(os.path.dirname(__file__), "..", "configs",
                                                                     "merge_viscodex_33b.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    assert c.lam == 0.85 and c.method == "task_arithmetic"
    c.base_dir, c.vlm_dir, c.coder_dir = tiny["base"], tiny["vlm"], tiny["coder"]
    c.out_dir, c.orbax_dir = str(tmp_path / "hf"), str(tmp_path / "orbax")
    c.merge_embeddings = False
    s = spec_from_config(c)
    assert np.allclose(s.weights, (0.85, 0.15)) and not s.merges("model/embed_tokens/embedding") and s.merges("model/norm/scale")
    report = run_merge(c)
    assert "model.embed_tokens.weight" in report["copied"] and os.path.isdir(c.orbax_dir)
    c.out_dir = str(tmp_path / "sweep")
    os.makedirs(c.out_dir)
    scores = {}

    def score(model, lam):  # distance of the merged norm from the VLM's: grows as lam moves away from 1
        got = np.asarray(model.params["model"]["norm"]["scale"]).astype(np.float32)
        ref = checkpoint.load_hf_params(tiny["vlm"])[1]["model"]["norm"]["scale"]
        scores[lam] = float(np.abs(got - ref).sum())
        return scores[lam]

    result = lambda_sweep(c, [0.7, 0.9], score=score)
    assert [r["lam"] for r in result["rows"]] == [0.7, 0.9] and result["best_lam"] == 0.9
    assert json.load(open(os.path.join(c.out_dir, "sweep.json")))["best_lam"] == 0.9
    assert list(scores) == [0.7, 0.9]  # each call is told the lam it scores
    assert [r["score"] for r in result["rows"]] == [scores[0.7], scores[0.9]] and scores[0.7] > scores[0.9]
    assert sorted(d for d in os.listdir(c.out_dir) if d.startswith("lam_")) == ["lam_0.9"]  # the best one only
    with pytest.raises(MergeError, match="--config.base_dir"):
        c.base_dir = ""
        run_merge(c)


def _st_tensors(d):
    from viscodex_jax.checkpoint.safetensors_io import SafetensorsFile

    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            sf = SafetensorsFile(os.path.join(d, f))
            out.update({n: (f, sf.read(n)) for n in sf.keys()})
    return out


def test_planned_writer_writes_the_shards_sharded_writer_writes(tmp_path):
    """Pieces written out of order land where they belong; shard split, file names, index and bytes are
    ShardedWriter's; a tensor left incomplete is named at finish."""
    import ml_dtypes

    from viscodex_jax.checkpoint.planned_writer import PlannedWriter
    from viscodex_jax.checkpoint.safetensors_io import CheckpointError, ShardedWriter

    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((30, 7)).astype(ml_dtypes.bfloat16), "empty": np.zeros((0, 3), np.float32),
               "b": rng.standard_normal(50).astype(np.float32), "c": rng.standard_normal((9, 4, 2)).astype(np.float16)}
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    sw = ShardedWriter(str(old), max_shard_bytes=300)
    for k, v in tensors.items():
        sw.add(k, v)
    old_names = sw.finish()
    pw = PlannedWriter(str(new), [(k, v.dtype, v.shape) for k, v in tensors.items()], max_shard_bytes=300)
    for k in reversed(list(tensors)):
        flat = tensors[k].reshape(-1)
        for lo in reversed(range(0, max(flat.size, 1), 17)):
            pw.write(k, flat[lo:lo + 17], lo)
    assert pw.finish() == old_names and len(old_names) > 1
    got, want = _st_tensors(str(new)), _st_tensors(str(old))
    assert got.keys() == want.keys() == tensors.keys()
    for k in tensors:
        assert got[k][0] == want[k][0] and got[k][1].dtype == tensors[k].dtype
        np.testing.assert_array_equal(got[k][1].view(np.uint8), tensors[k].view(np.uint8))
    with open(old / "model.safetensors.index.json") as f1, open(new / "model.safetensors.index.json") as f2:
        assert json.load(f1) == json.load(f2)
    part = tmp_path / "part"
    part.mkdir()
    pw = PlannedWriter(str(part), [("x", np.float32, (4,))])
    pw.write("x", np.zeros(3, np.float32))
    with pytest.raises(CheckpointError, match="'x': 12 of its 16 bytes written"):
        pw.finish()
    pw.abort()
    with pytest.raises(CheckpointError, match="'x': planned as float32, written as float64"):
        PlannedWriter(str(tmp_path), [("x", np.float32, (4,))]).write("x", np.zeros(4))


def test_file_tensor_reads_element_ranges_and_rows(tmp_path):
    from viscodex_jax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
    from viscodex_jax.merge.file_tensor import FileTensor

    x = np.arange(6 * 5, dtype=np.float32).reshape(6, 5)
    path = str(tmp_path / "t.safetensors")
    write_safetensors(path, {"pad": np.ones(3, np.float16), "x": x})
    ref = FileTensor.of(SafetensorsFile(path), "x")
    assert ref.shape == (6, 5) and ref.dtype == np.float32 and ref.nbytes == x.nbytes
    np.testing.assert_array_equal(np.asarray(ref), x)
    out = np.empty(8, np.float32)
    ref.read_into(out, 7, 15)
    np.testing.assert_array_equal(out, x.reshape(-1)[7:15])
    np.testing.assert_array_equal(np.asarray(ref[2:5]), x[2:5])
    np.testing.assert_array_equal(np.asarray(ref[:4][1:3]), x[1:3])
    assert ref[4:].shape == (2, 5)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_flat_chunks_and_padding_leave_the_merge_and_its_counts_unchanged(monkeypatch, method):
    """Unkeyed methods run in flat chunks padded with zeros to one of two sizes: the merged values are those
    of one whole-tensor call, and the padding never counts as kept."""
    from viscodex_jax.merge import tensor as merge_mod

    rng = np.random.default_rng(3)
    base = rng.standard_normal((37, 11)).astype(np.float32)
    thetas = [base + rng.standard_normal(base.shape).astype(np.float32) * 0.1 for _ in range(2)]
    spec = MergeSpec(method=method, weights=(0.6, 0.4), density=0.3 if method == "ties" else 1.0,
                     out_dtype="float32")
    whole, s1 = merge_mod.merge_tensor("w", base, thetas, spec)
    monkeypatch.setattr(merge_mod, "UNKEYED_CHUNK_ELEMENTS", 100)  # 4 full chunks and a padded small tail
    monkeypatch.setattr(merge_mod, "SMALL_CHUNK_ELEMENTS", 16)
    pieces = {}
    out, s2 = merge_mod.merge_tensor("w", base, thetas, spec, sink=lambda lo, x: pieces.setdefault(lo, x.copy()))
    assert out is None and sorted(pieces) == [0, 100, 200, 300, 400]
    np.testing.assert_array_equal(np.concatenate([pieces[k] for k in sorted(pieces)]), np.asarray(whole).reshape(-1))
    np.testing.assert_array_equal(s1["kept_fraction"], s2["kept_fraction"])
    if method == "ties":
        kept = np.ceil(0.3 * base.size) / base.size
        assert all(k == kept for k in s2["kept_fraction"])  # no ties at the cut in random floats
    np.testing.assert_allclose(s1["task_vector_norms"], s2["task_vector_norms"], rtol=1e-6)
