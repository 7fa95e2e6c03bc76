"""VisCodex-33B merge: Qwen2.5-VL-32B-Instruct + OpenCodeReasoning-Nemotron-1.1-32B over Qwen2.5-32B-Instruct.

Same recipe as configs/merge_viscodex_8b.py with lam = 0.85 (the 33B value is reported only by
secondary summaries of the paper).

    python launch/merge.py --config=configs/merge_viscodex_33b.py \
      --config.base_dir=/ckpt/Qwen2.5-32B-Instruct --config.vlm_dir=/ckpt/Qwen2.5-VL-32B-Instruct \
      --config.coder_dir=/ckpt/OpenCodeReasoning-Nemotron-1.1-32B --config.out_dir=/ckpt/viscodex-33b-merged
"""

import importlib.util
import os


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "merge_viscodex_8b.py")
    spec = importlib.util.spec_from_file_location("merge_viscodex_8b", path)
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.lam = 0.85
    return c
