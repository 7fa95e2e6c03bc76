"""A small, deterministic MCD-format sample made by the project itself (for tests and tiny runs).

``make_mcd_sample(out_dir)`` writes::

    out_dir/mcd_train.json, out_dir/mcd_heldout.json     MCD-format JSON lists
    out_dir/mcd_images/{chart,html,qa}_images/<i>.png    the images (<= 224x224)
    out_dir/zip/mcd_{train,heldout}.json + mcd_images.zip   the same, images zipped

with the four MCD categories:

* ``chart``: matplotlib code written here (the assistant answer), executed to draw the image;
* ``html``: a simple absolutely-positioned HTML page (the answer) and a PIL drawing of it;
* ``qa``: an image of a short Python snippet, the question what it prints, and the answer
  (obtained by running the snippet) with a one-line explanation;
* ``algorithm``: text-only problems with a reference solution (examples computed by running it).

Same arguments -> same bytes (fixed seeds, fixed zip timestamps, no PNG software tag).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import textwrap
import warnings
import zipfile
from typing import Any, Callable

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

__all__ = ["CATEGORIES", "make_mcd_sample"]

CATEGORIES = ("chart", "html", "qa", "algorithm")
SIZE = 224

CHART_PROMPT = (
    "<image>\nYou are an expert Python developer who specializes in writing matplotlib code based on a "
    "given picture. I need your help to generate the Python code that can reproduce the picture based on "
    "the picture I provide.\nNote that it is necessary to use figsize=(2.24, 2.24) to set the image size "
    "to match the original size.\nNow, please give me the matplotlib code that reproduces the picture below."
)
HTML_PROMPT = (
    "<image>\nYou are a web developer proficient in HTML and CSS. Please generate the complete HTML code "
    "that reproduces the web page shown in the screenshot above. The page is 224x224 pixels."
)
WORDS = ("Sales", "Users", "Revenue", "Growth", "Orders", "Visits", "Costs", "Profit", "Clicks", "Signups")
LABELS = ("A", "B", "C", "D", "E", "F")
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


# ---------------------------------------------------------------- charts

def _chart_code(rng: np.random.Generator, i: int) -> str:
    kind = ("bar", "line", "scatter", "pie")[i % 4]
    title = str(rng.choice(WORDS))
    color = str(rng.choice(COLORS))
    n = int(rng.integers(3, 6))
    labels = list(LABELS[:n])
    values = [int(v) for v in rng.integers(1, 20, n)]
    head = "import matplotlib.pyplot as plt\n\n"
    setup = "plt.figure(figsize=(2.24, 2.24), dpi=100)\nplt.rcParams['font.size'] = 6\n"
    if kind == "bar":
        body = (f"labels = {labels}\nvalues = {values}\n\n{setup}"
                f"plt.bar(labels, values, color='{color}')\nplt.title('{title} by group')\n"
                "plt.xlabel('Group')\nplt.ylabel('Value')\n")
    elif kind == "line":
        xs = list(range(2018, 2018 + n + 2))
        ys = [int(v) for v in rng.integers(5, 50, len(xs))]
        body = (f"years = {xs}\n{title.lower()} = {ys}\n\n{setup}"
                f"plt.plot(years, {title.lower()}, marker='o', color='{color}')\n"
                f"plt.title('{title} per year')\nplt.grid(True, linestyle='--', alpha=0.5)\n")
    elif kind == "scatter":
        xs = [round(float(v), 1) for v in rng.uniform(0, 10, 8)]
        ys = [round(float(v), 1) for v in rng.uniform(0, 10, 8)]
        body = (f"x = {xs}\ny = {ys}\n\n{setup}"
                f"plt.scatter(x, y, color='{color}', s=12)\nplt.title('{title} vs. time')\n"
                "plt.xlabel('x')\nplt.ylabel('y')\n")
    else:
        colors = [str(c) for c in rng.choice(COLORS, n, replace=False)]
        body = (f"labels = {labels}\nsizes = {values}\ncolors = {colors}\n\n{setup}"
                "plt.pie(sizes, labels=labels, colors=colors, autopct='%1.0f%%')\n"
                f"plt.title('{title} share')\n")
    return head + body + "plt.tight_layout()\nplt.show()\n"


def draw_chart(code: str) -> bytes:
    """PNG of a chart program we wrote ourselves (trusted code, run in-process)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    here = os.getcwd()
    with warnings.catch_warnings(), matplotlib.rc_context(), tempfile.TemporaryDirectory() as scratch:
        warnings.simplefilter("ignore")  # plt.show() on Agg, tight_layout on tiny figures
        os.chdir(scratch)  # a program's own plt.savefig('chart.pdf') lands here, not in the caller's directory
        try:
            exec(compile(code, "<chart>", "exec"), {"__name__": "__mcd_chart__"})
        finally:
            os.chdir(here)
        buf = io.BytesIO()
        plt.gcf().savefig(buf, format="png", dpi=100, metadata={"Software": None})
        plt.close("all")
    return buf.getvalue()


# ---------------------------------------------------------------- html

def _html_page(rng: np.random.Generator, i: int) -> tuple[str, list[tuple[int, int, int, int, str, str, str]]]:
    """(HTML, boxes) with boxes (left, top, width, height, background, color, text)."""
    title = f"{rng.choice(WORDS)} Dashboard"
    header_bg = str(rng.choice(COLORS))
    boxes = [(0, 0, SIZE, 32, header_bg, "#ffffff", title)]
    n_cards = int(rng.integers(2, 5))
    card_w = (SIZE - 8 * (n_cards + 1)) // n_cards
    for k in range(n_cards):
        boxes.append((8 + k * (card_w + 8), 44, card_w, 60, "#ffffff", "#333333", str(rng.choice(WORDS))))
    boxes.append((8, 116, SIZE - 16, 72, "#e8eef5", "#222222", f"Item {int(rng.integers(1, 100))} details"))
    boxes.append((0, SIZE - 24, SIZE, 24, "#333333", "#cccccc", "(c) 2024 Example"))
    lines = [
        "<!DOCTYPE html>",
        "<html>",
        "<head>",
        "<style>",
        f"body {{ margin: 0; width: {SIZE}px; height: {SIZE}px; background: #f5f5f5; "
        "font-family: sans-serif; font-size: 10px; position: relative; }",
        ".box { position: absolute; box-sizing: border-box; padding: 4px; }",
        "</style>",
        "</head>",
        "<body>",
    ]
    for left, top, w, h, bg, fg, text in boxes:
        lines.append(f'<div class="box" style="left: {left}px; top: {top}px; width: {w}px; height: {h}px; '
                     f'background: {bg}; color: {fg};">{text}</div>')
    lines += ["</body>", "</html>"]
    return "\n".join(lines) + "\n", boxes


def _draw_html(boxes) -> bytes:
    img = PIL.Image.new("RGB", (SIZE, SIZE), "#f5f5f5")
    draw = PIL.ImageDraw.Draw(img)
    font = PIL.ImageFont.load_default()
    for left, top, w, h, bg, fg, text in boxes:
        draw.rectangle([left, top, left + w - 1, top + h - 1], fill=bg)
        draw.text((left + 4, top + 4), text, fill=fg, font=font)
    return _png(img)


# ---------------------------------------------------------------- qa

_QA_SNIPPETS: tuple[Callable[[np.random.Generator], tuple[str, str]], ...] = (
    lambda r: (f"nums = {[int(v) for v in r.integers(1, 20, 5)]}\ntotal = 0\nfor n in nums:\n"
               "    if n % 2 == 0:\n        total += n\nprint(total)\n",
               "It adds up the even numbers of the list."),
    lambda r: (f"words = {[str(w) for w in r.choice(WORDS, 3, replace=False)]}\n"
               "print(max(words, key=len))\n", "max with key=len returns the first longest word."),
    lambda r: (f"s = '{r.choice(WORDS).lower()}'\nprint(s[::-1])\n", "s[::-1] reverses the string."),
    lambda r: (f"k = {int(r.integers(2, 6))}\nsquares = [i * i for i in range(k)]\nprint(sum(squares))\n",
               "It sums the squares of 0 .. k-1."),
)


def _qa_item(rng: np.random.Generator, i: int) -> tuple[str, str, str]:
    """(snippet, question, answer)."""
    snippet, why = _QA_SNIPPETS[i % len(_QA_SNIPPETS)](rng)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(snippet, "<qa>", "exec"), {})
    printed = out.getvalue().strip()
    question = "<image>\nWhat does the Python code in this image print? Explain briefly."
    answer = f"The code prints `{printed}`.\n\n{why}"
    return snippet, question, answer


def _draw_code(snippet: str) -> bytes:
    lines = snippet.rstrip("\n").split("\n")
    img = PIL.Image.new("RGB", (SIZE, max(56, min(SIZE, 12 * len(lines) + 12))), "#1e1e1e")
    draw = PIL.ImageDraw.Draw(img)
    font = PIL.ImageFont.load_default()
    for k, line in enumerate(lines):
        draw.text((6, 6 + 12 * k), line, fill="#d4d4d4", font=font)
    return _png(img)


# ---------------------------------------------------------------- algorithm

def _algorithm_item(rng: np.random.Generator, i: int) -> tuple[str, str]:
    kind = i % 4
    if kind == 0:
        a, b = int(rng.integers(2, 5)), int(rng.integers(5, 8))
        name, args = "count_multiples", (int(rng.integers(20, 60)),)
        problem = (f"Write a Python function `count_multiples(n)` that returns how many integers in "
                   f"1..n are divisible by {a} or by {b}.")
        solution = (f"def count_multiples(n):\n    return sum(1 for i in range(1, n + 1) "
                    f"if i % {a} == 0 or i % {b} == 0)\n")
    elif kind == 1:
        name, args = "longest_run", ([int(v) for v in rng.integers(0, 9, 8)],)
        problem = ("Write a Python function `longest_run(nums)` that returns the length of the longest "
                   "strictly increasing contiguous run in the list `nums` (0 for an empty list).")
        solution = ("def longest_run(nums):\n    best = cur = 0\n    prev = None\n    for x in nums:\n"
                    "        cur = cur + 1 if prev is not None and x > prev else 1\n"
                    "        best = max(best, cur)\n        prev = x\n    return best\n")
    elif kind == 2:
        nums = [int(v) for v in rng.choice(np.arange(1, 30), 6, replace=False)]
        target = nums[1] + nums[4]
        name, args = "two_sum", (nums, target)
        problem = ("Write a Python function `two_sum(nums, target)` that returns the indices `[i, j]` "
                   "(i < j) of the two numbers in `nums` that add up to `target`, or `[]` if there are none.")
        solution = ("def two_sum(nums, target):\n    seen = {}\n    for j, x in enumerate(nums):\n"
                    "        if target - x in seen:\n            return [seen[target - x], j]\n"
                    "        seen[x] = j\n    return []\n")
    else:
        word = str(rng.choice(WORDS)).lower()
        name, args = "compress", (word[0] * 3 + word + word[-1] * 2,)
        problem = ("Write a Python function `compress(s)` that replaces every run of a repeated character "
                   "with the character followed by the run length, e.g. 'aaab' -> 'a3b1'.")
        solution = ("def compress(s):\n    out = []\n    i = 0\n    while i < len(s):\n        j = i\n"
                    "        while j < len(s) and s[j] == s[i]:\n            j += 1\n"
                    "        out.append(f'{s[i]}{j - i}')\n        i = j\n    return ''.join(out)\n")
    ns: dict[str, Any] = {}
    exec(compile(solution, "<solution>", "exec"), ns)
    result = ns[name](*args)
    call = f"{name}({', '.join(repr(a) for a in args)})"
    prompt = f"{problem}\n\nExample: `{call}` returns `{result!r}`."
    answer = f"```python\n{solution}```\n\nFor the example, `{call}` returns `{result!r}`."
    return prompt, answer


# ---------------------------------------------------------------- writing

def _png(img: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _make_category(cat: str, n: int, rng: np.random.Generator) -> list[tuple[dict[str, Any], dict[str, bytes]]]:
    out = []
    for i in range(n):
        images: dict[str, bytes] = {}
        if cat == "chart":
            code = _chart_code(rng, i)
            rel = f"mcd_images/chart_images/{i}.png"
            images[rel] = draw_chart(code)
            messages = [{"role": "user", "content": CHART_PROMPT}, {"role": "assistant", "content": code}]
        elif cat == "html":
            html, boxes = _html_page(rng, i)
            rel = f"mcd_images/html_images/{i}.png"
            images[rel] = _draw_html(boxes)
            messages = [{"role": "user", "content": HTML_PROMPT}, {"role": "assistant", "content": html}]
        elif cat == "qa":
            snippet, question, answer = _qa_item(rng, i)
            rel = f"mcd_images/qa_images/{i}.png"
            images[rel] = _draw_code(snippet)
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        else:
            prompt, answer = _algorithm_item(rng, i)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        out.append(({"images": list(images), "messages": messages, "category": cat}, images))
    return out


def _write_json(path: str, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
        f.write("\n")


def make_mcd_sample(
    out_dir: str | os.PathLike,
    n_per_category: int = 8,
    seed: int = 0,
    heldout_fraction: float = 0.25,
) -> dict[str, Any]:
    """Writes the sample (see module doc); returns its paths and per-split category counts.

    ``heldout_fraction`` of each category (rounded, at least one when the
    fraction is positive and the category has two or more records) goes to
    ``mcd_heldout.json``; the rest, mixed in a seeded order, to ``mcd_train.json``.
    """
    if n_per_category <= 0:
        raise ValueError(f"n_per_category must be positive, got {n_per_category}")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    out_dir = os.fspath(out_dir)
    zip_dir = os.path.join(out_dir, "zip")
    os.makedirs(zip_dir, exist_ok=True)
    train: list[dict[str, Any]] = []
    heldout: list[dict[str, Any]] = []
    all_images: dict[str, bytes] = {}
    for c, cat in enumerate(CATEGORIES):
        rng = np.random.default_rng([seed, c])
        items = _make_category(cat, n_per_category, rng)
        n_held = int(round(n_per_category * heldout_fraction))
        if heldout_fraction > 0 and n_per_category >= 2:
            n_held = min(max(n_held, 1), n_per_category - 1)
        order = rng.permutation(n_per_category)
        for k, j in enumerate(order):
            rec, images = items[j]
            (heldout if k < n_held else train).append(rec)
            all_images.update(images)
    train = [train[i] for i in np.random.default_rng([seed, 99]).permutation(len(train))]

    for rel, data in sorted(all_images.items()):
        path = os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    zip_path = os.path.join(zip_dir, "mcd_images.zip")
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as zf:
        for rel, data in sorted(all_images.items()):
            zf.writestr(zipfile.ZipInfo(rel, date_time=(2024, 1, 1, 0, 0, 0)), data)
    paths = {"dir": out_dir, "zip_dir": zip_dir, "zip": zip_path}
    for split, recs in (("train", train), ("heldout", heldout)):
        for d, key in ((out_dir, split), (zip_dir, f"zip_{split}")):
            p = os.path.join(d, f"mcd_{split}.json")
            _write_json(p, recs)
            paths[key] = p
    counts = {split: {cat: sum(r["category"] == cat for r in recs) for cat in CATEGORIES}
              for split, recs in (("train", train), ("heldout", heldout))}
    return {**paths, "counts": counts}


def _describe(sample: dict[str, Any]) -> str:  # for `python -m viscodex_jax.testing.mcd_sample`
    return textwrap.dedent(f"""\
        train:   {sample['train']} {sample['counts']['train']}
        heldout: {sample['heldout']} {sample['counts']['heldout']}
        zip:     {sample['zip']}""")


if __name__ == "__main__":
    import sys

    print(_describe(make_mcd_sample(sys.argv[1] if len(sys.argv) > 1 else "runs/mcd_sample")))
