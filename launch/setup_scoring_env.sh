#!/usr/bin/env bash
# Idempotent set-up of .venv-score: the interpreter ChartMimic runs reference and generated chart
# programs with (viscodex_jax/eval/chartmimic/, through the sandbox). It holds the official
# ChartMimic pins (its environment.yaml: matplotlib 3.8.4, numpy 1.26.1, scipy 1.12.0, seaborn 0.13.2,
# networkx 3.2.1, squarify 0.4.3, matplotlib-venn 0.11.10, ...), which clash with the project's own
# numpy 2 / newest matplotlib, hence a venv of its own. pandas is 1.5.3: the official 1.4.2 has no
# wheel for Python 3.11. No torch, no project install: only chart programs run here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python  # same interpreter version as the project's venv
PINS=(
  "matplotlib==3.8.4" "numpy==1.26.1" "scipy==1.12.0" "pandas==1.5.3" "seaborn==0.13.2"
  "networkx==3.2.1" "squarify==0.4.3" "matplotlib-venn==0.11.10" "pillow==10.2.0"
  "contourpy==1.2.0" "cycler==0.12.1" "fonttools==4.50.0" "kiwisolver==1.4.5" "pyparsing==3.1.2"
)
CHECK='import matplotlib, numpy, pandas, seaborn, squarify, networkx, matplotlib_venn, scipy
assert matplotlib.__version__ == "3.8.4", matplotlib.__version__'
if ! .venv-score/bin/python -c "$CHECK" >/dev/null 2>&1; then
  [ -x .venv-score/bin/python ] || "$PY" -m venv .venv-score
  .venv-score/bin/pip install -q --upgrade pip
  .venv-score/bin/pip install -q "${PINS[@]}"
  .venv-score/bin/python -c "$CHECK"
fi
