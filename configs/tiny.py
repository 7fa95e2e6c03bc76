"""Tiny model on CPU: the embedded default (see launch/make_tiny.py and the MCD sample).

    python launch/train.py --config=configs/tiny.py --config.model.init_checkpoint=runs/tiny/vlm \
        --config.data.train=runs/mcd_sample/mcd_train.json --config.workdir=runs/train_tiny
"""

from viscodex_jax.train.config import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/train_tiny"
    c.data.max_len = 512
    c.data.batch_size = 4
    c.data.patches_per_row = 256
    c.train.steps = 60
    c.train.vocab_chunk = 2048
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 5
    c.optim.total_steps = 60
    c.checkpoint.save_every = 20
    c.checkpoint.keep = 2
    return c
