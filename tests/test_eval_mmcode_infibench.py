"""MMCode and InfiBench-V scoring on hand-made cases with known answers."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from viscodex_jax.eval.base import extract_code
from viscodex_jax.eval.infibench.benchmark import InfiBenchV
from viscodex_jax.eval.infibench.judge import Judge
from viscodex_jax.eval.mmcode.benchmark import MMCode, pass_at_k


@pytest.fixture(scope="module")
def mmcode_items(tmp_path_factory):
    root = MMCode.make_sample(str(tmp_path_factory.mktemp("mmcode")))
    return {it.id: it for it in MMCode().load(root)}


def test_mmcode_load_reads_published_layout(mmcode_items):
    assert set(mmcode_items) == {"sum-two", "bars-max", "reverse"}  # the "dev" problem is filtered out
    bars = mmcode_items["bars-max"]
    assert len(bars.images) == 1 and bars.images[0].size == (720, 480)  # 120x80 scaled to 480 px high
    assert bars.messages[0]["role"] == "system" and bars.messages[1]["content"][1] == {"type": "image"}
    assert bars.reference.n_tests == 2 and bars.reference.fn_name is None


def test_mmcode_correct_wrong_and_crashing_programs(mmcode_items):
    item, bench = mmcode_items["sum-two"], MMCode()
    good = "Here you go:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    assert bench.score(item, good) == {"score": 100.0, "passed": 1.0, "tests_passed": 1.0}
    wrong = "```python\na, b = map(int, input().split())\nprint(a - b if a > 0 else a + b)\n```"
    r = bench.score(item, wrong)
    assert r["passed"] == 0.0 and r["score"] == 0.0 and r["tests_passed"] == pytest.approx(1 / 3)  # -5 7 passes
    crash = "```python\nraise SystemExit(3)\n```"
    assert bench.score(item, crash)["passed"] == 0.0
    spaces = "```python\na, b = map(int, input().split())\nprint(' ', a + b, ' ')\nprint()\n```"
    assert bench.score(item, spaces)["passed"] == 1.0  # surrounding whitespace/blank lines are ignored
    assert bench.score(item, "```python\nprint(eval(input().replace(' ', '+')) + 0.0)\n```")["passed"] == 1.0


def test_pass_at_k_estimator():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(3, 3, 3) == 1.0
    rows = [{"id": "a", "passed": 1.0}, {"id": "a", "passed": 0.0}, {"id": "b", "passed": 0.0}, {"id": "b", "passed": 0.0}]
    agg = MMCode().aggregate(rows, ks=(1, 2))
    assert agg["pass@1"] == pytest.approx(25.0) and agg["pass@2"] == pytest.approx(50.0)


def test_extract_code_prefers_last_python_block():
    text = "```bash\nls\n```\nthen\n```python\nprint(1)\n```\nand\n```python\nprint(2)\n```"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("```python\nprint(3)") == "print(3)"  # cut off before the closing fence
    assert extract_code("print(4)") == "print(4)"


@pytest.fixture(scope="module")
def infi_items(tmp_path_factory):
    root = InfiBenchV.make_sample(str(tmp_path_factory.mktemp("infi")))
    return {it.id: it for it in InfiBenchV().load(root)}


def test_infibench_keywords_weighted_and_normalised(infi_items):
    item, bench = infi_items["pandas-groupby"], InfiBenchV()
    assert len(item.images) == 1
    assert bench.score(item, "Use df.GroupBy('city')['price'].mean()")["score"] == pytest.approx(100.0)
    assert bench.score(item, "Use df.groupby('city') and average")["score"] == pytest.approx(50.0)
    assert bench.score(item, "no idea")["score"] == 0.0


def test_infibench_unit_tests_run_in_sandbox(infi_items):
    item, bench = infi_items["square-fn"], InfiBenchV()
    good = bench.score(item, "```python\ndef square(x):\n    return x * x\n```")
    assert good["score"] == pytest.approx(100.0) and good["unit_tests_passed"] == 1.0
    half = bench.score(item, "```python\ndef square(x):\n    return x * 3\n```")  # right for 3 only
    assert half["unit_tests_passed"] == 0.5 and half["score"] == pytest.approx(100 * 2 / 3)


def test_infibench_negative_keyword_and_judge_through_local_endpoint(tmp_path):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert body["messages"][0]["role"] == "user"
            out = json.dumps({"choices": [{"message": {"content": "Score: 85"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.handle_request, daemon=True).start()
    spec = {"id": "j", "question": "q?", "grading": {
        "keywords": [{"content": "eval(", "weight": 1.0, "neg": True}, {"content": "ast.literal_eval", "weight": 1.0}],
        "judge": {"weight": 1.0, "threshold": 0.8}}, "full_score": 2.0, "null_score": 0.0}
    (tmp_path / "questions.jsonl").write_text(json.dumps(spec) + "\n")
    item = InfiBenchV().load(str(tmp_path))[0]
    judged = InfiBenchV(judge=Judge(f"http://127.0.0.1:{server.server_address[1]}/v1")).score(item, "use ast.literal_eval")
    server.server_close()
    assert judged["judge"] == pytest.approx(0.85) and judged["score"] == pytest.approx(100.0)
    # "ast.literal_eval(" contains "eval(": the negative keyword cancels the positive one
    assert InfiBenchV().score(item, "ast.literal_eval(s)")["raw"] == 0.0


def test_infibench_rejects_spec_without_grading(tmp_path):
    (tmp_path / "questions.jsonl").write_text(json.dumps({"id": "x", "question": "q", "grading": {}}) + "\n")
    with pytest.raises(ValueError, match="questions.jsonl:1: grading needs"):
        InfiBenchV().load(str(tmp_path))
