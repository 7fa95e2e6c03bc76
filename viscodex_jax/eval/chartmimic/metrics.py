"""ChartMimic's official low-level metrics (text, layout, type, colour F1 x100) over two harness logs."""

from __future__ import annotations

import collections
from typing import Any, Sequence

import numpy as np

from viscodex_jax.eval.colors import similarity_matrix

METRICS = ("text_f1", "layout_f1", "type_f1", "color_f1")

_COLOR_FILTER_MIN = 10  # more logged colours than this go through the official similarity filter


def f1(gen: Sequence[Any], ref: Sequence[Any]) -> float:
    """Official multiset F1 x100 (items hashable); 0 when either side is empty."""
    if not gen or not ref:
        return 0.0
    hit = sum((collections.Counter(gen) & collections.Counter(ref)).values())
    if hit == 0:
        return 0.0
    p, r = hit / len(gen), hit / len(ref)
    return 100.0 * 2 * p * r / (p + r)


def type_f1(gen: dict[str, int], ref: dict[str, int]) -> float:
    """Official chart-type F1 x100 over call counts (fresh evaluator: 0 when either side logged none)."""
    if not gen or not ref:
        return 0.0
    hit = sum(min(n, ref[k]) for k, n in gen.items() if k in ref)
    p, r = hit / sum(gen.values()), hit / sum(ref.values())
    return 0.0 if p + r == 0 else 100.0 * 2 * p * r / (p + r)


def _similarity(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """Official pairwise similarity: CIEDE2000 for two hex colours, equality for two colormap names, else 0."""
    sim = np.zeros((len(a), len(b)))
    ha = [i for i, c in enumerate(a) if c.startswith("#")]
    hb = [j for j, c in enumerate(b) if c.startswith("#")]
    if ha and hb:
        sim[np.ix_(ha, hb)] = similarity_matrix([a[i] for i in ha], [b[j] for j in hb])
    for i, c in enumerate(a):
        if not c.startswith("#"):
            for j, d in enumerate(b):
                sim[i, j] = float(c == d)
    return sim


def filter_colors(logged: Sequence[str]) -> list[str]:
    """Official ``filter_color`` for more than 10 logged colours: keep one that is at most 0.7 similar to
    every colour kept before it, in the logged (set iteration) order."""
    if len(logged) <= _COLOR_FILTER_MIN:
        return list(logged)
    kept: list[str] = []
    for entry in logged:
        c = entry.split("--", 1)[1]
        if not kept or all(_similarity([c], [k.split("--", 1)[1]])[0, 0] <= 0.7 for k in kept):
            kept.append(entry)
    return kept


class ColorlessReference(Exception):
    """The reference logged no colour: the official colour evaluator divides by zero on it."""


def color_f1(gen: Sequence[str], ref: Sequence[str], guarded: bool = False) -> float:
    """Official colour F1 x100 over ``"<call>--<colour>"`` entries: optimal matching within each call group.

    Raises ``ColorlessReference`` when ``ref`` is empty, unless ``guarded`` (the official guard for "box").
    """
    from scipy.optimize import linear_sum_assignment

    groups: dict[str, tuple[list[str], list[str]]] = {}
    for side, entries in enumerate((gen, ref)):
        for e in entries:
            call, color = e.split("--", 1)
            groups.setdefault(call, ([], []))[side].append(color)
    total = 0.0
    for g, r in groups.values():
        if g and r:
            sim = _similarity(g, r)
            rows, cols = linear_sum_assignment(sim, maximize=True)
            total += float(sim[rows, cols].sum())
    p = total / len(gen) if gen else 0.0
    if not ref and not guarded:
        raise ColorlessReference("the reference logged no colour (official ZeroDivisionError)")
    r = total / len(ref) if ref else 0.0
    return 0.0 if p + r == 0 else 100.0 * 2 * p * r / (p + r)


def compare(gen: dict[str, Any], ref: dict[str, Any], name: str = "") -> dict[str, float]:
    """The four low-level metrics (x100), their mean, and ``colorless_reference``, from two harness infos.

    ``name`` is the item's name: "box" in it guards the colour recall, as the official path test does.
    """
    m = {
        "text_f1": f1(gen["texts"], ref["texts"]),
        "layout_f1": f1([tuple(x) for x in gen["layout"]], [tuple(x) for x in ref["layout"]]),
        "type_f1": type_f1(gen["types"], ref["types"]),
    }
    try:
        m["color_f1"] = color_f1(filter_colors(gen["colors"]), filter_colors(ref["colors"]), "box" in name)
    except ColorlessReference:  # the official run writes no result for the item: 0 on every metric
        return {**ZERO_SCORES, "colorless_reference": 1.0}
    m["score"] = sum(m[k] for k in METRICS) / 4
    m["colorless_reference"] = 0.0
    return m


ZERO_SCORES = {"text_f1": 0.0, "layout_f1": 0.0, "type_f1": 0.0, "color_f1": 0.0, "score": 0.0}
