"""The sandbox's seccomp filter, compiled by libseccomp (through the ``pyseccomp`` binding).

libseccomp, not hand-written BPF, because it gets the architecture checks right:
a filter made for the native ABI kills a process that enters the kernel through
another one (x86 ``int 0x80``, x32 syscall numbers), which a filter comparing
syscall numbers alone lets through.

Policy: everything the interpreter and numeric/plotting libraries need stays
allowed; calls that reach other processes, the kernel's global state, new
namespaces or memory outside the rlimits fail with EPERM, so the program sees
an ordinary ``PermissionError``. New processes are refused too (threads stay
allowed): as the harness's uid the kernel may never apply RLIMIT_NPROC, so the
process limit is one.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile

CLONE_THREAD = 0x00010000
# Socket families a program may open: its own network namespace covers these. Others are refused,
# above all AF_VSOCK (not confined by a network namespace: it reaches the VM host and local vsock
# services), and AF_PACKET, AF_ALG, AF_KEY, ... (kernel surface nothing here needs).
_AF_UNIX, _AF_INET, _AF_INET6, _AF_NETLINK = 1, 2, 10, 16
_ALLOWED_FAMILIES = (_AF_UNIX, _AF_INET, _AF_INET6, _AF_NETLINK)
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
_CLONE_NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)

# Calls that act on other processes, the kernel, mounts and namespaces, or hold
# memory outside RLIMIT_AS (SysV/POSIX IPC, memfd). Names unknown to the running
# libseccomp are skipped (see ``_add``).
DENIED = (
    # processes other than itself
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # kernel keyrings, io_uring (its own syscall path), eBPF, perf, userfaultfd
    "keyctl", "add_key", "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "bpf", "perf_event_open", "userfaultfd", "fanotify_init",
    # mounts and namespaces
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "fsopen", "fsconfig", "fsmount",
    "fspick", "move_mount", "open_tree", "mount_setattr", "open_by_handle_at", "name_to_handle_at",
    # kernel-wide state
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "syslog", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "iopl", "ioperm", "modify_ldt", "uselib", "lookup_dcookie", "vhangup",
    # memory the address-space limit does not count
    "shmget", "msgget", "semget", "mq_open", "memfd_create",
    # other processes' memory (only reachable inside its PID namespace anyway)
    "process_madvise", "process_mrelease",
    # new processes (clone without CLONE_THREAD is handled by argument below)
    "fork", "vfork",
)


class SeccompUnavailable(RuntimeError):
    pass


def _import():
    try:
        import pyseccomp
    except (ImportError, OSError) as e:  # OSError: libseccomp.so.2 missing
        raise SeccompUnavailable(
            "the sandbox's seccomp filter needs the Python package 'pyseccomp' and the system library "
            f"libseccomp.so.2 (Debian: libseccomp2); import failed: {e}") from e
    return pyseccomp


def _add(sc, f, action, name: str, *args) -> None:
    try:
        nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
    except (ValueError, OSError):
        return  # unknown on this architecture/libseccomp (e.g. iopl on aarch64): nothing to deny
    if nr < 0:
        return
    f.add_rule(action, nr, *args)


@functools.lru_cache(maxsize=None)
def filter_bpf(deny_sockets: bool = False) -> bytes:
    """The compiled filter (a ``struct sock_filter`` array) for bwrap's ``--seccomp`` or prctl.

    ``deny_sockets``: also refuse non-AF_UNIX sockets (the weak mode has no
    network namespace to rely on).
    """
    sc = _import()
    eperm = sc.ERRNO(errno.EPERM)
    f = sc.SyscallFilter(sc.ALLOW)
    # Only the native ABI is in the filter: any other (x86 int 0x80, x32) kills the whole process.
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    for name in DENIED:
        _add(sc, f, eperm, name)
    _add(sc, f, eperm, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))  # a process, not a thread
    for flag in _CLONE_NAMESPACE_FLAGS:
        _add(sc, f, eperm, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    # clone3 passes its flags in memory the filter cannot read: ENOSYS makes libc fall back to clone.
    _add(sc, f, sc.ERRNO(errno.ENOSYS), "clone3")
    if deny_sockets:  # the weak mode has no network namespace: local sockets only
        _add(sc, f, eperm, "socket", sc.Arg(0, sc.NE, _AF_UNIX))
    else:
        _add(sc, f, eperm, "socket", sc.Arg(0, sc.GT, max(_ALLOWED_FAMILIES)))
        for family in range(max(_ALLOWED_FAMILIES)):
            if family not in _ALLOWED_FAMILIES:
                _add(sc, f, eperm, "socket", sc.Arg(0, sc.EQ, family))
    with tempfile.TemporaryFile() as t:
        f.export_bpf(t)
        t.seek(0)
        data = t.read()
    if not data or len(data) % 8:
        raise SeccompUnavailable(f"libseccomp exported a malformed filter ({len(data)} bytes)")
    return data


def filter_fd(deny_sockets: bool = False) -> int:
    """A read-only descriptor positioned at the start of the compiled filter (caller closes it)."""
    data = filter_bpf(deny_sockets)
    r, w = os.pipe()
    if len(data) > 65536:  # a pipe holds 64 KiB; the filter is a few hundred bytes
        raise SeccompUnavailable(f"seccomp filter of {len(data)} bytes does not fit a pipe")
    os.write(w, data)
    os.close(w)
    return r
