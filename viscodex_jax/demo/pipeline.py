"""The paper in miniature: the README's main job, on tiny models and generated data.

Stages (each a library call; the same work as the documented command named after it):

    checkpoints  tiny seeded HF checkpoints: base (Qwen2), vlm (Qwen2.5-VL from base), coder (Qwen2 from base)
    parity       HF -> orbax -> our forward vs transformers; HF export round trip
    data         MCD-format SFT data, describe data, programming data, held-out ChartMimic/MMCode items
    train_vlm    the VLM learns to describe images (a general VLM: sees images, no visual coding)
    train_coder  the coder learns text-only programming problems
    merge        as launch/merge.py: base + lam * tau_vlm + (1 - lam) * tau_coder, vision copied from the VLM
    sft_merged   as launch/train.py on MCD, vision tower + merger frozen
    sft_vlm      the same fine-tune from the un-merged VLM (the paper's ablation)
    eval_*       as launch/eval.py on held-out charts (ChartMimic low-level) and programs (MMCode pass@1)
    report       runs/demo/report.{md,html}: timings, loss curves, scores next to the paper's table

A finished stage leaves ``<workdir>/stages/<name>.json``; running again skips it,
and a stage interrupted midway resumes (training resumes from its checkpoints).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

import numpy as np

from viscodex_jax.demo.report import MODELS
from viscodex_jax.testing.images import demo_chart
from viscodex_jax.testing.reference import transformers_logits

log = logging.getLogger(__name__)


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
    ref = transformers_logits(hf, batch)
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


def train_stage_config(c, name: str, init: str, data: str, steps: int, trainable: str, lr: float):
    """The training config of demo stage ``name``: the tiny preset (``configs/tiny.py``) with the demo's data,
    steps and outputs (``<workdir>/train/<name>``, exported as float32 HF to ``<workdir>/models/<name>``)."""
    from viscodex_jax.testing.tiny import tiny_train_config

    t = tiny_train_config()
    t.model.init_checkpoint = init
    t.data.train = data
    t.workdir = os.path.join(c.workdir, "train", name)
    t.train.steps = t.optim.total_steps = steps
    t.optim.lr = lr
    t.optim.warmup_steps = max(1, steps // 10)
    t.train.trainable = trainable
    t.data.batch_size = c.batch_size
    t.data.max_len = c.max_len
    t.data.seed = c.seed
    t.checkpoint.save_every = max(10, steps // 4)
    t.export_hf = os.path.join(c.workdir, "models", name)
    t.export_dtype = "float32"
    t.mesh.shape = (1, 1, 1)  # tiny models: one device, whatever the host has
    return t


def merge_stage_config(c, tiny: dict[str, str]):
    """The merge stage's config: the VisCodex-8B recipe at the demo's lam over the tiny base and the two
    trained models, written as float32 to ``<workdir>/models/merged``."""
    from viscodex_jax.merge.recipe import merge_config as recipe_defaults

    models = os.path.join(c.workdir, "models")
    m = recipe_defaults()  # task arithmetic, as configs/merge_viscodex_8b.py
    m.base_dir = tiny["base"]
    m.vlm_dir = os.path.join(models, "vlm")
    m.coder_dir = os.path.join(models, "coder")
    m.out_dir = os.path.join(models, "merged")
    m.lam = c.lam
    m.out_dtype = "float32"
    m.overwrite = True
    return m


def _train(c, name: str, init: str, data: str, steps: int, trainable: str, lr: float) -> dict[str, Any]:
    from viscodex_jax.train.loop import run_training

    cfg = train_stage_config(c, name, init, data, steps, trainable, lr)
    log.info("training %s from %s (%d steps)", cfg.workdir, cfg.model.init_checkpoint, cfg.train.steps)
    return run_training(cfg)


def _merge(cfg) -> dict[str, Any]:
    from viscodex_jax.merge.recipe import run_merge

    return run_merge(cfg).get("summary", {})


def _eval(c, m: str, d: dict[str, str]) -> dict[str, Any]:
    """The two benchmarks on held-out items, greedy, with launch/eval.py's defaults otherwise."""
    from viscodex_jax.eval.runner import EvalSettings, evaluate

    settings = EvalSettings(max_new_tokens=c.max_new_tokens, batch_size=c.eval_batch_size)
    roots = {"chartmimic": d["heldout_chartmimic"], "mmcode": d["heldout_mmcode"]}
    summary = evaluate(os.path.join(c.workdir, "models", m), list(roots), roots, os.path.join(c.workdir, "eval", m),
                       settings, model_name=MODELS[m])
    return {name: b["score"] for name, b in summary["benchmarks"].items()}


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
    st.run("train_vlm", lambda: _train(c, "vlm", tiny["vlm"], d["describe_train"], c.vlm_steps, "all", c.lr))
    st.run("train_coder", lambda: _train(c, "coder", tiny["coder"], d["coder_train"], c.coder_steps, "llm", c.lr))
    st.run("merge", lambda: _merge(merge_stage_config(c, tiny)))
    st.run("sft_merged", lambda: _train(c, "merged_sft", os.path.join(models, "merged"), d["mcd_train"],
                                        c.sft_steps, "llm", c.sft_lr))
    st.run("sft_vlm", lambda: _train(c, "vlm_sft", os.path.join(models, "vlm"), d["mcd_train"], c.sft_steps, "llm",
                                     c.sft_lr))
    for m in MODELS:
        st.run(f"eval_{m}", lambda m=m: _eval(c, m, d))

    def report():
        from viscodex_jax.demo.report import write_report

        return write_report(wd, dict(st.seconds), parity, c.to_dict() if hasattr(c, "to_dict") else dict(c))

    summary = st.run("report", report)
    return summary
