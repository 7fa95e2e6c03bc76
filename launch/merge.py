"""Merge a VLM and a coder into one model (the VisCodex recipe). The lam sweep is launch/sweep.py.

    python launch/merge.py --config=configs/merge_viscodex_8b.py --config.base_dir=... \
        --config.vlm_dir=... --config.coder_dir=... --config.out_dir=...
"""

import json

from absl import app
from ml_collections import config_flags

from viscodex_jax.checkpoint import CheckpointError
from viscodex_jax.merge import MergeError
from viscodex_jax.merge.recipe import run_merge
from viscodex_jax.model.config import ConfigError
from viscodex_jax.utils import quiet_third_party

CONFIG = config_flags.DEFINE_config_file("config", "configs/merge_viscodex_8b.py", "Merge config.")


def main(argv):
    del argv
    quiet_third_party()
    c = CONFIG.value
    if c.sweep_lams:
        raise SystemExit("merge: --config.sweep_lams is the lam sweep's flag: run launch/sweep.py with it "
                         "(launch/merge.py writes one merge)")
    try:
        print(json.dumps(run_merge(c)["summary"], indent=2))
    except (MergeError, CheckpointError, ConfigError, FileExistsError) as e:
        # Bad input, already named in the message: no traceback, exit status 1.
        raise SystemExit(f"merge: {e}") from None


if __name__ == "__main__":
    app.run(main)
