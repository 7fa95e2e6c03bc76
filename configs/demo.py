"""The main job's settings: the paper in miniature (launch/demo.py).

    python launch/demo.py                      # full demo (~15 min on 2 quiet cores)
    python launch/demo.py --config=configs/demo.py:quick   # fewer items and steps (the end-to-end test)
"""

from viscodex_jax.demo.config import demo_config


def get_config(preset: str = "full"):
    return demo_config(preset)
