"""Guards for training, data and generation (issue 13): every bad input ends in a named error or a
counted skip, never a silent wrong result, a hang or a half-written output."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest

import viscodex_jax as vx
from viscodex_jax.data import mcd
from viscodex_jax.data import encode
from viscodex_jax.data.image_processor import ImageProcessorConfig
from viscodex_jax.testing.mcd_sample import make_mcd_sample
from viscodex_jax.data.pipeline import MCDEncode, MCDJsonSource, PipelineConfig, make_dataset
from viscodex_jax.data.tokenizer import build_qwen2_tokenizer, special_token_ids
from viscodex_jax.model.config import ConfigError, ModelConfig, TextConfig, VisionConfig
from viscodex_jax.sampling.loop import DecodeSettings, generate_ids
from viscodex_jax.testing.images import png_header_only, random_png
from viscodex_jax.testing.tiny import make_tiny_checkpoints
from viscodex_jax.train.config import base_config
from viscodex_jax.train.guards import NonFiniteError, ResumeError, check_finite
from viscodex_jax.train.loop import read_metrics, run_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_CFG = ImageProcessorConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)  # as the tiny VLM's


# ------------------------------------------------------------------ helpers


USER_IMG = {"role": "user", "content": "<image>\nWrite code for this chart."}
ANSWER = {"role": "assistant", "content": "import matplotlib.pyplot as plt\nplt.plot([1, 2])"}


def _write_bad_data(folder: str) -> tuple[str, dict[int, str]]:
    """A .json whose records 1..3 each fail a different way; returns (path, {index: reason})."""
    os.makedirs(os.path.join(folder, "mcd_images"), exist_ok=True)
    for name, data in (("ok.png", random_png(56, 56)), ("thin.png", random_png(8400, 28)),  # aspect ratio 300
                       ("bomb.png", png_header_only(12000, 12000))):
        with open(os.path.join(folder, "mcd_images", name), "wb") as f:
            f.write(data)
    records = [
        {"images": ["mcd_images/ok.png"], "messages": [USER_IMG, ANSWER]},
        {"images": ["mcd_images/thin.png"], "messages": [USER_IMG, ANSWER]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "print('\ud800')"}]},
        {"images": ["mcd_images/bomb.png"], "messages": [USER_IMG, ANSWER]},
        {"messages": [{"role": "user", "content": "text only"}, ANSWER]},
    ]
    path = os.path.join(folder, "bad.json")
    with open(path, "w") as f:
        json.dump(records, f)  # ensure_ascii: the lone surrogate travels as the escape \ud800
    return path, {1: mcd.BAD_IMAGE, 2: mcd.INVALID_TEXT, 3: mcd.IMAGE_TOO_LARGE}


@pytest.fixture(scope="module")
def tok():
    return build_qwen2_tokenizer(num_ranks=4096)


@pytest.fixture(scope="module")
def vl_cfg(tok):
    ids = special_token_ids(tok)
    vision = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          fullatt_block_indexes=(1,), window_size=56)
    return ModelConfig("qwen2_5_vl", TextConfig(-(-len(tok) // 64) * 64, 64, 128, 2, 4, 2, mrope_section=(2, 3, 3)),
                       vision, image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                       vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])


def _pipeline(path, tok, cfg, **kw):
    pc = dict(batch_size=2, max_len=256, patches_per_row=64, shuffle=False, shard_index=0, shard_count=1,
              prefetch=0, read_threads=1)
    pc.update(kw)
    stats = mcd.SkipStats()
    return make_dataset(MCDJsonSource(path), tok, cfg, PipelineConfig(**pc), IMAGE_CFG, stats=stats), stats


class _Deadline:
    """Fails the test instead of hanging it (the bug under test is an endless loop)."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self):
        def fire(signum, frame):
            raise TimeoutError(f"still running after {self.seconds}s: the pipeline loops")

        self.old = signal.signal(signal.SIGALRM, fire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


# ------------------------------------------------------------------ data


def test_each_bad_record_is_a_counted_skip_naming_file_and_record(tmp_path, tok, vl_cfg):
    path, expected = _write_bad_data(str(tmp_path))
    ds, stats = _pipeline(path, tok, vl_cfg)
    batches = list(ds)
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == 2  # records 0 and 4 only
    assert {r: stats.indices[r] for r in expected.values()} == {r: [i] for i, r in expected.items()}
    assert stats.total == 3

    # on_error=raise: the first bad record stops the pipeline with its file, index and reason
    ds, _ = _pipeline(path, tok, vl_cfg, on_error="raise")
    with pytest.raises(mcd.MCDRecordError, match=rf"{path}: record 1: bad_image: .*aspect ratio"):
        list(ds)


def test_any_exception_while_encoding_is_a_named_skip(tmp_path, tok, vl_cfg, monkeypatch):
    real = encode._tokenize_with_labels

    def flaky(tokenizer, text, spans):
        if "BOOM" in text:
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")
        return real(tokenizer, text, spans)

    monkeypatch.setattr(encode, "_tokenize_with_labels", flaky)
    enc = MCDEncode(tok, vl_cfg, max_len=256, image_cfg=IMAGE_CFG, on_error="skip")
    rec = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "BOOM"}]}
    el = {"index": 4, "file": "d.json", "record": json.dumps(rec), "images": []}
    assert enc.map(el) is None
    assert enc.stats.indices[mcd.ENCODE_ERROR] == [4]
    enc = MCDEncode(tok, vl_cfg, max_len=256, image_cfg=IMAGE_CFG, on_error="raise")
    with pytest.raises(mcd.MCDRecordError, match=r"d.json: record 4: encode_error: TypeError: TextEncodeInput"):
        enc.map(el)


def test_huge_image_is_refused_from_its_header_without_decoding(tmp_path, tok, vl_cfg, monkeypatch):
    assert PIL.Image.MAX_IMAGE_PIXELS == mcd.PIL_MAX_IMAGE_PIXELS  # set explicitly, not PIL's version default

    def no_decoding(self, *a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", no_decoding)
    limit = mcd.decode_limit(IMAGE_CFG.max_pixels)
    assert limit == 16 * IMAGE_CFG.max_pixels
    with pytest.raises(mcd.MCDRecordError, match=r"f.json: record 3: image_too_large: image 'b.png' is "
                                                 r"12000x12000 = 144000000 pixels"):
        mcd.decode_image(png_header_only(12000, 12000), "b.png", 3, "f.json", limit)
    # through the training encoder: a skip (not 1.5 GB of pixels), with the pipeline's limit
    enc = MCDEncode(tok, vl_cfg, max_len=256, image_cfg=IMAGE_CFG, on_error="skip")
    rec = {"images": ["b.png"], "messages": [USER_IMG, ANSWER]}
    assert enc.map({"index": 3, "file": "f.json", "record": json.dumps(rec),
                    "images": [png_header_only(12000, 12000)]}) is None
    assert enc.stats.indices == {mcd.IMAGE_TOO_LARGE: [3]}


def test_epoch_without_a_usable_record_is_an_error_not_an_endless_loop(tmp_path, tok, vl_cfg):
    folder = str(tmp_path)
    os.makedirs(os.path.join(folder, "mcd_images"))
    with open(os.path.join(folder, "mcd_images", "big.png"), "wb") as f:
        f.write(random_png(224, 224))  # 64 patches after resize... more than patches_per_row=16 below
    bad = [{"images": ["mcd_images/missing.png"], "messages": [USER_IMG, ANSWER]},
           {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
           {"messages": [{"role": "user", "content": "hi"}]}]
    path = os.path.join(folder, "all_bad.json")
    with open(path, "w") as f:
        json.dump(bad, f)
    for epochs in (None, 1, 3):  # forever (the old hang), one, several
        ds, stats = _pipeline(path, tok, vl_cfg, num_epochs=epochs, shuffle=True, read_threads=4)
        with _Deadline(120), pytest.raises(mcd.NoValidRecordError, match=rf"{path}: no usable record"):
            next(iter(ds))
        assert stats.total >= len(bad)
    # records that encode but can never fit a row count as unusable too
    big = os.path.join(folder, "too_big.json")
    with open(big, "w") as f:
        json.dump([{"images": ["mcd_images/big.png"], "messages": [USER_IMG, ANSWER]}] * 2, f)
    ds, stats = _pipeline(big, tok, vl_cfg, num_epochs=None, patches_per_row=16)
    with _Deadline(120), pytest.raises(mcd.NoValidRecordError, match="patches_exceed_row_budget"):
        next(iter(ds))


def test_non_utf8_mcd_file_names_the_file(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, ANSWER]})
    path = str(tmp_path / "latin1.json")
    with open(path, "wb") as f:
        f.write(("[" + good + "]").encode().replace(b"hi", b"h\xe9"))
    with pytest.raises(mcd.MCDFileError, match=rf"{path}: not UTF-8 text: byte 0xe9 at offset \d+"):
        mcd.read_records(path)
    with pytest.raises(mcd.MCDFileError, match=rf"{path}: not UTF-8"):
        MCDJsonSource(path)
    path = str(tmp_path / "latin1.jsonl")
    with open(path, "wb") as f:
        f.write(good.encode() + b"\n" + good.encode().replace(b"hi", b"h\xe9") + b"\n")
    with pytest.raises(mcd.MCDFileError, match=rf"{path}: line 2: not UTF-8"):
        mcd.read_records(path)


# ------------------------------------------------------------------ training


def _perturbed_copy(src: str, dst: str) -> None:
    """The same model shape with other weights (another 'merge' of the same size)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    for f in glob.glob(os.path.join(dst, "*.safetensors")):
        t = load_file(f)
        t = {k: v * np.asarray(1.5, v.dtype) if "embed_tokens" in k else v for k, v in t.items()}
        save_file(t, f, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def train_env(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("guards_train")
    tiny = tiny_checkpoints(5)
    deep = make_tiny_checkpoints(str(root / "deep"), seed=5, text_overrides={"num_hidden_layers": 3})
    other = str(root / "other_vlm")
    _perturbed_copy(tiny["vlm"], other)
    sample = make_mcd_sample(str(root / "mcd"), n_per_category=1, heldout_fraction=0.0)
    records = mcd.read_records(sample["train"])
    good = [r for r in records if r["category"] in ("chart", "algorithm")]
    path, _ = _write_bad_data(str(root / "mcd"))
    bad = mcd.read_records(path)[1:4]  # aspect ratio 300, lone surrogate, 12000x12000 header
    train = str(root / "mcd" / "train_with_bad.json")
    with open(train, "w") as f:
        json.dump(good + bad, f)
    return dict(root=root, vlm=tiny["vlm"], deep=deep["vlm"], other=other, train=train)


def _config(env, workdir, steps, **over):
    c = base_config()
    c.model.init_checkpoint = env["vlm"]
    c.data.train = env["train"]
    c.workdir = str(workdir)
    c.data.max_len = 384
    c.data.batch_size = 2
    c.data.patches_per_row = 256
    c.mesh.shape = (2, 1, 1)
    c.train.steps = c.optim.total_steps = steps
    c.train.vocab_chunk = 2048
    c.optim.lr, c.optim.warmup_steps = 2e-3, 1
    c.checkpoint.save_every = 2
    c.checkpoint.async_save = False
    for k, v in over.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


@pytest.mark.parametrize("field,value,message", [
    ("train.steps", 0, "--config.train.steps=0: expected an integer >= 1"),
    ("optim.lr", float("nan"), "--config.optim.lr=nan: expected a finite number"),
    ("data.on_error", "ignore", "--config.data.on_error='ignore': expected one of 'skip', 'raise'"),
    ("export_dtype", "float99", "--config.export_dtype='float99': expected one of"),
    ("train.max_skipped_fraction", 1.5, "--config.train.max_skipped_fraction=1.5: expected a finite number >= 0.0"),
    ("model.init_checkpoint", "/nonexistent/ckpt", "--config.model.init_checkpoint='/nonexistent/ckpt': expected an "
                                                   "existing checkpoint directory"),
    ("data.batch_size", 3, "--config.data.batch_size=3 must be a multiple of the mesh's data x fsdp size 2"),
    ("data.patches_per_row", 6, "--config.data.patches_per_row=6: expected a positive multiple of 4"),
    ("data.max_len", 5000, "--config.data.max_len=5000: longer than the model's max_position_embeddings=4096"),
    ("optim.lr_scale", (("^visual/", -1.0),), "--config.optim.lr_scale[0]=('^visual/', -1.0): expected a (regex, "
                                               "factor > 0) pair"),
    ("optim.lr_scale", (("(", 2.0),), "--config.optim.lr_scale[0]=('(', 2.0): expected a (regex, factor > 0) pair"),
    ("optim.lr_scale", (("^vision_tower/", 2.0),), "--config.optim.lr_scale[0]: pattern '^vision_tower/' matches no "
                                                  "trainable parameter"),
])
def test_config_errors_name_the_field(train_env, tmp_path, field, value, message):
    work = tmp_path / "work"
    with pytest.raises(ConfigError) as err:
        run_training(_config(train_env, work, 2, **{field: value}))
    assert message in str(err.value)
    assert not os.path.exists(work / "checkpoints")


def test_export_hf_existing_dir_is_refused_before_any_work(train_env, tmp_path):
    out = tmp_path / "keep_me"
    out.mkdir()
    (out / "precious.txt").write_text("do not delete")
    with pytest.raises(ConfigError, match=r"--config.export_hf=.*keep_me'?: already exists.*--config.overwrite=true"):
        run_training(_config(train_env, tmp_path / "work", 2, export_hf=str(out)))
    assert (out / "precious.txt").read_text() == "do not delete"
    assert not (tmp_path / "work").exists()

    # the entry point: a usage error naming the flag, no traceback, exit status 1
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
           f"--config.model.init_checkpoint={train_env['vlm']}", f"--config.data.train={train_env['train']}",
           f"--config.workdir={tmp_path / 'work'}", f"--config.export_hf={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 1 and "--config.export_hf=" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert (out / "precious.txt").exists() and not (tmp_path / "work").exists()


@pytest.fixture(scope="module")
def trained(train_env):
    """4 steps over data holding three bad records, exported over an existing dir with overwrite=true."""
    work = train_env["root"] / "run"
    out = train_env["root"] / "export"
    out.mkdir()
    (out / "stale.txt").write_text("old export")
    m = run_training(_config(train_env, work, 4, export_hf=str(out), overwrite=True))
    return work, out, m


def test_bad_records_are_skipped_in_training_and_export_overwrites_when_asked(trained):
    work, out, m = trained
    assert m["step"] == 4 and np.isfinite(m["loss"])
    assert m["records_skipped"] >= 3  # every epoch holds the three bad records; training went on
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert glob.glob(str(out / "*.safetensors"))
    assert not glob.glob(str(out.parent / ".export.tmp-*"))
    assert sorted(os.listdir(work / "checkpoints")) == ["2", "4"]


def test_resume_from_another_init_checkpoint_is_refused(train_env, trained):
    work, _, _ = trained
    before = read_metrics(str(work))
    with pytest.raises(ResumeError, match=r"cannot resume.*\n  init checkpoint: workdir was made from .*/vlm' "
                                          r"\(fingerprint [0-9a-f]+\), --config.model.init_checkpoint=.*other_vlm"):
        run_training(_config(train_env, work, 6, **{"model.init_checkpoint": train_env["other"]}))
    assert read_metrics(str(work)) == before and sorted(os.listdir(work / "checkpoints")) == ["2", "4"]


def test_resume_with_another_depth_names_what_differs(train_env, trained, tmp_path):
    work, _, _ = trained
    with pytest.raises(ResumeError, match=r"model.text.num_layers: workdir has 2, this run has 3"):
        run_training(_config(train_env, work, 6, **{"model.init_checkpoint": train_env["deep"]}))
    # a workdir from before identities were recorded: the saved shapes still give a named error
    legacy = tmp_path / "legacy"
    shutil.copytree(work, legacy)
    os.remove(legacy / "run_identity.json")
    with pytest.raises(ResumeError, match=r"does not match this config's model: model/layers/.*: "
                                          r"checkpoint shape \[2, .*\], this model \[3, "):
        run_training(_config(train_env, legacy, 6, **{"model.init_checkpoint": train_env["deep"]}))
    assert sorted(os.listdir(legacy / "checkpoints")) == ["2", "4"]


def test_truncated_latest_checkpoint_falls_back_to_the_newest_intact_step(train_env, trained, tmp_path, caplog):
    work = tmp_path / "run"
    shutil.copytree(trained[0], work)
    files = [f for f in glob.glob(str(work / "checkpoints" / "4" / "state" / "**"), recursive=True) if os.path.isfile(f)]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(1000)
    with caplog.at_level(logging.WARNING, logger="viscodex_jax.train.loop"):
        m = run_training(_config(train_env, work, 5))
    assert m["step"] == 5
    log = caplog.text
    assert "checkpoint step 4 in" in log and "OUT_OF_RANGE" in log and "resumed from step 2 instead" in log
    moved = os.listdir(work / "checkpoints_unreadable")
    assert len(moved) == 1 and moved[0].startswith("4-")
    assert [r["step"] for r in read_metrics(str(work))] == [1, 2, 3, 4, 5]
    assert "5" in os.listdir(work / "checkpoints")


def test_skip_nonfinite_stops_a_diverging_run_and_exports_nothing(train_env, tmp_path):
    out = tmp_path / "export"
    c = _config(train_env, tmp_path / "work", 8, export_hf=str(out), **{
        "train.skip_nonfinite": True, "optim.lr": 1e9, "optim.warmup_steps": 0, "checkpoint.save_every": 1})
    with pytest.raises(NonFiniteError, match=r"steps run so far had a non-finite loss or gradient, more than "
                                             r"--config.train.max_skipped_fraction=0.1.*Nothing was exported"):
        run_training(c)
    assert not out.exists() and not glob.glob(str(tmp_path / ".export.tmp-*"))
    steps = [m["step"] for m in read_metrics(str(tmp_path / "work"))]
    assert len(steps) < 8  # stopped early, not 7 of 8 steps skipped


def test_nonfinite_params_are_never_exported(tmp_path):
    params = {"model": {"norm": {"scale": np.ones(4, np.float32)},
                        "embed_tokens": {"embedding": np.array([[0.0, np.nan], [np.inf, 1.0]], np.float32)}}}
    with pytest.raises(NonFiniteError, match=r"not exporting to x: parameter model/embed_tokens/embedding has 2 "
                                             r"non-finite"):
        check_finite(params, "not exporting to x")
    check_finite({"a": np.ones(3, np.float32)}, "fine")


def test_vx_save_hf_refuses_nonfinite_params_and_writes_nothing(train_env, tmp_path):
    model = vx.load(train_env["vlm"])
    model.params["lm_head"]["kernel"] = model.params["lm_head"]["kernel"].at[0, 0].set(np.nan)
    out = tmp_path / "hf"
    with pytest.raises(NonFiniteError, match="parameter lm_head/kernel has 1 non-finite"):
        vx.save_hf(model, str(out))
    assert not out.exists() and not glob.glob(str(tmp_path / ".hf.tmp-*"))


# ------------------------------------------------------------------ generation


def test_generate_rejects_bad_max_new_tokens(train_env):
    model = vx.load(train_env["vlm"])
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ConfigError, match=r"max_new_tokens=-5: expected a positive integer"):
        vx.generate(model, msgs, max_new_tokens=-5)
    with pytest.raises(ConfigError, match=r"max_new_tokens=0: expected a positive integer"):
        DecodeSettings(max_new_tokens=0)
    limit = model.config.text.max_position_embeddings
    with pytest.raises(ConfigError, match=rf"max_new_tokens={limit}: the prompt \(\d+ tokens\) plus max_new_tokens "
                                          rf"exceeds the model's max_position_embeddings={limit}"):
        vx.generate(model, msgs, max_new_tokens=limit)
    batch = model.processor([msgs])
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        generate_ids(model.config, model.params, batch, [0], settings=DecodeSettings(max_new_tokens=limit))


def test_generate_cli_names_the_flag(train_env):
    cmd = [sys.executable, os.path.join(ROOT, "launch", "generate.py"), f"--checkpoint={train_env['vlm']}",
           "--prompt=hi", "--max_new_tokens=-5"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "--max_new_tokens=-5: expected a positive integer" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(cmd[:-1] + ["--temperature=0.7", "--top_p=1.5"], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert r.returncode == 1 and "--top_p=1.5: expected a probability mass" in r.stderr, r.stderr[-2000:]
