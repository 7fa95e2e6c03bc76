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
      --config.score=mmcode --config.mmcode_root=/data/mmcode --config.mesh=1,4,1

With ``--config.mesh`` the three models are read once into their shards and every lam is merged on the mesh
by one jitted program. Per chip on v5p-8 (4 chips, mesh 1,4,1), XLA:TPU ahead of time
(``launch/compile_check.py --config=configs/viscodex_8b.py:v5p-8 --model_config=viscodex-8b
--programs=sweep_merge --merge_method=...``, 2026-12-02), GiB:

| method (density) | base + VLM + coder (args) | merged tensors (out) | temporaries | peak | HBM | fits |
|---|---:|---:|---:|---:|---:|---|
| task_arithmetic | 11.90 | 3.55 | 3.05 | 18.50 | 95.74 | yes |
| ties (0.5) | 11.90 | 3.55 | 4.07 | 19.51 | 95.74 | yes |
| dare_ties (0.5) | 11.90 | 3.55 | 5.55 | 21.00 | 95.74 | yes |

Scoring (MMCode generation) then runs on the same chips next to the three models (about 15.5 GiB per chip).
"""

from viscodex_jax.merge.recipe import merge_config


def get_config():
    c = merge_config()
    c.method = "task_arithmetic"
    c.lam = 0.7
    return c
