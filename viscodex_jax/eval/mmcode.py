"""MMCode: contest problems with images -> a program; pass@1 (and unbiased pass@k).

Layout read (as MMCode publishes it): a JSONL file (``mmcode_test.jsonl``, or
any ``*.jsonl`` in ``root``), one problem per line with ``problem_id``,
``question`` (the statement), ``images`` (base64-encoded images or paths
relative to the file) and ``input_output`` (APPS style: a JSON string or object
with parallel ``inputs``/``outputs`` lists of stdin/stdout texts).

A problem passes only if the program's stdout matches every test case (lines
compared with trailing whitespace stripped, trailing blank lines ignored).
"""

from __future__ import annotations

import base64
import glob
import io
import json
import math
import os
from typing import Any, Sequence

from PIL import Image

from viscodex_jax.eval.base import Benchmark, Item, extract_code
from viscodex_jax.eval.sandbox import Limits, run_python

PROMPT = (
    "You are an expert competitive programmer. Solve the following problem (figures are given as images). "
    "Write a complete Python 3 program that reads the input from standard input and writes the answer to "
    "standard output. Put the program in one ```python code block.\n\n"
)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def _normalise(out: str) -> list[str]:
    lines = [line.rstrip() for line in out.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _image(value: str, base_dir: str) -> Image.Image:
    path = os.path.join(base_dir, value)
    if len(value) < 4096 and os.path.isfile(path):
        return Image.open(path).convert("RGB")
    data = value.split(",", 1)[1] if value.startswith("data:") else value
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


class MMCode(Benchmark):
    name = "mmcode"

    def __init__(self, limits: Limits = Limits(wall_seconds=10, cpu_seconds=6)):
        self.limits = limits

    def load(self, root: str, limit: int | None = None) -> list[Item]:
        files = [root] if os.path.isfile(root) else sorted(glob.glob(os.path.join(root, "*.jsonl")))
        if not files:
            raise FileNotFoundError(f"{root}: no MMCode *.jsonl file")
        items = []
        for path in files:
            with open(path) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{path}:{lineno}"
                    try:
                        rec = json.loads(line)
                        io_spec = rec["input_output"]
                        io_spec = json.loads(io_spec) if isinstance(io_spec, str) else io_spec
                        tests = list(zip(io_spec["inputs"], io_spec["outputs"], strict=True))
                        question = rec["question"]
                    except (KeyError, ValueError, TypeError) as e:
                        raise ValueError(f"{where}: not an MMCode record ({type(e).__name__}: {e})") from e
                    if not tests:
                        raise ValueError(f"{where}: problem has no test cases")
                    images = [_image(v, os.path.dirname(path)) for v in rec.get("images") or []]
                    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": PROMPT + question}]
                    pid = str(rec.get("problem_id", rec.get("name", f"{os.path.basename(path)}:{lineno}")))
                    items.append(Item(pid, [{"role": "user", "content": content}], images, tests))
                    if limit is not None and len(items) >= limit:
                        return items
        return items

    def score(self, item: Item, generation: str) -> dict[str, float]:
        code = extract_code(generation)
        passed = 0
        for stdin, expected in item.reference:
            r = run_python(code, stdin=stdin, limits=self.limits)
            if r.status != "ok" or _normalise(r.stdout) != _normalise(expected):
                break  # all must pass: stop at the first failure
            passed += 1
        ok = passed == len(item.reference)
        return {"score": 100.0 * ok, "passed": float(ok), "tests_passed": passed / len(item.reference)}

    def aggregate(self, rows: Sequence[dict[str, float]], ks: Sequence[int] = (1,)) -> dict[str, float]:
        """pass@k over items; rows of one item (several samples) share an ``id`` key when given."""
        by_item: dict[Any, list[float]] = {}
        for i, r in enumerate(rows):
            by_item.setdefault(r.get("id", i), []).append(r["passed"])
        out = {}
        for k in ks:
            vals = [pass_at_k(len(v), int(sum(v)), k) for v in by_item.values() if len(v) >= k]
            out[f"pass@{k}"] = 100.0 * sum(vals) / max(len(vals), 1)
        out["score"] = out.get("pass@1", 0.0)
        return out

    @staticmethod
    def make_sample(out_dir: str) -> str:
        """Three small problems (one with a figure) in MMCode's JSONL layout."""
        from PIL import ImageDraw

        os.makedirs(out_dir, exist_ok=True)
        img = Image.new("RGB", (120, 80), "white")
        d = ImageDraw.Draw(img)
        for i, h in enumerate([20, 50, 35]):
            d.rectangle([10 + i * 35, 70 - h, 35 + i * 35, 70], fill="#4477aa")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        problems = [
            {"problem_id": "sum-two", "question": "Read two integers a and b on one line and print a + b.",
             "images": [], "input_output": {"inputs": ["1 2\n", "-5 7\n", "100 200\n"], "outputs": ["3\n", "2\n", "300\n"]}},
            {"problem_id": "bars-max", "question": "The figure shows bars. Read n and then n bar heights; print the "
             "index (1-based) of the tallest bar.", "images": [base64.b64encode(buf.getvalue()).decode()],
             "input_output": json.dumps({"inputs": ["3\n20 50 35\n", "4\n1 2 3 9\n"], "outputs": ["2\n", "4\n"]})},
            {"problem_id": "reverse", "question": "Read a line and print it reversed.", "images": [],
             "input_output": {"inputs": ["abc\n", "racecar\n"], "outputs": ["cba\n", "racecar\n"]}},
        ]
        path = os.path.join(out_dir, "mmcode_test.jsonl")
        with open(path, "w") as f:
            for p in problems:
                f.write(json.dumps(p) + "\n")
        return out_dir
