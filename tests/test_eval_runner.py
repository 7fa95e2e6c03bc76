"""The eval runner: cached generations, resume after interruption, reports next to the paper's table."""

from __future__ import annotations

import json
import os

import pytest

from viscodex_jax.eval.infibench import InfiBenchV
from viscodex_jax.eval.mmcode import MMCode
from viscodex_jax.eval.runner import EvalSettings, run_eval

ANSWERS = {
    "sum-two": "```python\na, b = map(int, input().split())\nprint(a + b)\n```",
    "bars-max": "```python\nn = int(input())\nh = list(map(int, input().split()))\nprint(h.index(max(h)) + 1)\n```",
    "reverse": "```python\nprint(input())\n```",  # wrong on purpose
    "pandas-groupby": "df.groupby('city')['price'].mean()",
    "square-fn": "```python\ndef square(x):\n    return x * x\n```",
}


class Interrupt(Exception):
    pass


@pytest.fixture
def setup(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    roots = {"mmcode": MMCode.make_sample(str(tmp_path / "mm")), "infibench_v": InfiBenchV.make_sample(str(tmp_path / "ib"))}
    return str(ckpt), roots, str(tmp_path / "out")


def test_eval_scores_writes_reports_and_resumes_without_regenerating(setup):
    ckpt, roots, out = setup
    calls = []

    def gen(items, sample, fail_after=None):
        calls.append([it.id for it in items])
        if fail_after is not None and len(calls) > fail_after:
            raise Interrupt()
        return [ANSWERS[it.id] for it in items]

    settings = EvalSettings(batch_size=2)
    with pytest.raises(Interrupt):  # killed after the first batch
        run_eval(ckpt, roots, out, settings, generate_fn=lambda i, s: gen(i, s, fail_after=1))
    assert calls == [["sum-two", "bars-max"], ["reverse"]]
    calls.clear()
    summary = run_eval(ckpt, roots, out, settings, generate_fn=gen)
    assert calls == [["reverse"], ["pandas-groupby", "square-fn"]]  # only what was not finished
    assert summary["benchmarks"]["mmcode"]["score"] == pytest.approx(200 / 3)
    assert summary["benchmarks"]["infibench_v"]["score"] == pytest.approx(100.0)
    calls.clear()
    again = run_eval(ckpt, roots, out, settings, generate_fn=gen)  # re-score: nothing generated
    assert calls == [] and again["benchmarks"] == summary["benchmarks"] | {
        k: {**v, "score_seconds": again["benchmarks"][k]["score_seconds"]} for k, v in summary["benchmarks"].items()}
    md = open(os.path.join(out, "summary.md")).read()
    assert "VisCodex-8B (paper)" in md and "(ours)" in md and "| 66.7 |" in md
    html = open(os.path.join(out, "report.html")).read()
    assert "data:image/png;base64" in html and "bars-max" in html
    items = [json.loads(line) for line in open(os.path.join(out, "mmcode_items.jsonl"))]
    assert {r["id"]: r["passed"] for r in items} == {"sum-two": 1.0, "bars-max": 1.0, "reverse": 0.0}


def test_changed_weights_or_settings_regenerate(setup):
    ckpt, roots, out = setup
    n = []
    gen = lambda items, s: (n.append(len(items)), [ANSWERS[it.id] for it in items])[1]
    run_eval(ckpt, {"mmcode": roots["mmcode"]}, out, EvalSettings(), generate_fn=gen)
    run_eval(ckpt, {"mmcode": roots["mmcode"]}, out, EvalSettings(max_new_tokens=7), generate_fn=gen)
    assert sum(n) == 6
    os.utime(os.path.join(ckpt, "config.json"), (1, 1))  # touched, same bytes: same fingerprint, cached
    run_eval(ckpt, {"mmcode": roots["mmcode"]}, out, EvalSettings(), generate_fn=gen)
    assert sum(n) == 6
    with open(os.path.join(ckpt, "config.json"), "w") as f:  # new bytes: new fingerprint
        f.write('{"x": 1}')
    run_eval(ckpt, {"mmcode": roots["mmcode"]}, out, EvalSettings(), generate_fn=gen)
    assert sum(n) == 9
