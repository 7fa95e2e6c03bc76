"""The sandbox for model-written code: ``run`` (``run_python``, limits, results), ``bwrap`` (the bubblewrap
command line), ``seccomp`` (the syscall filter), ``cgroup`` (per-run cgroups), ``pipes`` (capped output and
the files a run leaves), ``_sandbox_stage0`` (run by path as root before bwrap)."""

from viscodex_jax.eval.sandbox.run import WEAK_ENV, Limits, SandboxResult, SandboxUnavailable, run_python

__all__ = ["Limits", "SandboxResult", "SandboxUnavailable", "run_python", "WEAK_ENV"]
