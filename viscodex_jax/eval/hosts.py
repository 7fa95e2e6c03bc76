"""Splitting an eval over the processes of a multi-process JAX run (one per host, each with its own model).

Each process takes every ``count``-th unit of work from the same ordered list, and the results meet in
files under the run's ``out_dir`` (which every process must see: a shared filesystem). Barriers are JAX's
``sync_global_devices``, so the processes must have called ``jax.distributed.initialize``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Hosts:
    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise ValueError(f"process {self.index} of {self.count}: expected 0 <= index < count")

    @classmethod
    def from_jax(cls) -> Hosts:
        """This process's place in the JAX run (one process when ``jax.distributed`` is not initialised)."""
        import jax

        if not jax.distributed.is_initialized():
            return cls()
        return cls(jax.process_index(), jax.process_count())

    @property
    def first(self) -> bool:
        return self.index == 0

    def share(self, work: Sequence[T]) -> list[T]:
        """This process's part of ``work``: every ``count``-th element from its ``index`` on."""
        return list(work[self.index::self.count])

    def barrier(self, name: str) -> None:
        if self.count > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)

    def gather(self, out_dir: str, name: str, records: Sequence[Any]) -> list[Any]:
        """Every process's ``records`` (JSON values), concatenated by process index; all processes get all.

        Each writes its part to ``<out_dir>/.gather/<name>.<index>.json`` (atomically), then all read."""
        if self.count == 1:
            return list(records)
        d = os.path.join(out_dir, ".gather")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"{name}.{self.index}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(list(records), f)
        os.replace(path + ".tmp", path)
        self.barrier(f"gather {name}")
        out = []
        for i in range(self.count):
            with open(os.path.join(d, f"{name}.{i}.json")) as f:
                out.extend(json.load(f))
        self.barrier(f"gathered {name}")  # nobody overwrites a part before everyone has read it
        return out
