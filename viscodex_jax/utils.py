"""Generic helpers with no jax import: pytree flatten/unflatten, directories that appear only when
complete, and logging set-up for the entry points.

Atomic output directories: a run writes into ``.<name>.tmp-<host>-<pid>-<random>`` next to ``<name>``
and renames it when done. An exception removes the temp dir, but kill -9 (or the OOM killer, or a lost
node) cannot, so the next run for the same output looks for temp dirs of that exact pattern whose owner
is gone and removes them. The owner is judged by host name and pid: a dir made on another host is never
touched (its pid means nothing here), and a dir whose pid is still alive is left alone, even if that pid
now belongs to an unrelated process (a reused pid keeps a stale dir, which is safe; it never removes a
live one). The one case this cannot see is a second pid namespace sharing both the host name and the
directory (two containers with one hostname writing the same output).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
from typing import Any, Iterator

log = logging.getLogger(__name__)

def flatten(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return tree



def _host() -> str:
    # A separator-free host label; temp names must stay one path component.
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def temp_prefix(final: str) -> str:
    """The prefix of every temp dir made for ``final`` (any host, any pid)."""
    return f".{os.path.basename(os.path.abspath(final))}.tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temp_dirs(final: str) -> list[str]:
    """Removes this host's temp dirs for ``final`` whose owning process is gone; returns their paths."""
    final = os.path.abspath(final)
    parent = os.path.dirname(final)
    prefix = temp_prefix(final)
    ours = re.compile(re.escape(prefix) + r"(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")
    try:
        entries = os.listdir(parent)
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        path = os.path.join(parent, entry)
        m = ours.match(entry)
        if m is None:
            log.warning("%s: leftover temp dir of an older naming scheme; not removing it (no owner to check)", path)
            continue
        if m["host"] != _host() or _pid_alive(int(m["pid"])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            log.warning("removed %s, left by process %s that no longer runs (killed mid-write?)", path, m["pid"])
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_dir(final: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a temp dir next to ``final``; renames it to ``final`` only if the block succeeds."""
    final = os.path.abspath(final)
    if os.path.exists(final) and not overwrite:
        raise FileExistsError(f"{final}: output already exists (pass overwrite to replace it)")
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temp_dirs(final)
    tmp = tempfile.mkdtemp(prefix=f"{temp_prefix(final)}{_host()}-{os.getpid()}-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the result should look like any other dir
    try:
        yield tmp
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

_NOISY = ("orbax", "jax/_src", "etils", "absl/", "tensorstore")


class _DropNoisyInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(n in record.pathname for n in _NOISY)


def quiet_third_party() -> None:
    """orbax logs every save/restore step at INFO through absl; keep only its warnings."""
    for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
        handler.addFilter(_DropNoisyInfo())
    logging.getLogger("absl").addFilter(_DropNoisyInfo())
