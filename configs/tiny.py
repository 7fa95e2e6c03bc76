"""Tiny model on CPU: the embedded default (see launch/make_tiny.py and the MCD sample).

    python launch/train.py --config=configs/tiny.py --config.model.init_checkpoint=runs/tiny/vlm \
        --config.data.train=runs/mcd_sample/mcd_train.json --config.workdir=runs/train_tiny
"""

from viscodex_jax.testing.tiny import tiny_train_config


def get_config():
    return tiny_train_config()
