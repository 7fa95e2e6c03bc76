"""The toy world of the demo: charts a tiny VLM can see, and problem families a tiny coder can solve.

Charts: four chart types (bar, barh, line, scatter) that look different even at 112 px (the tiny VLM's
processor halves the 224 px images), five far-apart colours, 3 to 6 bars or points, a large title from
eight words. A chart is a ``ChartSpec``; its program, its description and its picture all come from it.

Problems: stdin -> stdout task families (sum, max, reverse, ...). A statement is an intro sentence, an
input sentence and a task sentence, each picked from a few wordings, plus an example. Per family a
seeded quarter of the wording combinations is kept for held-out problems only, so a held-out statement
is a wording never seen in training, with new values; the family itself was seen (a tiny model does not
generalise to new tasks, and the report says so).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable

import numpy as np

CHART_KINDS = ("bar", "barh", "line", "scatter")
CHART_COLORS = {"red": "#d62728", "blue": "#1f77b4", "green": "#2ca02c", "orange": "#ff7f0e", "purple": "#9467bd"}
CHART_TITLES = ("Sales", "Users", "Revenue", "Growth", "Orders", "Visits", "Costs", "Profit")
_KIND_WORD = {"bar": "bar chart", "barh": "horizontal bar chart", "line": "line chart", "scatter": "scatter plot"}
_ITEM_WORD = {"bar": "bars", "barh": "bars", "line": "points", "scatter": "points"}
SAVEFIG = "plt.savefig('chart.pdf')\n"


@dataclasses.dataclass(frozen=True)
class ChartSpec:
    kind: str
    color: str  # a name of CHART_COLORS
    values: tuple[int, ...]
    title: str


def random_chart(rng: np.random.Generator) -> ChartSpec:
    n = int(rng.integers(3, 7))
    return ChartSpec(kind=str(rng.choice(CHART_KINDS)), color=str(rng.choice(list(CHART_COLORS))),
                     values=tuple(int(v) for v in rng.integers(1, 10, n)), title=str(rng.choice(CHART_TITLES)))


def chart_code(s: ChartSpec) -> str:
    """The chart's program; it ends in ``plt.savefig`` as ChartMimic's references do (its text metric logs
    what the PDF backend draws, so a program that only calls ``plt.show()`` logs no title)."""
    hexc = CHART_COLORS[s.color]
    vals = list(s.values)
    labels = list("ABCDEF"[:len(vals)])
    xs = list(range(1, len(vals) + 1))
    call = {"bar": f"plt.bar({labels}, {vals}, color='{hexc}')",
            "barh": f"plt.barh({labels}, {vals}, color='{hexc}')",
            "line": f"plt.plot({xs}, {vals}, color='{hexc}', linewidth=4)",
            "scatter": f"plt.scatter({xs}, {vals}, color='{hexc}', s=150)"}[s.kind]
    return ("import matplotlib.pyplot as plt\n\nplt.figure(figsize=(2.24, 2.24), dpi=100)\n"
            f"{call}\nplt.title('{s.title}', fontsize=16)\n{SAVEFIG}")


def describe_chart(s: ChartSpec) -> str:
    return f"A {s.color} {_KIND_WORD[s.kind]} with {len(s.values)} {_ITEM_WORD[s.kind]}, titled '{s.title}'."


def parse_description(text: str) -> dict[str, Any]:
    """What a description says (kind, colour, count, title), each None when it says nothing recognisable."""
    import re

    words = text.lower()
    kind = next((k for k in ("barh", "bar", "line", "scatter") if _KIND_WORD[k] in words), None)
    color = next((c for c in CHART_COLORS if re.search(rf"\b{c}\b", words)), None)
    count = re.search(r"with (\d+) ", words)
    title = re.search(r"titled '([^']*)'", text)
    return {"kind": kind, "color": color, "count": int(count.group(1)) if count else None,
            "title": title.group(1) if title else None}


def description_accuracy(specs: list[ChartSpec], texts: list[str]) -> dict[str, float]:
    """Fraction of charts whose description names the right kind / colour / count / title (x100)."""
    got = [parse_description(t) for t in texts]
    want = [{"kind": s.kind, "color": s.color, "count": len(s.values), "title": s.title} for s in specs]
    return {k: 100.0 * float(np.mean([g[k] == w[k] for g, w in zip(got, want)])) for k in ("kind", "color", "count",
                                                                                           "title")}


# ------------------------------------------------------------------------------------------------ problems

_INPUT = {
    "two": ("The input is one line with two integers a and b.", "Two integers a and b are given on one line."),
    "list": ("The input is one line of integers separated by spaces.", "A line of space-separated integers is given."),
    "word": ("The input is a single word.", "One word is given on a line."),
    "n": ("The input is one integer n.", "A single integer n is given."),
}
_INTROS = ("", "Solve this task. ", "Here is a short exercise. ", "Write a program for the following. ")


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split()]


# name: (input kind, task wordings, solution, expected output from the input text)
FAMILIES: dict[str, tuple[str, tuple[str, ...], str, Callable[[str], str]]] = {
    "sum": ("two", ("Print the sum of a and b.", "Output a + b.", "Print the total of the two numbers."),
            "a, b = map(int, input().split())\nprint(a + b)\n", lambda s: str(sum(_ints(s)))),
    "difference": ("two", ("Print a minus b.", "Output a - b.", "Print the difference a - b."),
                   "a, b = map(int, input().split())\nprint(a - b)\n", lambda s: str(_ints(s)[0] - _ints(s)[1])),
    "product": ("two", ("Print the product of a and b.", "Output a * b.", "Print a times b."),
                "a, b = map(int, input().split())\nprint(a * b)\n", lambda s: str(_ints(s)[0] * _ints(s)[1])),
    "max": ("list", ("Print the largest of them.", "Output the maximum value.", "Print the biggest number."),
            "nums = list(map(int, input().split()))\nprint(max(nums))\n", lambda s: str(max(_ints(s)))),
    "min": ("list", ("Print the smallest of them.", "Output the minimum value.", "Print the lowest number."),
            "nums = list(map(int, input().split()))\nprint(min(nums))\n", lambda s: str(min(_ints(s)))),
    "count_even": ("list", ("Print how many of them are even.", "Output the number of even values.",
                            "Count the even numbers and print the count."),
                   "nums = list(map(int, input().split()))\nprint(sum(1 for x in nums if x % 2 == 0))\n",
                   lambda s: str(sum(1 for x in _ints(s) if x % 2 == 0))),
    "list_sum": ("list", ("Print the sum of all of them.", "Output the total of the numbers.",
                          "Add the numbers up and print the result."),
                 "nums = list(map(int, input().split()))\nprint(sum(nums))\n", lambda s: str(sum(_ints(s)))),
    "sort": ("list", ("Print them sorted in increasing order.", "Output the numbers in ascending order.",
                      "Sort the numbers from small to large and print them."),
             "nums = list(map(int, input().split()))\nprint(*sorted(nums))\n",
             lambda s: " ".join(map(str, sorted(_ints(s))))),
    "reverse": ("word", ("Print the word reversed.", "Output the word backwards.",
                         "Print the letters of the word in reverse order."),
                "s = input().strip()\nprint(s[::-1])\n", lambda s: s.strip()[::-1]),
    "length": ("word", ("Print the length of the word.", "Output how many letters the word has.",
                        "Print the number of characters in the word."),
               "s = input().strip()\nprint(len(s))\n", lambda s: str(len(s.strip()))),
    "upper": ("word", ("Print the word in capital letters.", "Output the word in upper case.",
                       "Print the word with every letter capitalised."),
              "s = input().strip()\nprint(s.upper())\n", lambda s: s.strip().upper()),
    "triangle": ("n", ("Print the sum 1 + 2 + ... + n.", "Output the sum of the integers from 1 to n.",
                       "Print the total of all numbers from 1 up to n."),
                 "n = int(input())\nprint(n * (n + 1) // 2)\n", lambda s: str(int(s) * (int(s) + 1) // 2)),
}
_WORDS = ("apple", "chart", "matrix", "vision", "coder", "merge", "token", "python", "pixel", "kernel", "tensor",
          "figure", "layer", "window", "shader", "vector")


def _io(rng: np.random.Generator, kind: str) -> str:
    if kind == "two":
        return f"{rng.integers(-20, 50)} {rng.integers(-20, 50)}\n"
    if kind == "list":
        return " ".join(str(x) for x in rng.integers(-30, 60, rng.integers(3, 7))) + "\n"
    if kind == "word":
        return str(rng.choice(_WORDS)) + "\n"
    return f"{rng.integers(1, 60)}\n"


def wording_split(seed: int) -> dict[str, tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]]:
    """Per family: (train wordings, held-out wordings) as (intro, input sentence, task sentence) indices."""
    out = {}
    for f, (kind, tasks, _, _) in enumerate(FAMILIES.values()):
        combos = list(itertools.product(range(len(_INTROS)), range(len(_INPUT[kind])), range(len(tasks))))
        order = np.random.default_rng([seed, 77, f]).permutation(len(combos))
        n_held = len(combos) // 4
        out[list(FAMILIES)[f]] = ([combos[i] for i in order[n_held:]], [combos[i] for i in order[:n_held]])
    return out


def make_problem(rng: np.random.Generator, family: str, wording: tuple[int, int, int], n_tests: int = 3
                 ) -> dict[str, Any]:
    kind, tasks, solution, fn = FAMILIES[family]
    intro, inp, task = wording
    ex = _io(rng, kind)
    tests = [_io(rng, kind) for _ in range(n_tests)]
    question = f"{_INTROS[intro]}{_INPUT[kind][inp]} {tasks[task]}\n\nExample input:\n{ex}Example output:\n{fn(ex)}\n"
    return {"family": family, "question": question, "solution": solution,
            "input_output": {"inputs": tests, "outputs": [fn(t) + "\n" for t in tests]}}


def problems(rng: np.random.Generator, n: int, split: str, seed: int) -> list[dict[str, Any]]:
    """``n`` problems, families in turn, wordings from the ``split`` ("train" or "heldout") side."""
    words = wording_split(seed)
    side = 0 if split == "train" else 1
    out = []
    for i in range(n):
        fam = list(FAMILIES)[i % len(FAMILIES)]
        pool = words[fam][side]
        out.append(make_problem(rng, fam, pool[int(rng.integers(len(pool)))]))
    return out


def statement_sentence(rng: np.random.Generator, seed: int) -> str:
    """A training-side statement without its solution (for the shared corpus)."""
    fam = list(FAMILIES)[int(rng.integers(len(FAMILIES)))]
    pool = wording_split(seed)[fam][0]
    return make_problem(rng, fam, pool[int(rng.integers(len(pool)))])["question"]
