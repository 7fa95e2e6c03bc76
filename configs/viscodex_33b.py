"""VisCodex-33B SFT: the merged Qwen2.5-VL-32B-sized model on MCD (see configs/viscodex_8b.py).

    python launch/train.py --config=configs/viscodex_33b.py:tpu --config.model.init_checkpoint=... \
        --config.data.train=... --config.workdir=...

The 32B LLM needs tensor parallelism next to FSDP: gpu8 = (1, 4, 2) on one 8xH100 host (params
~65 GB bf16 + ~262 GB fp32 moments: fits only with FSDP over all 8 GPUs, remat full and small
micro-batches; a multi-node SLURM run is the practical setting); tpu = (-1, 16, 4) on a v5p slice.
"""

import importlib.util
import os


def get_config(preset: str = "tpu"):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "viscodex_8b.py")
    spec = importlib.util.spec_from_file_location("viscodex_8b", path)
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config(preset)
    c.model.remat_policy = "full"
    if preset == "gpu8":
        c.mesh.shape = (1, 4, 2)
        c.data.batch_size = 8
        c.train.accum_steps = 16
    else:
        c.mesh.shape = (-1, 16, 4)
    return c
