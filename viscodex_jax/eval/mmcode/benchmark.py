"""MMCode: contest problems with figures -> a Python program; judged as the official evaluator judges it.

Layouts read (as MMCode publishes them, github.com/likaixin2000/MMCode ``utils.py``):

* ``mmcode_test.jsonl.gz``: one problem per line with ``problem_id``, ``question`` (figures referenced as
  ``![image](1.png)``), ``images`` (base64 PNGs), ``input_output`` (a JSON *string*: ``inputs``/``outputs``,
  plus ``fn_name`` for call-based problems), ``starter_code``, ``data_split``. Plain ``.jsonl`` is read
  too, and ``input_output`` may also be an object (our demo writes both).
* a folder of ``<problem_id>/data.json`` + ``<problem_id>/images/<k>.png`` (k = 1, 2, ...).

``root`` is such a file, a folder holding one, or the problem-folder root. Problems are kept when their
``data_split`` is in ``data_split`` (default ``("test",)``; a record without the field counts as "test")
and, when ``image_categories`` is given, one of their ``image_tags`` is in it (the official filters).
A record that cannot be read raises an error naming the file and line (or problem folder); with
``on_error="skip"`` it becomes an item that is not generated and scores 0 with the reason in its row.

Prompt (the only one, since the prompt changes the score): MMCode's ``generate.py: generate_prompt``
(QUESTION/ANSWER with the Standard IO or Call-Based suffix and the starter code) after GPT-4V's
meta-prompt and system message (``models.py: GPT4V.generate``); figures interleaved at their
``![image](...)`` markers and images shorter than 480 px scaled up to 480 px high, as
``models.py: resize(image, base_height=480)`` does.

Judging: ``score`` runs the candidate once in ``sandbox.run_python`` under ``harness.py`` (this folder), which
judges all its tests in that one process (per-test alarms inside), following APPS ``run_test`` as
MMCode's ``eval.py`` calls it. A problem passes when every verdict is > 0 (``compute_metrics``);
``tests_passed`` is the fraction of tests whose verdict is true. Official behaviours matched on purpose:

* Code is the first ```` ```python ```` block (everything after ``python``: ```` ```python3 ```` leaves a
  stray ``3``), else the whole response; a ```` ```py ```` fence is not a python block
  (``models.py: extract_code``): we match it because the official verdicts are computed on that code.
* The fixed import prelude (``sys``, ``math``/``sqrt``..., ``collections``, ``numpy as np``, ``heapq``...)
  is prepended, so a missing ``import math`` passes.
* Standard-input code is wrapped in ``def code():`` (leading import lines stay outside): ``global``
  then names module scope and fails, a ``from __future__`` import is a compile error (-2).
* Every ``__main__`` in the source becomes the module name, so ``if __name__ == "__main__":`` runs.
* ``sys.stdin`` is a ``StringIO`` (``input``/``read``/``readline``/iteration work; ``sys.stdin.buffer``
  does not exist: -1); ``open(...)`` returns the input. The module-level ``stdin`` name is the process's
  real (empty) stdin with ``read``/``readline``/``readlines`` patched to the input (``readline`` without
  newlines); ``stdout`` is the real stdout, so output written through it is not judged.
  ``sys.stdout.close()`` is a TypeError (-1), as the official capture's ``close`` takes an argument.
* ``exit()``/``quit()`` are ``None`` (``reliability_guard``): calling them is a runtime error (-1), while
  ``sys.exit()`` is caught and the test is judged on what was printed; so are ``os.getcwd``, ``os.remove``,
  ``subprocess.Popen`` and the other functions the guard removes.
* stdout comparison is lenient, in the official order: stripped text; stripped lines; non-empty stripped
  lines; numbers with ``np.allclose``; finally the *set* of per-line token sets, also with numbers rounded
  to 3 decimals, so line order and token order do not matter (case does).
* List-valued I/O: inputs and outputs that are lists of lines are joined with newlines.
* Call-based: the result compares with ``==`` to the expected value or its first element (1 == 1.0 == True);
  tuples become lists, also row by row; ``class Solution`` is instantiated; JSON string keys of dict
  inputs/outputs become ints; ``SystemExit`` from a call-based program counts as the whole program failing.
* Timeouts: 20 s per test (an alarm, so the program can swallow it); the whole program gets 21 s, after
  which every test counts -1 even when some had passed (``check_correctness``'s global timeout); the
  harness's watchdog thread ends the process then. A program that ends the process itself (``os._exit``)
  also gets -1 everywhere, as an official worker that returns nothing; a verdicts file without the
  judge's per-run nonce is treated the same way.
* The program runs as many frames deep as in the official worker (padding frames, calibrated with a
  recursion probe under the official evaluator), so recursion near the default limit of 1000 fails or
  passes as it does there.
* What a program writes to stderr, or to stdout outside the capture, is discarded, so it cannot reach
  the sandbox's file-size limit (officially it goes to the worker's terminal).
* What we do not match: the official evaluator runs Python 3.11 with numpy 1.26 and no memory limit; we run
  the sandbox's interpreter (3.11 here, numpy 2: ``np.float_`` and friends are gone) with a 4 GiB
  address-space limit and a process-count limit, and a program holding the GIL past 21 s is stopped by
  the sandbox's wall clock (30 s) instead.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import glob
import gzip
import io
import json
import logging
import math
import os
import re
import secrets
from typing import Any, Iterator, Sequence

from PIL import Image

from viscodex_jax.eval.base import Benchmark, Column, Item, UnreadableItem
from viscodex_jax.eval.check import Aggregate, CheckAdapter, Metric, TripleResult
from viscodex_jax.eval.sandbox import Limits, run_python

log = logging.getLogger(__name__)

# models.py: GPT4V.generate (MMCode @ 8b9ac10), verbatim, its double space included.
PROMPT = ("You are required to solve a programming problem. Please enclose your code inside a ```python``` block. "
          " Do not write a main() function. If Call-Based format is used, return the result in an appropriate place "
          "instead of printing it.\n\n")
SYSTEM_PROMPT = ("You are a professional programming contester trying to solve algorithmic problems. The problems "
                 "come with a description and some images, and you should write a Python solution.")
# generate.py: generate_prompt, verbatim; the Call-Based line really starts with a backslash and no newline.
_STDIO_SUFFIX = "\nPlease write your code using Standard IO, i.e. input() and print()."
_CALL_SUFFIX = "\\Please write your code using Call-Based format."
_STARTER = "The starter code is provided as below. Please finish the code.\n"
_IMAGE_MARK = re.compile(r"!\[image\]\(.*?\)")
IMAGE_HEIGHT = 480
PER_TEST_SECONDS = 20
GLOBAL_SECONDS = 21

_HARNESS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness.py")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def extract_code_official(response: str) -> str:
    """The text between the first ```` ```python ```` and the next ```` ``` ````; the whole response otherwise."""
    start = response.find("```python")
    if start >= 0:
        start += len("```python")
        end = response.find("```", start)
        if end >= 0:
            return response[start:end]
    return response


def prompt_text(question: str, starter_code: str = "", fn_name: str | None = None) -> str:
    """The user text of the official prompt (meta-prompt + ``generate_prompt``), image markers still in it."""
    text = "\nQUESTION:\n" + question
    text += _STDIO_SUFFIX if not fn_name and not starter_code else _CALL_SUFFIX
    if starter_code:
        text += _STARTER + starter_code + "\n"
    return PROMPT + text + "\nANSWER:\n"


def interleave(text: str, images: Sequence[Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Chat content with image k after the k-th text segment; images beyond the markers + 1 are dropped
    (as the official loop over segments does). Returns the content and the images it uses, in order."""
    content, used = [], []
    for k, segment in enumerate(_IMAGE_MARK.split(text)):
        if segment:
            content.append({"type": "text", "text": segment})
        if k < len(images):
            content.append({"type": "image"})
            used.append(images[k])
    return content, used


def _upscale(img: Image.Image, height: int | None) -> Image.Image:
    if height is None or img.height >= height:
        return img
    return img.resize((int(img.width * (height / float(img.height))), height), Image.LANCZOS)


@dataclasses.dataclass(frozen=True)
class Problem:
    """What judging needs: the record's ``input_output`` JSON text (parsed again in the sandbox, exactly as
    the official code parses it), and facts about it."""

    input_output: str
    n_tests: int
    fn_name: str | None


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


class MMCode(Benchmark):
    name = "mmcode"
    columns = (Column("mmcode", "MMCode"),)
    pass_at = (1, 5, 10)  # the pass@k reported, each k up to the samples drawn per item

    def __init__(self, limits: Limits | None = None, data_split: Sequence[str] = ("test",), on_error: str = "raise",
                 image_height: int | None = IMAGE_HEIGHT, per_test_seconds: int = PER_TEST_SECONDS,
                 global_seconds: float = GLOBAL_SECONDS, image_categories: Sequence[str] | None = None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.data_split = (data_split,) if isinstance(data_split, str) else tuple(data_split)
        self.image_categories = None if image_categories is None else set(image_categories)
        self.on_error = on_error
        self.image_height = image_height
        self.per_test_seconds = int(per_test_seconds)
        self.global_seconds = float(global_seconds)
        # the harness enforces global_seconds itself; the wall limit only catches a program holding the GIL
        self.limits = limits or Limits(wall_seconds=self.global_seconds + 9, cpu_seconds=int(self.global_seconds) + 19,
                                       memory_bytes=4 * 2**30)
        self.skipped: list[str] = []  # reasons, one per record skipped by the last load (on_error="skip")

    # -- loading ---------------------------------------------------------------------------------------
    def _records(self, root: str) -> Iterator[tuple[str, str, Any]]:
        """(where, fallback id, record dict or the exception that reading it raised), in file order."""
        if os.path.isfile(root):
            yield from self._jsonl(root)
            return
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: no such MMCode file or folder")
        folders = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "data.json")))
        if folders:
            for d in folders:
                yield from self._folder(os.path.join(root, d))
            return
        files = sorted(glob.glob(os.path.join(root, "*.jsonl.gz"))) or sorted(glob.glob(os.path.join(root, "*.jsonl")))
        if not files:
            raise FileNotFoundError(f"{root}: no MMCode *.jsonl.gz / *.jsonl file and no <problem_id>/data.json "
                                    "folders")
        for path in files:
            yield from self._jsonl(path)

    @staticmethod
    def _jsonl(path: str) -> Iterator[tuple[str, str, Any]]:
        opener = gzip.open if _is_gzip(path) else open
        with opener(path, "rb") as f:
            lineno = 0
            while True:
                try:
                    line = f.readline()
                except (OSError, EOFError) as e:  # a truncated or corrupt gzip stream: nothing after it is readable
                    yield f"{path}:{lineno + 1}", f"{os.path.basename(path)}:{lineno + 1}", \
                        ValueError(f"cannot read further ({type(e).__name__}: {e})")
                    return
                if not line:
                    return
                lineno += 1
                if not line.strip():
                    continue
                where, pid = f"{path}:{lineno}", f"{os.path.basename(path)}:{lineno}"
                try:
                    rec = json.loads(line.decode("utf-8"))
                    if not isinstance(rec, dict):
                        raise ValueError(f"a JSON object per line, got {type(rec).__name__}")
                    pid = str(rec.get("problem_id", pid))  # a later error still names the problem
                    images = [_decode_image(v, k) for k, v in enumerate(rec.get("images") or [])]
                    yield where, pid, (rec, images)
                except (ValueError, TypeError) as e:
                    yield where, pid, e

    @staticmethod
    def _folder(folder: str) -> Iterator[tuple[str, str, Any]]:
        where, pid = os.path.join(folder, "data.json"), os.path.basename(folder)
        try:
            with open(where, encoding="utf-8") as f:
                rec = json.load(f)
            if not isinstance(rec, dict):
                raise ValueError(f"a JSON object, got {type(rec).__name__}")
            img_dir = os.path.join(folder, "images")
            names = [n for n in os.listdir(img_dir) if n.endswith(".png")] if os.path.isdir(img_dir) else []
            bad = [n for n in names if not os.path.splitext(n)[0].isdigit()]
            if bad:
                raise ValueError(f"images/ holds {bad[0]!r}; expected <k>.png with k = 1, 2, ...")
            images = []
            for n in sorted(names, key=lambda n: int(os.path.splitext(n)[0])):
                try:
                    images.append(Image.open(os.path.join(img_dir, n)).convert("RGB"))
                except OSError as e:
                    raise ValueError(f"images/{n}: not a readable image ({e})") from e
            yield where, pid, ({**rec, "problem_id": pid}, images)
        except (OSError, ValueError, TypeError) as e:
            yield where, pid, e

    def _item(self, rec: dict[str, Any], images: list[Image.Image], pid: str) -> Item:
        io_spec = rec["input_output"]
        io_text = io_spec if isinstance(io_spec, str) else json.dumps(io_spec)
        parsed = json.loads(io_text)
        if not isinstance(parsed, dict):
            raise ValueError(f"input_output must hold a JSON object, got {type(parsed).__name__}")
        inputs, outputs = parsed.get("inputs"), parsed.get("outputs")
        if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs) or not inputs:
            raise ValueError("input_output needs equally long, non-empty 'inputs' and 'outputs' lists")
        fn_name = parsed.get("fn_name") or None
        question = rec["question"]
        if not isinstance(question, str):
            raise ValueError(f"question must be a string, got {type(question).__name__}")
        starter = rec.get("starter_code") or ""
        content, used = interleave(prompt_text(question, starter, fn_name),
                                   [_upscale(im, self.image_height) for im in images])
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]
        return Item(pid, messages, used, Problem(io_text, len(inputs), fn_name))

    def load(self, root: str, limit: int | None = None) -> list[Item]:
        items: list[Item] = []
        self.skipped = []
        for where, pid, got in self._records(root):
            if not isinstance(got, Exception):
                rec, images = got
                if rec.get("data_split", "test") not in self.data_split:
                    continue
                tags = rec.get("image_tags") or []
                if self.image_categories is not None and not self.image_categories.intersection(tags):
                    continue
                try:
                    items.append(self._item(rec, images, pid))
                except (KeyError, ValueError, TypeError) as e:
                    got = e
            if isinstance(got, Exception):
                what = "missing field" if isinstance(got, KeyError) else type(got).__name__
                reason = f"{where}: not a readable MMCode record ({what}: {got})"
                if self.on_error == "raise":
                    raise ValueError(reason) from got
                log.warning("skipping (counted as failed): %s", reason)
                self.skipped.append(reason)
                items.append(Item(pid, [], [], UnreadableItem(reason)))
            if limit is not None and len(items) >= limit:
                break
        ids = [it.id for it in items]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"{root}: problem ids occur more than once: {dup[:5]}")
        return items

    # -- judging ---------------------------------------------------------------------------------------
    def judge(self, item: Item, generation: str) -> list:
        """The official per-test verdicts: True/False, -1 (runtime error or timeout), or [-2] (did not load)."""
        prob = item.reference
        if isinstance(prob, UnreadableItem):
            raise ValueError(prob.reason)
        nonce = secrets.token_hex(16)
        task = {"code": extract_code_official(generation), "input_output": prob.input_output, "nonce": nonce,
                "per_test_seconds": self.per_test_seconds, "global_seconds": self.global_seconds}
        r = run_python(_harness_source(), stdin=b"", limits=self.limits, files={"task.json": json.dumps(task)},
                       collect=("verdicts.json", "judge_ready"))
        if "judge_ready" not in r.files:
            raise RuntimeError(f"MMCode judge did not start in the sandbox ({r.status}): {r.stderr[-800:]}")
        if "verdicts.json" not in r.files:
            return [-1] * prob.n_tests  # killed, timed out or exited early: every test fails, as officially
        try:
            got = json.loads(r.files["verdicts.json"])
            verdicts = got["verdicts"] if got["nonce"] == nonce else None
        except (ValueError, TypeError, KeyError):
            verdicts = None
        if not isinstance(verdicts, list) or not all(isinstance(v, (bool, int, float)) for v in verdicts):
            # not written by the judge: the program wrote it (and then ended the process itself)
            return [-1] * prob.n_tests
        return verdicts

    def score(self, item: Item, generation: str) -> dict[str, float]:
        verdicts = self.judge(item, generation)
        ok = all(v > 0 for v in verdicts)
        return {"score": 100.0 * ok, "passed": float(ok),
                "tests_passed": sum(v is True for v in verdicts) / item.reference.n_tests}

    def aggregate(self, rows: Sequence[dict[str, float]], num_samples: int = 1,
                  ks: Sequence[int] | None = None) -> dict[str, float]:
        """pass@k over items; rows of one item (several samples) share an ``id`` key when given.
        ``ks`` default: each of ``pass_at`` up to ``num_samples``."""
        if ks is None:
            ks = tuple(k for k in self.pass_at if k <= num_samples) or (1,)
        by_item: dict[Any, list[float]] = {}
        for i, r in enumerate(rows):
            by_item.setdefault(r.get("id", i), []).append(r.get("passed", 0.0))
        out = {}
        for k in ks:
            vals = [pass_at_k(len(v), int(sum(v)), k) for v in by_item.values() if len(v) >= k]
            out[f"pass@{k}"] = 100.0 * sum(vals) / max(len(vals), 1)
        out["score"] = out.get("pass@1", 0.0)
        return out

    def check_adapter(self) -> CheckAdapter:
        return MMCodeCheck(self)

    @staticmethod
    def make_sample(out_dir: str) -> str:
        """Three small problems (one with a figure) in the official ``mmcode_test.jsonl.gz`` format."""
        from PIL import ImageDraw

        os.makedirs(out_dir, exist_ok=True)
        img = Image.new("RGB", (120, 80), "white")
        d = ImageDraw.Draw(img)
        for i, h in enumerate([20, 50, 35]):
            d.rectangle([10 + i * 35, 70 - h, 35 + i * 35, 70], fill="#4477aa")
        buf = io.BytesIO()
        img.save(buf, format="PNG")

        def rec(pid, question, images, inputs, outputs, split="test"):
            return {"problem_id": pid, "name": pid, "source": "sample", "url": "", "question": question,
                    "raw_problem": "", "solutions": [], "images": images, "image_tags": [], "starter_code": "",
                    "difficulty": "easy", "data_split": split,
                    "input_output": json.dumps({"inputs": inputs, "outputs": outputs})}

        problems = [
            rec("sum-two", "Read two integers a and b on one line and print a + b.", [],
                ["1 2\n", "-5 7\n", "100 200\n"], ["3\n", "2\n", "300\n"]),
            rec("bars-max", "![image](1.png)\nThe figure shows bars. Read n and then n bar heights; print the "
                "index (1-based) of the tallest bar.", [base64.b64encode(buf.getvalue()).decode()],
                ["3\n20 50 35\n", "4\n1 2 3 9\n"], ["2\n", "4\n"]),
            rec("reverse", "Read a line and print it reversed.", [], ["abc\n", "racecar\n"], ["cba\n", "racecar\n"]),
            rec("dev-only", "Print 1.", [], ["\n"], ["1\n"], split="dev"),  # filtered out by data_split
        ]
        with gzip.open(os.path.join(out_dir, "mmcode_test.jsonl.gz"), "wt", encoding="utf-8") as f:
            for p in problems:
                f.write(json.dumps(p) + "\n")
        return out_dir


def _decode_image(value: Any, k: int) -> Image.Image:
    if not isinstance(value, str):
        raise ValueError(f"images[{k}] must be a base64 string, got {type(value).__name__}")
    data = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return Image.open(io.BytesIO(base64.b64decode(data, validate=True))).convert("RGB")
    except (binascii.Error, OSError) as e:
        raise ValueError(f"images[{k}] is not a base64-encoded image ({e})") from e


_HARNESS: list[str] = []


def _harness_source() -> str:
    if not _HARNESS:
        with open(_HARNESS_PATH) as f:
            _HARNESS.append(f.read())
    return _HARNESS[0]


class MMCodeCheck(CheckAdapter):
    """``shared/benchmarks/mmcode`` layout: ``expected.jsonl`` lines name ``problem_id`` and ``candidate_file``,
    with the official ``test_results``, ``passed`` and ``problem_pass_at_1``."""

    item_field = "problem_id"
    metrics = (Metric("passed"), Metric("test_results"))
    max_workers = 4  # each triple is one sandboxed process; the timeouts are wall-clock waits

    def observe(self, item: Item, response: str) -> dict[str, Any]:
        verdicts = self.bench.judge(item, response)
        return {"passed": all(v > 0 for v in verdicts), "test_results": verdicts}

    def aggregates(self, results: Sequence[TripleResult]) -> list[Aggregate]:
        ours: dict[str, list[bool]] = {}
        official: dict[str, float] = {}
        for r in results:
            ours.setdefault(r.triple.item_id, []).append(bool(r.observed.get("passed", False)))
            official[r.triple.item_id] = float(r.triple.expected["problem_pass_at_1"])
        per_problem = {p: sum(v) / len(v) for p, v in ours.items()}
        agree = sum(abs(per_problem[p] - official[p]) < 1e-9 for p in ours)
        return [Aggregate("pass@1 (%, mean over problems)", 100.0 * sum(per_problem.values()) / len(ours),
                          100.0 * sum(official.values()) / len(official)),
                Aggregate("problems with equal pass@1", float(agree), float(len(ours)))]
