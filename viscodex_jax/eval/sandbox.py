"""Runs untrusted Python (model-written code) in a confined separate process.

Confinement, in layers:
* a fresh process (own session, so the whole tree is killed together) with
  wall-clock and CPU time limits, an address-space limit, a file-size limit
  (which also caps stdout/stderr, written to files), a process-count limit and
  no core dumps;
* its own temp working dir, a scrubbed environment (no inherited variables:
  secrets in the parent's environment are not visible), ``python -I``;
* no network: a new network namespace where the OS allows (only a loopback
  that is down), otherwise the ``socket`` module is disabled;
* when started as root: a mount namespace with "/" read-only except the
  program's dir, and an empty capability bounding set, so the program keeps
  uid 0 but none of root's powers (see ``_sandbox_launcher``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Mapping

_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_launcher.py")


@dataclasses.dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 2 * 2**30
    file_size_bytes: int = 16 * 2**20
    max_processes: int = 32
    max_output_bytes: int = 1 * 2**20  # stdout/stderr kept in the result
    allow_network: bool = False


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """``status``: "ok" (exit 0), "error" (non-zero exit, error text in ``stderr``),
    "timeout" (wall clock), or "killed" (a resource limit; ``limit`` says which)."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_seconds: float
    limit: str | None = None
    files: Mapping[str, bytes] = dataclasses.field(default_factory=dict)
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"


_SIGNAL_LIMITS = {signal.SIGXCPU: "cpu", signal.SIGXFSZ: "file_size", signal.SIGKILL: "killed", signal.SIGSEGV: "memory"}


def _read_capped(path: str, cap: int) -> tuple[str, bool]:
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except FileNotFoundError:
        return "", False
    return data[:cap].decode("utf-8", "replace"), len(data) > cap


def _scrubbed_env(workdir: str, allow_network: bool) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "MPLBACKEND": "Agg",  # headless matplotlib
        "MPLCONFIGDIR": os.path.join(workdir, ".mpl"),
        "OPENBLAS_NUM_THREADS": "1",  # BLAS thread pools reserve address space per thread
        "OMP_NUM_THREADS": "1",
        "PYTHONHASHSEED": "0",
        **({"VISCODEX_SANDBOX_ALLOW_NET": "1"} if allow_network else {}),
    }


def run_python(
    code: str,
    stdin: str | bytes = b"",
    limits: Limits = Limits(),
    files: Mapping[str, bytes | str] | None = None,
    collect: tuple[str, ...] = (),
) -> SandboxResult:
    """Runs ``code`` as ``main.py`` in a fresh temp dir; returns its result.

    ``files`` are written into the dir first (e.g. data the program reads);
    ``collect`` names files the program writes that should come back (capped
    by the file-size limit). The temp dir is removed afterwards.
    """
    workdir = tempfile.mkdtemp(prefix="viscodex-sandbox-")
    try:
        os.makedirs(os.path.join(workdir, ".mpl"))
        with open(os.path.join(workdir, "main.py"), "w") as f:
            f.write(code)
        for name, data in (files or {}).items():
            if os.path.isabs(name) or ".." in name.split("/"):
                raise ValueError(f"sandbox input file name {name!r} must be relative and stay inside the dir")
            with open(os.path.join(workdir, name), "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
        stdin_path = os.path.join(workdir, ".stdin")
        with open(stdin_path, "wb") as f:
            f.write(stdin.encode() if isinstance(stdin, str) else stdin)
        settings = json.dumps({
            "program": "main.py", "allow_network": limits.allow_network, "cpu_seconds": int(limits.cpu_seconds),
            "memory_bytes": int(limits.memory_bytes), "file_size_bytes": int(limits.file_size_bytes),
            "max_processes": int(limits.max_processes),
        })
        out_path, err_path = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")
        t0 = time.time()
        with open(stdin_path, "rb") as fin, open(out_path, "wb") as fout, open(err_path, "wb") as ferr:
            proc = subprocess.Popen([sys.executable, "-I", "-B", _LAUNCHER, settings], cwd=workdir, stdin=fin,
                                    stdout=fout, stderr=ferr, env=_scrubbed_env(workdir, limits.allow_network),
                                    start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_tree(proc)
        wall = time.time() - t0
        stdout, t1 = _read_capped(out_path, limits.max_output_bytes)
        stderr, t2 = _read_capped(err_path, limits.max_output_bytes)
        collected = {}
        for name in collect:
            p = os.path.join(workdir, name)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    collected[name] = f.read(limits.file_size_bytes)
        rc = proc.returncode
        status, limit = _classify(rc, timed_out, stderr)
        return SandboxResult(status, None if timed_out else rc, stdout, stderr, wall, limit, collected, t1 or t2)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _classify(rc: int | None, timed_out: bool, stderr: str) -> tuple[str, str | None]:
    if timed_out:
        return "timeout", "wall"
    if rc == 0:
        return "ok", None
    if rc is not None and rc < 0:
        return "killed", _SIGNAL_LIMITS.get(-rc, f"signal {-rc}")
    tail = stderr[-2000:]
    if "MemoryError" in tail or "Cannot allocate memory" in tail:
        return "killed", "memory"
    if "File size limit exceeded" in tail or "File too large" in tail:
        return "killed", "file_size"
    return "error", None


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kills the program's whole session (a fork bomb's children included)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
