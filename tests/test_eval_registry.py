"""The benchmark registry: a benchmark is its class plus one registry line, and the runner, the summary, the
paper table, the HTML report and launch/eval.py's flags all pick it up from there.

``TinyEcho`` is the worked example: a test-only benchmark (answer the word in the prompt) that no file of
the library names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from viscodex_jax.eval import registry
from viscodex_jax.eval.base import Benchmark, Column, Flag, Item
from viscodex_jax.eval.check import benchmark_for_folder
from viscodex_jax.eval.mmcode.benchmark import MMCode
from viscodex_jax.eval.report import markdown_table
from viscodex_jax.eval.runner import EvalSettings, evaluate, run_eval

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = {"a": "apple", "b": "banana", "c": "cherry"}


class TinyEcho(Benchmark):
    """Items ``{"id", "word"}`` in ``<root>/items.jsonl``; a generation scores 100 when it is the word."""

    name = "tiny_echo"
    flags = (Flag("tiny_echo_bonus", 0.0, "Points added to every tiny_echo score.", kind="float"),)
    columns = (Column("tiny_echo", "Tiny echo"), Column("tiny_echo_len", "Tiny echo length", "length"))
    folder_aliases = ("echo",)

    def __init__(self, tiny_echo_bonus: float = 0.0):
        self.bonus = tiny_echo_bonus

    def load(self, root, limit=None):
        with open(os.path.join(root, "items.jsonl")) as f:
            recs = [json.loads(line) for line in f][:limit]
        return [Item(r["id"], [{"role": "user", "content": [{"type": "text", "text": f"Say {r['word']}."}]}], [],
                     r["word"]) for r in recs]

    def score(self, item, generation):
        return {"score": 100.0 * (generation.strip() == item.reference) + self.bonus, "length": len(generation)}

    @staticmethod
    def make_sample(out_dir):
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "items.jsonl"), "w") as f:
            for i, w in WORDS.items():
                f.write(json.dumps({"id": i, "word": w}) + "\n")
        return out_dir


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, TinyEcho.name, TinyEcho)  # the one registry line


@pytest.fixture
def setup(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    return str(ckpt), TinyEcho.make_sample(str(tmp_path / "echo")), str(tmp_path / "out")


def answer(items, sample):
    return [WORDS[it.id] if it.id != "c" else "cherries" for it in items]


def test_a_registered_benchmark_runs_and_reaches_summary_table_and_report(setup):
    ckpt, root, out = setup
    summary = run_eval(ckpt, {"tiny_echo": root}, out, EvalSettings(batch_size=2), generate_fn=answer)
    agg = summary["benchmarks"]["tiny_echo"]
    assert agg["n_items"] == 3 and agg["score"] == pytest.approx(200 / 3)
    assert agg["length"] == pytest.approx((5 + 6 + 8) / 3)
    rows = [json.loads(line) for line in open(os.path.join(out, "tiny_echo_items.jsonl"))]
    assert [(r["id"], r["score"], r["generation"]) for r in rows] == [
        ("a", 100.0, "apple"), ("b", 100.0, "banana"), ("c", 0.0, "cherries")]
    md = open(os.path.join(out, "summary.md")).read()
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    assert header.endswith("| InfiBench-V | Tiny echo | Tiny echo length | avg |")  # after the paper's own
    assert "| ckpt (ours) | - | - | - | - | - | - | 66.7 | 6.3 | - |" in md
    assert "**tiny_echo** (3 items)" in md
    html = open(os.path.join(out, "report.html")).read()
    assert "<h2>tiny_echo</h2>" in html and "cherries" in html and "Tiny echo" in html


def test_flags_of_a_registered_benchmark_reach_its_constructor(setup):
    ckpt, root, out = setup
    assert registry.root_flags()["tiny_echo"].name == "tiny_echo_root"
    assert TinyEcho.flags[0] in registry.option_flags()
    benches = registry.build_benchmarks(["tiny_echo"], {"tiny_echo_bonus": 5.0})
    assert benches["tiny_echo"].bonus == 5.0
    with pytest.raises(registry.UsageError, match="does not support on_error='skip'"):
        registry.build_benchmarks(["tiny_echo"], on_error="skip")  # its constructor takes no on_error
    with pytest.raises(registry.UsageError, match="--tiny_echo_root is required"):
        evaluate(ckpt, ["tiny_echo"], {}, out)
    with pytest.raises(registry.UsageError, match=r"unknown 'nope'; choose from .*tiny_echo"):
        evaluate(ckpt, ["nope"], {"nope": root}, out)
    assert benchmark_for_folder("/data/echo") == "tiny_echo" and benchmark_for_folder("/x/tiny_echo/") == "tiny_echo"
    assert benchmark_for_folder("/data/infibench") == "infibench_v"
    with pytest.raises(ValueError, match="--check_benchmark"):
        benchmark_for_folder("/data/unknown")


def test_evaluate_builds_from_flag_values_and_rescores_from_the_cache(setup):
    ckpt, root, out = setup
    run_eval(ckpt, {"tiny_echo": root}, out, EvalSettings(), generate_fn=answer)
    # everything is cached: evaluate never loads the (absent) model, and the bonus flag reaches the scorer
    summary = evaluate(ckpt, ["tiny_echo"], {"tiny_echo": root, "mmcode": None}, out,
                       options={"tiny_echo_bonus": 1.5}, model_name="echo-model")
    assert summary["model"] == "echo-model" and summary["benchmarks"]["tiny_echo"]["score"] == pytest.approx(
        200 / 3 + 1.5)


def test_launch_eval_defines_the_flags_of_a_registered_benchmark(setup):
    """launch/eval.py, with TinyEcho registered before it starts: --tiny_echo_root and --tiny_echo_bonus
    exist and work (a re-score from the cache, so no model is needed)."""
    ckpt, root, out = setup
    run_eval(ckpt, {"tiny_echo": root}, out, EvalSettings(), generate_fn=answer)
    prelude = ("import runpy, sys\nsys.path.insert(0, sys.argv[1])\n"
               "from test_eval_registry import TinyEcho\nfrom viscodex_jax.eval import registry\n"
               "registry.register(TinyEcho)\nsys.argv = [sys.argv[2]] + sys.argv[3:]\n"
               "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", prelude, os.path.join(CHECKOUT, "tests"),
                        os.path.join(CHECKOUT, "launch", "eval.py"), f"--checkpoint={ckpt}", "--benchmarks=tiny_echo",
                        f"--tiny_echo_root={root}", "--tiny_echo_bonus=2", f"--out_dir={out}",
                        "--model_name=launched"], capture_output=True, text=True, env=env, cwd=CHECKOUT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| launched (ours) | - | - | - | - | - | - | 68.7 | 6.3 | - |" in r.stdout
    r = subprocess.run([sys.executable, "-c", prelude, os.path.join(CHECKOUT, "tests"),
                        os.path.join(CHECKOUT, "launch", "eval.py"), f"--checkpoint={ckpt}", "--benchmarks=tiny_echo",
                        f"--out_dir={out}"], capture_output=True, text=True, env=env, cwd=CHECKOUT, timeout=300)
    assert r.returncode != 0 and "--tiny_echo_root is required" in r.stderr


def test_the_builtin_benchmarks_give_the_papers_table():
    """The registry reproduces the table the reports always had: the paper's columns in its order, its labels."""
    assert registry.table_columns() == ("design2code", "design2code_high", "chartmimic", "chartmimic_high", "mmcode",
                                        "infibench_v", "tiny_echo", "tiny_echo_len", "avg")
    assert {k: v for k, v in registry.labels().items() if not k.startswith("tiny_echo")} == {
        "design2code": "D2C low", "design2code_high": "D2C high (CLIP)", "chartmimic": "ChartMimic low",
        "chartmimic_high": "ChartMimic high", "mmcode": "MMCode", "infibench_v": "InfiBench-V", "avg": "avg"}
    assert registry.names()[:4] == ("chartmimic", "design2code", "mmcode", "infibench_v")
    assert {f.name for f in registry.option_flags()} == {"clip_path", "judge_endpoint", "judge_model",
                                                         "tiny_echo_bonus"}
    row = registry.table_row({"design2code": {"score": 80.0, "clip": 0.9}, "chartmimic": {"score": 70.0},
                              "mmcode": {"score": 10.0}})
    assert row == {"design2code": 80.0, "design2code_high": pytest.approx(90.0), "chartmimic": 70.0, "mmcode": 10.0}
    assert markdown_table({"m": row}).splitlines()[0] == "| model | D2C low | D2C high (CLIP) | ChartMimic low | MMCode |"


def test_registry_refuses_clashes():
    class Other(TinyEcho):
        flags = (Flag("tiny_echo_bonus", 1.0, "Another default."),)

    with pytest.raises(ValueError, match="already registered"):
        registry.register(Other)
    registry.REGISTRY["other_echo"] = Other  # the same flag declared differently
    try:
        with pytest.raises(TypeError, match="is not a Benchmark named 'other_echo'"):
            registry.benchmark_class("other_echo")
        Other.name = "other_echo"
        with pytest.raises(ValueError, match="--tiny_echo_bonus is declared differently by 'tiny_echo' and "
                                             "'other_echo'"):
            registry.option_flags()
    finally:
        del registry.REGISTRY["other_echo"]


def test_aggregate_takes_the_number_of_samples():
    """One aggregate signature for every benchmark; MMCode reports pass@k for each of its ks the samples allow."""
    rows = [{"id": p, "sample": s, "passed": float(ok)} for p, oks in (("p", [1, 0, 0, 0, 0]), ("q", [0] * 5))
            for s, ok in enumerate(oks)]
    agg = MMCode().aggregate(rows, num_samples=5)
    assert set(agg) == {"pass@1", "pass@5", "score"}
    assert agg["pass@1"] == pytest.approx(10.0) and agg["pass@5"] == pytest.approx(50.0) and agg["score"] == agg["pass@1"]
    assert set(MMCode().aggregate(rows[:2], num_samples=1)) == {"pass@1", "score"}
    for name in registry.names():
        if name != "tiny_echo":
            assert "num_samples" in registry.benchmark_class(name).aggregate.__code__.co_varnames
