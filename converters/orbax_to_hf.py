"""Our orbax (or any loadable) checkpoint dir -> HF safetensors dir that transformers loads.

    python converters/orbax_to_hf.py --ckpt_dir=/ckpt/viscodex_orbax --out_dir=/ckpt/viscodex_hf
"""

from absl import app, flags, logging

from viscodex_jax import checkpoint
from viscodex_jax.utils import quiet_third_party
from viscodex_jax.model.config import ConfigError

CKPT = flags.DEFINE_string("ckpt_dir", None, "Our checkpoint dir (orbax params + config.json).", required=True)
OUT = flags.DEFINE_string("out_dir", None, "Output HF directory (written atomically).", required=True)
DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Cast tensors (default: keep).")
SHARD = flags.DEFINE_integer("max_shard_mb", 5000, "Maximum safetensors shard size in MB.")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing out_dir.")
CHECK_FINITE = flags.DEFINE_bool("check_finite", True, "Refuse weights holding NaN/Inf (names the tensor).")


def main(argv):
    del argv
    quiet_third_party()
    try:
        shards = checkpoint.convert_orbax_to_hf(CKPT.value, OUT.value, dtype=DTYPE.value,
                                                max_shard_bytes=SHARD.value * 10**6, overwrite=OVERWRITE.value,
                                                check_finite=CHECK_FINITE.value)
        logging.info("wrote %d shard(s) to %s", len(shards), OUT.value)
    except (checkpoint.CheckpointError, ConfigError, FileExistsError) as e:
        raise SystemExit(f"error: {e}") from None  # bad input, named in the message: no traceback


if __name__ == "__main__":
    app.run(main)
