"""A cgroup per sandbox run with ``pids.max`` and a memory limit: a second layer, where the host allows.

The rlimits already bound the program (RLIMIT_NPROC counts its threads in its own
user namespace; RLIMIT_AS its address space). The cgroup also counts what they
miss: kernel memory, page cache, bwrap's own processes. Only as root, only where a
cgroup can be made beside or under the harness's own (cgroup v2 with the pids and
memory controllers delegated there, or the v1 pids/memory hierarchies); otherwise
``create`` returns None and the run goes on with the rlimits alone.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

CGROUP_FS = "/sys/fs/cgroup"


def _own_paths() -> dict[str, str]:
    """controller name -> this process's cgroup path ("" for the v2 hierarchy)."""
    out = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                hier, ctrls, path = line.rstrip("\n").split(":", 2)
                for c in (ctrls.split(",") if ctrls else [""]):
                    out[c] = path
    except (OSError, ValueError):
        pass
    return out


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_int_field(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
    except (OSError, ValueError):
        pass
    return 0


@dataclasses.dataclass
class RunCgroups:
    dirs: list[str]
    oom_files: list[str]  # memory.events (v2) or memory.oom_control (v1): "oom_kill N"

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def oom_killed(self) -> bool:
        return any(_read_int_field(p, "oom_kill") > 0 for p in self.oom_files)

    def remove(self) -> None:
        """Removes the (by now empty) cgroups; exiting tasks may take a moment to leave."""
        for d in self.dirs:
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def _v2(name: str, pids_max: int, memory_max: int, own: dict[str, str]) -> RunCgroups | None:
    root = CGROUP_FS if os.path.exists(os.path.join(CGROUP_FS, "cgroup.controllers")) else \
        os.path.join(CGROUP_FS, "unified")
    if "" not in own or not os.path.exists(os.path.join(root, "cgroup.controllers")):
        return None
    parent = os.path.join(root, own[""].lstrip("/"))
    try:
        with open(os.path.join(parent, "cgroup.subtree_control")) as f:
            enabled = set(f.read().split())
    except OSError:
        return None
    if not {"pids", "memory"} <= enabled:
        return None  # not delegated here; enabling it would move this process's own accounting
    d = os.path.join(parent, name)
    os.mkdir(d)
    try:
        _write(os.path.join(d, "pids.max"), str(pids_max))
        _write(os.path.join(d, "memory.max"), str(memory_max))
        if os.path.exists(os.path.join(d, "memory.swap.max")):
            _write(os.path.join(d, "memory.swap.max"), "0")
    except OSError:
        os.rmdir(d)
        raise
    return RunCgroups([d], [os.path.join(d, "memory.events")])


def _v1(name: str, pids_max: int, memory_max: int, own: dict[str, str]) -> RunCgroups | None:
    made = RunCgroups([], [])
    try:
        for ctrl in ("pids", "memory"):
            mount = os.path.join(CGROUP_FS, ctrl)
            if ctrl not in own or not os.path.exists(os.path.join(mount, "cgroup.procs")):
                made.remove()
                return None
            d = os.path.join(mount, own[ctrl].lstrip("/"), name)
            os.mkdir(d)
            made.dirs.append(d)
            if ctrl == "pids":
                _write(os.path.join(d, "pids.max"), str(pids_max))
            else:
                _write(os.path.join(d, "memory.limit_in_bytes"), str(memory_max))
                if os.path.exists(os.path.join(d, "memory.memsw.limit_in_bytes")):  # no escape into swap
                    _write(os.path.join(d, "memory.memsw.limit_in_bytes"), str(memory_max))
                made.oom_files.append(os.path.join(d, "memory.oom_control"))
    except OSError:
        made.remove()
        raise
    return made


def _parents(own: dict[str, str]) -> list[str]:
    """Where ``create`` makes cgroups, on every hierarchy it might use."""
    out = []
    for root in (CGROUP_FS, os.path.join(CGROUP_FS, "unified")):
        if "" in own and os.path.exists(os.path.join(root, "cgroup.controllers")):
            out.append(os.path.join(root, own[""].lstrip("/")))
    for ctrl in ("pids", "memory"):
        if ctrl in own:
            out.append(os.path.join(CGROUP_FS, ctrl, own[ctrl].lstrip("/")))
    return out


def sweep(prefix: str, is_stale: Callable[[str], bool]) -> None:
    """Removes run cgroups named ``prefix...`` for which ``is_stale(name)`` (their harness died)."""
    if os.geteuid() != 0:
        return
    for parent in _parents(_own_paths()):
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            if name.startswith(prefix) and is_stale(name):
                try:
                    os.rmdir(os.path.join(parent, name))  # only succeeds once it is empty
                except OSError:
                    pass


def create(name: str, pids_max: int, memory_max: int) -> RunCgroups | None:
    """The run's cgroups (not yet joined: the launcher writes its pid into ``procs_files``), or None."""
    if os.geteuid() != 0:
        return None
    own = _own_paths()
    for make in (_v2, _v1):
        try:
            made = make(name, pids_max, memory_max, own)
        except OSError:
            made = None
        if made is not None:
            return made
    return None
