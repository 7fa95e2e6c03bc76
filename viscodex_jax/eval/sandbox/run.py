"""Runs untrusted Python (model-written code) under bubblewrap; the harness never trusts its files.

Containment (see ``bwrap`` and ``seccomp`` in this package):
* bubblewrap: new user, PID, IPC, UTS, network, mount and cgroup namespaces;
  uid/gid 65534 inside, no capabilities, no further user namespaces;
  ``--die-with-parent``, ``--new-session``; a read-only root holding only
  the system libraries, the interpreter's prefixes and the program's own
  writable dir; private ``/proc``, read-only minimal ``/dev``, no ``/sys``;
* a libseccomp filter: foreign syscall ABIs (x86 ``int 0x80``, x32) kill the
  process; ptrace, keyrings, io_uring, bpf, perf, userfaultfd, mounts, new
  namespaces, SysV/POSIX IPC, memfd and new processes fail with EPERM;
* rlimits inside (CPU, address space, file size, open files, no core dumps);
* a scrubbed environment; stdin from a descriptor and stdout/stderr through
  pipes the harness holds, read with caps; files the caller collects are read
  without following links, only when regular, up to the file-size limit;
* at the wall limit (or when output passes the file-size limit) the
  namespace's init is killed, which ends every process in it; if the harness
  itself dies, ``--die-with-parent`` and a lifeline pipe end the program;
* run dirs left by a harness killed with SIGKILL are removed by the next run.

Where bubblewrap or libseccomp is missing, ``run_python`` raises
``SandboxUnavailable`` naming what is missing, unless the weak mode is accepted
(``allow_weak=True`` or ``VISCODEX_SANDBOX_ALLOW_WEAK=1``): the same seccomp
filter (plus no non-AF_UNIX sockets), rlimits, a scrubbed environment and
pipes, but NO filesystem, process or user isolation.
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

from viscodex_jax.eval.sandbox import bwrap, cgroup
from viscodex_jax.eval.sandbox.bwrap import SANDBOX_DIR, SandboxUnavailable
from viscodex_jax.eval.sandbox.pipes import Run, read_program_file
from viscodex_jax.eval.sandbox.seccomp import SeccompUnavailable, filter_fd

__all__ = ["Limits", "SandboxResult", "SandboxUnavailable", "run_python", "WEAK_ENV"]

WEAK_ENV = "VISCODEX_SANDBOX_ALLOW_WEAK"
_MAX_OPEN_FILES = 512
_BWRAP_TASKS = 4  # bwrap's monitor and init beside the program, counted by the cgroup's pids.max
_CGROUP_MEMORY_MARGIN = 256 << 20  # above RLIMIT_AS: page cache of its files, bwrap, kernel memory


@dataclasses.dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 2 * 2**30
    file_size_bytes: int = 16 * 2**20  # each file written, and all of stdout / of stderr
    max_processes: int = 32  # threads; new processes are refused by the seccomp filter
    max_output_bytes: int = 1 * 2**20  # stdout/stderr kept in the result
    allow_network: bool = False


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """``status``: "ok" (exit 0), "error" (non-zero exit, error text in ``stderr``),
    "timeout" (wall clock), or "killed" (a resource limit or a signal; ``limit`` says which:
    "cpu", "memory", "file_size" (a file or the output too large), "seccomp" (a forbidden
    syscall ABI), "killed" (SIGKILL), or "signal N")."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_seconds: float
    limit: str | None = None
    files: Mapping[str, bytes] = dataclasses.field(default_factory=dict)
    truncated: bool = False
    mode: str = "bwrap"  # or "weak"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


_SIGNAL_LIMITS = {signal.SIGXCPU: "cpu", signal.SIGXFSZ: "file_size", signal.SIGKILL: "killed",
                  signal.SIGSEGV: "memory", signal.SIGSYS: "seccomp"}

# Runs first in the sandboxed interpreter: rlimits (soft = hard, so the program cannot raise
# them), the lifeline, in the weak mode the seccomp filter, then the program as __main__.
# Lifeline: a pipe whose only writer is the harness. When the harness dies (even by SIGKILL,
# even while bwrap was still setting up, before its --die-with-parent took hold) the pipe
# closes and the kernel sends SIGIO, whose default action ends the program.
_BOOTSTRAP = r"""
import fcntl, json, os, resource, select, sys
_s = json.loads(sys.argv[1])
for _n, (_soft, _hard) in _s["rlimits"].items():
    resource.setrlimit(getattr(resource, _n), (_soft, _hard))
_fd = _s["lifeline_fd"]
fcntl.fcntl(_fd, fcntl.F_SETOWN, os.getpid())
fcntl.fcntl(_fd, fcntl.F_SETFL, fcntl.fcntl(_fd, fcntl.F_GETFL) | os.O_ASYNC)
if select.select([_fd], [], [], 0)[0]:  # closed before it was armed: the harness is gone
    os._exit(137)
if _s["seccomp_fd"] is not None:
    import ctypes
    _data = b""
    while True:
        _c = os.read(_s["seccomp_fd"], 65536)
        if not _c:
            break
        _data += _c
    os.close(_s["seccomp_fd"])
    class _Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    _buf = ctypes.create_string_buffer(_data, len(_data))
    _prog = _Prog(len(_data) // 8, ctypes.addressof(_buf))
    _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.prctl(38, 1, 0, 0, 0) != 0 or _libc.prctl(22, 2, ctypes.byref(_prog), 0, 0) != 0:
        sys.stderr.write("sandbox: could not load the seccomp filter\n")
        os._exit(120)
    del ctypes, _data, _c, _Prog, _buf, _prog, _libc
sys.argv = [_s["program"]]
sys.path.insert(0, os.getcwd())
del _s, _n, _soft, _hard, _fd
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _env(home: str, tmp: str, allow_network: bool) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": tmp,
        "LANG": "C.UTF-8",
        "MPLBACKEND": "Agg",  # headless matplotlib
        "MPLCONFIGDIR": os.path.join(home, ".mpl"),
        "OPENBLAS_NUM_THREADS": "1",  # BLAS thread pools reserve address space per thread
        "OMP_NUM_THREADS": "1",
        "PYTHONHASHSEED": "0",
        **({"VISCODEX_SANDBOX_ALLOW_NET": "1"} if allow_network else {}),
    }


def _rlimits(limits: Limits) -> dict[str, tuple[int, int]]:
    cpu, mem, fsize = int(limits.cpu_seconds), int(limits.memory_bytes), int(limits.file_size_bytes)
    return {"RLIMIT_CPU": (cpu, cpu + 1), "RLIMIT_AS": (mem, mem), "RLIMIT_FSIZE": (fsize, fsize),
            "RLIMIT_NPROC": (int(limits.max_processes),) * 2, "RLIMIT_CORE": (0, 0),
            "RLIMIT_NOFILE": (_MAX_OPEN_FILES, _MAX_OPEN_FILES)}


def _weak_allowed(allow_weak: bool | None) -> bool:
    if allow_weak is not None:
        return allow_weak
    return os.environ.get(WEAK_ENV, "") == "1"


def _write_inputs(workdir: str, code: str, files: Mapping[str, bytes | str] | None) -> None:
    for name in (files or {}):
        if not name or os.path.isabs(name) or ".." in name.split("/"):
            raise ValueError(f"sandbox input file name {name!r} must be relative and stay inside the dir")
    for sub in (".mpl", ".tmp"):
        os.makedirs(os.path.join(workdir, sub))
    with open(os.path.join(workdir, "main.py"), "w") as f:
        f.write(code)
    for name, data in (files or {}).items():
        path = os.path.join(workdir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)


def _run_parent(mode: str) -> str:
    """Where run dirs go: the temp dir, which bwrap running as the sandbox uid must be able to reach."""
    tmp = tempfile.gettempdir()
    if mode != "bwrap" or os.geteuid() != 0 or bwrap.reachable(os.path.realpath(tmp), search_only=True):
        return tmp
    if bwrap.reachable("/tmp", search_only=True):
        return "/tmp"
    raise SandboxUnavailable(f"neither the temp dir {tmp} nor /tmp can be reached by uid {bwrap.SANDBOX_UID}, "
                             "which the sandbox runs as")


_RUN_PREFIX = "viscodex-sandbox-"


def _owner_tag(pid: int) -> str | None:
    """pid.start-time of a live process (start time tells a reused pid apart), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f"{pid}.{f.read().rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return None


def _stale(name: str) -> bool:
    """Whether a run dir/cgroup name carries the tag of a harness process that no longer exists."""
    tag = name[len(_RUN_PREFIX):].rsplit("-", 1)[0]
    pid = tag.split(".")[0]
    return "." in tag and pid.isdigit() and _owner_tag(int(pid)) != tag


def _sweep_stale_runs(parent: str) -> None:
    """Removes run dirs and cgroups left by harness processes that no longer exist (killed with
    SIGKILL, say)."""
    cgroup.sweep(_RUN_PREFIX, _stale)
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(_RUN_PREFIX) or not _stale(name):
            continue
        path = os.path.join(parent, name)
        try:
            if os.lstat(path).st_uid != os.geteuid():
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)


def _chown_tree(top: str, uid: int) -> None:
    os.chown(top, uid, uid)
    for root, dirs, names in os.walk(top):
        for n in dirs + names:
            os.chown(os.path.join(root, n), uid, uid, follow_symlinks=False)


def _mode(allow_weak: bool | None) -> str:
    """"bwrap", or "weak" when bubblewrap cannot run and the weak mode was accepted."""
    try:
        bwrap.check_bwrap()
        return "bwrap"
    except SandboxUnavailable as e:
        if _weak_allowed(allow_weak):
            return "weak"
        raise SandboxUnavailable(f"{e}. Refusing to run untrusted code without it; to accept a weaker "
                                 f"sandbox without filesystem, process or user isolation, set "
                                 f"{WEAK_ENV}=1 or pass allow_weak=True") from None


def run_python(
    code: str,
    stdin: str | bytes = b"",
    limits: Limits = Limits(),
    files: Mapping[str, bytes | str] | None = None,
    collect: tuple[str, ...] = (),
    python: str | None = None,
    allow_weak: bool | None = None,
) -> SandboxResult:
    """Runs ``code`` as ``main.py`` in a fresh dir under the sandbox; returns its result.

    ``files`` are written into the dir first (e.g. data the program reads);
    ``collect`` names files the program writes that should come back (regular
    files only, links not followed, capped by the file-size limit; a name the
    program did not leave as a regular file is absent). ``python``: absolute
    path of the interpreter (e.g. a scoring venv's ``bin/python``), default the
    current one; its prefixes are bound read-only. The dir is removed afterwards.

    Never raises for anything the program did; raises ``ValueError`` for bad
    arguments and ``SandboxUnavailable`` when the host cannot sandbox.
    """
    python = python or sys.executable
    mode = _mode(allow_weak)
    try:
        seccomp = filter_fd(deny_sockets=(mode == "weak" and not limits.allow_network))
    except SeccompUnavailable as e:
        raise SandboxUnavailable(str(e)) from None
    if mode == "bwrap":
        bwrap.read_only_paths(python)  # bad interpreter: ValueError before any work
    parent = _run_parent(mode)
    _sweep_stale_runs(parent)
    run_dir = tempfile.mkdtemp(prefix=f"{_RUN_PREFIX}{_owner_tag(os.getpid())}-", dir=parent)
    workdir = os.path.join(run_dir, "work")
    run = life_w = cgroups = None
    try:
        os.mkdir(workdir, 0o700)
        _write_inputs(workdir, code, files)
        if mode == "bwrap" and os.geteuid() == 0:  # the program runs as the sandbox uid: its dir is its own
            os.chmod(run_dir, 0o711)
            _chown_tree(workdir, bwrap.SANDBOX_UID)
        with tempfile.TemporaryFile() as f:  # the program gets a read-only descriptor of its own
            f.write(stdin.encode() if isinstance(stdin, str) else stdin)
            f.flush()
            stdin_file = open(f"/proc/self/fd/{f.fileno()}", "rb")
        life_r, life_w = os.pipe2(os.O_CLOEXEC)  # the harness keeps the only writer (see _BOOTSTRAP)
        settings = {"program": "main.py", "rlimits": _rlimits(limits), "lifeline_fd": life_r,
                    "seccomp_fd": seccomp if mode == "weak" else None}
        argv = ["-I", "-B", "-c", _BOOTSTRAP, json.dumps(settings)]
        status_r = status_w = None
        if mode == "bwrap":
            status_r, status_w = os.pipe()
            env = _env(SANDBOX_DIR, SANDBOX_DIR + "/.tmp", limits.allow_network)
            cgroups = cgroup.create(os.path.basename(run_dir), limits.max_processes + _BWRAP_TASKS,
                                            limits.memory_bytes + _CGROUP_MEMORY_MARGIN)
            cmd = bwrap.launch_argv(python=python, run_dir=run_dir, workdir=workdir, env=env, argv=argv,
                                            seccomp_fd=seccomp, status_fd=status_w,
                                            allow_network=limits.allow_network,
                                            cgroup_procs=cgroups.procs_files if cgroups else ())
            kw = dict(cwd="/", env={"PATH": "/usr/bin:/bin"}, pass_fds=(seccomp, status_w, life_r))
        else:
            env = _env(workdir, os.path.join(workdir, ".tmp"), limits.allow_network)
            cmd = [python, *argv]
            kw = dict(cwd=workdir, env=env, pass_fds=(seccomp, life_r))
        t0 = time.monotonic()
        try:
            with stdin_file:
                proc = subprocess.Popen(cmd, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        start_new_session=True, close_fds=True, **kw)
        finally:
            for fd in (seccomp, status_w, life_r):
                if fd is not None:
                    os.close(fd)
            seccomp = None
        run = Run(proc, status_r, limits.max_output_bytes, limits.file_size_bytes)
        try:
            stopped = run.pump(t0 + limits.wall_seconds)
            if stopped is None:
                try:
                    proc.wait(timeout=max(0.1, t0 + limits.wall_seconds - time.monotonic()))
                except subprocess.TimeoutExpired:
                    stopped = "wall"
        finally:
            run.end()
        wall = time.monotonic() - t0
        run.finish_status()
        if mode == "bwrap" and not run.started() and stopped is None:
            # bwrap failed before starting the program: a host problem, not the program's doing
            raise SandboxUnavailable(f"bubblewrap did not start the program (exit {proc.returncode}): "
                                     f"{run.err.text()[-2000:]}")
        rc = run.exit_code if run.exit_code is not None else proc.returncode
        if rc is not None and mode == "bwrap" and 128 < rc < 128 + 65:  # bwrap reports a signal as 128+N
            rc = -(rc - 128)
        stdout, stderr = run.out.text(), run.err.text()
        collected = {}
        for name in collect:
            data = read_program_file(workdir, name, limits.file_size_bytes)
            if data is not None:
                collected[name] = data
        status, limit = _classify(rc, stopped, stderr)
        if status == "killed" and cgroups is not None and cgroups.oom_killed():
            limit = "memory"
        truncated = run.out.total > len(run.out.data) or run.err.total > len(run.err.data)
        return SandboxResult(status, None if stopped == "wall" else rc, stdout, stderr, wall, limit, collected,
                             truncated, mode)
    finally:
        if life_w is not None:
            os.close(life_w)
        if run is not None:
            run.close()
        if seccomp is not None:
            os.close(seccomp)
        if cgroups is not None:
            cgroups.remove()
        shutil.rmtree(run_dir, ignore_errors=True)


def _classify(rc: int | None, stopped: str | None, stderr: str) -> tuple[str, str | None]:
    if stopped == "wall":
        return "timeout", "wall"
    if stopped == "file_size":
        return "killed", "file_size"
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

