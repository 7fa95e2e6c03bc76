"""The lam sweep (launch/sweep.py): one command on tiny checkpoints; in-memory merges equal the streamed ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from viscodex_jax import checkpoint
from viscodex_jax.merge import MergeError
from viscodex_jax.merge.recipe import merge_config
from viscodex_jax.merge.sweep import human_bytes, lambda_sweep
from viscodex_jax.utils import flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    return tiny_checkpoints(11)  # shared with test_merge_checkpoints; read-only here (outputs go to tmp_path)


def _config(tiny, out_dir, **over):
    c = merge_config()
    c.base_dir, c.vlm_dir, c.coder_dir, c.out_dir = tiny["base"], tiny["vlm"], tiny["coder"], str(out_dir)
    for k, v in over.items():
        setattr(c, k, v)
    return c


def _lam_dirs(d):
    return sorted(x for x in os.listdir(d) if x.startswith("lam_"))


@pytest.mark.parametrize("method,density,mesh", [("task_arithmetic", 1.0, ""), ("ties", 0.5, "1,4,2")])
def test_in_memory_params_equal_the_streamed_merge_bit_for_bit(tiny, tmp_path, method, density, mesh):
    """write_all: every lam's checkpoint is written by the streamed merge_checkpoints, so each can be compared.
    On a mesh the scored params are sharded by the training rules (checked), with the same bits."""
    import jax
    from jax.sharding import NamedSharding

    c = _config(tiny, tmp_path / "sweep", method=method, density=density, write_all=True, mesh=mesh)
    seen, split, per_device, lams_told = [], [], [], []

    def score(model, lam):  # keeps what was scored; 1, 2: lower is better, so the first lam wins
        leaves = flatten(model.params)
        seen.append({k: np.asarray(v) for k, v in leaves.items()})
        lams_told.append(lam)
        if mesh:
            assert model.mesh.devices.shape == (1, 4, 2)
            assert all(isinstance(v.sharding, NamedSharding) and v.sharding.mesh == model.mesh for v in leaves.values())
            split.append(sum(not v.sharding.is_fully_replicated for v in leaves.values()))
        else:
            assert all(v.sharding.device_set == {jax.devices()[0]} for v in leaves.values())
        per = {}
        for v in leaves.values():
            for shard in v.addressable_shards:
                per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
        per_device.append(max(per.values()))
        return float(len(seen))

    result = lambda_sweep(c, [0.7, 0.85], score=score)
    assert [r["lam"] for r in result["rows"]] == [0.7, 0.85] == lams_told and result["best_lam"] == 0.7
    assert _lam_dirs(c.out_dir) == ["lam_0.7", "lam_0.85"]
    for lam, got in zip((0.7, 0.85), seen):
        report = json.load(open(os.path.join(c.out_dir, f"lam_{lam:g}", "merge_report.json")))
        assert report["method"] == method and report["weights"] == [lam, 1.0 - lam]
        want = flatten(checkpoint.load_hf_params(os.path.join(c.out_dir, f"lam_{lam:g}"))[1])
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), "/".join(k)
    assert not np.array_equal(seen[0][("model", "norm", "scale")], seen[1][("model", "norm", "scale")])
    mem = result["memory_bytes"]  # the per-device share printed up front is what the devices then held
    assert per_device == [mem["per_device"]] * 2
    if mesh:
        assert min(split) > 0 and mem["per_device"] < mem["merged"]
    else:
        assert mem["per_device"] == mem["merged"]


def test_sweep_command_writes_table_plot_json_and_only_the_best_checkpoint(tiny, tmp_path):
    import viscodex_jax as vx
    from viscodex_jax.merge.heldout import DEFAULT_HELDOUT, heldout_loss

    out = tmp_path / "sweep"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "sweep.py"),
                        f"--config={os.path.join(ROOT, 'configs', 'merge_viscodex_8b.py')}",
                        f"--config.base_dir={tiny['base']}", f"--config.vlm_dir={tiny['vlm']}",
                        f"--config.coder_dir={tiny['coder']}", f"--config.out_dir={out}",
                        "--config.sweep_lams=0.7,0.9", "--config.score=heldout"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.load(open(out / "sweep.json"))
    scores = [row["score"] for row in result["rows"]]
    assert [row["lam"] for row in result["rows"]] == [0.7, 0.9] and all(np.isfinite(scores))
    assert result["higher_is_better"] is False and result["best_lam"] == [0.7, 0.9][int(np.argmin(scores))]
    best = f"lam_{result['best_lam']:g}"
    assert _lam_dirs(out) == [best] and sorted(os.listdir(out)) == sorted([best, "sweep.json", "sweep.md", "sweep.png"])
    assert open(out / "sweep.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = open(out / "sweep.md").read()
    assert f"| {result['best_lam']:g} (best) | {min(scores):.5g} |" in table and table.count("\n") == 4
    assert f"best lam: {result['best_lam']:g}" in r.stdout
    # the memory printed up front: the merged copy from the shapes is the size of the checkpoint written
    mem = result["memory_bytes"]
    written = sum(a.nbytes for a in flatten(checkpoint.load_hf_params(str(out / best))[1]).values())
    assert mem["merged"] == written and mem["host_total"] == mem["base"] + mem["vlm"] + mem["coder"] + written
    assert f"one merged copy {human_bytes(written)}" in r.stdout
    # the in-memory score is the score of the written checkpoint
    want = heldout_loss(vx.load(str(out / best), param_dtype=np.float32), DEFAULT_HELDOUT)
    assert min(scores) == pytest.approx(want, rel=1e-6)


def test_sweep_scores_mmcode_through_the_eval_runner(tiny, tmp_path):
    from viscodex_jax.eval.mmcode.benchmark import MMCode

    root = MMCode.make_sample(str(tmp_path / "mmcode"))
    c = _config(tiny, tmp_path / "sweep", score="mmcode", mmcode_root=root, eval_max_new_tokens=4,
                sweep_lams="0.7,0.9")
    result = lambda_sweep(c)
    assert result["metric"] == "MMCode pass@1 (%)" and result["higher_is_better"] is True
    for row in result["rows"]:
        assert 0.0 <= row["score"] <= 100.0
        items = [json.loads(x) for x in open(tmp_path / "sweep" / "eval" / f"lam_{row['lam']:g}" / "mmcode_items.jsonl")]
        assert len(items) == 3 and all(isinstance(it["generation"], str) for it in items)
        made = json.load(open(tmp_path / "sweep" / "eval" / f"lam_{row['lam']:g}" / "merge_spec.json"))
        assert f"weights=({row['lam']}, {1.0 - row['lam']})" in made["spec"] and set(made["inputs"]) == {
            "base_dir", "vlm_dir", "coder_dir"}
    assert _lam_dirs(c.out_dir) == [f"lam_{result['best_lam']:g}"]
    # the generation cache is keyed by what defines each in-memory merge, so the lams do not share it
    fps = {json.load(open(tmp_path / "sweep" / "eval" / f"lam_{lam}" / "summary.json"))["fingerprint"]
           for lam in (0.7, 0.9)}
    assert len(fps) == 2


@pytest.mark.parametrize("over,pattern", [
    (dict(score="bleu"), "--config.score='bleu': choose from heldout, mmcode"),
    (dict(score="mmcode", mmcode_root=""), "--config.mmcode_root='' is not a directory"),
    (dict(score="mmcode", eval_max_new_tokens=0), "--config.eval_max_new_tokens must be a positive integer"),
    (dict(sweep_lams="0.7,x"), "entry 2 'x' is not a number"),
    (dict(mesh="1,16,1"), "--config.mesh='1,16,1': mesh shape (1, 16, 1) needs 16 devices, have 8"),
    (dict(mesh="2,2"), "--config.mesh='2,2': expected three positive integers"),
])
def test_bad_sweep_settings_are_refused_before_any_work(tiny, tmp_path, over, pattern):
    c = _config(tiny, tmp_path / "sweep", sweep_lams="0.7", mmcode_root=str(tmp_path))
    for k, v in over.items():
        setattr(c, k, v)
    with pytest.raises(MergeError) as e:
        lambda_sweep(c)
    assert pattern in str(e.value), str(e.value)
    assert not os.path.exists(c.out_dir)


def test_merge_command_points_the_sweep_flag_to_launch_sweep(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "merge.py"),
                        f"--config={os.path.join(ROOT, 'configs', 'merge_viscodex_8b.py')}",
                        f"--config.out_dir={tmp_path / 'o'}", "--config.sweep_lams=0.7,0.8"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "run launch/sweep.py" in r.stderr and not os.path.exists(tmp_path / "o")


def test_a_non_finite_score_stops_the_sweep_before_any_output(tiny, tmp_path):
    c = _config(tiny, tmp_path / "sweep")
    scores = iter([1.0, float("nan")])
    with pytest.raises(MergeError, match="lam=0.8: the score is nan; a non-finite score cannot be ranked"):
        lambda_sweep(c, [0.7, 0.8], score=lambda model, lam: next(scores))
    assert os.listdir(c.out_dir) == []
