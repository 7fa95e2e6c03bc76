"""Ahead-of-time compilation for TPU slices from a CPU host: memory per chip and FLOPs of our programs.

Needs libtpu (the ``tpu`` extra; launch/setup_env.sh puts it in ``.venv-tpu``), no TPU.
"""

from viscodex_jax.aot.check import PROGRAMS, CheckError, Settings, compile_check, render
from viscodex_jax.aot.shapes import builtin_names, model_config
from viscodex_jax.aot.topologies import LibtpuMissingError, Slice, TopologyError, have_libtpu, parse_slice

__all__ = ["PROGRAMS", "CheckError", "LibtpuMissingError", "Settings", "Slice", "TopologyError", "builtin_names",
           "compile_check", "have_libtpu", "model_config", "parse_slice", "render"]
