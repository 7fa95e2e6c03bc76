"""VisCodex-33B merge: Qwen2.5-VL-32B-Instruct + OpenCodeReasoning-Nemotron-1.1-32B over Qwen2.5-32B-Instruct.

Same recipe as configs/merge_viscodex_8b.py with lam = 0.85 (the 33B value is reported only by
secondary summaries of the paper).

    python launch/merge.py --config=configs/merge_viscodex_33b.py \
      --config.base_dir=/ckpt/Qwen2.5-32B-Instruct --config.vlm_dir=/ckpt/Qwen2.5-VL-32B-Instruct \
      --config.coder_dir=/ckpt/OpenCodeReasoning-Nemotron-1.1-32B --config.out_dir=/ckpt/viscodex-33b-merged
"""

from viscodex_jax.merge.recipe import merge_config


def get_config():
    c = merge_config()
    c.method = "task_arithmetic"
    c.lam = 0.85
    return c
