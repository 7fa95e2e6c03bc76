"""The README's main job: the whole VisCodex pipeline on the embedded tiny default.

    python launch/demo.py [--config=configs/demo.py[:quick]] [--config.workdir=runs/demo]

Re-running continues from the finished stages. Writes <workdir>/report.{md,html}, scores.json (every
score, the image ablation, the lam sweep, the VLM's description accuracy, the task vectors' sizes),
ablation.json and sweep/ (viscodex_jax.demo.evals).
"""

import json

from absl import app, logging
from ml_collections import config_flags

from viscodex_jax.demo.pipeline import run_demo
from viscodex_jax.utils import quiet_third_party

CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Demo settings.")


def main(argv):
    del argv
    quiet_third_party()
    summary = run_demo(CONFIG.value)
    print(json.dumps({"scores": summary["scores"], "stage_seconds": summary["stage_seconds"]}, indent=1))
    logging.info("report: %s/report.html", CONFIG.value.workdir)


if __name__ == "__main__":
    app.run(main)
