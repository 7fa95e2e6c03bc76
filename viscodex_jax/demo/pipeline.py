"""The paper in miniature: the README's main job, on tiny models and generated data.

Stages (each a documented command of its own, run here as subprocesses):

    checkpoints  tiny seeded HF checkpoints: base (Qwen2), vlm (Qwen2.5-VL from base), coder (Qwen2 from base)
    parity       HF -> orbax -> our forward vs transformers; HF export round trip
    data         MCD-format SFT data, describe data, programming data, held-out ChartMimic/MMCode items
    train_vlm    the VLM learns to describe images (a general VLM: sees images, no visual coding)
    train_coder  the coder learns text-only programming problems
    merge        launch/merge.py: base + lam * tau_vlm + (1 - lam) * tau_coder, vision copied from the VLM
    sft_merged   launch/train.py on MCD, vision tower + merger frozen
    sft_vlm      the same fine-tune from the un-merged VLM (the paper's ablation)
    eval_*       launch/eval.py on held-out charts (ChartMimic low-level) and programs (MMCode pass@1)
    report       runs/demo/report.{md,html}: timings, loss curves, scores next to the paper's table

A finished stage leaves ``<workdir>/stages/<name>.json``; running again skips it,
and a stage interrupted midway resumes (training resumes from its checkpoints).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

from viscodex_jax.demo.report import MODELS

log = logging.getLogger(__name__)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def demo_chart(width: int = 160, height: int = 120, seed: int = 0):
    """A small bar chart drawn with PIL: the kind of image VisCodex turns into code."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.line([(15, 10), (15, height - 15), (width - 5, height - 15)], fill="black", width=1)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    for i, v in enumerate(rng.uniform(0.2, 1.0, 4)):
        x0 = 25 + i * 33
        d.rectangle([x0, height - 15 - v * (height - 30), x0 + 22, height - 16], fill=colors[i])
    return img


class Stages:
    """Runs named stages once; a stage's result (JSON) marks it finished."""

    def __init__(self, workdir: str):
        self.dir = os.path.join(workdir, "stages")
        os.makedirs(self.dir, exist_ok=True)
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        path = os.path.join(self.dir, f"{name}.json")
        if os.path.isfile(path):
            with open(path) as f:
                rec = json.load(f)
            self.seconds[name] = rec["seconds"]
            log.info("[%s] already done (%.1fs), skipped", name, rec["seconds"])
            return rec["result"]
        log.info("[%s] start", name)
        t0 = time.time()
        result = fn()
        self.seconds[name] = time.time() - t0
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"seconds": self.seconds[name], "result": result}, f, indent=1)
        os.replace(tmp, path)
        log.info("[%s] done in %.1fs", name, self.seconds[name])
        return result


def _run(args: list[str]) -> None:
    """Runs one of our entry points; its output goes to the log, its failure stops the demo."""
    cmd = [sys.executable, os.path.join(ROOT, args[0]), *args[1:]]
    log.info("$ %s", " ".join(cmd[1:]))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def parity_check(tiny_vlm: str, workdir: str) -> dict[str, Any]:
    """Our Flax forward vs transformers on a chat prompt with an image, through our orbax format."""
    import torch
    from transformers import AutoModelForImageTextToText

    import viscodex_jax as vx
    from viscodex_jax import checkpoint

    orbax_dir = os.path.join(workdir, "vlm_orbax")
    checkpoint.convert_hf_to_orbax(tiny_vlm, orbax_dir, overwrite=True)
    model = vx.load(orbax_dir)
    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Write matplotlib code that reproduces this chart."}]}]
    batch = model.processor([messages], images=[[demo_chart()]])
    ours = np.asarray(model.logits(batch))
    hf = AutoModelForImageTextToText.from_pretrained(tiny_vlm, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(batch["input_ids"]).long(), attention_mask=torch.tensor(batch["attention_mask"]),
                 position_ids=torch.tensor(batch["positions"]).long(), pixel_values=torch.tensor(batch["pixel_values"]),
                 image_grid_thw=torch.tensor(batch["image_grid_thw"])).logits.numpy()
    export_dir = os.path.join(workdir, "vlm_export_hf")
    checkpoint.convert_orbax_to_hf(orbax_dir, export_dir, overwrite=True)
    reloaded = AutoModelForImageTextToText.from_pretrained(export_dir).eval()
    src = dict(hf.state_dict())
    tok = model.processor.tokenizer
    return {
        "prompt_tokens": int(batch["input_ids"].shape[1]),
        "image_grid_thw": batch["image_grid_thw"].tolist(),
        "max_abs_logit_diff": float(np.abs(ours - ref).max()),
        "roundtrip_bit_identical": all(torch.equal(src[k], v) for k, v in reloaded.state_dict().items()),
        "top5_ours": [tok.decode([int(i)]) for i in np.argsort(-ours[0, -1])[:5]],
        "top5_transformers": [tok.decode([int(i)]) for i in np.argsort(-ref[0, -1])[:5]],
    }


def _train_args(c, name: str, init: str, data: str, steps: int, trainable: str, lr: float) -> list[str]:
    return ["launch/train.py", f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
            f"--config.model.init_checkpoint={init}", f"--config.data.train={data}",
            f"--config.workdir={os.path.join(c.workdir, 'train', name)}", f"--config.train.steps={steps}",
            f"--config.optim.total_steps={steps}", f"--config.optim.lr={lr}",
            f"--config.optim.warmup_steps={max(1, steps // 10)}", f"--config.train.trainable={trainable}",
            f"--config.data.batch_size={c.batch_size}", f"--config.data.max_len={c.max_len}",
            f"--config.data.seed={c.seed}", f"--config.checkpoint.save_every={max(10, steps // 4)}",
            f"--config.export_hf={os.path.join(c.workdir, 'models', name)}", "--config.export_dtype=float32",
            "--config.mesh.shape=(1,1,1)"]  # tiny models: one device, whatever the host has


def run_demo(c) -> dict[str, Any]:
    """Runs (or continues) every stage; returns the summary that the report shows."""
    from viscodex_jax.testing.tiny import ensure_tiny_checkpoints

    wd = os.path.abspath(c.workdir)
    c.workdir = wd
    st = Stages(wd)
    models = os.path.join(wd, "models")
    tiny = st.run("checkpoints", lambda: ensure_tiny_checkpoints(os.path.join(wd, "tiny"), c.seed))
    parity = st.run("parity", lambda: parity_check(tiny["vlm"], wd))
    if parity["max_abs_logit_diff"] > 1e-4 or not parity["roundtrip_bit_identical"]:
        raise RuntimeError(f"parity check failed: {parity}")

    def data():
        from viscodex_jax.demo.data import make_demo_data

        return make_demo_data(os.path.join(wd, "data"), c.seed, c.n_per_category, c.n_programs, c.n_heldout_programs)

    d = st.run("data", data)
    st.run("train_vlm", lambda: _run(_train_args(c, "vlm", tiny["vlm"], d["describe_train"], c.vlm_steps, "all", c.lr)))
    st.run("train_coder", lambda: _run(_train_args(c, "coder", tiny["coder"], d["coder_train"], c.coder_steps, "llm",
                                                   c.lr)))
    st.run("merge", lambda: _run(["launch/merge.py", f"--config={os.path.join(ROOT, 'configs', 'merge_viscodex_8b.py')}",
                                  f"--config.base_dir={tiny['base']}", f"--config.vlm_dir={os.path.join(models, 'vlm')}",
                                  f"--config.coder_dir={os.path.join(models, 'coder')}",
                                  f"--config.out_dir={os.path.join(models, 'merged')}", f"--config.lam={c.lam}",
                                  "--config.out_dtype=float32", "--config.overwrite=true"]))
    st.run("sft_merged", lambda: _run(_train_args(c, "merged_sft", os.path.join(models, "merged"), d["mcd_train"],
                                                  c.sft_steps, "llm", c.sft_lr)))
    st.run("sft_vlm", lambda: _run(_train_args(c, "vlm_sft", os.path.join(models, "vlm"), d["mcd_train"], c.sft_steps,
                                               "llm", c.sft_lr)))
    for m in MODELS:
        st.run(f"eval_{m}", lambda m=m: _run([
            "launch/eval.py", f"--checkpoint={os.path.join(models, m)}", "--benchmarks=chartmimic,mmcode",
            f"--chartmimic_root={d['heldout_chartmimic']}", f"--mmcode_root={d['heldout_mmcode']}",
            f"--out_dir={os.path.join(wd, 'eval', m)}", f"--max_new_tokens={c.max_new_tokens}",
            f"--batch_size={c.eval_batch_size}", f"--model_name={MODELS[m]}"]))

    def report():
        from viscodex_jax.demo.report import write_report

        return write_report(wd, dict(st.seconds), parity, c.to_dict() if hasattr(c, "to_dict") else dict(c))

    summary = st.run("report", report)
    return summary
