"""InfiBench unit tests: the official code extraction and program assembly, run in our sandbox.

Official behaviours (``execution_utils.py`` / ``grader_utils.unit_test_execution``
at commit 96cb098) kept because the published scores include them:
* the test's ``prefix`` is put before the *response* and code is extracted after:
  with two or more fence lines (```` ``` ````, ``\\begin{code}``, ``\\end{code}``)
  every pair of fence lines delimits a block and all blocks are joined (or only
  the longest, ``only_longest``); otherwise the CodeGeeX "function signature"
  cut applies (a Python response starting with ``def`` is cut to nothing);
* Python programs get the CodeGeeX import header, then ``prefix_path``'s text,
  the code, and the test; ``from __future__`` lines move to the top; the whole
  is ``exec``'d with empty globals, so ``__name__`` is ``"builtins"`` and
  ``if __name__ == "__main__":`` blocks do not run, and any exception,
  ``SystemExit`` included, fails the test. Timeout 10 s unless the test says.

What we do differently, and why:
* the program runs in ``eval.sandbox.run_python`` (no network, own empty dir)
  instead of a fork of the grader; tests that need the network (1-3-223's pip
  queries) therefore fail, as they did officially for the shipped responses;
* each header import is guarded, so a package missing from the scoring
  runtime fails only programs that use it (the official environment had all);
* the wall limit adds ``STARTUP_SLACK`` seconds for the interpreter start and
  the header imports, which the official parent process had already paid;
* non-Python tests (javascript, typescript, c++, r, java, go, c#) are reported
  as "not run": the sandbox runs Python only and forbids child processes, and
  running model-written programs outside it is not acceptable.
"""

from __future__ import annotations

from viscodex_jax.eval.infibench.spec import UnitTest
from viscodex_jax.eval.sandbox import Limits, run_python

# execution_utils.LANGUAGE_TO_TIMEOUT (official seconds per test)
TIMEOUTS = {"python": 10, "cpp": 60, "javascript": 10, "typescript": 20, "java": 10, "go": 20, "c#": 20, "r": 20}
# execution_utils.LANGUAGE_TO_STOP_WORDS (from CodeGeeX), for responses without fences
STOP_WORDS = {"python": ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\nassert"],
              "go": ["\n//", "\nfunc main(", "struct", "\nfunc"]}
# execution_utils.IMPORT_HELPER["python"] (from CodeGeeX)
PYTHON_HEADER = ["import math", "import re", "import sys", "import copy", "import datetime", "import itertools",
                 "import collections", "import heapq", "import statistics", "import functools", "import hashlib",
                 "import numpy", "import numpy as np", "import pandas as pd", "import string", "import requests",
                 "import openpyxl", "import xlsxwriter", "import yolk", "from typing import *",
                 "from collections import *"]
STARTUP_SLACK = 10.0
RUNNABLE = ("python",)


def _is_fence(line: str) -> bool:
    return "```" in line or "\\begin{code}" in line or "\\end{code}" in line


def remove_last_block(code: str, lang: str) -> str:
    for w in STOP_WORDS.get(lang, []):
        if w in code:
            code = code[:code.find(w)]
    if lang == "python":
        lines = code.split("\n")
        for i, line in enumerate(lines):
            if line.strip() and line[0] not in " \t":
                return "\n".join(lines[:i])
    elif lang in ("java", "javascript", "go", "cpp", "rust"):
        depth, cut = (2 if lang == "java" else 1), False
        for i, c in enumerate(code):
            depth += (c == "{") - (c == "}")
            if depth == 0:
                code, cut = code[:i + 1], True
                break
        if not cut:
            if lang == "java":
                main = code.find("public static void main")
                if main != -1:
                    code = code[:main] + "}"
                if "}" in code:
                    code = code[:code.rfind("}")] + "}"
                if code.count("{") - 1 == code.count("}"):
                    code += "\n}"
            elif "}" in code:
                code = code[:code.rfind("}")] + "}"
    return code


def extract_code(text: str, lang: str, only_longest: bool) -> str:
    """``execution_utils.preprocess`` for one generation."""
    if text.count("```") + text.count("\\begin{code}") + text.count("\\end{code}") < 2:
        return remove_last_block(text, lang)
    lines = text.split("\n")
    marks = [i for i, line in enumerate(lines) if _is_fence(line)]
    pairs = [(marks[i], marks[i + 1]) for i in range(0, len(marks) - 1, 2)]
    if only_longest:
        if len(marks) < 2:
            return ""
        best, best_len = 0, 0
        for k, (a, b) in enumerate(pairs):
            if b - a > best_len:
                best, best_len = k, b - a
        a, b = pairs[best]
        return "\n".join(lines[a + 1:b])
    return "\n\n".join("\n".join(lines[a + 1:b]) for a, b in pairs)


def python_program(code: str, test: UnitTest) -> str:
    """Header, prefix file, code (stripped as a whole), ``__future__`` lines first, then the test."""
    guarded = [f"try:\n    {imp}\nexcept ImportError:\n    pass" for imp in PYTHON_HEADER]
    body = (test.prefix_from_file + "\n" + code).strip()
    future = [ln for ln in body.split("\n") if ln.startswith("from __future__")]
    rest = [ln for ln in body.split("\n") if not ln.startswith("from __future__")]
    return "\n".join(future + guarded + rest) + "\n" + test.reference


# The driver mirrors the official child process: exec with fresh globals, any BaseException fails.
_DRIVER = """import os, sys, traceback
src = open("check_program.py", encoding="utf-8").read()
try:
    exec(compile(src, "check_program.py", "exec"), {})
except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(3)
sys.stdout.flush()
os._exit(0)
"""


def run_unit_test(lang: str, response: str, test: UnitTest, python: str | None = None) -> dict:
    """One official unit test: {"status": "passed"|"failed"|"not_run", "detail": ...}."""
    code = extract_code(test.prefix + "\n" + response, lang, test.only_longest)
    if lang not in RUNNABLE:
        return {"status": "not_run", "detail": f"{lang} tests are not run (the sandbox runs Python only)"}
    timeout = TIMEOUTS[lang] if test.timeout is None else test.timeout
    limits = Limits(wall_seconds=timeout + STARTUP_SLACK, cpu_seconds=int(timeout + STARTUP_SLACK),
                    memory_bytes=16 * 2**30)  # torch/pandas tests reserve several GiB of address space
    res = run_python(_DRIVER, limits=limits, files={"check_program.py": python_program(code, test)}, python=python)
    passed = res.ok
    detail = "passed" if passed else f"{res.status}{f' ({res.limit})' if res.limit else ''}: {res.stderr[-500:]}"
    return {"status": "passed" if passed else "failed", "detail": detail}


def grade_unit_tests(lang: str, response: str, tests: list[UnitTest],
                     python: str | None = None) -> tuple[float, float, list[dict], bool]:
    """(score, total, per-test details, every test ran); ``python``: the scoring interpreter (default ours)."""
    now, tot, details = 0.0, 0.0, []
    for t in tests:
        r = run_unit_test(lang, response, t, python)
        tot += t.weight
        now += t.weight * (r["status"] == "passed")
        details.append({"test": t.source, **r})
    return now, tot, details, all(d["status"] != "not_run" for d in details)
