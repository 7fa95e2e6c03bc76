"""The paper's lam sweep in one command: merge in memory per lam, score, write the table, plot and best checkpoint.

    python launch/sweep.py --config=configs/merge_viscodex_8b.py --config.base_dir=... --config.vlm_dir=... \
        --config.coder_dir=... --config.out_dir=runs/sweep --config.sweep_lams=0.7,0.8,0.85,0.9 \
        --config.score=mmcode --config.mmcode_root=/data/mmcode
--config.score=heldout (the default) scores by held-out loss; --config.write_all writes every lam's checkpoint.
--config.mesh=1,4,1 (data,fsdp,tensor) reads base, VLM and coder once into their shards over the mesh and
merges each lam there (one jitted program, every method on device); the memory per device is printed first.
"""

from absl import app
from ml_collections import config_flags

from viscodex_jax.checkpoint import CheckpointError
from viscodex_jax.merge import MergeError
from viscodex_jax.merge.sweep import lambda_sweep
from viscodex_jax.model.config import ConfigError
from viscodex_jax.utils import quiet_third_party

CONFIG = config_flags.DEFINE_config_file("config", "configs/merge_viscodex_8b.py", "Merge config (sweep_* fields).")


def main(argv):
    del argv
    quiet_third_party()
    c = CONFIG.value
    try:
        result = lambda_sweep(c)
    except (MergeError, CheckpointError, ConfigError, FileExistsError) as e:
        raise SystemExit(f"sweep: {e}") from None  # bad input, named in the message: no traceback, status 1
    with open(f"{c.out_dir}/sweep.md") as f:
        print(f.read(), end="")
    print(f"best lam: {result['best_lam']:g} (table, plot and sweep.json in {c.out_dir})")


if __name__ == "__main__":
    app.run(main)
