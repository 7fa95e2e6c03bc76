"""Writes the tiny seeded HF checkpoints (base, vlm, coder) used by the demo and tests.

    python launch/make_tiny.py --out_dir=runs/tiny --seed=0
"""

from absl import app, flags, logging

from viscodex_jax.testing.tiny import make_tiny_checkpoints
from viscodex_jax.utils import quiet_third_party

OUT = flags.DEFINE_string("out_dir", "runs/tiny", "Output directory (base/, vlm/, coder/ inside).")
SEED = flags.DEFINE_integer("seed", 0, "Seed: the same seed writes the same bytes.")
RANKS = flags.DEFINE_integer("num_ranks", 4096, "BPE ranks kept in the small-vocab Qwen2.5 tokenizer.")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing out_dir.")


def main(argv):
    del argv
    quiet_third_party()
    for name, path in make_tiny_checkpoints(OUT.value, SEED.value, RANKS.value, overwrite=OVERWRITE.value).items():
        logging.info("%s: %s", name, path)


if __name__ == "__main__":
    app.run(main)
