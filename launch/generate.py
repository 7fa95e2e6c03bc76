"""Generate code (or any text) from a checkpoint for a prompt with images; prints as it streams.

    python launch/generate.py --checkpoint=/ckpt/viscodex-8b --image=chart.png \
        --prompt="Write matplotlib code that reproduces this chart." [--temperature=0.7 --top_p=0.95]
"""

import sys

from absl import app, flags

import viscodex_jax as vx
from viscodex_jax.data.chat import user_conversation
from viscodex_jax.utils import quiet_third_party
from viscodex_jax.model.config import ConfigError

CKPT = flags.DEFINE_string("checkpoint", None, "HF dir or our orbax dir.", required=True)
IMAGES = flags.DEFINE_multi_string("image", [], "Image file(s), in prompt order (repeatable).")
PROMPT = flags.DEFINE_string("prompt", None, "User message text.", required=True)
SYSTEM = flags.DEFINE_string("system", None, "System prompt (default: the chat template's).")
MAX_NEW = flags.DEFINE_integer("max_new_tokens", 512, "Maximum tokens to generate.")
TEMP = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0 = off).")
TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")


def main(argv):
    del argv
    quiet_third_party()
    from PIL import Image

    model = vx.load(CKPT.value, dtype=DTYPE.value).for_inference()
    images = [Image.open(p) for p in IMAGES.value]
    messages = user_conversation(PROMPT.value, len(images), SYSTEM.value)
    try:
        sampler = vx.sampler_from_settings(TEMP.value, TOP_P.value, TOP_K.value)
        vx.generate(model, [messages], images=[images], max_new_tokens=MAX_NEW.value, sampler=sampler, seed=SEED.value,
                    stream=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    except ConfigError as e:  # names the setting, which is the flag of the same name
        raise app.UsageError(f"--{e}") from None
    print()


if __name__ == "__main__":
    app.run(main)
