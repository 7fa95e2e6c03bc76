"""The bubblewrap command line for one sandbox run, and the host checks it rests on.

The sandbox's filesystem is a fresh read-only tmpfs root holding only:
the system's shared-library dirs, the interpreter's prefixes (stdlib and
site-packages, read-only), the program's own dir (read-write, at ``/sandbox``),
a private ``/proc`` for its own PID namespace, and bwrap's minimal ``/dev``
(null, zero, random, ...), read-only. The program's kernel uid is 65534 (see
``_sandbox_stage0``), so root-owned files such as the global sysctls under
``/proc/sys`` are not writable for it; the sysctls it may write belong to its own
namespaces. No ``/sys``, ``/etc``, ``/home``, ``/root`` contents, ``/tmp`` of the
host, or the checkout. ``TMPDIR`` points into the program's dir.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import stat
import subprocess
import sys
from typing import Mapping, Sequence

_STAGE0 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_stage0.py")
SANDBOX_DIR = "/sandbox"
SANDBOX_UID = 65534  # "nobody" inside the sandbox's user namespace

# Shared data that numeric/plotting code reads; harmless to expose (no secrets).
_SHARED_DATA = ("/usr/share/fonts", "/usr/share/zoneinfo", "/etc/localtime", "/etc/ld.so.cache")
# Only with Limits.allow_network: name resolution and TLS roots.
_NET_DATA = ("/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/ssl", "/etc/ca-certificates",
             "/usr/share/ca-certificates")


class SandboxUnavailable(RuntimeError):
    """Untrusted code cannot be run with the sandbox's guarantees on this host."""


def bwrap_path() -> str | None:
    return os.environ.get("VISCODEX_BWRAP") or shutil.which("bwrap")


_NAMESPACES = ("--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup")


@functools.lru_cache(maxsize=None)
def check_bwrap() -> str:
    """Path of a bwrap that can create every namespace the sandbox uses; else SandboxUnavailable."""
    path = bwrap_path()
    if not path:
        raise SandboxUnavailable(
            "bubblewrap ('bwrap') is not installed: install Debian's 'bubblewrap' package "
            "(launch/setup_env.sh does), or set VISCODEX_BWRAP to its path")
    probe = [path, *_NAMESPACES, "--unshare-net", "--disable-userns", "--uid", str(SANDBOX_UID),
             "--gid", str(SANDBOX_UID), "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
             "--die-with-parent", "--new-session", "--", "true"]
    as_user = {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []} if os.geteuid() == 0 else {}
    try:  # as root, bwrap runs as the sandbox uid (see _sandbox_stage0): probe it that way
        r = subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, cwd="/", **as_user)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SandboxUnavailable(f"bubblewrap at {path} could not be started: {e}") from e
    if r.returncode != 0:
        why = r.stderr.decode("utf-8", "replace").strip()
        raise SandboxUnavailable(
            f"bubblewrap at {path} cannot create the sandbox's namespaces (user, pid, ipc, uts, net, "
            f"cgroup): {why or 'exit ' + str(r.returncode)}. It needs unprivileged user namespaces (bwrap "
            f"runs as uid {SANDBOX_UID} even under root): sysctl user.max_user_namespaces > 0, "
            "kernel.unprivileged_userns_clone=1 where that sysctl exists, and no AppArmor restriction "
            "(kernel.apparmor_restrict_unprivileged_userns=0, or a profile allowing bwrap)")
    return path


@functools.lru_cache(maxsize=None)
def interpreter_layout(python: str) -> dict:
    """Prefixes, package dirs and lib dirs of a (trusted) interpreter, asked of the interpreter itself."""
    if not os.path.isabs(python) or not os.access(python, os.X_OK):
        raise ValueError(f"sandbox interpreter {python!r} must be an absolute path to an executable")
    code = ("import json, sys, sysconfig\n"
            "print(json.dumps({'prefixes': [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix],"
            " 'path': sys.path, 'multiarch': sysconfig.get_config_var('MULTIARCH') or '',"
            " 'libdir': sysconfig.get_config_var('LIBDIR') or ''}))")
    try:
        r = subprocess.run([python, "-I", "-c", code], stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=60, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        info = json.loads(r.stdout)
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
        raise ValueError(f"sandbox interpreter {python!r} did not describe itself: {e}") from e
    return info


def _covered(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _minimal(paths: Sequence[str]) -> list[str]:
    """Existing dirs/files, real paths, with those inside another one dropped."""
    real = sorted({os.path.realpath(p) for p in paths if p and os.path.exists(p)}, key=len)
    out: list[str] = []
    for p in real:
        if not _covered(p, out):
            out.append(p)
    return out


def _data(allow_network: bool) -> tuple[str, ...]:
    return _SHARED_DATA + (_NET_DATA if allow_network else ())


def read_only_paths(python: str, allow_network: bool = False) -> list[str]:
    """Host paths bound read-only: the interpreter, its stdlib and package dirs, and the system's libs."""
    info = interpreter_layout(python)
    pkg_dirs = [p for p in info["path"] if os.path.basename(p.rstrip("/")) in ("site-packages", "dist-packages")]
    libs = ["/usr/lib64", "/lib64", "/usr/lib32"]
    if info["multiarch"]:
        libs += [f"/usr/lib/{info['multiarch']}", f"/lib/{info['multiarch']}"]
    else:  # no multiarch triplet: the libraries live directly in /usr/lib
        libs += ["/usr/lib", "/lib"]
    own = [python, os.path.dirname(os.path.realpath(python)), info["libdir"]]
    return _minimal([*info["prefixes"], *pkg_dirs, *libs, *own, *_data(allow_network)])


def _root_symlinks() -> list[str]:
    """Merged-/usr hosts have /lib, /lib64 and /bin as symlinks into /usr; mirror them."""
    args: list[str] = []
    for top in ("/lib", "/lib64", "/lib32", "/bin", "/sbin"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
    return args


def _may(st: os.stat_result, bits: int) -> bool:
    """Whether the sandbox's uid has ``bits`` (4 read, 1 search) on a file with this stat."""
    if st.st_uid == SANDBOX_UID:
        mode = st.st_mode >> 6
    elif st.st_gid == SANDBOX_UID:
        mode = st.st_mode >> 3
    else:
        mode = st.st_mode
    return mode & bits == bits


def reachable(path: str, search_only: bool = False) -> bool:
    """Whether uid SANDBOX_UID can resolve ``path`` (a real path) and read it (or, with
    ``search_only``, a dir's entries by name) by itself."""
    try:
        parts = path.strip("/").split("/")
        for i in range(len(parts)):
            if not _may(os.stat("/" + "/".join(parts[:i])), 1):
                return False
        st = os.stat(path)
    except OSError:
        return False
    if stat.S_ISDIR(st.st_mode):
        return _may(st, 1 if search_only else 5)
    return not search_only and _may(st, 4)


def launch_argv(*, python: str, run_dir: str, workdir: str, env: Mapping[str, str], argv: Sequence[str],
                seccomp_fd: int, status_fd: int, allow_network: bool,
                cgroup_procs: Sequence[str] = ()) -> list[str]:
    """The argv that runs ``python argv...`` in ``workdir`` (bound at SANDBOX_DIR) under bwrap.

    As root: through ``_sandbox_stage0`` so that bwrap itself runs as uid SANDBOX_UID (see
    there why); paths that uid cannot reach are bound onto mount points in ``run_dir``
    first. Otherwise bwrap runs as the caller, whose uid the sandbox's maps to.
    """
    as_root = os.geteuid() == 0
    binds = [(p, p, True) for p in read_only_paths(python, allow_network)]
    binds.append((workdir, SANDBOX_DIR, False))
    stage: list[list[str]] = []
    args = [check_bwrap(), *_NAMESPACES, "--disable-userns", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    if not allow_network:
        args.append("--unshare-net")
    args += ["--die-with-parent", "--new-session", "--hostname", "sandbox", "--clearenv"]
    for k, v in env.items():
        args += ["--setenv", k, v]
    args += _root_symlinks()
    for p in _data(allow_network):  # e.g. /etc/localtime -> /usr/share/zoneinfo/...: bound at the target
        if os.path.islink(p) and os.path.exists(p):
            args += ["--symlink", os.readlink(p), p]
    for src, dest, ro in binds:
        src = os.path.realpath(src)
        if as_root and not reachable(src):
            point = os.path.join(run_dir, "stage", str(len(stage)))
            os.makedirs(os.path.dirname(point), mode=0o711, exist_ok=True)
            if os.path.isdir(src):
                os.mkdir(point, 0o755)
            else:
                os.close(os.open(point, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
            stage.append([src, point])
            src = point
        args += ["--ro-bind" if ro else "--bind", src, dest]
    paths = [b[1] for b in binds]
    if os.path.realpath(python) != python and not _covered(python, paths):
        args += ["--symlink", os.path.realpath(python), python]
    args += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev", "--chdir", SANDBOX_DIR, "--remount-ro", "/",
             "--seccomp", str(seccomp_fd), "--json-status-fd", str(status_fd), "--", python, *argv]
    if not as_root:
        return args
    spec = {"binds": stage, "uid": SANDBOX_UID, "gid": SANDBOX_UID, "argv": args, "cgroup_procs": list(cgroup_procs)}
    return [sys.executable, "-I", "-S", _STAGE0, json.dumps(spec)]
