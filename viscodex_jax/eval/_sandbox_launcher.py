"""Runs inside the sandbox's fresh process: confine, then exec Python on the untrusted program.

Kept separate (standard library only) because it runs between the spawn and
the untrusted code: no threads, nothing inherited.

As root (CI and containers), confinement uses namespaces and drops every
capability before the exec: a new network namespace (no usable interface), a
new mount namespace where "/" is read-only except the program's own dir, and
an empty capability bounding set, so the program runs as uid 0 *without*
root's powers: it cannot remount, cannot write or delete outside its dir.
The kernel never applies RLIMIT_NPROC to uid 0, so as root a seccomp filter
denies creating processes altogether (threads stay allowed): the process
limit is then one. (Switching to ``nobody`` is not an option when the
interpreter lives under a 0700 home directory, as pyenv installs do.)
Without root, only the resource limits apply and the bootstrap disables the
socket module.
argv: <json settings>
"""

import ctypes
import json
import os
import resource
import sys

CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _confine_as_root(libc, workdir: str, allow_network: bool) -> bool:
    flags = CLONE_NEWNS | (0 if allow_network else CLONE_NEWNET)
    if libc.unshare(flags) != 0:
        return False
    ok = libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0  # nothing propagates back to the host
    wd = workdir.encode()
    ok = ok and libc.mount(wd, wd, None, MS_BIND, None) == 0  # the program's dir stays writable
    ok = ok and libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND | MS_RDONLY, None) == 0
    os.chdir(workdir)  # the old cwd still points into the root mount, under the bind
    for m in (b"/tmp", b"/var/tmp", b"/dev/shm", b"/run"):
        if os.path.ismount(m.decode()):
            libc.mount(None, m, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
    if not ok:
        raise OSError(ctypes.get_errno(), "sandbox: could not make the filesystem read-only")
    return not allow_network


def _drop_capabilities(libc) -> None:
    cap = 0
    while libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:  # an exec of root can no longer regain them
        cap += 1
    if cap == 0:
        raise OSError(ctypes.get_errno(), "sandbox: could not drop capabilities")
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


# seccomp: deny new processes (threads stay allowed). Needed as root, where the kernel never
# applies RLIMIT_NPROC to uid 0 in the initial user namespace, capabilities or not.
_ARCH = {"x86_64": (0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435}),
         "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435})}
CLONE_THREAD = 0x00010000
_EPERM, _ENOSYS = 1, 38


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _deny_process_creation(libc) -> bool:
    arch = os.uname().machine
    if arch not in _ARCH:
        return False
    audit, nr = _ARCH[arch]
    ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06
    allow, errno = 0x7FFF0000, 0x00050000
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, audit), (ret, 0, 0, allow), (ld, 0, 0, 0)]
    for name in ("fork", "vfork"):
        if name in nr:
            prog += [(jeq, 0, 1, nr[name]), (ret, 0, 0, errno | _EPERM)]
    prog += [(jeq, 0, 1, nr["clone3"]), (ret, 0, 0, errno | _ENOSYS),  # libc falls back to clone
             (jeq, 0, 3, nr["clone"]), (ld, 0, 0, 16), (jset, 1, 0, CLONE_THREAD), (ret, 0, 0, errno | _EPERM),
             (ret, 0, 0, allow)]
    arr = (_SockFilter * len(prog))(*[_SockFilter(*x) for x in prog])
    fprog = _SockFprog(len(prog), arr)
    return libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def _processes_of(uid: int) -> int:
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def main() -> None:
    s = json.loads(sys.argv[1])
    libc = _libc()
    net_isolated = False
    root = os.geteuid() == 0
    if root:
        net_isolated = _confine_as_root(libc, os.getcwd(), s["allow_network"])
        _drop_capabilities(libc)
    # RLIMIT_NPROC counts every process of the user: allow the ones already running plus the budget.
    nproc = s["max_processes"] + _processes_of(os.getuid())
    limits = {
        resource.RLIMIT_CPU: (s["cpu_seconds"], s["cpu_seconds"] + 1),
        resource.RLIMIT_AS: (s["memory_bytes"], s["memory_bytes"]),
        resource.RLIMIT_FSIZE: (s["file_size_bytes"], s["file_size_bytes"]),
        resource.RLIMIT_NPROC: (nproc, nproc),
        resource.RLIMIT_CORE: (0, 0),
    }
    for k, v in limits.items():
        resource.setrlimit(k, v)
    if root and not _deny_process_creation(libc):
        raise OSError("sandbox: cannot limit processes for root on this platform")
    os.environ["VISCODEX_SANDBOX_NET_ISOLATED"] = "1" if net_isolated else "0"
    os.execv(sys.executable, [sys.executable, "-I", "-B", "-c", BOOTSTRAP, s["program"]])


BOOTSTRAP = r"""
import os, runpy, sys
if os.environ.pop("VISCODEX_SANDBOX_NET_ISOLATED", "0") != "1" and os.environ.get("VISCODEX_SANDBOX_ALLOW_NET") != "1":
    import socket
    def _blocked(*a, **k):
        raise PermissionError("network access is disabled in the sandbox")
    socket.socket = _blocked
    socket.create_connection = _blocked
    socket.socketpair = _blocked
sys.argv = [sys.argv[1]]
sys.path.insert(0, os.getcwd())
runpy.run_path(sys.argv[0], run_name="__main__")
"""

if __name__ == "__main__":
    main()
