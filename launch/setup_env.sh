#!/usr/bin/env bash
# One-time (idempotent) set-up of a fresh checkout: a virtualenv in .venv with
# the CPU torch pin installed first, then the project with its test and eval
# extras, and Debian's headless Chromium for Design2Code rendering.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x /usr/bin/chromium ] && [ -z "${VISCODEX_CHROMIUM:-}" ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
  else
    echo "setup_env: /usr/bin/chromium missing; install Debian's chromium (or set VISCODEX_CHROMIUM)" >&2
  fi
fi
# bubblewrap and libseccomp: the eval sandbox (viscodex_jax/eval/sandbox.py) refuses model-written code without them.
if ! command -v bwrap >/dev/null 2>&1 || ! ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2'; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap libseccomp2 >/dev/null
  else
    echo "setup_env: install Debian's bubblewrap and libseccomp2 (the eval sandbox needs them)" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import viscodex_jax, torch, pytest, scipy, matplotlib, playwright, tensorboardX, pyseccomp" >/dev/null 2>&1; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[test,torch,eval]"
fi
