"""The project's earlier flat InfiBench-V layout (``questions.jsonl``), kept working for existing data.

One question per line::

    {"id": "q1", "question": "...", "images": ["imgs/q1.png"], "lang": "python",
     "grading": {
        "keywords": [{"content": "groupby", "weight": 1.0, "regex": false, "to_lower": true, "neg": false}, ...],
        "unit_test": {"weight": 2.0, "tests": [{"prefix": "", "suffix": "assert f(2) == 4\\n"}]},
        "judge": {"weight": 1.0, "rubric": "...", "threshold": 0.5}},
     "full_score": 4.0, "null_score": 0.0}

Each keyword (or regex) found adds its weight (a ``neg`` keyword subtracts it);
the unit-test part adds its weight times the fraction of tests that pass; the
optional judge adds its weight when an LLM rating reaches ``threshold``. The
item score is ``(raw - null_score) / (full_score - null_score)``, clipped to
[0, 1], reported x100. The official case-YAML layout is ``spec``.
"""

from __future__ import annotations

import json
import os
import re

from PIL import Image

from viscodex_jax.eval.base import Item, extract_code
from viscodex_jax.eval.sandbox import Limits, run_python


def load_flat(path: str, limit: int | None = None) -> list[Item]:
    items = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            where = f"{path}:{lineno}"
            for key in ("id", "question", "grading"):
                if key not in rec:
                    raise ValueError(f"{where}: question spec lacks {key!r}")
            g = rec["grading"]
            if not any(k in g for k in ("keywords", "unit_test", "judge")):
                raise ValueError(f"{where}: grading needs keywords, unit_test or judge")
            images = [Image.open(os.path.join(os.path.dirname(path), p)).convert("RGB") for p in rec.get("images", [])]
            text = rec["question"] + (f"\n\nAnswer in {rec['lang']}." if rec.get("lang") else "")
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
            items.append(Item(str(rec["id"]), [{"role": "user", "content": content}], images, rec))
            if limit is not None and len(items) >= limit:
                break
    return items


def score_flat(spec: dict, generation: str, judge, limits: Limits) -> dict[str, float]:
    g = spec["grading"]
    raw, parts = 0.0, {}
    kw = 0.0
    for k in g.get("keywords", []):
        text, pat = generation, k["content"]
        if k.get("to_lower"):
            text, pat = text.lower(), pat.lower()
        found = re.search(pat, text) is not None if k.get("regex") else pat in text
        if found:
            kw += -k.get("weight", 1.0) if k.get("neg") else k.get("weight", 1.0)
    raw += kw
    parts["keywords"] = kw
    if "unit_test" in g:
        ut = g["unit_test"]
        code = extract_code(generation, (spec.get("lang", "python"), "python", "py", ""))
        ok = sum(run_python(t.get("prefix", "") + "\n" + code + "\n" + t.get("suffix", ""), limits=limits).ok
                 for t in ut["tests"])
        parts["unit_tests_passed"] = ok / len(ut["tests"])
        raw += ut.get("weight", 1.0) * parts["unit_tests_passed"]
    if "judge" in g and judge is not None:
        j = g["judge"]
        rating = judge.rate(j.get("rubric", "Rate the answer's correctness."), spec["question"], generation)
        parts["judge"] = rating
        raw += j.get("weight", 1.0) * (rating >= j.get("threshold", 0.5))
    full, null = spec.get("full_score", 1.0), spec.get("null_score", 0.0)
    norm = min(max((raw - null) / (full - null), 0.0), 1.0) if full != null else 0.0
    return {"score": 100.0 * norm, "raw": raw, **parts}
