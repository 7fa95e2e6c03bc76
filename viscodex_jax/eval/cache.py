"""What the runner keeps between runs in its ``out_dir``: checkpoint fingerprints and finished generations.

Generations are cached in ``<out_dir>/generations.jsonl`` (one process) or one
``generations.<i>-of-<n>.jsonl`` per process of a multi-process run, under a key of
(checkpoint fingerprint, benchmark, item, sample index, sampling settings). Every file matching
``generations*.jsonl`` is read, so a run resumes whatever process count wrote the cache.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any, Sequence


def fingerprint(ckpt_dir: str, cache_path: str | None = None) -> str:
    """sha256 over the checkpoint's files (weights, config, tokenizer), cached by (path, size, mtime)."""
    files = []
    for root, _, names in os.walk(ckpt_dir):
        for n in sorted(names):
            p = os.path.join(root, n)
            st = os.stat(p)
            files.append((os.path.relpath(p, ckpt_dir), st.st_size, st.st_mtime_ns))
    files.sort()
    stamp = hashlib.sha256(json.dumps([os.path.abspath(ckpt_dir), files]).encode()).hexdigest()
    cache = {}
    if cache_path and os.path.isfile(cache_path):
        try:
            with open(cache_path) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}  # unreadable: hashed again and rewritten
        if stamp in cache:
            return cache[stamp]
    h = hashlib.sha256()
    for rel, _, _ in files:
        h.update(rel.encode())
        with open(os.path.join(ckpt_dir, rel), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    digest = h.hexdigest()[:16]
    if cache_path:
        cache[stamp] = digest
        tmp = f"{cache_path}.{os.getpid()}.tmp"  # several processes may write it at once
        with open(tmp, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, cache_path)
    return digest


class GenerationCache:
    """Append-only JSONL of finished generations: appends to ``path``, reads every ``generations*.jsonl``
    beside it."""

    def __init__(self, path: str):
        self.path = path
        self.entries: dict[str, str] = {}
        self.reload()

    @classmethod
    def in_dir(cls, out_dir: str, process_index: int = 0, process_count: int = 1) -> GenerationCache:
        name = "generations.jsonl" if process_count == 1 else f"generations.{process_index}-of-{process_count}.jsonl"
        return cls(os.path.join(out_dir, name))

    def reload(self) -> None:
        """Reads every cache file in the dir (other processes' too)."""
        paths = set(glob.glob(os.path.join(glob.escape(os.path.dirname(self.path) or "."), "generations*.jsonl")))
        for path in sorted(paths | ({self.path} if os.path.isfile(self.path) else set())):
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        key, gen = rec["key"], rec["generation"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut by an interruption (or not ours); that item is generated again
                    if isinstance(key, str) and isinstance(gen, str):
                        self.entries[key] = gen

    @staticmethod
    def key(fp: str, bench: str, item_id: str, sample: int, settings: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps([fp, bench, item_id, sample, settings], sort_keys=True).encode()).hexdigest()

    def add(self, records: Sequence[dict[str, Any]]) -> None:
        with open(self.path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
                self.entries[r["key"]] = r["generation"]
            f.flush()
            os.fsync(f.fileno())
