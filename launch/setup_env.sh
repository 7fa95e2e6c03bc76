#!/usr/bin/env bash
# One-time (idempotent) set-up of a fresh checkout: a virtualenv in .venv with
# the CPU torch pin installed first, then the project and its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import viscodex_jax, torch, pytest" >/dev/null 2>&1; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[test,torch]"
fi
