"""Run as root between the harness and bubblewrap: lay out paths bwrap can reach, drop to the sandbox uid, exec bwrap.

Why: bwrap started by root maps the sandbox's uid to root (kernel uid 0). Without
capabilities that still owns every root-owned file a kernel check compares by uid,
for instance the global sysctls under ``/proc/sys`` (core_pattern). So bwrap runs as
uid 65534 instead, and then it can only bind what uid 65534 can reach. An
interpreter under a 0700 home (pyenv in /root) is bound first onto a reachable
mount point here, in a private mount namespace of this process alone, which the
host never sees. No confinement relies on this step: bwrap and its seccomp filter
do that.

Standard library only, started with ``python -I -S``, single-threaded.
argv: <json {"binds": [[source, mountpoint], ...], "uid": int, "gid": int, "argv": [bwrap, ...],
             "cgroup_procs": [cgroup.procs paths to join first]}>
"""

import ctypes
import json
import os
import sys

CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18


def main() -> None:
    s = json.loads(sys.argv[1])
    for procs in s.get("cgroup_procs", []):  # the run's cgroups (cgroup.py): bwrap and all below
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    if s["binds"]:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "sandbox stage 0: unshare(CLONE_NEWNS)")
        if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:  # nothing propagates to the host
            raise OSError(ctypes.get_errno(), "sandbox stage 0: make / private")
        for src, point in s["binds"]:
            if libc.mount(src.encode(), point.encode(), None, MS_BIND | MS_REC, None) != 0:
                raise OSError(ctypes.get_errno(), f"sandbox stage 0: bind {src} on {point}")
    os.setgroups([])
    os.setresgid(s["gid"], s["gid"], s["gid"])
    os.setresuid(s["uid"], s["uid"], s["uid"])
    os.execv(s["argv"][0], s["argv"])


if __name__ == "__main__":
    main()
