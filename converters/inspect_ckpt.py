"""Prints a checkpoint's tensors (name, shape, dtype, bytes): HF dir, orbax dir, or our params after conversion.

    python converters/inspect_ckpt.py --path=/ckpt/Qwen2.5-VL-7B-Instruct [--as_params]
"""

from absl import app, flags

from viscodex_jax import checkpoint
from viscodex_jax.checkpoint.inspect_tree import format_rows, inspect_rows
from viscodex_jax.utils import quiet_third_party

PATH = flags.DEFINE_string("path", None, "HF or orbax checkpoint directory.", required=True)
AS_PARAMS = flags.DEFINE_bool("as_params", False, "Show our params tree (converted, stacked layers) instead of the files.")


def main(argv):
    del argv
    quiet_third_party()
    if AS_PARAMS.value:
        _, params, _ = checkpoint.load_params(PATH.value)
        print(format_rows(inspect_rows(params)))
    else:
        print(format_rows(inspect_rows(PATH.value)))


if __name__ == "__main__":
    app.run(main)
