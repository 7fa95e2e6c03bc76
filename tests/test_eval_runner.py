"""The eval runner: cached generations, resume after interruption, reports next to the paper's table."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from viscodex_jax.eval.base import Benchmark, Item
from viscodex_jax.eval.check import CheckAdapter, Metric, adapter_for, format_report, run_check
from viscodex_jax.eval.infibench.benchmark import InfiBenchV
from viscodex_jax.eval.mmcode.benchmark import MMCode
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


class FlakyMMCode(MMCode):
    """A scorer that raises on one item, as a program replacing the harness's files once made ours do."""

    def score(self, item, generation):
        if item.id == "bars-max":
            raise IsADirectoryError(21, "Is a directory", ".stdout")
        return super().score(item, generation)


def test_scorer_failure_scores_zero_with_reason_and_resume_does_not_crash(setup, tmp_path):
    ckpt, roots, out = setup
    # one unreadable problem line: counted as failed, never generated
    with open(os.path.join(roots["mmcode"], "mmcode_test.jsonl.gz"), "ab") as f:
        f.write(gzip.compress(b'{"problem_id": "broken", "question": 3}\n'))
    generated = []

    def gen(items, s):
        generated.extend(it.id for it in items)
        return [ANSWERS[it.id] for it in items]

    bench = {"mmcode": FlakyMMCode(on_error="skip")}
    first = run_eval(ckpt, {"mmcode": roots["mmcode"]}, out, EvalSettings(), generate_fn=gen, benchmarks=bench)
    assert sorted(generated) == ["bars-max", "reverse", "sum-two"]
    rows = {r["id"]: r for r in map(json.loads, open(os.path.join(out, "mmcode_items.jsonl")))}
    assert rows["bars-max"]["score_error"] == "IsADirectoryError: [Errno 21] Is a directory: '.stdout'"
    assert rows["bars-max"]["passed"] == 0.0 and rows["bars-max"]["score"] == 0.0
    reason = rows["broken"]["score_error"]
    assert "mmcode_test.jsonl.gz:5: " in reason and "missing field: 'input_output'" in reason
    assert rows["sum-two"]["passed"] == 1.0 and "score_error" not in rows["sum-two"]
    assert first["benchmarks"]["mmcode"]["n_items"] == 4 and first["benchmarks"]["mmcode"]["n_score_errors"] == 2
    assert first["benchmarks"]["mmcode"]["score"] == pytest.approx(25.0)  # 1 of 4 problems
    # resuming over the same cached items (plus a foreign line in the cache) scores again without crashing
    with open(os.path.join(out, "generations.jsonl"), "a") as f:
        f.write('{"not": "a cache record"}\n')
    generated.clear()
    again = run_eval(ckpt, {"mmcode": roots["mmcode"]}, out, EvalSettings(), generate_fn=gen, benchmarks=bench)
    assert generated == [] and again["benchmarks"]["mmcode"]["score"] == pytest.approx(25.0)


class ToyBench(Benchmark):
    """A benchmark whose score is the response's length, to check check.py without any real scorer."""

    name = "toy"

    def load(self, root, limit=None):
        return [Item(i, [], [], None) for i in ("a", "b")]

    def score(self, item, generation):
        if generation.startswith("boom"):
            raise RuntimeError("scorer broke")
        return {"score": float(len(generation.strip()))}

    def check_adapter(self):
        adapter = CheckAdapter(self)
        adapter.item_field, adapter.metrics = "ref", (Metric("score", "official_score", tolerance=0.5),)
        return adapter

    @staticmethod
    def make_sample(out_dir):
        return out_dir


def test_check_generic_triples_tolerance_and_scorer_errors(tmp_path):
    rows = [("a", "four", "abcd", 4.4), ("a", "far", "abcdefgh", 4.0), ("b", "boom", "boom!", 5.0),
            ("b", "one", "x", 1.0)]
    for ref, cand, text, _ in rows:
        (tmp_path / "candidates" / ref).mkdir(parents=True, exist_ok=True)
        (tmp_path / "candidates" / ref / f"{cand}.txt").write_text(text)
    (tmp_path / "expected.jsonl").write_text("".join(json.dumps(
        {"ref": ref, "candidate": cand, "candidate_file": f"candidates/{ref}/{cand}.txt", "official_score": v}) + "\n"
        for ref, cand, _, v in rows))
    report = run_check(ToyBench(), str(tmp_path))
    assert report.agreement(report.metrics[0]) == (2, 4) and not report.ok
    text = format_report(report)
    assert "| score | 2 | 4 | 50.00% |" in text and "a/far: score: ours 8.0, official 4.0" in text
    assert "b/boom: our scorer raised RuntimeError: scorer broke" in text
    with pytest.raises(NotImplementedError, match="'mmcode-like' cannot be checked yet"):
        adapter_for(type("NoCheck", (ToyBench,), {"name": "mmcode-like", "check_adapter": None})())
    (tmp_path / "expected.jsonl").write_text('{"ref": "zz", "candidate_file": "candidates/a/four.txt"}\n')
    with pytest.raises(ValueError, match=r"names items the loader did not find: \['zz'\]"):
        run_check(ToyBench(), str(tmp_path))
