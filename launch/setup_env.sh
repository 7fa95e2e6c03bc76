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
# bubblewrap and libseccomp: the eval sandbox (viscodex_jax/eval/sandbox/) refuses model-written code without them.
if ! command -v bwrap >/dev/null 2>&1 || ! ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2'; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap libseccomp2 >/dev/null
  else
    echo "setup_env: install Debian's bubblewrap and libseccomp2 (the eval sandbox needs them)" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import viscodex_jax, torch, pytest, xdist, scipy, matplotlib, playwright, tensorboardX, pyseccomp" >/dev/null 2>&1; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[test,torch,eval]"
fi
# .venv-tpu: .venv's packages plus libtpu, for compiling TPU programs on this host (launch/compile_check.py,
# tests/test_compile_check.py). libtpu stays out of .venv: there every JAX process would probe for a TPU and
# print libtpu's errors. The .pth makes .venv's site-packages (editable install included) visible, so both
# run the same jax, flax and project code; the tpu pin is the same jax version, so pip adds libtpu only.
if ! .venv-tpu/bin/python -c "import libtpu, viscodex_jax" >/dev/null 2>&1; then
  [ -x .venv-tpu/bin/python ] || .venv/bin/python -m venv .venv-tpu
  .venv/bin/python -c 'import sysconfig; print("import site; site.addsitedir(%r)" % sysconfig.get_paths()["purelib"])' \
    > "$(.venv-tpu/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/viscodex_main_venv.pth"
  .venv-tpu/bin/pip install -q "jax[tpu]==$(.venv/bin/python -c 'import jax; print(jax.__version__)')"
fi
# .venv-score: ChartMimic's chart programs run with the official pins (matplotlib 3.8.4, ...), see the script.
bash launch/setup_scoring_env.sh
