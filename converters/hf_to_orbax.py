"""HF checkpoint dir (sharded safetensors or .bin) -> our orbax checkpoint dir.

    python converters/hf_to_orbax.py --hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct --out_dir=/ckpt/vl7b_orbax
"""

from absl import app, flags, logging

from viscodex_jax import checkpoint
from viscodex_jax.checkpoint.stream import COMPRESS_DEFAULT
from viscodex_jax.utils import quiet_third_party
from viscodex_jax.model.config import ConfigError

FLAGS = flags.DEFINE_string("hf_dir", None, "HF checkpoint directory (config.json + weights).", required=True)
OUT = flags.DEFINE_string("out_dir", None, "Output directory (written atomically).", required=True)
DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Cast params to this dtype (default: keep).")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing out_dir.")
CHECK_FINITE = flags.DEFINE_bool("check_finite", True, "Refuse weights holding NaN/Inf (names the tensor).")
COMPRESS = flags.DEFINE_bool("compress", COMPRESS_DEFAULT,
                              "zstd-compress the stored chunks (smaller on disk, slower to write and read).")
FSYNC = flags.DEFINE_bool("fsync", False, "fsync every written file before the output directory appears.")


def main(argv):
    del argv
    quiet_third_party()
    try:
        cfg = checkpoint.convert_hf_to_orbax(FLAGS.value, OUT.value, dtype=DTYPE.value, overwrite=OVERWRITE.value,
                                               check_finite=CHECK_FINITE.value, compress=COMPRESS.value,
                                               fsync=FSYNC.value)
        logging.info("wrote %s (%s)", OUT.value, cfg.model_type)
    except (checkpoint.CheckpointError, ConfigError, FileExistsError) as e:
        raise SystemExit(f"error: {e}") from None  # bad input, named in the message: no traceback


if __name__ == "__main__":
    app.run(main)
