"""Data for the paper-in-miniature demo, all generated here and seeded.

* MCD-format SFT data (charts from matplotlib code we write, HTML pages, code QA,
  algorithm problems) with a held-out split: ``testing.mcd_sample``.
* "Describe" data for the tiny VLM: the same images with short descriptions,
  as a general VLM knows images but not visual coding.
* Programming problems (stdin -> stdout) with test cases: solutions for the
  tiny coder's training, and held-out problems in MMCode's layout.
* Held-out charts in ChartMimic's layout (``<name>.py`` + ``<name>.png``).

The MCD chart records are replaced by short bar/line programs (rendered with
matplotlib): the sample's richer charts need more capacity and steps than a
2-layer, 64-wide model gets in a CPU demo.

Held-out programs are new statements (other example values) of task families
the coder saw; tiny models do not generalise further, and the report says so.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from viscodex_jax.testing.mcd_sample import make_mcd_sample
from viscodex_jax.eval.chartmimic.benchmark import direct_mimic_prompt
from viscodex_jax.eval.mmcode.benchmark import SYSTEM_PROMPT as MMCODE_SYSTEM_PROMPT
from viscodex_jax.eval.mmcode.benchmark import prompt_text as mmcode_prompt_text

# (statement, solution, function computing the expected output from the input text)
_FAMILIES = [
    ("Read two integers a and b on one line and print their sum.",
     "a, b = map(int, input().split())\nprint(a + b)\n", lambda s: str(sum(map(int, s.split())))),
    ("Read two integers a and b on one line and print their product.",
     "a, b = map(int, input().split())\nprint(a * b)\n", lambda s: str(int(s.split()[0]) * int(s.split()[1]))),
    ("Read a line of integers and print the largest one.",
     "nums = list(map(int, input().split()))\nprint(max(nums))\n", lambda s: str(max(map(int, s.split())))),
    ("Read a line of integers and print how many of them are even.",
     "nums = list(map(int, input().split()))\nprint(sum(1 for x in nums if x % 2 == 0))\n",
     lambda s: str(sum(1 for x in map(int, s.split()) if x % 2 == 0))),
    ("Read a word and print it reversed.", "s = input().strip()\nprint(s[::-1])\n", lambda s: s.strip()[::-1]),
    ("Read an integer n and print the sum 1 + 2 + ... + n.",
     "n = int(input())\nprint(n * (n + 1) // 2)\n", lambda s: str(int(s) * (int(s) + 1) // 2)),
]
_WORDS = ("apple", "chart", "matrix", "vision", "coder", "merge", "token", "python")


def _io(rng: np.random.Generator, fam: int) -> str:
    if fam in (0, 1):
        return f"{rng.integers(-20, 50)} {rng.integers(-20, 50)}\n"
    if fam in (2, 3):
        return " ".join(str(x) for x in rng.integers(-30, 60, rng.integers(3, 7))) + "\n"
    if fam == 4:
        return _WORDS[rng.integers(len(_WORDS))] + "\n"
    return f"{rng.integers(1, 60)}\n"


def _problem(rng: np.random.Generator, fam: int) -> dict[str, Any]:
    statement, solution, fn = _FAMILIES[fam]
    ex = _io(rng, fam)
    tests = [_io(rng, fam) for _ in range(3)]
    question = (f"{statement}\n\nExample input:\n{ex}Example output:\n{fn(ex)}\n")
    return {"question": question, "solution": solution,
            "input_output": {"inputs": tests, "outputs": [fn(t) + "\n" for t in tests]}}


def _describe_chart(code: str) -> str:
    kind = "line" if "plt.plot(" in code else "bar" if "plt.bar(" in code else "scatter" if "plt.scatter(" in code \
        else "pie" if "plt.pie(" in code else "chart"
    title = re.search(r"plt\.title\('([^']*)'\)", code)
    color = re.search(r"color='(#[0-9a-f]{6})'", code)
    return (f"A {kind} chart" + (f" titled '{title.group(1)}'" if title else "") +
            (f", drawn in {color.group(1)}" if color else "") + ".")


def _describe(record: dict[str, Any]) -> str:
    answer = record["messages"][-1]["content"]
    if record["category"] == "chart":
        return _describe_chart(answer)
    if record["category"] == "html":
        labels = re.findall(r">([^<>]+)</div>", answer)
        return "A web page with boxes labelled " + ", ".join(f"'{x}'" for x in labels[:4]) + "."
    return "An image of a short Python program."


_CHART_WORDS = ("Sales", "Users", "Revenue", "Growth", "Orders", "Visits", "Costs", "Profit")
_CHART_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")


def _simple_chart(rng: np.random.Generator) -> str:
    """A short, regular chart program: the tiny demo models can learn its shape in a few minutes."""
    n = int(rng.integers(3, 6))
    values = [int(v) for v in rng.integers(1, 10, n)]
    color = str(rng.choice(_CHART_COLORS))
    title = str(rng.choice(_CHART_WORDS))
    if rng.random() < 0.5:
        call = f"plt.bar({list('ABCDE'[:n])}, {values}, color='{color}')"
    else:
        call = f"plt.plot({list(range(1, n + 1))}, {values}, color='{color}')"
    return ("import matplotlib.pyplot as plt\n\nplt.figure(figsize=(2.24, 2.24), dpi=100)\n"
            f"{call}\nplt.title('{title}')\nplt.show()\n")


def _simple_charts(records: list[dict[str, Any]], base: str, tag: str, rng: np.random.Generator) -> None:
    """Replaces the chart records' code and images with simple charts (same count, same prompt shape)."""
    from viscodex_jax.testing.mcd_sample import draw_chart

    for i, r in enumerate(x for x in records if x["category"] == "chart"):
        code = _simple_chart(rng)
        rel = f"mcd_images/chart_images/simple_{tag}_{i}.png"
        with open(os.path.join(base, rel), "wb") as f:
            f.write(draw_chart(code))
        r["images"] = [rel]
        # As ChartMimic asks: instruction then image, and the answer in a ```python fence (official
        # extraction scores an unfenced answer 0).
        r["messages"] = [{"role": "user", "content": direct_mimic_prompt(code, (224, 224)) + "<image>"},
                         {"role": "assistant", "content": f"```python\n{code}```"}]


def _write(path: str, records: list[dict[str, Any]]) -> str:
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return path


def make_demo_data(out_dir: str, seed: int = 0, n_per_category: int = 12, n_programs: int = 48,
                   n_heldout_programs: int = 12, chart_oversample: int = 3) -> dict[str, str]:
    """Writes every dataset of the demo under ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    mcd = make_mcd_sample(os.path.join(out_dir, "mcd"), n_per_category=n_per_category, seed=seed,
                          heldout_fraction=0.25)
    with open(mcd["train"]) as f:
        train = json.load(f)
    with open(mcd["heldout"]) as f:
        heldout = json.load(f)
    # Chart records: short regular programs, asked with the benchmark's own direct-mimic wording (a
    # tiny model cannot bridge two phrasings of one request); the image comes first, as the chat
    # template puts it.
    chart_rng = np.random.default_rng(seed + 2000)
    base = os.path.dirname(mcd["train"])
    _simple_charts(train, base, "train", chart_rng)
    _simple_charts(heldout, base, "heldout", chart_rng)
    _write(mcd["heldout"], heldout)
    describe = [{"images": r["images"], "category": r["category"], "messages": [
        {"role": "user", "content": "<image>\nDescribe this image."},
        {"role": "assistant", "content": _describe(r)}]} for r in train if r["images"]]
    describe_path = _write(os.path.join(os.path.dirname(mcd["train"]), "describe_train.json"), describe)
    # Charts are oversampled in the SFT data (the real MCD is 35% charts; the sample is balanced).
    _write(mcd["train"], train + [r for r in train if r["category"] == "chart"] * (chart_oversample - 1))

    rng = np.random.default_rng(seed + 1000)
    programs = [_problem(rng, i % len(_FAMILIES)) for i in range(n_programs)]
    coder = [{"images": [], "category": "algorithm", "messages": [
        {"role": "system", "content": MMCODE_SYSTEM_PROMPT},
        {"role": "user", "content": mmcode_prompt_text(p["question"])},
        {"role": "assistant", "content": f"```python\n{p['solution']}```"}]} for p in programs]
    coder_path = _write(os.path.join(out_dir, "coder_train.json"), coder)

    mm_dir = os.path.join(out_dir, "heldout_mmcode")
    os.makedirs(mm_dir, exist_ok=True)
    with open(os.path.join(mm_dir, "mmcode_test.jsonl"), "w") as f:
        for i in range(n_heldout_programs):
            p = _problem(rng, i % len(_FAMILIES))
            f.write(json.dumps({"problem_id": f"demo-{i}", "question": p["question"], "images": [],
                                "input_output": p["input_output"]}) + "\n")

    cm_dir = os.path.join(out_dir, "heldout_chartmimic", "direct_demo")
    os.makedirs(cm_dir, exist_ok=True)
    for i, r in enumerate(x for x in heldout if x["category"] == "chart"):
        with open(os.path.join(cm_dir, f"chart_{i}.py"), "w") as f:
            f.write(r["messages"][-1]["content"].removeprefix("```python\n").removesuffix("```"))
        with open(os.path.join(base, r["images"][0]), "rb") as src, open(os.path.join(cm_dir, f"chart_{i}.png"), "wb") as dst:
            dst.write(src.read())
    return {"mcd_train": mcd["train"], "mcd_heldout": mcd["heldout"], "describe_train": describe_path,
            "coder_train": coder_path, "heldout_mmcode": mm_dir, "heldout_chartmimic": os.path.dirname(cm_dir)}
