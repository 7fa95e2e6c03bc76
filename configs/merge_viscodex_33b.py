"""VisCodex-33B merge: Qwen2.5-VL-32B-Instruct + OpenCodeReasoning-Nemotron-1.1-32B over Qwen2.5-32B-Instruct.

Same recipe as configs/merge_viscodex_8b.py with lam = 0.85 (the 33B value is reported only by
secondary summaries of the paper).

    python launch/merge.py --config=configs/merge_viscodex_33b.py \
      --config.base_dir=/ckpt/Qwen2.5-32B-Instruct --config.vlm_dir=/ckpt/Qwen2.5-VL-32B-Instruct \
      --config.coder_dir=/ckpt/OpenCodeReasoning-Nemotron-1.1-32B --config.out_dir=/ckpt/viscodex-33b-merged

The lam sweep on device (``launch/sweep.py ... --config.mesh=1,4,1``, as in configs/merge_viscodex_8b.py) fits
a v5p-8 too. Per chip (4 chips, mesh 1,4,1), XLA:TPU ahead of time (``launch/compile_check.py
--config=configs/viscodex_33b.py:v5p-64 --topology=v5p-8 --config.mesh.shape="(1,-1,1)"
--model_config=viscodex-33b --programs=sweep_merge --merge_method=...``, 2026-12-02), GiB:

| method (density) | base + VLM + coder (args) | merged tensors (out) | temporaries | peak | HBM | fits |
|---|---:|---:|---:|---:|---:|---|
| task_arithmetic | 47.05 | 15.26 | 0.73 | 63.04 | 95.74 | yes |
| ties (0.5) | 47.05 | 15.26 | 7.98 | 70.29 | 95.74 | yes |

Scoring then generates next to about 62 GiB of params per chip: the KV cache has what is left.
"""

from viscodex_jax.merge.recipe import merge_config


def get_config():
    c = merge_config()
    c.method = "task_arithmetic"
    c.lam = 0.85
    return c
