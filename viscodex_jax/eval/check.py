"""Re-checks a benchmark scorer against an official evaluator's own scores (``launch/eval.py --check_against``).

A reference folder has the shared layout of ``shared/benchmarks/<benchmark>/``: the benchmark's items in
their published layout, the candidate responses (``candidates/<item>/<candidate>.txt``, or wherever the
benchmark keeps them), and ``expected.jsonl``, one line per (item, candidate) with the official scores.
Each line is one *triple*: the item it names, the candidate response, and the expected values.

A benchmark plugs in through a ``check_adapter()`` method returning a ``CheckAdapter``: which field of an
``expected.jsonl`` line names the item, where the response is, which metrics to compare and how closely,
how to score one triple (by default ``Benchmark.score``), and the benchmark-level numbers (such as
pass@1) to compare after all triples are scored. ``run_check`` scores every triple and ``format_report``
prints the per-metric agreement and every disagreement.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
from typing import Any, Iterator, Mapping, Sequence

from viscodex_jax.eval import registry
from viscodex_jax.eval.base import Benchmark, Item


@dataclasses.dataclass(frozen=True)
class Metric:
    """One compared value: ``key`` in our observation, ``expected_key`` (default: ``key``) in the line.

    Numbers (bools count as 0/1) agree within ``tolerance`` after ours is multiplied by ``scale``; lists
    agree element by element; anything else must be equal.
    """

    key: str
    expected_key: str | None = None
    tolerance: float = 0.0
    scale: float = 1.0

    @property
    def source(self) -> str:
        return self.expected_key or self.key


@dataclasses.dataclass
class Triple:
    item_id: str
    candidate: str
    response: str
    expected: dict[str, Any]
    where: str  # "expected.jsonl:<line>", for messages


@dataclasses.dataclass
class TripleResult:
    triple: Triple
    observed: dict[str, Any]
    agree: dict[str, bool]
    error: str | None = None  # our scorer raised: every metric counts as disagreeing


@dataclasses.dataclass
class Aggregate:
    """A benchmark-level number compared after all triples (e.g. pass@1 over the problems)."""

    name: str
    ours: float
    expected: float
    tolerance: float = 0.0

    @property
    def agree(self) -> bool:
        return abs(self.ours - self.expected) <= self.tolerance + 1e-9


@dataclasses.dataclass
class CheckReport:
    benchmark: str
    folder: str
    metrics: tuple[Metric, ...]
    results: list[TripleResult]
    aggregates: list[Aggregate]

    def agreement(self, metric: Metric) -> tuple[int, int]:
        return sum(r.agree.get(metric.key, False) for r in self.results), len(self.results)

    @property
    def disagreements(self) -> list[TripleResult]:
        return [r for r in self.results if r.error or not all(r.agree.values())]

    @property
    def ok(self) -> bool:
        return not self.disagreements and all(a.agree for a in self.aggregates)


def values_agree(ours: Any, expected: Any, tolerance: float = 0.0, scale: float = 1.0) -> bool:
    if isinstance(ours, (list, tuple)) or isinstance(expected, (list, tuple)):
        return (isinstance(ours, (list, tuple)) and isinstance(expected, (list, tuple)) and len(ours) == len(expected)
                and all(values_agree(a, b, tolerance, scale) for a, b in zip(ours, expected)))
    if isinstance(ours, (int, float)) and isinstance(expected, (int, float)):
        a, b = float(ours) * scale, float(expected)
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return abs(a - b) <= tolerance + 1e-9
    return ours == expected


class CheckAdapter:
    """How one benchmark's reference folder maps onto triples; benchmarks override what differs."""

    item_field: str = "id"
    metrics: tuple[Metric, ...] = ()
    max_workers: int = 1  # raise where scoring one triple is independent of the others (e.g. sandboxed)

    def __init__(self, bench: Benchmark):
        self.bench = bench

    def load_items(self, folder: str) -> dict[str, Item]:
        return {it.id: it for it in self.bench.load(folder)}

    def triples(self, folder: str) -> Iterator[Triple]:
        """One per ``expected.jsonl`` line; the response is read from its ``candidate_file``."""
        path = os.path.join(folder, "expected.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder}: no expected.jsonl (one line per item and candidate, with the "
                                    "official scores)")
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    rec = json.loads(line)
                    item_id, rel = str(rec[self.item_field]), rec["candidate_file"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{where}: expected a JSON object with {self.item_field!r} and 'candidate_file' "
                                     f"({type(e).__name__}: {e})") from e
                cand = os.path.join(folder, rel)
                try:
                    with open(cand, encoding="utf-8") as c:
                        response = c.read()
                except OSError as e:
                    raise ValueError(f"{where}: candidate file {cand}: {e}") from e
                name = rec.get("candidate", os.path.splitext(os.path.basename(rel))[0])
                yield Triple(item_id, str(name), response, rec, where)

    def observe(self, item: Item, response: str) -> dict[str, Any]:
        return self.bench.score(item, response)

    def aggregates(self, results: Sequence[TripleResult]) -> list[Aggregate]:
        return []


def benchmark_for_folder(folder: str) -> str:
    """The benchmark a reference folder holds, from its name (``.../mmcode`` -> ``mmcode``) or one of a
    benchmark's ``folder_aliases``."""
    base = os.path.basename(os.path.normpath(folder)).lower()
    aliases = {a: n for n in registry.names() for a in registry.benchmark_class(n).folder_aliases}
    name = aliases.get(base, base)
    if name not in registry.names():
        raise registry.UsageError(f"{folder}: cannot tell the benchmark from the folder name {base!r}; name it "
                                  f"with --check_benchmark (one of {', '.join(registry.names())})")
    return name


def adapter_for(bench: Benchmark) -> CheckAdapter:
    make = getattr(bench, "check_adapter", None)
    if make is None:
        raise NotImplementedError(
            f"benchmark {bench.name!r} cannot be checked yet: give {type(bench).__name__} a check_adapter() method "
            "returning a viscodex_jax.eval.check.CheckAdapter")
    return make()


def run_check(bench: Benchmark, folder: str, adapter: CheckAdapter | None = None,
              max_workers: int | None = None) -> CheckReport:
    adapter = adapter or adapter_for(bench)
    items = adapter.load_items(folder)
    triples = list(adapter.triples(folder))
    if not triples:
        raise ValueError(f"{folder}/expected.jsonl: no triples")
    missing = sorted({t.item_id for t in triples if t.item_id not in items})
    if missing:
        raise ValueError(f"{folder}/expected.jsonl names items the loader did not find: {missing[:10]}")

    def one(t: Triple) -> TripleResult:
        try:
            observed = adapter.observe(items[t.item_id], t.response)
        except Exception as e:  # noqa: BLE001  (a scorer failure is a disagreement to report, not a crash)
            return TripleResult(t, {}, {m.key: False for m in adapter.metrics}, f"{type(e).__name__}: {e}")
        agree = {}
        for m in adapter.metrics:
            if m.source not in t.expected:
                raise ValueError(f"{t.where}: no expected value {m.source!r}")
            agree[m.key] = m.key in observed and values_agree(observed[m.key], t.expected[m.source],
                                                              m.tolerance, m.scale)
        return TripleResult(t, observed, agree)

    workers = max_workers or adapter.max_workers
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(one, triples))
    return CheckReport(bench.name, folder, adapter.metrics, results, adapter.aggregates(results))


def check_folder(folder: str, benchmark: str | None = None, options: Mapping[str, Any] | None = None,
                 on_error: str = "raise", max_workers: int | None = None) -> CheckReport:
    """``launch/eval.py --check_against``: the folder's benchmark (``benchmark``, else from the folder name),
    built from the launch flag values ``options``, checked against the folder's official scores."""
    name = benchmark or benchmark_for_folder(folder)
    bench = registry.build_benchmarks([name], options, on_error)[name]
    return run_check(bench, folder, max_workers=max_workers)


def _short(v: Any, width: int = 60) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= width else s[:width - 3] + "..."


def format_report(report: CheckReport) -> str:
    n_items = len({r.triple.item_id for r in report.results})
    lines = [f"check {report.benchmark} against {report.folder}: {len(report.results)} triples over {n_items} items",
             "", "| metric | agree | total | agreement |", "| --- | ---: | ---: | ---: |"]
    for m in report.metrics:
        a, n = report.agreement(m)
        lines.append(f"| {m.key} | {a} | {n} | {100.0 * a / max(n, 1):.2f}% |")
    if report.aggregates:
        lines += ["", "| aggregate | ours | official | agree |", "| --- | ---: | ---: | --- |"]
        for g in report.aggregates:
            lines.append(f"| {g.name} | {g.ours:.4f} | {g.expected:.4f} | {'yes' if g.agree else 'NO'} |")
    bad = report.disagreements
    lines += ["", f"disagreements: {len(bad)}"]
    for r in bad:
        t = r.triple
        if r.error:
            lines.append(f"  {t.item_id}/{t.candidate}: our scorer raised {r.error}")
            continue
        diffs = [f"{m.key}: ours {_short(r.observed.get(m.key))}, official {_short(t.expected[m.source])}"
                 for m in report.metrics if not r.agree[m.key]]
        lines.append(f"  {t.item_id}/{t.candidate}: " + "; ".join(diffs))
    return "\n".join(lines)
