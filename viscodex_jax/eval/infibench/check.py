"""``launch/eval.py --check_against`` for InfiBench: the shared ``benchmarks/infibench`` layout as triples.

Layout: the suite (``suite_*.yaml``, ``cases_*/``), ``expected.jsonl`` with one line per (model, case,
response) carrying ``model``, ``case`` (suite-relative case YAML), ``case_id``, ``response_index``, the
official ``score`` (on the case's full score), ``raw_score``, ``raw_total`` and ``subscores``; the
responses in ``responses/<model>.jsonl.gz`` (lines with ``model``, ``case``, ``response_index``,
``response``), or a ``response`` field on the expected line itself.

Responses whose case needs a unit-test runtime we do not run (non-Python) are not compared; the report
counts them in an aggregate line ("not run"), so they are never passed or failed. Unit-test programs and
handler modules missing from the folder are looked up in ``INFIBENCH_SUPPORT_DIRS`` (``os.pathsep``-
separated, e.g. an infibench-evaluator checkout's ``cases_dev``); a case still missing them is
unreadable and its responses disagree.
"""

from __future__ import annotations

import glob
import gzip
import json
import math
import os
from typing import Any, Iterator, Sequence

from viscodex_jax.eval.base import Item
from viscodex_jax.eval.check import Aggregate, CheckAdapter, Metric, Triple, TripleResult
from viscodex_jax.eval.infibench.spec import Case
from viscodex_jax.eval.infibench.unit_tests import RUNNABLE


def expected_records(root: str) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(``expected.jsonl:<line>``, the line, its response) for every line."""
    responses: dict[tuple[str, str, int], str] = {}
    for f in sorted(glob.glob(os.path.join(root, "responses", "*.jsonl.gz"))):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                r = json.loads(line)
                responses[(r["model"], os.path.normpath(r["case"]), int(r["response_index"]))] = r["response"]
    path = os.path.join(root, "expected.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{root}: no expected.jsonl (one line per model, case and response, with the "
                                "official scores)")
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
                key = (rec["model"], os.path.normpath(rec["case"]), int(rec["response_index"]))
                for k in ("case_id", "score", "raw_score", "raw_total"):
                    rec[k]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{where}: expected model, case, case_id, response_index, score, raw_score, "
                                 f"raw_total ({type(e).__name__}: {e})") from e
            response = rec.get("response", responses.get(key))
            if response is None:
                raise ValueError(f"{where}: no response for {key} in responses/*.jsonl.gz")
            yield where, rec, response


class InfiBenchCheck(CheckAdapter):
    item_field = "case_id"
    metrics = (Metric("official_score", "score", tolerance=1e-6), Metric("raw", "raw_score", tolerance=1e-6),
               Metric("total", "raw_total", tolerance=1e-6))
    max_workers = 2  # unit tests are sandboxed processes; text grading holds the GIL

    def load_items(self, folder: str) -> dict[str, Item]:
        on_error, self.bench.on_error = self.bench.on_error, "skip"  # one missing test program must not stop it
        try:
            self._items = {it.id: it for it in self.bench.load(folder)}
        finally:
            self.bench.on_error = on_error
        return self._items

    def _not_runnable(self, item: Item) -> bool:
        ref = item.reference
        return isinstance(ref, Case) and ref.unit_lang is not None and ref.unit_lang not in RUNNABLE

    def triples(self, folder: str) -> Iterator[Triple]:
        self._not_run: dict[str, int] = {}
        for where, rec, response in expected_records(folder):
            item = self._items.get(str(rec["case_id"]))
            if item is not None and self._not_runnable(item):
                lang = item.reference.unit_lang
                self._not_run[lang] = self._not_run.get(lang, 0) + 1
                continue
            yield Triple(str(rec["case_id"]), f"{rec['model']}#{rec['response_index']}", response, rec, where)

    def aggregates(self, results: Sequence[TripleResult]) -> list[Aggregate]:
        out = [Aggregate(f"responses not run (no {lang} runtime in the sandbox)", float(n), float(n))
               for lang, n in sorted(self._not_run.items())]
        per: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
        for r in results:
            rec = r.triple.expected
            ours = r.observed.get("official_score", 0.0)
            per.setdefault((rec["model"], rec["case_id"]), {})[int(rec["response_index"])] = (
                0.0 if ours is None or math.isnan(ours) else ours, rec["score"])
        from viscodex_jax.eval.infibench.benchmark import reduce_scores

        for model in sorted({m for m, _ in per}):
            cases = [v for (m, _), v in per.items() if m == model]
            ours = sum(reduce_scores([v[i][0] for i in sorted(v)], self.bench.reduce_mode) for v in cases)
            official = sum(reduce_scores([v[i][1] for i in sorted(v)], self.bench.reduce_mode) for v in cases)
            out.append(Aggregate(f"{model}: suite score over the {len(cases)} compared cases", ours, official, 1e-6))
        return out
