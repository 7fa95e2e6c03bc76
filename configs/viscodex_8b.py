"""VisCodex-8B SFT: the merged Qwen2.5-VL-7B-sized model on MCD, vision tower and merger frozen.

Paper-adjacent settings (`train.presets.sft_recipe`; the paper publishes none; the authors' earlier configs used lr 1e-5 for
full fine-tuning, cosine, warmup ratio 0.1, 1 epoch, bf16, cutoff 4096).

    python launch/train.py --config=configs/viscodex_8b.py:v5p-8 \
        --config.model.init_checkpoint=/ckpt/viscodex-8b-merged --config.data.train=/data/mcd_tfds \
        --config.workdir=/ckpt/viscodex-8b-sft

Presets (after the colon): rows of 4096 tokens (and 4096 image patches) per chip per micro-step,
accumulated to 128 rows per optimizer step; ``tpu`` is the generic pod preset (data x FSDP over
every chip of any slice). TPU rows are the largest that ``launch/compile_check.py`` fits within 90%
of HBM and that divide the 128 global rows. Measured (XLA:TPU ahead-of-time compile of the SFT step
on a CPU host, Qwen2.5-VL-7B shape, bf16 params, fp32 Adam on the LLM, 2026-12-01):

| preset | slice | chips | rows x tokens per chip | accum | remat | attention | temp GiB | peak GiB per chip | HBM | fits 90% |
|---|---|---:|---|---:|---|---|---:|---:|---:|---|
| v5p-8 | v5p:2x2x1 | 4 | 8 x 4096 | 4 * | proj | splash | 66.0 | 86.1 | 95.7 | yes (89.9%) |
| (v5p-8 at 4 rows) | v5p:2x2x1 | 4 | 4 x 4096 | 8 | proj | splash | 44.3 | 63.9 | 95.7 | yes |
| v5p-32 | v5p:2x2x4 | 16 | 8 x 4096 | 2 * | proj | splash | 48.4 | 54.4 | 95.7 | yes |
| (v5p-32 at 4 rows) | v5p:2x2x4 | 16 | 4 x 4096 | 2 | proj | splash | 27.8 | 33.6 | 95.7 | yes |
| (v5p-128 at 4 rows) | v5p:4x4x4 | 64 | 4 x 4096 | 1 | proj | splash | 22.5 | 26.0 | 95.7 | yes |
| v6e-8 | v6e:2x4 | 8 | 1 x 4096 | 16 | proj | splash | 17.1 | 27.5 | 32.0 | yes |

* compiled with more accumulation steps than the preset's (v5p-8: 8 vs 4; v5p-32: 2 vs none): the
same per micro-step, plus a float32 gradient accumulator the preset may not need.
v5p-128 runs 2 rows per chip (64 chips x 2 = the 128 global rows); 4 rows fit as the row above shows.
Per-chip memory at a fixed number of rows per chip falls, never grows, with the slice: FSDP divides
the state over more chips and the activations stay divided like the batch. gpu8 (8 x H100 80 GB) is
not compiled here (no GPU topology ahead of time): 2 rows per GPU by the same arithmetic as v5p-8.
"""

from viscodex_jax.train.presets import Preset, sft_recipe


PRESETS = {
    "gpu8": Preset(chips=8, mesh=(1, 8, 1), rows_per_chip=2, attention="cudnn", remat="proj"),
    "v5p-8": Preset(chips=4, mesh=(1, 4, 1), rows_per_chip=8, attention="splash", remat="proj",
                    topology="v5p:2x2x1"),
    "v5p-32": Preset(chips=16, mesh=(1, 16, 1), rows_per_chip=8, attention="splash", remat="proj",
                     topology="v5p:2x2x4", multi_host=True),
    "v5p-128": Preset(chips=64, mesh=(2, 32, 1), rows_per_chip=2, attention="splash", remat="proj",
                      topology="v5p:4x4x4", multi_host=True),
    "v6e-8": Preset(chips=8, mesh=(1, 8, 1), rows_per_chip=1, attention="splash", remat="proj",
                    topology="v6e:2x4"),
    "tpu": Preset(chips=128, mesh=(-1, 16, 1), rows_per_chip=1, attention="splash", remat="proj",
                  multi_host=True),
}


def get_config(preset: str = "gpu8"):
    return sft_recipe(PRESETS, preset)
