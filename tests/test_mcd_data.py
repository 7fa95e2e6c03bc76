"""MCD data: reader/validation, encoding (truncation, drops), packing, grain pipeline, TFDS (the chat template: test_chat_template)."""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import pytest

import grain

from viscodex_jax.data import mcd
from viscodex_jax.data.chat import IGNORE_INDEX, num_image_tokens
from viscodex_jax.data.encode import encode_record
from viscodex_jax.data.image_processor import ImageProcessorConfig
from viscodex_jax.testing.mcd_sample import CATEGORIES, make_mcd_sample
from viscodex_jax.data.packing import Packer, pack_records
from viscodex_jax.data.pipeline import MCDEncode, MCDJsonSource, PipelineConfig, host_shard, make_dataset
from viscodex_jax.data.tokenizer import build_qwen2_tokenizer, special_token_ids
from viscodex_jax.model.config import ModelConfig, TextConfig, VisionConfig
from viscodex_jax.model.families.qwen2_5_vl import metadata_arrays, vision_metadata

IMAGE_CFG = ImageProcessorConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)  # as the tiny VLM's


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def tok():
    return build_qwen2_tokenizer(num_ranks=4096)


def _cfgs(tokenizer):
    ids = special_token_ids(tokenizer)
    vocab = -(-len(tokenizer) // 64) * 64
    vision = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          fullatt_block_indexes=(1,), window_size=56)
    vl = ModelConfig("qwen2_5_vl", TextConfig(vocab, 64, 128, 2, 4, 2, mrope_section=(2, 3, 3)), vision,
                     image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                     vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])
    text = ModelConfig("qwen2", TextConfig(vocab, 64, 128, 2, 4, 2))
    return vl, text


@pytest.fixture(scope="module")
def cfgs(tok):
    return _cfgs(tok)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return make_mcd_sample(tmp_path_factory.mktemp("mcd_sample"), n_per_category=4, seed=0, heldout_fraction=0.25)


def _img(w: int, h: int, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _png_bytes(img: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ truncation / drops

def test_truncation_never_cuts_an_image_span(tok, cfgs):
    vl, _ = cfgs
    sp = special_token_ids(tok)
    messages = [{"role": "user", "content": "First question, text only."},
                {"role": "assistant", "content": "First answer."},
                {"role": "user", "content": "Look: <image> and <image> now code it."},
                {"role": "assistant", "content": "print('two images')"}]
    images = [_img(112, 112, 1), _img(56, 112, 2)]
    record = {"messages": messages, "images": ["a.png", "b.png"]}
    full = encode_record(record, images, tok, IMAGE_CFG, vl, max_len=10_000)
    starts = np.flatnonzero(full.input_ids == sp["vision_start"])
    ends = np.flatnonzero(full.input_ids == sp["vision_end"])
    seen_cut_inside = seen_keep_one = 0
    for max_len in range(int(starts[0]) - 3, full.length + 2):
        rec = encode_record(record, images, tok, IMAGE_CFG, vl, max_len=max_len)
        assert rec.length <= max_len
        assert rec.input_ids.tolist() == full.input_ids[:rec.length].tolist()
        n = len(rec.grid_thw)
        # complete spans only: every kept image has all its pads and its <|vision_end|>
        assert int(np.sum(rec.input_ids == sp["vision_start"])) == n
        assert int(np.sum(rec.input_ids == sp["vision_end"])) == n
        assert int(np.sum(rec.input_ids == sp["image_pad"])) == sum(num_image_tokens(g) for g in rec.grid_thw)
        assert rec.grid_thw.tolist() == full.grid_thw[:n].tolist()
        assert rec.num_patches == int(np.prod(rec.grid_thw, -1).sum())
        np.testing.assert_array_equal(rec.pixel_values, full.pixel_values[:rec.num_patches])
        np.testing.assert_array_equal(rec.positions, full.positions[:, :rec.length])
        for s, e in zip(starts, ends):
            if s < max_len <= e:  # the cut would fall inside this span: text ends before it
                assert rec.length == s
                seen_cut_inside += 1
        seen_keep_one += n == 1
    assert seen_cut_inside > 0 and seen_keep_one > 0


def test_record_with_too_many_image_tokens_is_dropped_and_counted(tok, cfgs):
    vl, _ = cfgs
    record = {"messages": [{"role": "user", "content": "<image>\ncode?"},
                           {"role": "assistant", "content": "x = 1"}], "images": ["big.png"]}
    images = [_img(224, 224)]  # 16x16 patches -> 64 image tokens (+2)
    with pytest.raises(mcd.MCDRecordError) as err:
        encode_record(record, images, tok, IMAGE_CFG, vl, max_len=60, index=7, file="x.json")
    assert err.value.reason == mcd.IMAGE_TOKENS_EXCEED_MAX_LEN and err.value.index == 7
    assert "x.json: record 7" in str(err.value)
    # through the grain map transform: skipped, counted, index kept
    enc = MCDEncode(tok, vl, max_len=60, image_cfg=IMAGE_CFG, on_error="skip")
    el = {"index": 7, "file": "x.json", "record": json.dumps(record), "images": [_png_bytes(images[0])]}
    assert enc.map(el) is None
    assert enc.stats.counts[mcd.IMAGE_TOKENS_EXCEED_MAX_LEN] == 1
    assert enc.stats.indices[mcd.IMAGE_TOKENS_EXCEED_MAX_LEN] == [7]
    # and a record that fits by tokens but not the per-row patch budget is dropped by the packer
    rec = encode_record(record, images, tok, IMAGE_CFG, vl, max_len=512, index=3)
    packer = Packer(1, 512, tok.pad_token_id, vl.vision, patches_per_row=128)
    assert list(pack_records([rec], packer)) == []
    assert packer.stats.indices[mcd.PATCHES_EXCEED_ROW_BUDGET] == [3]


# ------------------------------------------------------------------ malformed records

def _bad_records(folder):
    good_png = _png_bytes(_img(56, 56))
    os.makedirs(os.path.join(folder, "mcd_images"), exist_ok=True)
    with open(os.path.join(folder, "mcd_images", "ok.png"), "wb") as f:
        f.write(good_png)
    with open(os.path.join(folder, "mcd_images", "corrupt.png"), "wb") as f:
        f.write(good_png[: len(good_png) // 2])  # truncated PNG: header fine, data cut
    user_img = {"role": "user", "content": "<image>\nCode this."}
    answer = {"role": "assistant", "content": "print(1)"}
    return [
        (None, {"images": ["mcd_images/ok.png"], "messages": [user_img, answer], "category": "chart"}),
        (mcd.MISSING_IMAGE, {"images": ["mcd_images/nope.png"], "messages": [user_img, answer]}),
        (mcd.IMAGE_TAG_MISMATCH, {"images": ["mcd_images/ok.png"],
                                  "messages": [{"role": "user", "content": "<image><image> x"}, answer]}),
        (mcd.IMAGE_TAG_MISMATCH, {"images": ["mcd_images/ok.png", "mcd_images/ok.png"],
                                  "messages": [user_img, answer]}),
        (mcd.UNKNOWN_ROLE, {"messages": [{"role": "human", "content": "hi"}, answer]}),
        (mcd.EMPTY_ASSISTANT, {"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "  \n"}]}),
        (mcd.CORRUPT_IMAGE, {"images": ["mcd_images/corrupt.png"], "messages": [user_img, answer]}),
        (mcd.NO_ASSISTANT, {"messages": [{"role": "user", "content": "hi"}]}),
        (mcd.MALFORMED, {"messages": "hi"}),
        (None, {"messages": [{"role": "user", "content": "text only"}, answer], "category": "algorithm"}),
    ]


def test_each_malformed_record_kind_names_file_index_and_problem(tmp_path, tok, cfgs):
    cases = _bad_records(str(tmp_path))
    for k, (reason, rec) in enumerate(cases):
        if reason is None:
            continue
        path = str(tmp_path / f"bad_{k}.jsonl")
        with open(path, "w") as f:
            f.write(json.dumps(cases[0][1]) + "\n" + json.dumps(rec) + "\n")
        with pytest.raises(mcd.MCDRecordError) as err:
            mcd.validate_records(path, on_error="raise")
        assert (err.value.reason, err.value.index, err.value.file) == (reason, 1, path), str(err.value)
        assert str(err.value).startswith(f"{path}: record 1: {reason}")

    path = str(tmp_path / "all.json")
    with open(path, "w") as f:
        json.dump([rec for _, rec in cases], f)
    valid, stats = mcd.validate_records(path, on_error="skip")
    assert valid == [0, len(cases) - 1]
    expected = {}
    for reason, _ in cases:
        if reason is not None:
            expected[reason] = expected.get(reason, 0) + 1
    assert stats.as_dict() == expected
    assert stats.indices[mcd.CORRUPT_IMAGE] == [6]

    # the pipeline in skip mode: only the two good records reach the packer, the rest are counted
    vl, _ = cfgs
    stats = mcd.SkipStats()
    ds = make_dataset(MCDJsonSource(path), tok, vl,
                      PipelineConfig(batch_size=2, max_len=256, patches_per_row=64, shuffle=False,
                                     shard_index=0, shard_count=1, prefetch=0), IMAGE_CFG, stats=stats)
    batches = list(ds)
    assert len(batches) == 1 and batches[0]["segment_ids"].max() == 2
    assert stats.as_dict() == expected
    # and in raise mode the first bad record stops the pipeline (on the host) with the named error
    ds = make_dataset(MCDJsonSource(path), tok, vl,
                      PipelineConfig(batch_size=2, max_len=256, patches_per_row=64, shuffle=False,
                                     shard_index=0, shard_count=1, prefetch=0, read_threads=1,
                                     on_error="raise"), IMAGE_CFG)
    with pytest.raises(mcd.MCDRecordError, match=r"all.json: record 1: missing_image"):
        list(ds)


# ------------------------------------------------------------------ sample + image store

def test_sample_has_all_categories_and_zip_variant(sample):
    for split in ("train", "heldout"):
        records = mcd.read_records(sample[split])
        assert {r["category"] for r in records} == set(CATEGORIES)
        assert all(sample["counts"][split][c] > 0 for c in CATEGORIES)
        valid, stats = mcd.validate_records(sample[split], on_error="raise")
        assert len(valid) == len(records) and stats.total == 0
        for r in records:
            assert (r["category"] == "algorithm") == (not r["images"])
            if r["category"] == "chart":
                assert r["messages"][1]["content"].startswith("import matplotlib.pyplot as plt")
            if r["category"] == "html":
                assert r["messages"][1]["content"].startswith("<!DOCTYPE html>")
    # images are small, and the zip variant resolves to the same bytes
    folder, zipped = MCDJsonSource(sample["train"]), MCDJsonSource(sample["zip_train"])
    assert zipped.store.zip_path == sample["zip"] and not os.path.isdir(os.path.join(sample["zip_dir"], "mcd_images"))
    for i in range(len(folder)):
        a, b = folder[i], zipped[i]
        assert a["images"] == b["images"] and None not in a["images"]
        for data in a["images"]:
            assert max(PIL.Image.open(io.BytesIO(data)).size) <= 224
    assert len(mcd.read_records(sample["train"])) + len(mcd.read_records(sample["heldout"])) == 16


def test_image_store_zip_layouts(tmp_path):
    png = _png_bytes(_img(28, 28))
    for k, member in enumerate(["mcd_images/chart_images/1.png", "chart_images/1.png"]):
        zpath = str(tmp_path / f"z{k}.zip")
        with zipfile.ZipFile(zpath, "w") as zf:
            zf.writestr(member, png)
        store = mcd.ImageStore(str(tmp_path / "nowhere"), zpath)
        assert store.read_bytes("mcd_images/chart_images/1.png") == png
        with pytest.raises(FileNotFoundError, match="2.png"):
            store.read_bytes("mcd_images/chart_images/2.png")
        import pickle

        clone = pickle.loads(pickle.dumps(store))  # handle dropped, reopened lazily
        assert clone._zip is None and clone.read_bytes("mcd_images/chart_images/1.png") == png


# ------------------------------------------------------------------ packing

def test_packing_shapes_segments_positions(sample, tok, cfgs):
    vl, text = cfgs
    records = [(i, r, ims) for i, r, ims in mcd.iter_valid(sample["train"])]
    encoded = [encode_record(r, ims, tok, IMAGE_CFG, vl, 384, index=i) for i, r, ims in records]
    B, T, P = 2, 384, 384
    packer = Packer(B, T, tok.pad_token_id, vl.vision, patches_per_row=P)
    batches = list(pack_records(encoded, packer))
    seen = []
    for batch in batches:
        assert batch["input_ids"].shape == (B, T) and batch["input_ids"].dtype == np.int32
        assert batch["labels"].shape == batch["segment_ids"].shape == (B, T)
        assert batch["positions"].shape == (3, B, T) and batch["positions"].dtype == np.int32
        assert batch["pixel_values"].shape == (B, P, 1176) and batch["pixel_values"].dtype == np.float32
        assert batch["num_image_tokens"].shape == (B,) and batch["num_image_tokens"].dtype == np.int32
        assert {k: v.shape for k, v in batch["vision_meta"].items()} == {
            "window_perm": (B, P), "merged_inverse": (B, P // 4), "window_segments": (B, P),
            "image_segments": (B, P), "rotary_pos": (B, P, 2)}
        for b in range(B):
            seg = batch["segment_ids"][b]
            pad = seg == 0
            assert np.all(batch["input_ids"][b][pad] == tok.pad_token_id)
            assert np.all(batch["labels"][b][pad] == IGNORE_INDEX)
            assert np.all(batch["positions"][:, b][:, pad] == 0)
            # segments are 1..n, contiguous, padding only at the end
            n = int(seg.max())
            nz = seg[~pad]
            assert np.all(np.diff(nz) >= 0) and set(nz.tolist()) == set(range(1, n + 1))
            assert not np.any(pad[: int((~pad).sum())])
            # each segment is one record with its own positions (restarting at 0)
            grids, poff = [], 0
            row_records = []
            for s in range(1, n + 1):
                idx = np.flatnonzero(seg == s)
                match = [e for e in encoded if e.length == len(idx)
                         and np.array_equal(e.input_ids, batch["input_ids"][b, idx])]
                assert match
                e = match[0]
                row_records.append(e.index)
                np.testing.assert_array_equal(batch["labels"][b, idx], e.labels)
                np.testing.assert_array_equal(batch["positions"][:, b, idx], e.positions)
                assert batch["positions"][0, b, idx[0]] == 0
                np.testing.assert_array_equal(batch["pixel_values"][b, poff:poff + e.num_patches], e.pixel_values)
                poff += e.num_patches
                grids += e.grid_thw.tolist()
            seen += row_records
            assert poff <= P
            assert np.all(batch["pixel_values"][b, poff:] == 0)
            assert batch["num_image_tokens"][b] == int(np.sum(batch["input_ids"][b] == vl.image_token_id))
            if grids:
                want = metadata_arrays(vision_metadata(grids, vl.vision, pad_to=P))
                for k, v in want.items():
                    np.testing.assert_array_equal(batch["vision_meta"][k][b], v)
            else:
                assert np.all(batch["vision_meta"]["image_segments"][b] == -1)
    assert seen == [e.index for e in encoded]  # greedy in order, nothing lost

    # text-only model: 1-D positions restarting per record, no pixel inputs
    algo = [encode_record(r, ims, tok, IMAGE_CFG, text, 512, index=i)
            for i, r, ims in records if r["category"] == "algorithm"]
    tp = Packer(2, 512, tok.pad_token_id)
    tb = next(pack_records(algo, tp))
    assert set(tb) == {"input_ids", "labels", "segment_ids", "positions", "num_image_tokens"}
    assert tb["positions"].shape == (2, 512)
    seg = tb["segment_ids"][0]
    for s in range(1, int(seg.max()) + 1):
        assert tb["positions"][0, seg == s].tolist() == list(range(int((seg == s).sum())))


def test_packed_batch_runs_through_the_model(sample, tok, cfgs):
    """The batch is what CausalLM takes (per-row vision tower, segment mask): finite logits."""
    import jax
    import jax.numpy as jnp

    from viscodex_jax.model.causal_lm import CausalLM, param_shapes

    vl, _ = cfgs
    ds = make_dataset(MCDJsonSource(sample["heldout"]), tok, vl,
                      PipelineConfig(batch_size=2, max_len=256, patches_per_row=256, shuffle=False,
                                     shard_index=0, shard_count=1, prefetch=0), IMAGE_CFG)
    batch = next(iter(ds))
    assert batch["num_image_tokens"].sum() > 0
    # random params from the shapes (eval_shape): cheaper than compiling init
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape), s.dtype), param_shapes(vl))

    @jax.jit
    def forward(params, b):
        return CausalLM(vl).apply(
            {"params": params}, b["input_ids"], b["positions"], (b["segment_ids"] > 0).astype(jnp.int32),
            pixel_values=b["pixel_values"], vision_meta=b["vision_meta"], segment_ids=b["segment_ids"])

    logits = forward(params, batch)
    assert logits.shape == (2, 256, vl.text.vocab_size)
    assert bool(jnp.all(jnp.isfinite(logits)))


# ------------------------------------------------------------------ grain pipeline

def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], dict):
                for kk in x[k]:
                    np.testing.assert_array_equal(x[k][kk], y[k][kk])
            else:
                np.testing.assert_array_equal(x[k], y[k])


def test_iterator_state_save_restore_resumes_exactly(sample, tok, cfgs):
    vl, _ = cfgs
    config = PipelineConfig(batch_size=2, max_len=320, patches_per_row=320, seed=3, num_epochs=None,
                            shard_index=0, shard_count=1, read_threads=2, prefetch=2)
    ds = make_dataset(MCDJsonSource(sample["train"]), tok, vl, config, IMAGE_CFG)
    it = iter(ds)
    _take(it, 3)
    state = it.get_state()
    json.dumps(state)  # checkpointable as JSON (what grain's orbax handler writes)
    expected = _take(it, 4)

    it2 = iter(make_dataset(MCDJsonSource(sample["train"]), tok, vl, config, IMAGE_CFG))
    it2.set_state(state)
    _assert_batches_equal(_take(it2, 4), expected)

    # a different seed gives a different order
    other = iter(make_dataset(MCDJsonSource(sample["train"]), tok, vl,
                              PipelineConfig(**{**config.__dict__, "seed": 4}), IMAGE_CFG))
    first = _take(iter(ds), 1)[0]
    assert not np.array_equal(_take(other, 1)[0]["input_ids"], first["input_ids"])


def test_worker_processes_resume_exactly_and_read_the_zip(sample, tok, cfgs):
    """mp_prefetch workers (each opening mcd_images.zip itself): state restores exactly."""
    vl, _ = cfgs
    config = PipelineConfig(batch_size=2, max_len=320, patches_per_row=320, seed=5, num_epochs=None,
                            shard_index=0, shard_count=1, read_threads=1, worker_count=2, prefetch=0)
    it = iter(make_dataset(MCDJsonSource(sample["zip_train"]), tok, vl, config, IMAGE_CFG))
    try:
        _take(it, 2)
        state = it.get_state()
        expected = _take(it, 3)
    finally:
        it.close()
    it2 = iter(make_dataset(MCDJsonSource(sample["zip_train"]), tok, vl, config, IMAGE_CFG))
    try:
        it2.set_state(state)
        got = _take(it2, 3)
    finally:
        it2.close()
    _assert_batches_equal(got, expected)
    assert sum(int(b["num_image_tokens"].sum()) for b in got) > 0


def test_host_sharding_is_disjoint_and_covering(sample):
    src = MCDJsonSource(sample["train"])
    shards = []
    for i in range(3):
        ds = host_shard(grain.MapDataset.source(src), i, 3).shuffle(seed=0)
        shards.append([el["index"] for el in ds])
    flat = [x for s in shards for x in s]
    assert sorted(flat) == list(range(len(src)))
    assert all(len(s) in (len(src) // 3, len(src) // 3 + 1) for s in shards)
    # default: jax.process_index()/process_count() (one process here -> everything)
    assert len(host_shard(grain.MapDataset.source(src))) == len(src)


# ------------------------------------------------------------------ TFDS

def test_tfds_builder_round_trip(sample, tmp_path, tok, cfgs):
    from viscodex_jax.data.tfds_mcd import TfdsMCDSource, prepare_mcd_tfds

    manual = tmp_path / "manual"
    manual.mkdir()
    for name in ("mcd_train.json", "mcd_heldout.json"):
        os.symlink(os.path.join(sample["dir"], name), manual / name)
    os.symlink(os.path.join(sample["dir"], "mcd_images"), manual / "mcd_images")
    # a third split with one bad record: skipped at build time, counted in the metadata
    with open(manual / "mcd_bad.jsonl", "w") as f:
        f.write(json.dumps({"images": ["mcd_images/missing.png"],
                            "messages": [{"role": "user", "content": "<image>"},
                                         {"role": "assistant", "content": "x"}]}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "a"}]}) + "\n")
    builder = prepare_mcd_tfds(manual, tmp_path / "tfds")
    assert builder.info.metadata["skipped"]["bad"] == {mcd.MISSING_IMAGE: 1}
    assert {s: builder.info.splits[s].num_examples for s in ("train", "heldout", "bad")} == {
        "train": 12, "heldout": 4, "bad": 1}
    shard_files = [f for f in os.listdir(builder.data_dir) if "array_record" in f]
    assert shard_files

    for split in ("train", "heldout"):
        tsrc, jsrc = TfdsMCDSource(tmp_path / "tfds", split), MCDJsonSource(sample[split])
        assert len(tsrc) == len(jsrc)
        for i in range(len(jsrc)):
            a, b = tsrc[i], jsrc[i]
            assert a["index"] == b["index"] == i
            assert json.loads(a["record"]) == json.loads(b["record"])
            assert a["images"] == b["images"]
    assert TfdsMCDSource(tmp_path / "tfds", "bad")[0]["index"] == 1

    # as the grain source: the same batches as the JSON source
    vl, _ = cfgs
    config = PipelineConfig(batch_size=2, max_len=256, patches_per_row=256, seed=1,
                            shard_index=0, shard_count=1, prefetch=0)
    _assert_batches_equal(
        list(make_dataset(TfdsMCDSource(tmp_path / "tfds", "heldout"), tok, vl, config, IMAGE_CFG)),
        list(make_dataset(MCDJsonSource(sample["heldout"]), tok, vl, config, IMAGE_CFG)))
