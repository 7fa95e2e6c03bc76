"""Hostile checkpoints, config.json files and merge settings (issue 13): each ends in an error that names
what was wrong, and leaves no output or temp dir behind."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from viscodex_jax import checkpoint
from viscodex_jax.checkpoint import CheckpointError
from viscodex_jax.utils import _host, remove_stale_temp_dirs
from viscodex_jax.utils import flatten
from viscodex_jax.checkpoint.safetensors_io import SafetensorsFile
from viscodex_jax.merge import MergeError, MergeSpec, merge_checkpoints, merge_params
from viscodex_jax.merge.report import UNRELATED_BASE_COSINE
from viscodex_jax.merge.tensor import merge_tensor
from viscodex_jax.merge.recipe import run_merge, spec_from_config
from viscodex_jax.merge.sweep import lambda_sweep, parse_sweep_lams
from viscodex_jax.model.config import ConfigError, config_from_dict, read_config_json
from viscodex_jax.testing.asserts import assert_no_output
from viscodex_jax.testing.checkpoints import rewrite_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy(src: str, dst) -> str:
    shutil.copytree(src, str(dst))
    return str(dst)


def _set_value(name: str, value: float, index: int = 0):
    def edit(t):
        t[name] = t[name].copy()
        t[name].reshape(-1)[index] = value
    return edit


def _edit_header(ckpt: str, edit) -> str:
    """Rewrites the JSON header of model.safetensors in place, keeping the data bytes."""
    path = os.path.join(ckpt, "model.safetensors")
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * ((-len(new)) % 8)
    with open(path, "wb") as f:
        f.write(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    return path


def _convert_fails(src: str, tmp_path, exc, *patterns: str, **kw):
    with pytest.raises(exc) as e:
        checkpoint.convert_hf_to_orbax(src, str(tmp_path / "out"), **kw)
    for p in patterns:
        assert p in str(e.value), f"{p!r} not in: {e.value}"
    assert_no_output(tmp_path, "out")
    return e.value


@pytest.fixture
def vl(hf_checkpoint, tmp_path):
    """A writable copy of the tiny VL checkpoint vl_a (one model.safetensors)."""
    return _copy(hf_checkpoint("vl_a"), tmp_path / "src")


# ---------------------------------------------------------------------------------- loading: values


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_tensor_is_refused_by_the_converter_and_named(vl, tmp_path, value):
    name = "model.layers.1.mlp.up_proj.weight"
    path = rewrite_tensors(vl, _set_value(name, value, index=7))
    _convert_fails(vl, tmp_path, CheckpointError, path, repr(name), "1 of", "NaN/Inf")
    # the option is real: off, the same file loads (plain loading keeps it off by default)
    _, params = checkpoint.load_hf_params(vl, check_finite=False)
    assert not np.isfinite(params["model"]["layers"]["mlp"]["up_proj"]["kernel"]).all()
    with pytest.raises(CheckpointError, match="up_proj"):
        checkpoint.load_params(vl, check_finite=True)


def test_cast_overflow_is_named_as_such(vl, tmp_path):
    rewrite_tensors(vl, _set_value("model.norm.weight", 1e6))
    _convert_fails(vl, tmp_path, CheckpointError, "'model.norm.weight'", "after casting to float16",
                   dtype=np.float16)


def test_orbax_to_hf_refuses_non_finite_params_naming_the_param(vl, tmp_path):
    rewrite_tensors(vl, _set_value("visual.blocks.0.attn.qkv.weight", np.nan))
    orbax = str(tmp_path / "orbax")
    checkpoint.convert_hf_to_orbax(vl, orbax, check_finite=False)  # explicitly let it through once
    with pytest.raises(CheckpointError, match=r"orbax/params: param visual/blocks/attn/qkv/kernel: 1 of"):
        checkpoint.convert_orbax_to_hf(orbax, str(tmp_path / "hf"))
    assert_no_output(tmp_path, "hf")


def test_orbax_to_hf_refuses_a_cast_that_overflows(vl, tmp_path):
    rewrite_tensors(vl, _set_value("model.norm.weight", 1e6))
    orbax = str(tmp_path / "orbax")
    checkpoint.convert_hf_to_orbax(vl, orbax)  # finite in float32
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' cast to float16: 1 of 64 values are NaN/Inf"):
        checkpoint.convert_orbax_to_hf(orbax, str(tmp_path / "hf"), dtype=np.float16)
    assert_no_output(tmp_path, "hf")


# ---------------------------------------------------------------------------------- loading: headers


def test_aliased_byte_ranges_are_refused(vl, tmp_path):
    a, b = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"
    path = _edit_header(vl, lambda h: h[a].__setitem__("data_offsets", h[b]["data_offsets"]))
    _convert_fails(vl, tmp_path, CheckpointError, path, a, b, "overlap")


def test_partly_overlapping_byte_ranges_are_refused(vl, tmp_path):
    names = []

    def edit(h):  # shift the last tensor's range back by 8 bytes, into its neighbour's
        name = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        b, e = h[name]["data_offsets"]
        h[name]["data_offsets"] = [b - 8, e - 8]
        names.append(name)
    path = _edit_header(vl, edit)
    _convert_fails(vl, tmp_path, CheckpointError, path, repr(names[0]), "overlap")


def test_out_of_bounds_byte_range_is_refused(vl, tmp_path):
    name = "model.norm.weight"

    def edit(h):
        size = max(e["data_offsets"][1] for k, e in h.items() if k != "__metadata__")
        h[name]["data_offsets"] = [size + 64, size + 64 + 4 * 64]
    path = _edit_header(vl, edit)
    _convert_fails(vl, tmp_path, CheckpointError, path, repr(name), "data ends at byte")


def test_integer_dtype_declared_for_float_data_is_refused(vl, tmp_path):
    path = _edit_header(vl, lambda h: h["model.norm.weight"].__setitem__("dtype", "I32"))
    _convert_fails(vl, tmp_path, CheckpointError, path, "'model.norm.weight'", "int32",
                   "model/norm/scale is a floating-point parameter")


def test_dtype_whose_size_disagrees_with_the_byte_range_is_refused(vl, tmp_path):
    path = _edit_header(vl, lambda h: h["model.norm.weight"].__setitem__("dtype", "F16"))
    _convert_fails(vl, tmp_path, CheckpointError, path, "'model.norm.weight'", "does not fit shape [64] of F16")


def test_metadata_that_is_not_an_object_is_refused(vl, tmp_path):
    path = _edit_header(vl, lambda h: h.__setitem__("__metadata__", ["pt"]))
    _convert_fails(vl, tmp_path, CheckpointError, path, "__metadata__ is not an object")


@pytest.mark.parametrize("shape,pattern", [([-1, -64], "negative dimension"), ([2.5, 25.6], "not a list of integers")])
def test_bad_shapes_in_the_header_are_refused(vl, tmp_path, shape, pattern):
    path = _edit_header(vl, lambda h: h["model.norm.weight"].__setitem__("shape", shape))
    _convert_fails(vl, tmp_path, CheckpointError, path, "'model.norm.weight'", pattern)


def _move_into_index(ckpt: str, target_dir: str, entry: str) -> str:
    """Moves model.safetensors to ``target_dir`` and writes an index that lists it as ``entry``."""
    os.makedirs(target_dir, exist_ok=True)
    moved = os.path.join(target_dir, "m.safetensors")
    shutil.move(os.path.join(ckpt, "model.safetensors"), moved)
    names = SafetensorsFile(moved).keys()
    index = os.path.join(ckpt, "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: entry for k in names}}, f)
    return index


@pytest.mark.parametrize("absolute", [False, True])
def test_index_paths_outside_the_checkpoint_dir_are_refused(vl, tmp_path, absolute):
    outside = str(tmp_path / "outside")
    entry = os.path.join(outside, "m.safetensors") if absolute else "sub/../../outside/m.safetensors"
    index = _move_into_index(vl, outside, entry)
    _convert_fails(vl, tmp_path, CheckpointError, index, repr(entry), "outside the checkpoint directory")


def test_hub_cache_symlinks_inside_the_dir_still_load(vl, hf_checkpoint, tmp_path):
    """The hub cache stores files as symlinks into ../../blobs: the index check is on names, not targets."""
    blobs = str(tmp_path / "blobs")
    _move_into_index(vl, blobs, "model.safetensors")
    os.symlink(os.path.join(blobs, "m.safetensors"), os.path.join(vl, "model.safetensors"))
    got = flatten(checkpoint.load_hf_params(vl)[1])
    ref = flatten(checkpoint.load_hf_params(hf_checkpoint("vl_a"))[1])
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)


# ---------------------------------------------------------------------------------- config.json


def _text(c, k, v):
    c["text_config"][k] = v


def _vision(c, k, v):
    c["vision_config"][k] = v


@pytest.mark.parametrize("edit,pattern", [
    (lambda c: _text(c, "num_key_value_heads", 3), "text_config: num_key_value_heads=3 must divide num_attention_heads=4"),
    (lambda c: _text(c, "num_key_value_heads", 0), "text_config: num_key_value_heads must be >= 1, got 0"),
    (lambda c: _text(c, "rms_norm_eps", "abc"), "text_config: rms_norm_eps must be a positive finite number, got 'abc'"),
    (lambda c: _text(c, "rms_norm_eps", -1e-6), "rms_norm_eps must be a positive finite number, got -1e-06"),
    (lambda c: _text(c, "hidden_size", "64"), "text_config: hidden_size must be an integer, got '64'"),
    (lambda c: _text(c, "num_hidden_layers", 2.5), "num_hidden_layers must be an integer, got 2.5"),
    (lambda c: _text(c, "hidden_size", 36), "hidden_size=36 / num_attention_heads=4 must be an even integer"),
    (lambda c: _text(c, "vocab_size", True), "vocab_size must be an integer, got True"),
    (lambda c: c["text_config"]["rope_parameters"].__setitem__("rope_theta", -1.0), "rope_theta must be a positive"),
    (lambda c: c["text_config"]["rope_parameters"].__setitem__("mrope_section", [2, "3", 3]), "mrope_section must be"),
    (lambda c: c["text_config"].__setitem__("rope_parameters", [1]), "rope_parameters: expected a JSON object"),
    (lambda c: c.__setitem__("text_config", [1, 2]), "text_config: expected a JSON object, got list"),
    (lambda c: c.__setitem__("vision_config", "none"), "vision_config: expected a JSON object, got str"),
    (lambda c: c.__setitem__("tie_word_embeddings", "false"), "tie_word_embeddings must be true or false, got 'false'"),
    (lambda c: _vision(c, "fullatt_block_indexes", [1, 7]), "fullatt_block_indexes must be a list of integers in [0, 3)"),
    (lambda c: _vision(c, "num_heads", 3), "vision_config: num_heads=3 must divide hidden_size=32"),
    (lambda c: _vision(c, "patch_size", 0), "vision_config: patch_size must be >= 1, got 0"),
    (lambda c: c.__setitem__("image_token_id", -5), "image_token_id must be >= 0, got -5"),
], ids=["kv_not_dividing", "kv_zero", "eps_string", "eps_negative", "hidden_string", "layers_float", "heads_odd_dim",
        "vocab_bool", "theta_negative", "mrope_string", "rope_list", "text_list", "vision_str", "tie_string",
        "fullatt_range", "vision_heads", "patch_zero", "token_negative"])
def test_config_errors_name_the_field(hf_checkpoint, edit, pattern):
    where = "/ckpt/config.json"
    good = read_config_json(hf_checkpoint("vl_a"))
    config_from_dict(copy.deepcopy(good), where)  # the unedited config is fine
    bad = copy.deepcopy(good)
    edit(bad)
    with pytest.raises(ConfigError) as e:
        config_from_dict(bad, where)
    assert where in str(e.value) and pattern in str(e.value), str(e.value)


def test_config_json_that_is_a_list_is_a_config_error_naming_the_file(vl, tmp_path):
    cfg_path = os.path.join(vl, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    with open(cfg_path, "w") as f:
        json.dump([cfg], f)
    _convert_fails(vl, tmp_path, ConfigError, cfg_path, "expected a JSON object, got list")


# ---------------------------------------------------------------------------------- temp dirs of killed runs

from test_convert_stream import KILL_9_MID_STREAM as _KILLED_CONVERT  # noqa: E402  (kill -9 mid-stream)


def test_kill_9_during_hf_to_orbax_leaves_a_temp_dir_that_the_next_run_removes(hf_checkpoint, tmp_path):
    src, out = hf_checkpoint("qwen2_tied_gqa3"), str(tmp_path / "out")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.run([sys.executable, "-c", _KILLED_CONVERT, src, out], env=env, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    stale = [f for f in os.listdir(tmp_path) if f.startswith(".out.tmp-")]
    assert len(stale) == 1 and f"-{_host()}-" in stale[0] and not os.path.exists(out)
    # Temp dirs that are not provably dead and ours must survive: a live pid, another host, the old naming.
    live = tmp_path / f".out.tmp-{_host()}-{os.getpid()}-live"
    other_host = tmp_path / f".out.tmp-{_host()}x-{1 << 22}-other"
    legacy = tmp_path / ".out.tmp-k3j2h1"
    unrelated = tmp_path / ".outx.tmp-dead"
    for d in (live, other_host, legacy, unrelated):
        d.mkdir()
    checkpoint.convert_hf_to_orbax(src, out)
    assert os.path.isfile(os.path.join(out, "config.json"))
    assert not os.path.exists(tmp_path / stale[0])
    assert all(d.is_dir() for d in (live, other_host, legacy, unrelated))


def test_stale_temp_dir_of_a_dead_pid_is_removed_and_reported(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".x.tmp-{_host()}-{dead.pid}-abc_1"
    (stale / "sub").mkdir(parents=True)
    assert remove_stale_temp_dirs(str(tmp_path / "x")) == [str(stale)]
    assert not stale.exists()
    assert socket.gethostname()  # the naming relies on a host name


# ---------------------------------------------------------------------------------- merge settings


@pytest.mark.parametrize("kw,pattern", [
    (dict(out_dtype="int8"), "out_dtype='int8': int8 is not a floating dtype"),
    (dict(out_dtype="float99"), "out_dtype='float99': not a dtype; choose from bfloat16, float16, float32"),
    (dict(out_dtype="bool"), "bool is not a floating dtype"),
    (dict(lam=1e30), r"lam (the final scale) must be in (0, 2], got 1e+30"),
    (dict(lam=-2.0), "lam (the final scale) must be in (0, 2], got -2"),
    (dict(lam=float("nan")), "lam (the final scale) must be finite, got nan"),
    (dict(weights=(2, 3)), "weights=[2.0, 3.0]: each weight must be in [0, 1]"),
    (dict(weights=(1e30, 1e30)), "weights=[1e+30, 1e+30]: each weight must be in [0, 1]"),
    (dict(weights=()), "weights must be a non-empty sequence"),
    (dict(weights=(0.5, float("inf"))), "weights[1] must be finite, got inf"),
    (dict(weights=(0.0, 0.0), method="linear"), "sum to 0, but this method divides by their sum"),
    (dict(group_weights=((r"/self_attn/", (1.7, -0.7)),)), "group_weights['/self_attn/']=[1.7, -0.7]"),
    (dict(group_weights=((r"/mlp/", (float("nan"), 0.5)),)), "group_weights['/mlp/'][0] must be finite"),
    (dict(density=float("nan")), "density must be in (0, 1], got nan"),
    (dict(exclude=("(mlp",)), "exclude: '(mlp' is not a valid regex"),
])
def test_merge_spec_rejects_bad_numbers_and_dtypes(kw, pattern):
    with pytest.raises(MergeError) as e:
        MergeSpec(**kw)
    assert pattern in str(e.value), str(e.value)


def test_allow_unusual_weights_lifts_ranges_but_not_finiteness():
    base = np.zeros((4, 3), np.float32)
    a, b = np.ones_like(base), np.full_like(base, 2.0)
    spec = MergeSpec(weights=(-0.5, 1.5), lam=3.0, out_dtype="float32", allow_unusual_weights=True)
    out, _ = merge_tensor("w", base, [a, b], spec)
    np.testing.assert_allclose(np.asarray(out), 3.0 * (-0.5 * a + 1.5 * b))
    with pytest.raises(MergeError, match="must be finite"):
        MergeSpec(weights=(np.nan, 1.0), allow_unusual_weights=True)
    with pytest.raises(MergeError, match="must be finite"):
        MergeSpec(lam=np.inf, allow_unusual_weights=True)


def _merge_config(tiny_set, tmp_path, **over):
    spec = importlib.util.spec_from_file_location("merge_cfg", os.path.join(ROOT, "configs", "merge_viscodex_8b.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.base_dir, c.vlm_dir, c.coder_dir = tiny_set["base"], tiny_set["vlm"], tiny_set["coder"]
    c.out_dir = str(tmp_path / "hf")
    for k, v in over.items():
        setattr(c, k, v)
    return c


@pytest.mark.parametrize("over,pattern", [
    (dict(scale=1e30), "--config.scale=1e+30: lam (the final scale) must be in (0, 2]"),
    (dict(scale=-2.0), "--config.scale=-2.0: lam (the final scale) must be in (0, 2]"),
    (dict(attn_lam=1.7), "--config.attn_lam must be -1 (off) or in [0, 1], got 1.7"),
    (dict(attn_lam=float("nan")), "--config.attn_lam must be finite, got nan"),
    (dict(attn_lam=-0.5), "--config.attn_lam must be -1 (off) or in [0, 1], got -0.5"),
    (dict(lam=float("nan")), "--config.lam must be finite, got nan"),
    (dict(lam=1.3), "--config.lam must be in [0, 1], got 1.3"),
    (dict(out_dtype="int8"), "--config.out_dtype='int8': out_dtype='int8': int8 is not a floating dtype"),
    (dict(out_dtype="float99"), "--config.out_dtype='float99'"),
])
def test_merge_config_rejects_bad_settings_naming_the_flag(tmp_path, over, pattern):
    c = _merge_config({"base": "", "vlm": "", "coder": ""}, tmp_path, **over)
    with pytest.raises(MergeError) as e:
        spec_from_config(c)
    assert pattern in str(e.value), str(e.value)


def test_merge_config_allow_unusual_weights(tmp_path):
    c = _merge_config({"base": "", "vlm": "", "coder": ""}, tmp_path, lam=1.3, attn_lam=-0.5, scale=2.5,
                      allow_unusual_weights=True)
    s = spec_from_config(c)
    assert s.weights == (1.3, 1.0 - 1.3) and s.lam == 2.5 and s.group_weights == ((r"/self_attn/", (-0.5, 1.5)),)


# ---------------------------------------------------------------------------------- merging checkpoints


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    return tiny_checkpoints(21)


def _merge_fails(tiny_set, tmp_path, exc, *patterns, vlm=None, coder=None, base=None, **kw):
    with pytest.raises(exc) as e:
        merge_checkpoints(base or tiny_set["base"], [vlm or tiny_set["vlm"], coder or tiny_set["coder"]],
                          str(tmp_path / "merged"), MergeSpec(), **kw)
    for p in patterns:
        assert p in str(e.value), f"{p!r} not in: {e.value}"
    assert_no_output(tmp_path, "merged")


@pytest.mark.parametrize("case", ["swapped", "base_as_vlm"])
def test_vlm_without_a_vision_tower_is_refused(tiny, tmp_path, case):
    vlm, coder = (tiny["coder"], tiny["vlm"]) if case == "swapped" else (tiny["base"], tiny["coder"])
    c = _merge_config(tiny, tmp_path, vlm_dir=vlm, coder_dir=coder)
    with pytest.raises(MergeError) as e:
        run_merge(c)
    assert f"--config.vlm_dir={vlm!r}" in str(e.value) and "no vision tower" in str(e.value)
    assert_no_output(tmp_path, "hf")
    # the library driver refuses it too when asked to (the recipe always asks)
    _merge_fails(tiny, tmp_path, MergeError, vlm, "no vision tower", vlm=vlm, coder=coder, require_vision=True)


def test_vlm_missing_part_of_its_vision_tower_is_refused(tiny, tmp_path):
    vlm = _copy(tiny["vlm"], tmp_path / "vlm_cut")
    rewrite_tensors(vlm, lambda t: t.pop("visual.blocks.2.mlp.down_proj.weight"))
    _merge_fails(tiny, tmp_path, MergeError, vlm, "'visual.blocks.2.mlp.down_proj.weight'", vlm=vlm)


def test_non_finite_copied_vision_tensor_is_refused(tiny, tmp_path):
    vlm = _copy(tiny["vlm"], tmp_path / "vlm_nan")
    path = rewrite_tensors(vlm, _set_value("visual.blocks.0.mlp.up_proj.weight", np.inf, index=3))
    _merge_fails(tiny, tmp_path, MergeError, path, "'visual.blocks.0.mlp.up_proj.weight'", "NaN/Inf: 1 of", vlm=vlm)
    # in memory too
    cfg, v = checkpoint.load_hf_params(vlm)
    _, b = checkpoint.load_hf_params(tiny["base"])
    _, c = checkpoint.load_hf_params(tiny["coder"])
    with pytest.raises(MergeError, match="visual/blocks/mlp/up_proj/kernel.*NaN/Inf"):
        merge_params(b, [v, c], MergeSpec(), cfg, model_names=["vlm", "coder"])


def test_negative_shape_header_in_merge_is_a_named_error(tiny, tmp_path):
    coder = _copy(tiny["coder"], tmp_path / "coder_neg")
    path = _edit_header(coder, lambda h: h["model.norm.weight"].__setitem__("shape", [-1, -64]))
    _merge_fails(tiny, tmp_path, CheckpointError, path, "'model.norm.weight'", "negative dimension", coder=coder)


def test_unrelated_base_warns_with_the_numbers(tiny, tmp_path, caplog):
    normal = merge_checkpoints(tiny["base"], [tiny["vlm"], tiny["coder"]], str(tmp_path / "ok"), MergeSpec())
    assert normal["warnings"] == [] and abs(normal["summary"]["mean_cosine_model1_model2"]) < 0.05
    rng = np.random.default_rng(0)
    other = _copy(tiny["base"], tmp_path / "other_base")  # shares nothing: the same offset lands in both task vectors
    rewrite_tensors(other, lambda t: t.update({k: (v + rng.normal(0, 0.05, v.shape)).astype(v.dtype) for k, v in t.items()}))
    with caplog.at_level(logging.WARNING, logger="viscodex_jax.merge.drivers"):
        report = merge_checkpoints(other, [tiny["vlm"], tiny["coder"]], str(tmp_path / "odd"), MergeSpec())
    cos = report["summary"]["mean_cosine_model1_model2"]
    assert cos > UNRELATED_BASE_COSINE
    (w,) = report["warnings"]
    assert f"mean cosine {cos:.3f}" in w and "other_base looks unrelated" in w and "Task-vector norms: vlm" in w
    assert w in caplog.text
    assert json.load(open(tmp_path / "odd" / "merge_report.json"))["warnings"] == [w]


def test_model_equal_to_the_base_warns(tiny, caplog):
    cfg, b = checkpoint.load_hf_params(tiny["base"])
    _, c = checkpoint.load_hf_params(tiny["coder"])
    with caplog.at_level(logging.WARNING, logger="viscodex_jax.merge.drivers"):
        _, report = merge_params(b, [b, c], MergeSpec(), cfg, model_names=["same", "coder"])
    assert any("task vector of same is zero" in w for w in report["warnings"]) and "is zero" in caplog.text


# ---------------------------------------------------------------------------------- partial outputs


def test_existing_orbax_dir_is_refused_before_anything_is_written(tiny, tmp_path):
    orbax = tmp_path / "orbax"
    orbax.mkdir()
    c = _merge_config(tiny, tmp_path, orbax_dir=str(orbax))
    with pytest.raises(FileExistsError, match=r"--config.orbax_dir=.*orbax' already exists"):
        run_merge(c)
    assert_no_output(tmp_path, "hf")
    assert os.listdir(orbax) == []


def test_failed_orbax_conversion_removes_the_hf_output(tiny, tmp_path, monkeypatch):
    from viscodex_jax import checkpoint as ckpt_mod

    def fails(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "convert_hf_to_orbax", fails)
    c = _merge_config(tiny, tmp_path, orbax_dir=str(tmp_path / "orbax"))
    with pytest.raises(OSError, match="No space left"):
        run_merge(c)
    assert_no_output(tmp_path, "hf")
    assert_no_output(tmp_path, "orbax")


@pytest.mark.parametrize("lams,pattern", [
    ([0.7, float("nan")], "--config.sweep_lams: nan: lam must be finite"),
    ([0.7, 1.5], "--config.sweep_lams: 1.5: --config.lam must be in [0, 1]"),
    ([0.7, 0.70], "--config.sweep_lams: 0.7 and 0.7 both write lam_0.7"),
    ([], "--config.sweep_lams is empty"),
])
def test_bad_sweep_value_is_rejected_before_any_work(tiny, tmp_path, lams, pattern):
    c = _merge_config(tiny, tmp_path, out_dir=str(tmp_path / "sweep"))
    scored = []
    with pytest.raises(MergeError) as e:
        lambda_sweep(c, lams, score=lambda model, lam: scored.append(lam))
    assert pattern in str(e.value) and scored == []
    assert not os.path.exists(c.out_dir)


def test_sweep_refuses_an_existing_lam_dir_up_front(tiny, tmp_path):
    c = _merge_config(tiny, tmp_path, out_dir=str(tmp_path / "sweep"))
    os.makedirs(os.path.join(c.out_dir, "lam_0.9"))
    with pytest.raises(FileExistsError, match="lam_0.9"):
        lambda_sweep(c, [0.7, 0.9], score=lambda model, lam: 0.0)
    assert sorted(os.listdir(c.out_dir)) == ["lam_0.9"]


def test_non_positive_shard_size_is_refused_before_any_work(tiny, tmp_path):
    with pytest.raises(MergeError, match="--config.max_shard_mb must be > 0, got 0"):
        run_merge(_merge_config(tiny, tmp_path, max_shard_mb=0))
    assert_no_output(tmp_path, "hf")


def test_parse_sweep_lams_names_the_bad_entry():
    assert parse_sweep_lams("0.7, 0.85") == [0.7, 0.85]
    with pytest.raises(MergeError, match=r"entry 2 'abc' is not a number"):
        parse_sweep_lams("0.7,abc")


def test_merge_cli_prints_the_named_error_without_a_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "merge.py"),
                        f"--config={os.path.join(ROOT, 'configs', 'merge_viscodex_8b.py')}",
                        f"--config.base_dir={tmp_path}", f"--config.vlm_dir={tmp_path}",
                        f"--config.coder_dir={tmp_path}", f"--config.out_dir={tmp_path / 'o'}",
                        "--config.out_dtype=float99"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert "merge: --config.out_dtype='float99'" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
