"""The README's main job: the VisCodex pipeline on the embedded tiny default.

    python launch/demo.py [--workdir=runs/demo]
"""

from absl import app, flags, logging

from viscodex_jax.demo import format_summary, run_demo
from viscodex_jax.logs import quiet_third_party

WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where checkpoints and results go.")
SEED = flags.DEFINE_integer("seed", 0, "Seed for the tiny checkpoints and demo image.")
TOL = flags.DEFINE_float("tolerance", 1e-4, "Fail if the fp32 logit difference to transformers exceeds this.")


def main(argv):
    del argv
    quiet_third_party()
    summary = run_demo(WORKDIR.value, SEED.value)
    print(format_summary(summary))
    if summary["max_abs_logit_diff"] > TOL.value or not summary["roundtrip_bit_identical"]:
        raise SystemExit("parity check failed")
    logging.info("results in %s/summary.json", WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
