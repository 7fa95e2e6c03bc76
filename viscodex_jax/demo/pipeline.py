"""The paper in miniature: the README's main job, on tiny models and generated data.

Stages (each a library call; the same work as the documented command named after it):

    checkpoints    tiny seeded HF checkpoints: base (Qwen2), vlm (Qwen2.5-VL), coder (Qwen2)
    parity         HF -> orbax -> our forward vs transformers; HF export round trip
    data           the toy world (demo.data): shared corpus, describe data, problems, MCD-format SFT data,
                   held-out ChartMimic charts and MMCode problems
    pretrain_base  the base learns the shared corpus (as launch/train.py)
    init_models    the VLM to fine-tune: the tiny VLM's vision tower on the trained base's language model
    train_vlm      the VLM learns to describe the charts it sees (vision tower trained too)
    train_coder    the coder (from the trained base) learns the programming problems
    task_vectors   |tau| / |base| of the two fine-tunes (merged tensors only)
    merge          as launch/merge.py: base + lam * tau_vlm + (1 - lam) * tau_coder, vision copied from the VLM
    sweep          as launch/merge.py --config.sweep_lams: the merge before SFT at each lam, scored on the
                   held-out charts and problems (<workdir>/sweep/)
    sft_merged     as launch/train.py on the MCD-format data, vision tower + merger frozen
    sft_vlm        the same fine-tune from the un-merged VLM (the paper's ablation)
    eval_*         as launch/eval.py: ChartMimic low-level on held-out charts, MMCode pass@1 on held-out problems
    describe_vlm   the VLM's descriptions of the held-out charts: kind / colour / count / title accuracy
    ablation       vlm_sft and merged_sft on the held-out charts with the images shuffled across items
    report         <workdir>/report.{md,html} (demo.report), <workdir>/scores.json

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

from viscodex_jax.demo import evals
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


def train_stage_config(c, name: str, init: str, data: str, steps: int, trainable: str, lr: float,
                       patches_per_row: int = 0, lr_scale: tuple = ()):
    """The training config of demo stage ``name``: the tiny preset (``configs/tiny.py``) with the demo's data,
    steps and outputs (``<workdir>/train/<name>``, exported as float32 HF to ``<workdir>/models/<name>``)."""
    from viscodex_jax.testing.tiny import tiny_train_config

    t = tiny_train_config()
    t.model.init_checkpoint = init
    t.data.train = data
    t.workdir = os.path.join(c.workdir, "train", name)
    t.train.steps = t.optim.total_steps = steps
    t.optim.lr = lr
    t.optim.lr_scale = lr_scale
    t.optim.warmup_steps = max(1, steps // 10)
    t.train.trainable = trainable
    t.data.batch_size = c.batch_size
    t.data.max_len = c.max_len
    if patches_per_row:
        t.data.patches_per_row = patches_per_row
    t.data.seed = c.seed
    t.checkpoint.save_every = max(10, steps // 4)
    t.export_hf = os.path.join(c.workdir, "models", name)
    t.export_dtype = "float32"
    t.overwrite = True  # a stage interrupted after its export runs again and writes the same bytes
    t.mesh.shape = (1, 1, 1)  # tiny models: one device, whatever the host has
    return t


def merge_stage_config(c):
    """The merge stage's config: the VisCodex-8B recipe at the demo's lam over the trained base and the two
    fine-tuned models, written as float32 to ``<workdir>/models/merged``."""
    from viscodex_jax.merge.recipe import merge_config as recipe_defaults

    models = os.path.join(c.workdir, "models")
    m = recipe_defaults()  # task arithmetic, as configs/merge_viscodex_8b.py
    m.base_dir = os.path.join(models, "base")
    m.vlm_dir = os.path.join(models, "vlm")
    m.coder_dir = os.path.join(models, "coder")
    m.out_dir = os.path.join(models, "merged")
    m.lam = c.lam
    m.out_dtype = "float32"
    m.overwrite = True
    return m


def init_vlm(tiny_vlm: str, base: str, out_dir: str, max_pixels: int) -> dict[str, Any]:
    """The tiny VLM's (random) vision tower and merger on the trained base's language model, as Qwen2.5-VL's
    LLM starts from Qwen2.5, with a processor that shows the VLM ``max_pixels`` per image.

    The processor normalises white to 0 (mean 1, std 0.5) instead of CLIP's statistics: the charts are
    mostly white page, and with CLIP's mean every patch of the random tower starts from the same large
    vector, so its features barely differ between charts (measured: cosine 0.9-1.0 between a red bar and a
    blue scatter chart after training, against 0.4-0.7 at init with white at 0) and the VLM does not learn
    to see in the demo's budget."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, Qwen2VLImageProcessorPil

    from viscodex_jax.data.tokenizer import save_tokenizer
    from viscodex_jax.utils import atomic_dir

    vlm = AutoModelForImageTextToText.from_pretrained(tiny_vlm).eval()
    lm = AutoModelForCausalLM.from_pretrained(base).eval()
    sd = {f"model.language_model.{k[len('model.'):]}" if k.startswith("model.") else k: v
          for k, v in lm.state_dict().items()}
    missing, unexpected = vlm.load_state_dict(sd, strict=False)
    if unexpected or any("visual" not in m for m in missing):
        raise RuntimeError(f"init_vlm: the base's weights do not fit the VLM {tiny_vlm}: {unexpected} {missing}")
    with torch.no_grad(), atomic_dir(out_dir, overwrite=True) as tmp:
        vlm.save_pretrained(tmp)
        from transformers import AutoTokenizer

        save_tokenizer(AutoTokenizer.from_pretrained(base), tmp)
        Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=max_pixels, image_mean=[1.0, 1.0, 1.0],
                                 image_std=[0.5, 0.5, 0.5]).save_pretrained(tmp)
    return {"vlm_init": out_dir, "max_pixels": max_pixels, "image_mean": 1.0, "image_std": 0.5}


def _train(c, name: str, init: str, data: str, steps: int, trainable: str, lr: float,
           patches_per_row: int = 0, lr_scale: tuple = ()) -> dict[str, Any]:
    from viscodex_jax.train.loop import run_training

    cfg = train_stage_config(c, name, init, data, steps, trainable, lr, patches_per_row, lr_scale)
    log.info("training %s from %s (%d steps)", cfg.workdir, cfg.model.init_checkpoint, cfg.train.steps)
    return run_training(cfg)


def _merge(cfg) -> dict[str, Any]:
    from viscodex_jax.merge.recipe import run_merge

    return run_merge(cfg).get("summary", {})


def run_demo(c) -> dict[str, Any]:
    """Runs (or continues) every stage; returns the summary (``<workdir>/scores.json``)."""
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

        return make_demo_data(os.path.join(wd, "data"), c)

    d = st.run("data", data)
    st.run("pretrain_base", lambda: _train(c, "base", tiny["base"], d["base_train"], c.base_steps, "llm",
                                           c.base_lr))
    init = st.run("init_models", lambda: init_vlm(tiny["vlm"], os.path.join(models, "base"),
                                                 os.path.join(models, "vlm_init"), c.image_max_pixels))
    # descriptions are short: a row holds as many of them as its image-patch budget allows. The fresh vision
    # tower learns at vision_lr, the pretrained LLM at vlm_lr (its change is the VLM's task vector)
    st.run("train_vlm", lambda: _train(c, "vlm", init["vlm_init"], d["describe_train"], c.vlm_steps, "all", c.vlm_lr,
                                       c.vlm_patches_per_row, (("^visual/", c.vision_lr / c.vlm_lr),)))
    st.run("train_coder", lambda: _train(c, "coder", os.path.join(models, "base"), d["coder_train"],
                                         c.coder_steps, "llm", c.coder_lr))
    merge_cfg = merge_stage_config(c)
    tv = st.run("task_vectors", lambda: evals.task_vector_norms(merge_cfg))
    st.run("merge", lambda: _merge(merge_cfg))
    st.run("sft_merged", lambda: _train(c, "merged_sft", os.path.join(models, "merged"), d["mcd_train"],
                                        c.sft_steps, "llm", c.sft_lr))
    st.run("sft_vlm", lambda: _train(c, "vlm_sft", os.path.join(models, "vlm"), d["mcd_train"], c.sft_steps, "llm",
                                     c.sft_lr))
    scores = {}
    for m in evals.EVAL_MODELS:
        scores[m] = st.run(f"eval_{m}", lambda m=m: evals.evaluate_model(c, m, d))
    describe = st.run("describe_vlm", lambda: evals.describe_accuracy(c, "vlm", d))
    ablation = st.run("ablation", lambda: evals.image_ablation(c, d))
    sweep = st.run("sweep", lambda: evals.sweep(c, merge_cfg, d))

    summary = {"scores": scores, "ablation": ablation, "sweep": sweep, "describe_vlm": describe,
               "task_vectors": tv, "n_items": evals.item_counts(d)}

    def report():
        from viscodex_jax.demo.report import write_report

        evals.write_json(os.path.join(wd, "scores.json"), summary)
        write_report(wd, dict(st.seconds), parity, c.to_dict() if hasattr(c, "to_dict") else dict(c))
        return summary

    st.run("report", report)
    return {**summary, "stage_seconds": dict(st.seconds)}
