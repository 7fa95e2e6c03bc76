"""VisCodex-8B merge: Qwen2.5-VL-7B-Instruct + OpenCodeReasoning-Nemotron-1.1-7B over Qwen2.5-7B-Instruct.

theta = base + lam * (vlm - base) + (1 - lam) * (coder - base), lam = 0.7 (chosen by the paper from
{0.7, 0.8, 0.85, 0.9} by MMCode score). Only the language model is merged; the vision tower and the
merger are copied from the VLM.

    python launch/merge.py --config=configs/merge_viscodex_8b.py \
      --config.base_dir=/ckpt/Qwen2.5-7B-Instruct --config.vlm_dir=/ckpt/Qwen2.5-VL-7B-Instruct \
      --config.coder_dir=/ckpt/OpenCodeReasoning-Nemotron-1.1-7B --config.out_dir=/ckpt/viscodex-8b-merged
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.base_dir = ""
    c.vlm_dir = ""
    c.coder_dir = ""
    c.out_dir = ""  # HF dir (safetensors + VLM config + tokenizer + merge_report.json)
    c.orbax_dir = ""  # optional: also write our orbax checkpoint
    c.method = "task_arithmetic"
    c.lam = 0.7  # weight of the VLM's task vector, in [0, 1]; the coder gets 1 - lam
    c.scale = 1.0  # final lambda of the generalized pipeline, in (0, 2]
    c.density = 1.0  # ties/dare only
    c.seed = 0
    c.dare_rescale = "inverse_p"
    # The paper does not say whether embeddings/lm_head were merged; by default they are.
    c.merge_embeddings = True
    c.exclude = ""  # comma-separated extra regexes on param paths to copy from the VLM instead
    c.attn_lam = -1.0  # -1: off; in [0, 1]: a different lam for attention (per-group weights)
    # Lifts the ranges above (negative weights, lam > 1, scale > 2); values must still be finite.
    c.allow_unusual_weights = False
    c.out_dtype = "bfloat16"  # bfloat16 | float16 | float32
    c.max_shard_mb = 5000
    c.overwrite = False
    # lambda sweep: comma-separated lams; each is merged to <out_dir>/lam_<lam> and scored.
    c.sweep_lams = ""
    c.heldout_jsonl = ""  # {"text": ...} per line for the held-out loss score; built-in snippets if empty
    return c
