"""The demo's settings (``configs/demo.py`` is this function with its presets)."""

from __future__ import annotations

import ml_collections

PRESETS = ("full", "quick")
SWEEP_LAMS = (0.0, 0.3, 0.5, 0.7, 0.85, 1.0)


def demo_config(preset: str = "full") -> ml_collections.ConfigDict:
    """``full``: the README's main job; ``quick``: fewer items and steps (the end-to-end test)."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: use full or quick")
    c = ml_collections.ConfigDict()
    c.workdir = "runs/demo"
    c.seed = 0
    c.lam = 0.7  # the paper's VisCodex-8B lam
    # data (demo.data): charts drawn at 224 px and seen by the VLM at 112 px (16 image tokens)
    c.n_train_charts = 240
    c.n_heldout_charts = 24
    c.n_programs = 240
    c.n_heldout_programs = 24
    c.n_base_corpus = 800
    c.n_mcd_per_category = 8  # MCD's html / qa / algorithm records from testing.mcd_sample
    c.image_max_pixels = 112 * 112
    # training: the base first, then the two fine-tunes (smaller lr: task vectors small next to the base)
    c.batch_size = 4
    c.max_len = 512
    c.base_lr = 3e-3
    # the fine-tunes' LLM lr is well below the base's, so their task vectors stay small next to the base
    c.coder_lr = 1e-3
    c.vlm_lr = 5e-4  # the VLM's language model
    c.vision_lr = 3e-3  # the VLM's vision tower and merger: they start from random
    c.vlm_patches_per_row = 512  # 8 images of 64 patches per row
    c.sft_lr = 2e-3
    c.base_steps = 300
    c.vlm_steps = 250
    c.coder_steps = 200
    c.sft_steps = 300
    # evaluation (greedy): long enough for a chart program (~130 tokens); a solution ends after ~40
    c.max_new_tokens = 160
    c.eval_batch_size = 8
    c.sweep_lams = ",".join(f"{x:g}" for x in SWEEP_LAMS)
    if preset == "quick":
        c.workdir = "runs/demo_quick"
        c.n_train_charts = 160
        c.n_heldout_charts = 16
        c.n_programs = 160
        c.n_heldout_programs = 16
        c.n_base_corpus = 400
        c.n_mcd_per_category = 4
        c.base_steps = 150
        c.vlm_steps = 150
        c.coder_steps = 120
        c.sft_steps = 180
        c.sweep_lams = "0,0.7,1"
    return c
