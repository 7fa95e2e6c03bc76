"""Supervised fine-tuning on MCD (grain -> sharded steps on a Mesh -> orbax), resumable.

    python launch/train.py --config=configs/tiny.py --config.model.init_checkpoint=runs/tiny/vlm \
        --config.data.train=runs/mcd_sample/mcd_train.json
Restarting the same command resumes from the latest checkpoint in --config.workdir.
"""

import json

from absl import app
from ml_collections import config_flags

from viscodex_jax.utils import quiet_third_party
from viscodex_jax.model.config import ConfigError
from viscodex_jax.train.loop import run_training

CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training config.")


def main(argv):
    del argv
    quiet_third_party()
    try:
        metrics = run_training(CONFIG.value)
    except ConfigError as e:  # a bad flag value: the message names it; a traceback would bury it
        raise app.UsageError(str(e)) from None
    print(json.dumps(metrics))


if __name__ == "__main__":
    app.run(main)
