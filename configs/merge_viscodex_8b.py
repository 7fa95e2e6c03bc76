"""VisCodex-8B merge: Qwen2.5-VL-7B-Instruct + OpenCodeReasoning-Nemotron-1.1-7B over Qwen2.5-7B-Instruct.

theta = base + lam * (vlm - base) + (1 - lam) * (coder - base), lam = 0.7 (chosen by the paper from
{0.7, 0.8, 0.85, 0.9} by MMCode score). Only the language model is merged; the vision tower and the
merger are copied from the VLM. Every field and its meaning: viscodex_jax.merge.recipe.merge_config.

    python launch/merge.py --config=configs/merge_viscodex_8b.py \
      --config.base_dir=/ckpt/Qwen2.5-7B-Instruct --config.vlm_dir=/ckpt/Qwen2.5-VL-7B-Instruct \
      --config.coder_dir=/ckpt/OpenCodeReasoning-Nemotron-1.1-7B --config.out_dir=/ckpt/viscodex-8b-merged

The paper's lam sweep (each lam merged in memory and scored by MMCode pass@1; only the best is written):

    python launch/sweep.py --config=configs/merge_viscodex_8b.py --config.base_dir=... --config.vlm_dir=... \
      --config.coder_dir=... --config.out_dir=runs/sweep_8b --config.sweep_lams=0.7,0.8,0.85,0.9 \
      --config.score=mmcode --config.mmcode_root=/data/mmcode
"""

from viscodex_jax.merge.recipe import merge_config


def get_config():
    c = merge_config()
    c.method = "task_arithmetic"
    c.lam = 0.7
    return c
