"""Benchmarks by name: the one table that ``launch/eval.py``, the runner, the reports and ``--check_against``
read. Adding a benchmark is its module plus one line in ``REGISTRY``.

Each class declares the rest itself (``base.Benchmark``): its launch flags, paper-table columns and labels,
and the folder names a reference folder may carry. Entries are ``"module:Class"`` strings, imported on first
use, or classes (``register``, e.g. a test's own benchmark).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Mapping, Sequence

from viscodex_jax.eval.base import Benchmark, Column, Flag
from viscodex_jax.eval.paper import PAPER_COLUMNS

REGISTRY: dict[str, str | type[Benchmark]] = {
    "chartmimic": "viscodex_jax.eval.chartmimic.benchmark:ChartMimic",
    "design2code": "viscodex_jax.eval.design2code.benchmark:Design2Code",
    "mmcode": "viscodex_jax.eval.mmcode.benchmark:MMCode",
    "infibench_v": "viscodex_jax.eval.infibench.benchmark:InfiBenchV",
}

AVG = "avg"  # the paper's mean column; ours is never computed (we run subsets)


class UsageError(ValueError):
    """A benchmark name, root or option the caller chose does not fit the registry (a flag problem)."""


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def register(cls: type[Benchmark]) -> type[Benchmark]:
    """Adds ``cls`` under ``cls.name`` (usable as a class decorator); a name already taken is an error."""
    if not (isinstance(cls, type) and issubclass(cls, Benchmark)) or not cls.name:
        raise TypeError(f"{cls!r}: expected a Benchmark subclass with a name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"benchmark name {cls.name!r} is already registered ({REGISTRY[cls.name]!r})")
    REGISTRY[cls.name] = cls
    return cls


def benchmark_class(name: str) -> type[Benchmark]:
    entry = REGISTRY.get(name)
    if entry is None:
        raise UsageError(f"unknown benchmark {name!r}; choose from {', '.join(REGISTRY)}")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
    if not (isinstance(entry, type) and issubclass(entry, Benchmark)) or entry.name != name:
        raise TypeError(f"registry entry {name!r}: {entry!r} is not a Benchmark named {name!r}")
    return entry


def make_benchmark(name: str, **kw) -> Benchmark:
    return benchmark_class(name)(**kw)


def build_benchmarks(names: Sequence[str], options: Mapping[str, Any] | None = None,
                     on_error: str = "raise") -> dict[str, Benchmark]:
    """The named benchmarks, each built from the launch flag values it declares (``options``: flag name ->
    value). ``on_error="skip"`` goes to every benchmark whose constructor takes ``on_error`` (unreadable
    items then count as failed); for the others it is an error rather than silently ignored."""
    benches = {}
    for n in names:
        cls = benchmark_class(n)
        kw = cls.options(options or {})
        if on_error != "raise":
            if "on_error" not in inspect.signature(cls.__init__).parameters:
                raise UsageError(f"benchmark {n!r} does not support on_error={on_error!r}; its unreadable items "
                                 "always stop the run")
            kw["on_error"] = on_error
        benches[n] = cls(**kw)
    return benches


# -- launch flags ----------------------------------------------------------------------------------------
def root_flags() -> dict[str, Flag]:
    """``--<name>_root`` per benchmark: where its data is, in its published layout."""
    return {n: Flag(f"{n}_root", None, f"Data root of {n} ({benchmark_class(n).root_help}).") for n in REGISTRY}


def option_flags() -> list[Flag]:
    """Every benchmark's own flags, once each; two benchmarks may share a flag only if they declare it alike."""
    seen: dict[str, tuple[str, Flag]] = {}
    for n in REGISTRY:
        for f in benchmark_class(n).flags:
            if f.name in seen and seen[f.name][1] != f:
                raise ValueError(f"flag --{f.name} is declared differently by {seen[f.name][0]!r} and {n!r}")
            seen.setdefault(f.name, (n, f))
    return [f for _, f in seen.values()]


def select_roots(benchmarks: Sequence[str], roots: Mapping[str, str | None]) -> dict[str, str]:
    """``{name: root}`` for the benchmarks asked for; an unknown name or a missing root is a UsageError."""
    out = {}
    for name in benchmarks:
        if name not in REGISTRY:
            raise UsageError(f"--benchmarks: unknown {name!r}; choose from {', '.join(REGISTRY)}")
        if not roots.get(name):
            raise UsageError(f"--{name}_root is required when --benchmarks includes {name}")
        out[name] = roots[name]
    return out


# -- tables and reports ----------------------------------------------------------------------------------
def columns() -> dict[str, tuple[str, Column]]:
    """Paper-table column key -> (benchmark, column): the paper's own columns in its order, then columns of
    benchmarks the paper does not have, in registry order."""
    found = {c.key: (n, c) for n in REGISTRY for c in benchmark_class(n).table_columns()}
    order = {k: i for i, k in enumerate(PAPER_COLUMNS)}
    return dict(sorted(found.items(), key=lambda kv: order.get(kv[0], len(order))))


def table_columns() -> tuple[str, ...]:
    return (*columns(), AVG)


def labels() -> dict[str, str]:
    return {**{k: c.label for k, (_, c) in columns().items()}, AVG: AVG}


def table_row(benchmarks: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Our row of the paper table from a summary's per-benchmark aggregates."""
    row = {}
    for key, (name, col) in columns().items():
        agg = benchmarks.get(name)
        if agg is not None and col.metric is not None and col.metric in agg:
            row[key] = col.scale * agg[col.metric]
    return row

