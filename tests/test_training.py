"""Training end to end: packing equivalence, overfitting, kill -9 and resume, multi-process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from viscodex_jax.checkpoint import load_hf_params
from viscodex_jax.data.image_processor import ImageProcessorConfig
from viscodex_jax.data.mcd import ImageStore, load_images, read_records
from viscodex_jax.testing.mcd_sample import make_mcd_sample
from viscodex_jax.data.encode import encode_record
from viscodex_jax.data.packing import Packer
from viscodex_jax.train.loop import read_metrics
from viscodex_jax.train.step import batch_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("train")
    paths = tiny_checkpoints(5)
    sample = make_mcd_sample(str(root / "mcd"), n_per_category=3)
    return paths, sample, root


def _encoded(paths, sample, n=6):
    from transformers import AutoTokenizer

    cfg, params = load_hf_params(paths["vlm"])
    tok = AutoTokenizer.from_pretrained(paths["vlm"])
    recs = read_records(sample["train"])
    store = ImageStore.for_json(sample["train"])
    image_cfg = ImageProcessorConfig.from_pretrained(paths["vlm"])
    enc = [encode_record(r, load_images(r.get("images") or [], None, store, i, sample["train"]), tok, image_cfg, cfg, 512, index=i,
                         file=sample["train"]) for i, r in enumerate(recs[:n])]
    return cfg, params, tok, enc


def test_packed_batch_gives_the_same_per_record_losses(tiny):
    paths, sample, _ = tiny
    cfg, params, tok, enc = _encoded(paths, sample)
    t = max(sum(r.length for r in enc[:3]), sum(r.length for r in enc[3:6])) + 5
    p = max(sum(r.num_patches for r in enc[:3]), sum(r.num_patches for r in enc[3:6]), 4)
    p = -(-p // 4) * 4
    packed = Packer(2, t, tok.pad_token_id, cfg.vision, p).make_batch([enc[:3], enc[3:6]])
    assert packed["segment_ids"].max() == 3  # really packed: three records in a row
    _, _, nll = batch_loss(params, packed, cfg, vocab_chunk=1024)
    nll = np.asarray(nll)
    # Each record alone in a row of one shape for all six (padding past the record is masked): the loss runs
    # op by op, and every new shape compiles every op again.
    alone_packer = Packer(1, max(r.length for r in enc[:6]) + 3, tok.pad_token_id, cfg.vision,
                          max(4, -(-max(r.num_patches for r in enc[:6]) // 4) * 4))
    for row in range(2):
        for s in range(1, 4):
            rec = enc[row * 3 + s - 1]
            alone = alone_packer.make_batch([[rec]])
            _, _, nll1 = batch_loss(params, alone, cfg, vocab_chunk=1024)
            got = nll[row][packed["segment_ids"][row] == s].sum()
            want = float(np.asarray(nll1).sum())
            assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (row, s, got, want)


def _train_cmd(paths, sample, workdir, steps, save_every, extra=()):
    return [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
            f"--config.model.init_checkpoint={paths['vlm']}", f"--config.data.train={sample['train']}",
            f"--config.workdir={workdir}", f"--config.train.steps={steps}", f"--config.optim.total_steps={steps}",
            f"--config.checkpoint.save_every={save_every}", "--config.data.max_len=384",
            "--config.data.batch_size=2", "--config.checkpoint.async_save=false", *extra]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _train_until(cmd: list[str], workdir: str, step: int) -> subprocess.Popen:
    """Starts a training command; returns the process once its metrics reach ``step`` (or after 240 s)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not any(m["step"] >= step for m in read_metrics(workdir)):
        time.sleep(0.2)
    return proc


@pytest.mark.slow
def test_kill_minus_9_and_resume_equals_uninterrupted_run(tiny):
    paths, sample, root = tiny
    full, killed = str(root / "full"), str(root / "killed")
    subprocess.run(_train_cmd(paths, sample, full, 8, 2), check=True, env=_env(), capture_output=True)
    proc = _train_until(_train_cmd(paths, sample, killed, 8, 2), killed, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    seen = max(m["step"] for m in read_metrics(killed))
    assert 5 <= seen < 8, f"the run was not killed mid-training (reached step {seen})"
    subprocess.run(_train_cmd(paths, sample, killed, 8, 2), check=True, env=_env(), capture_output=True)
    a, b = read_metrics(full), read_metrics(killed)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 9))
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 * abs(x["loss"]), (x["step"], x["loss"], y["loss"])


@pytest.mark.slow
def test_sigterm_saves_and_exits(tiny):
    paths, sample, root = tiny
    work = str(root / "term")
    proc = _train_until(_train_cmd(paths, sample, work, 50, 100), work, 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    last = max(m["step"] for m in read_metrics(work))
    saved = sorted(int(d) for d in os.listdir(os.path.join(work, "checkpoints")) if d.isdigit())
    assert saved and saved[-1] == last  # saved at the step it stopped, not at the 100-step interval


@pytest.mark.slow
def test_overfit_a_few_records(tiny):
    paths, sample, root = tiny
    recs = read_records(sample["train"])
    few = [r for r in recs if r["category"] == "algorithm"][:2] + [r for r in recs if r["category"] == "chart"][:1]
    path = os.path.join(os.path.dirname(sample["train"]), "few.json")
    with open(path, "w") as f:
        json.dump(few, f)
    work = str(root / "overfit")
    sample_few = dict(sample, train=path)
    subprocess.run(_train_cmd(paths, sample_few, work, 80, 1000,
                              ("--config.optim.lr=1e-2", "--config.optim.warmup_steps=3",
                               "--config.data.max_len=1024")),
                   check=True, env=_env(), capture_output=True)
    m = read_metrics(work)
    start, end = m[0]["loss"], min(x["loss"] for x in m[-5:])
    assert end < 0.1 * start, f"loss went from {start:.3f} to {end:.3f}"


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.slow
def test_two_processes_equal_one_process(hf_checkpoint):
    path = hf_checkpoint("qwen2_untied")
    worker = os.path.join(ROOT, "tests", "dist_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, worker, path, "2", str(i), port, "4"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    single = subprocess.run([sys.executable, worker, path, "1", "0", "0", "8"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    res = [json.loads(next(l for l in o.splitlines() if l.startswith("RESULT "))[7:]) for o, _ in outs]
    ref = json.loads(next(l for l in single.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert ref["devices"] == 8 and ref["processes"] == 1
    for r in res:
        assert r["devices"] == 8 and r["processes"] == 2
        for a, b in zip(r["steps"], ref["steps"]):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"])
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * abs(b["grad_norm"])
