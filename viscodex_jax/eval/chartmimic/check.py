"""``launch/eval.py --check_against=DIR`` for ChartMimic: our low-level scores against the official ones.

A reference folder has the layout of ``shared/benchmarks/chartmimic``: reference programs in the
``ori_500`` layout, ``candidates/<item>/<candidate>.txt`` (raw responses) and ``expected.jsonl`` with the
official ``exec_ok``, ``text``, ``layout``, ``type``, ``color`` and ``score`` (x100) per pair.
"""

from __future__ import annotations

from typing import Any, Sequence

from viscodex_jax.eval.base import Item
from viscodex_jax.eval.check import Aggregate, CheckAdapter, Metric, TripleResult

TOLERANCE = 0.5  # points, per metric and pair (issue 11's parity band)
MEAN_TOLERANCE = 0.3  # points, for the mean over pairs


class ChartMimicCheck(CheckAdapter):
    item_field = "ref"
    metrics = (Metric("exec_ok"),
               Metric("text_f1", "text", TOLERANCE), Metric("layout_f1", "layout", TOLERANCE),
               Metric("type_f1", "type", TOLERANCE), Metric("color_f1", "color", TOLERANCE),
               Metric("score", "score", TOLERANCE))
    max_workers = 2  # each pair is one sandboxed process (the reference's run is cached per item)

    def observe(self, item: Item, response: str) -> dict[str, Any]:
        out = self.bench.observe(item, response)
        return {k: v for k, v in out.items() if isinstance(v, float)}

    def aggregates(self, results: Sequence[TripleResult]) -> list[Aggregate]:
        out = []
        n = max(len(results), 1)
        for m in self.metrics[1:]:
            ours = sum(float(r.observed.get(m.key, 0.0)) for r in results) / n
            official = sum(float(r.triple.expected[m.source]) for r in results) / n
            out.append(Aggregate(f"mean {m.source}", ours, official, MEAN_TOLERANCE))
        return out
