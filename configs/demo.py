"""The main job's settings: the paper in miniature (launch/demo.py).

    python launch/demo.py                      # full demo (~15 min on 2 cores)
    python launch/demo.py --config=configs/demo.py:quick   # fewer steps (the end-to-end test)
"""

import ml_collections


def get_config(preset: str = "full"):
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
    elif preset != "full":
        raise ValueError(f"preset {preset!r}: use full or quick")
    return c
