"""VisCodex-33B SFT: the merged Qwen2.5-VL-32B-sized model on MCD (settings as configs/viscodex_8b.py).

    python launch/train.py --config=configs/viscodex_33b.py:v5p-64 --config.model.init_checkpoint=... \
        --config.data.train=... --config.workdir=...

The 33B state (bf16 params ~66 GB, fp32 Adam moments ~262 GB, fp32 grads ~131 GB) needs at least
a v5p-64 (32 chips x 95.7 GiB). Presets: rows of 4096 tokens per chip per micro-step, accumulated to 128 rows per optimizer step,
from ``launch/compile_check.py`` (Qwen2.5-VL-32B shape, bf16 params, fp32 Adam on the LLM, 2026-12-01):

| preset | slice | chips | rows x tokens per chip | accum | remat | attention | temp GiB | peak GiB per chip | HBM | fits 90% |
|---|---|---:|---|---:|---|---|---:|---:|---:|---|
| v5p-64 | v5p:2x4x4 | 32 | 4 x 4096 | 4 * | proj | splash | 69.1 | 80.2 | 95.7 | yes (84%) |
| (v5p-64 at 2 rows) | v5p:2x4x4 | 32 | 2 x 4096 | 2 | proj | splash | 41.5 | 52.5 | 95.7 | yes |
| (v5p-64 at 1 row) | v5p:2x4x4 | 32 | 1 x 4096 | 4 | proj | splash | 27.3 | 38.2 | 95.7 | yes |

* compiled with 4 accumulation steps (a float32 gradient accumulator); the preset's 4 rows x 32 chips are
the 128 global rows, so it runs without accumulation and needs no more than this.

gpu8 is one 8xH100 host with FSDP 4 x tensor 2 and full remat; a multi-node SLURM run is the
practical GPU setting.
"""

from viscodex_jax.train.presets import Preset, sft_recipe


PRESETS = {
    "gpu8": Preset(chips=8, mesh=(1, 4, 2), rows_per_chip=1, attention="cudnn", remat="full"),
    "v5p-64": Preset(chips=32, mesh=(1, 32, 1), rows_per_chip=4, attention="splash", remat="proj",
                     topology="v5p:2x4x4", multi_host=True),
    "v5p-128": Preset(chips=64, mesh=(1, 64, 1), rows_per_chip=2, attention="splash", remat="proj",
                      topology="v5p:4x4x4", multi_host=True),
    "tpu": Preset(chips=128, mesh=(-1, 16, 4), rows_per_chip=1, attention="splash", remat="proj",
                  multi_host=True),
}


def get_config(preset: str = "v5p-64"):
    return sft_recipe(PRESETS, preset)
