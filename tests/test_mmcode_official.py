"""MMCode against the official evaluator: parity on the shared reference set, the published layouts, bad input.

The reference set (16 problems, 54 candidates, official run_test verdicts) is read from
/work/shared/benchmarks/mmcode; it is never copied into the project.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from viscodex_jax.eval.base import UnreadableItem
from viscodex_jax.eval.check import format_report, run_check
from viscodex_jax.eval.mmcode.benchmark import MMCode, extract_code_official, prompt_text

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mmcode_ref() -> Path:
    """The shared MMCode reference set: /work/shared/benchmarks/mmcode (a missing folder is a failure)."""
    path = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "mmcode"
    if not (path / "expected.jsonl").is_file() or not (path / "mmcode_test.jsonl.gz").is_file():
        pytest.fail(f"MMCode reference set not found at {path} (expected.jsonl and mmcode_test.jsonl.gz): the "
                    "parity test needs the shared benchmark data next to the checkout")
    return path


def test_parity_with_official_verdicts(mmcode_ref):
    report = run_check(MMCode(), str(mmcode_ref))
    text = format_report(report)
    print(text)
    assert len(report.results) == 54, text
    for metric in report.metrics:  # passed, and the per-test verdict list itself
        agree, total = report.agreement(metric)
        assert agree == total, f"{metric.key}: {agree}/{total} agree\n{text}"
    pass1 = report.aggregates[0]
    assert pass1.ours == pytest.approx(63.0208, abs=1e-3) and pass1.agree, text
    assert report.ok, text


def test_loads_gzipped_official_file_and_filters_split(mmcode_ref):
    items = MMCode().load(str(mmcode_ref / "mmcode_test.jsonl.gz"))
    assert len(items) == 16 and items[0].id == "syn_01"
    by_id = {it.id: it for it in items}
    call = by_id["syn_17"]
    assert call.reference.fn_name == "triangle_area" and call.reference.n_tests == 3
    text = "".join(c["text"] for c in call.messages[1]["content"] if c["type"] == "text")
    assert "\\Please write your code using Call-Based format.The starter code" in text
    assert "def triangle_area(a, b, c):" in text and text.endswith("\nANSWER:\n")
    stdio = by_id["syn_01"]
    assert "Please write your code using Standard IO, i.e. input() and print()." in json.dumps(stdio.messages)
    assert len(stdio.images) == 1 and stdio.images[0].height >= 480  # shorter figures are scaled up to 480 px
    assert [c["type"] for c in stdio.messages[1]["content"]].count("image") == 1
    assert MMCode(data_split=("dev",)).load(str(mmcode_ref)) == []
    assert [it.id for it in MMCode(image_categories=("chart", "clock")).load(str(mmcode_ref))] == ["syn_01", "syn_08"]


def _record(pid, split="test", **kw):
    rec = {"problem_id": pid, "question": f"![image](1.png) problem {pid}", "images": [], "starter_code": "",
           "data_split": split, "input_output": json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]})}
    return {**rec, **kw}


def _png(color, size=(20, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_loads_problem_folder_layout(tmp_path):
    for pid, split in (("p1", "test"), ("p2", "test"), ("p3", "dev")):
        (tmp_path / pid / "images").mkdir(parents=True)
        rec = _record(pid, split, question="Two figures: ![image](1.png) and ![image](2.png).")
        del rec["problem_id"]  # the folder name is the id
        (tmp_path / pid / "data.json").write_text(json.dumps(rec))
        (tmp_path / pid / "images" / "2.png").write_bytes(_png("blue", (30, 10)))
        (tmp_path / pid / "images" / "1.png").write_bytes(_png("red"))
    items = MMCode(image_height=None).load(str(tmp_path))
    assert [it.id for it in items] == ["p1", "p2"]
    assert [im.size for im in items[0].images] == [(20, 10), (30, 10)]  # numeric order, as the official loader
    assert items[0].images[0].getpixel((0, 0)) == (255, 0, 0)
    kinds = [c["type"] for c in items[0].messages[1]["content"]]
    assert kinds == ["text", "image", "text", "image", "text"]  # each figure where its marker was
    good = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    assert MMCode().score(items[1], good) == {"score": 100.0, "passed": 1.0, "tests_passed": 1.0}


def test_bad_line_is_named_or_counted_as_failed(tmp_path):
    path = tmp_path / "mmcode_test.jsonl.gz"
    lines = [json.dumps(_record("a")), json.dumps(_record("b", images=["not base64 at all!"])),
             "{truncated", json.dumps(_record("d", input_output="{}")), json.dumps(_record("e"))]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"mmcode_test\.jsonl\.gz:2: .*images\[0\] is not a base64-encoded image"):
        MMCode().load(str(path))
    bench = MMCode(on_error="skip")
    items = bench.load(str(path))
    assert [it.id for it in items] == ["a", "b", "mmcode_test.jsonl.gz:3", "d", "e"]
    bad = [it for it in items if isinstance(it.reference, UnreadableItem)]
    assert [it.id for it in bad] == ["b", "mmcode_test.jsonl.gz:3", "d"] and len(bench.skipped) == 3
    assert ":3: " in bad[1].reference.reason and "JSONDecodeError" in bad[1].reference.reason
    assert ":4: " in bad[2].reference.reason and "'inputs' and 'outputs'" in bad[2].reference.reason
    with pytest.raises(ValueError, match=":3: "):
        bench.score(bad[1], "print(3)")
    # a gzip stream cut in the middle: the cut is named, and with skip it is one failed item
    whole = gzip.compress("".join(json.dumps(_record(f"p{i}", question=os.urandom(300).hex())) + "\n"
                                  for i in range(20)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"cut\.jsonl\.gz:\d+: .*cannot read further"):
        MMCode().load(str(tmp_path / "cut.jsonl.gz"))
    cut = MMCode(on_error="skip").load(str(tmp_path / "cut.jsonl.gz"))
    assert 1 < len(cut) < 20 and isinstance(cut[-1].reference, UnreadableItem)
    assert all(not isinstance(it.reference, UnreadableItem) for it in cut[:-1])


def test_code_extraction_and_prompt_follow_official():
    assert extract_code_official("a\n```python\nx = 1\n```\n```python\nx = 2\n```") == "\nx = 1\n"
    assert extract_code_official("```py\nprint(1)\n```") == "```py\nprint(1)\n```"  # not a python fence
    assert extract_code_official("```python3\nprint(1)\n```") == "3\nprint(1)\n"
    assert extract_code_official("```python\nprint(1)") == "```python\nprint(1)"  # no closing fence
    p = prompt_text("Q?")
    assert p.startswith("You are required to solve a programming problem. Please enclose your code inside a "
                        "```python``` block.  Do not write a main() function.")
    assert p.endswith("\nQUESTION:\nQ?\nPlease write your code using Standard IO, i.e. input() and print().\nANSWER:\n")


def _item(tmp_path, io_spec, name="x"):
    path = tmp_path / f"{name}.jsonl"
    path.write_text(json.dumps(_record(name, input_output=json.dumps(io_spec))) + "\n")
    return MMCode().load(str(path))[0]


def test_official_quirks_outside_the_shared_set(tmp_path):
    bench = MMCode()
    item = _item(tmp_path, {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]})
    def program(*lines):
        return "```python\n" + "\n".join(lines) + "\n```"

    add = "print(sum(map(int, input().split())))"
    # print through the module-level `stdout` name escapes the capture; sys.stdout.close() is a TypeError
    assert bench.judge(item, program("a, b = map(int, input().split())", "stdout.write(str(a + b))")) == [False] * 2
    assert bench.judge(item, program("import sys", add, "sys.stdout.close()")) == [-1, -1]
    assert bench.judge(item, program("import os", "os.getcwd()")) == [-1, -1]  # removed by reliability_guard
    assert bench.judge(item, program("import os", add, "os._exit(0)")) == [-1, -1]  # no result: all fail
    noisy = program("import sys", "for i in range(400000):",
                    "    print('debug line %d ........' % i, file=sys.stderr)", add)
    assert bench.judge(item, noisy) == [True, True]  # 20 MB of stderr is not judged, and not a file-size kill
    forged = program("import os", "open('verdicts.json', 'w').write('[true, true]')", "os._exit(0)")
    call = _item(tmp_path, {"fn_name": "f", "inputs": [[1], [2]], "outputs": [1, 2]}, "c")
    assert bench.judge(call, forged) == [-1, -1]  # the program's own verdicts file is not believed
    dicts = _item(tmp_path, {"fn_name": "f", "inputs": [[{"1": "a"}]], "outputs": [{"1": "a"}]}, "d")
    assert bench.judge(dicts, "```python\ndef f(d):\n    return d\n```") == [True]  # keys become ints on both sides
    assert bench.judge(dicts, "```python\ndef f(d):\n    return {'1': 'a'}\n```") == [False]
    assert bench.judge(dicts, "```python\nimport sys\nsys.exit(0)\n```") == [-1]  # SystemExit while loading: no result


# (printed text, expected output, official verdict): verdicts measured with the official check_correctness
# (MMCode @ 8b9ac10, Python 3.11.7, numpy 2.4; none of these cases depends on the numpy version, the
# official numpy 1.26 gives the same); each exercises a different step of the comparison cascade.
STDOUT_VERDICTS = [
    ("3.0001", "3\n", True), ("1_000", "1000\n", True), ("1e3", "1000\n", True), ("nan", "nan\n", True),
    ("inf", "inf", True), ("0.12349 2", "0.1235 2\n", True), ("0.12351 2.0004", "0.1235 2\n", False),
    ("2 1\n4 3\n", "1 2\n3 4\n", True), ("1 2 2\n3 4", "1 2\n3 4\n", True), ("1 2\u20283 4", "1 2\n3 4\n", True),
    ("1 2\r\n3 4\r\n", ["1 2", "3 4"], True), ("x\ny", ["x", "", "y"], True), ("A B\nC D", "a b\nc d\n", False),
    ("-0", "0\n", True), ("True", "1\n2\n3\n", False), ("", "\n", True),
]
CALL_VERDICTS = [  # (function body, expected output, official verdict)
    ("return [(1, 2), (3, 4)]", [[[1, 2], [3, 4]]], True), ("return [(1, 2), (3, 4)]", [[1, 2], [3, 4]], False),
    ("return ((1, 2),)", [[1, 2]], False), ("return 6.0000001", [6.0], False), ("return True", [1], True),
    ("return None", [], False), ("return np.array([1, 2])", [[1, 2]], -1), ("return np.array([6.0])", [6.0], True),
    ("return {1: 'a'}", {"1": "a"}, True), ("return float('nan')", ["nan"], False),
]


def test_comparison_cascade_matches_measured_official_verdicts(tmp_path):
    cases = [("import sys\nsys.stdout.write(%r)" % out,
              {"inputs": ["x\n"] if isinstance(exp, str) else [["x"]], "outputs": [exp]}, want)
             for out, exp, want in STDOUT_VERDICTS]
    cases += [(f"def f(x):\n    {body}", {"fn_name": "f", "inputs": [[0]], "outputs": [exp]}, want)
              for body, exp, want in CALL_VERDICTS]
    items = [_item(tmp_path, spec, f"v{i}") for i, (_, spec, _) in enumerate(cases)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda a: MMCode().judge(a[0], "```python\n" + a[1][0] + "\n```"), zip(items, cases)))
    wrong = [(c[0], c[1]["outputs"], g, c[2]) for c, g in zip(cases, got) if g != [c[2]]]
    assert not wrong, wrong


def test_recursion_headroom_matches_official(tmp_path):
    """The deepest recursion a program reaches: 981 frames as a standard-input program and 984 as a
    call-based one, as measured with the official evaluator (check_correctness from eval.py) on Python 3.11.7."""
    probe = ("def f(n):", "    try:", "        return f(n + 1)", "    except RecursionError:", "        return n")
    std = _item(tmp_path, {"inputs": [""], "outputs": ["981"]}, "s")
    assert MMCode().judge(std, "```python\n" + "\n".join(probe + ("print(f(0))",)) + "\n```") == [True]
    call = _item(tmp_path, {"fn_name": "g", "inputs": [[]], "outputs": [984]}, "c")
    nested = "\n".join(["def g():"] + ["    " + x for x in probe] + ["    return f(0)"])
    assert MMCode().judge(call, "```python\n" + nested + "\n```") == [True]


def test_check_against_command_line(mmcode_ref, tmp_path):
    """launch/eval.py --check_against on a 3-candidate folder in the shared layout (copied from the set)."""
    folder = tmp_path / "mmcode"
    (folder / "candidates" / "syn_17").mkdir(parents=True)
    (folder / "mmcode_test.jsonl.gz").write_bytes((mmcode_ref / "mmcode_test.jsonl.gz").read_bytes())
    rows = [json.loads(x) for x in (mmcode_ref / "expected.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["problem_id"] == "syn_17"]
    for r in rows:
        (folder / r["candidate_file"]).write_text((mmcode_ref / r["candidate_file"]).read_text())
    (folder / "expected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows[1]["passed"] = not rows[1]["passed"]  # an official verdict we disagree with: exit status 1, named
    (folder / "expected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, str(REPO / "launch" / "eval.py"), f"--check_against={folder}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "| passed | 2 | 3 | 66.67% |" in run.stdout and "| test_results | 3 | 3 | 100.00% |" in run.stdout
    assert f"syn_17/{rows[1]['candidate']}: passed: ours" in run.stdout and "disagreements: 1" in run.stdout
