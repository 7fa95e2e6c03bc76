"""Merge a VLM and a coder into one model (the VisCodex recipe), or sweep lam.

    python launch/merge.py --config=configs/merge_viscodex_8b.py --config.base_dir=... \
        --config.vlm_dir=... --config.coder_dir=... --config.out_dir=...
    python launch/merge.py --config=configs/merge_viscodex_8b.py ... --config.sweep_lams=0.7,0.8,0.85,0.9
"""

import json

from absl import app
from ml_collections import config_flags

from viscodex_jax.checkpoint import CheckpointError
from viscodex_jax.merge import MergeError
from viscodex_jax.merge.recipe import lambda_sweep, parse_sweep_lams, run_merge
from viscodex_jax.model.config import ConfigError
from viscodex_jax.utils import quiet_third_party

CONFIG = config_flags.DEFINE_config_file("config", "configs/merge_viscodex_8b.py", "Merge config.")


def main(argv):
    del argv
    quiet_third_party()
    c = CONFIG.value
    try:
        if c.sweep_lams:
            result = lambda_sweep(c, parse_sweep_lams(c.sweep_lams))
            for r in result["rows"]:
                print(f"lam={r['lam']:<5g} score={r['score']:.5f}  {r['dir']}")
            print(f"best lam: {result['best_lam']}")
        else:
            print(json.dumps(run_merge(c)["summary"], indent=2))
    except (MergeError, CheckpointError, ConfigError, FileExistsError) as e:
        # Bad input, already named in the message: no traceback, exit status 1.
        raise SystemExit(f"merge: {e}") from None


if __name__ == "__main__":
    app.run(main)
