"""The demo's settings (``configs/demo.py`` is this function with its presets)."""

from __future__ import annotations

import ml_collections

PRESETS = ("full", "quick")


def demo_config(preset: str = "full") -> ml_collections.ConfigDict:
    """``full``: the README's main job (~15 min on 2 cores); ``quick``: fewer steps (the end-to-end test)."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: use full or quick")
    c = ml_collections.ConfigDict()
    c.workdir = "runs/demo"
    c.seed = 0
    c.lam = 0.7  # the paper's VisCodex-8B lam
    c.n_per_category = 16
    c.n_programs = 48
    c.n_heldout_programs = 12
    c.batch_size = 4
    c.max_len = 512
    c.lr = 3e-3
    c.sft_lr = 3e-3
    c.vlm_steps = 150
    c.coder_steps = 150
    c.sft_steps = 400
    c.max_new_tokens = 200
    c.eval_batch_size = 4
    if preset == "quick":
        c.workdir = "runs/demo_quick"
        c.n_per_category = 12
        c.n_programs = 24
        c.n_heldout_programs = 6
        c.vlm_steps = 30
        c.coder_steps = 40
        c.sft_steps = 220
        c.max_new_tokens = 160
    return c
