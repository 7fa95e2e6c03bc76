"""InfiBench(-V): free-form code QA scored by the official per-case rules.

Layouts read by ``InfiBenchV.load(root)``:
* the official one (infi-coder/infibench-evaluator): a suite YAML, or a folder
  holding one, listing ``cases_*/eval_<id>.yaml`` with prompt files
  (``spec``); a folder of ``eval_*.yaml`` without a suite also works;
* the project's earlier ``questions.jsonl`` (``flat``).

Scoring follows ``grader_main.grade_response`` at commit 96cb098: the metric
scores (``match``: keywords, blank filling, ROUGE similarity;
``unit_tests``: unit tests; the case's own handler for ``customized`` and
``post_handler``) are summed into ``ans`` and their totals into ``tot``;
``max_score`` replaces ``tot`` and caps ``ans``, ``min_score`` floors ``ans``;
the response scores ``ans / tot * full_score`` (``official_score``), reported
as a percentage of the case's full score in ``score``. A response whose unit
tests could not run (no runtime for the language) scores NaN with
``not_run = 1``: never counted as passed or failed. A case that cannot be read
is an error naming the file (``on_error="raise"``), or, with ``on_error="skip"``,
an ``UnreadableItem`` that the runner never generates for and counts as failed
(the run goes on). Handler modules named by a case are imported from the case's
folder, as the official grader imports them. ``check_adapter()`` plugs the
shared ``expected.jsonl`` layout into ``launch/eval.py --check_against``.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from typing import Any, Iterator, Mapping, Sequence

from viscodex_jax.eval.base import Benchmark, Column, Flag, Item, UnreadableItem
from viscodex_jax.eval.check import CheckAdapter
from viscodex_jax.eval.infibench.flat import load_flat, score_flat
from viscodex_jax.eval.infibench.judge import Judge
from viscodex_jax.eval.infibench.match import grade_blank_filling, grade_keywords, grade_similarity
from viscodex_jax.eval.infibench.spec import Case, CaseError, load_case, load_suite
from viscodex_jax.eval.infibench.unit_tests import RUNNABLE, grade_unit_tests
from viscodex_jax.eval.sandbox import Limits

log = logging.getLogger(__name__)

# openai_caller.py defaults (infibench-evaluator, commit 96cb098): --system_prompt / --qa_system_prompt
SYSTEM_PROMPT = ("You are a professional assistant for programmers. "
                 "By default, questions and answers are in Markdown format.")
QA_SYSTEM_PROMPT = SYSTEM_PROMPT + " You are chatting with programmers, so please answer as briefly as possible."


def official_prompt(case: Case) -> list[dict[str, Any]]:
    """openai_caller.py: the QA system prompt when ``similarity`` is the grading's only key."""
    system = QA_SYSTEM_PROMPT if "similarity" in case.grading and len(case.grading) == 1 else SYSTEM_PROMPT
    return [{"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": [{"type": "text", "text": case.prompt}]}]


def reduce_scores(scores: Sequence[float], mode: str) -> float:
    """grader_main.grade_responses' attempt reduction (``avg``, ``max``, ``min``, ``avg_max_<n>``)."""
    if mode == "avg":
        return sum(scores) / len(scores)
    if mode in ("max", "min"):
        return (max if mode == "max" else min)(scores)
    if mode.startswith("avg_max_"):
        n = int(mode[len("avg_max_"):])
        bests = [max(scores[i:i + n]) for i in range(0, len(scores), n)]
        return sum(bests) / len(bests)
    raise ValueError(f"unsupported attempt_reduce_mode {mode!r}")


class InfiBenchV(Benchmark):
    name = "infibench_v"
    flags = (Flag("judge_endpoint", None, "OpenAI-compatible endpoint for LLM judges (off by default)."),
             Flag("judge_model", "gpt-4o", "Judge model name."))
    columns = (Column("infibench_v", "InfiBench-V"),)
    folder_aliases = ("infibench",)

    def __init__(self, judge: Judge | None = None, limits: Limits = Limits(wall_seconds=10, cpu_seconds=6),
                 support_dirs: Sequence[str] | None = None, on_error: str = "raise", use_official_prompt: bool = True,
                 python: str | None = None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.judge, self.limits = judge, limits  # the flat layout's judge and sandbox limits
        if support_dirs is None:  # launch/eval.py has no flag for it: the environment names them
            support_dirs = [d for d in os.environ.get("INFIBENCH_SUPPORT_DIRS", "").split(os.pathsep) if d]
        self.support_dirs, self.on_error = tuple(support_dirs), on_error
        self.use_official_prompt = use_official_prompt  # False: the prompt file alone, no system turn
        self.python = python  # interpreter for unit tests (a scoring venv's bin/python); default ours
        self.reduce_mode = "avg"  # the official default; a suite's attempt_reduce_mode replaces it

    # ---- loading -------------------------------------------------------------------------------------------
    def _case_paths(self, root: str) -> list[str]:
        if os.path.isfile(root):
            if root.endswith((".yaml", ".yml")) and os.path.basename(root).startswith("eval_"):
                return [root]
            paths, settings = load_suite(root)
            self.reduce_mode = settings.get("attempt_reduce_mode", "avg")
            return [p for p, _ in paths]
        suites = sorted(glob.glob(os.path.join(root, "suite*.yaml")))
        if len(suites) > 1:
            raise ValueError(f"{root}: several suites ({', '.join(map(os.path.basename, suites))}); pass one file")
        if suites:
            return self._case_paths(suites[0])
        cases = sorted(glob.glob(os.path.join(root, "eval_*.yaml")) + glob.glob(os.path.join(root, "*", "eval_*.yaml")))
        if not cases:
            raise FileNotFoundError(f"{root}: no InfiBench suite*.yaml, eval_*.yaml or questions.jsonl")
        return cases

    def load_cases(self, root: str) -> list[Case | tuple[str, str]]:
        """Cases, or (path, reason) for those that cannot be read (with ``on_error="skip"``)."""
        out: list[Case | tuple[str, str]] = []
        for path in self._case_paths(root):
            try:
                out.append(load_case(path, self.support_dirs, run_langs=RUNNABLE))
            except CaseError as e:
                if self.on_error == "raise":
                    raise
                log.warning("InfiBench case unreadable, counted as failed: %s", e)
                out.append((path, str(e)))
        return out

    def load(self, root: str, limit: int | None = None) -> list[Item]:
        flat = os.path.join(root, "questions.jsonl") if os.path.isdir(root) else root
        if flat.endswith(".jsonl") and (os.path.isfile(flat) or not os.path.isdir(root)):
            if not os.path.isfile(flat):
                raise FileNotFoundError(f"{flat}: no InfiBench-V questions.jsonl")
            return load_flat(flat, limit)
        items = []
        for c in self.load_cases(root)[:limit]:
            if isinstance(c, tuple):
                cid = os.path.basename(c[0]).removeprefix("eval_").rsplit(".", 1)[0]
                items.append(Item(cid, [], [], UnreadableItem(c[1])))
            else:
                msgs = official_prompt(c) if self.use_official_prompt else official_prompt(c)[1:]
                items.append(Item(c.id, msgs, [], c))
        return items

    # ---- scoring -------------------------------------------------------------------------------------------
    def score(self, item: Item, generation: str) -> dict[str, Any]:
        ref = item.reference
        if isinstance(ref, UnreadableItem):  # the runner never gets here (score_guarded); direct callers may
            return {"score": 0.0, "score_error": ref.reason}
        if isinstance(ref, Case):
            return self.grade(ref, generation, python=self.python)
        return score_flat(ref, generation, self.judge, self.limits)

    @staticmethod
    def grade(case: Case, response: str, python: str | None = None) -> dict[str, Any]:
        """One response, as grader_main.grade_response; NaN ``score`` with ``not_run`` when tests could not run.

        A case whose rules raise (a bad regex, a blank at the template's very end) scores 0 with
        ``grading_error``: the official grader scores such a case 0 and also drops it from the full score."""
        g, ans, tot, row, detail = case.grading, 0.0, 0.0, {}, {}
        ran = True
        try:
            parts = []
            if "keywords" in g:
                parts.append(("keywords", *grade_keywords(g["keywords"], response, case.handlers.get("keywords"))))
            if "blank_filling" in g:
                parts.append(("blank_filling", *grade_blank_filling(g["blank_filling"], response,
                                                                    case.handlers.get("blank_filling"))))
            if "unit_test" in g:
                a, t, d, ran = grade_unit_tests(case.unit_lang, response, case.unit_tests, python)
                parts.append(("unit_test", a, t, d))
            if "similarity" in g:
                parts.append(("similarity", *grade_similarity(g["similarity"], case.references, response)))
            if "customized" in g:
                parts.append(("custom", *case.handlers["customized"](response)))
            for name, a, t, d in parts:
                row[name], row[f"{name}_total"], detail[name] = float(a), float(t), d
                ans, tot = ans + a, tot + t
            if "max_score" in g:
                tot = g["max_score"]
                ans = min(ans, tot)
            if "min_score" in g:
                ans = max(ans, g["min_score"])
            frac = ans / tot
        except Exception as e:  # noqa: BLE001 - the official grader turns any error into a zero for the case
            log.warning("%s: grading error: %r", case.path, e)
            return {"score": 0.0, "official_score": 0.0, "grading_error": 1.0, "error": f"{type(e).__name__}: {e}"}
        return {"score": 100.0 * frac if ran else math.nan, "official_score": frac * case.full_score if ran else math.nan,
                "raw": float(ans), "total": float(tot), "not_run": 0.0 if ran else 1.0, **row,
                "detail": json.dumps(detail, default=str)[:4000]}

    @classmethod
    def options(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        endpoint = values.get("judge_endpoint")
        return {"judge": Judge(endpoint, values.get("judge_model", "gpt-4o"))} if endpoint else {}

    def aggregate(self, rows: Sequence[dict[str, Any]], num_samples: int = 1) -> dict[str, float]:
        """Means over graded responses (not-run ones excluded, and counted);
        with several samples per item, also the suite score under the official attempt reduction."""
        graded = [r for r in rows if isinstance(r.get("score"), (int, float)) and not math.isnan(r["score"])]
        keys = sorted({k for r in graded for k, v in r.items() if isinstance(v, (int, float)) and k != "sample"})
        out = {k: float(sum(r.get(k, 0.0) for r in graded) / max(len(graded), 1)) for k in keys}
        out.update(n_graded=float(len(graded)), n_not_run=float(sum(r.get("not_run", 0.0) for r in rows)))
        by_id: dict[str, list[tuple[int, float]]] = {}
        for r in graded:
            by_id.setdefault(r.get("id", ""), []).append((r.get("sample", 0), r["score"]))
        if by_id and max(len(v) for v in by_id.values()) > 1:
            per_case = [reduce_scores([s for _, s in sorted(v)], self.reduce_mode) for v in by_id.values()]
            out["suite_score"] = sum(per_case) / len(per_case)
        return out

    # ---- official-score check ------------------------------------------------------------------------------
    def check_pairs(self, root: str, models: Sequence[str] | None = None) -> Iterator[tuple[Item, str, dict[str, float]]]:
        """(item, response, expected metrics) for every line of ``root/expected.jsonl`` (layout: ``check``).

        Expected keys match ``score()``'s: ``score`` (percent of the case's full score), ``official_score``,
        ``raw``, ``total`` and one per metric. Our NaN ``score`` means "not run"; an ``UnreadableItem`` (with
        ``on_error="skip"``) means the case could not be read: neither is an agreement.
        """
        from viscodex_jax.eval.infibench.check import expected_records

        items = {it.id: it for it in self.load(root)}
        for where, rec, response in expected_records(root):
            if models is not None and rec["model"] not in models:
                continue
            if rec["case_id"] not in items:
                raise KeyError(f"{where}: case {rec['case_id']!r} is not in the suite")
            item = items[rec["case_id"]]
            full = item.reference.full_score if isinstance(item.reference, Case) else 1.0
            exp = {"score": 100.0 * rec["score"] / full, "official_score": rec["score"], "raw": rec["raw_score"],
                   "total": rec["raw_total"], **{m: v[0] for m, v in rec.get("subscores", {}).items()}}
            yield item, response, exp

    def check_adapter(self) -> CheckAdapter:
        from viscodex_jax.eval.infibench.check import InfiBenchCheck

        return InfiBenchCheck(self)

    @staticmethod
    def make_sample(out_dir: str) -> str:
        """The flat layout (see ``flat``); ``tests/test_infibench_official.py`` writes case YAMLs."""
        from PIL import Image, ImageDraw

        os.makedirs(os.path.join(out_dir, "imgs"), exist_ok=True)
        img = Image.new("RGB", (200, 60), "white")
        ImageDraw.Draw(img).text((5, 20), "df.groupby('city').mean()", fill="black")
        img.save(os.path.join(out_dir, "imgs", "q1.png"))
        questions = [
            {"id": "pandas-groupby", "images": ["imgs/q1.png"], "lang": "python",
             "question": "The screenshot shows a pandas call. How do I get the mean price per city?",
             "grading": {"keywords": [{"content": "groupby", "weight": 1.0, "to_lower": True},
                                      {"content": r"\.mean\(\)", "weight": 1.0, "regex": True}]},
             "full_score": 2.0, "null_score": 0.0},
            {"id": "square-fn", "images": [], "lang": "python",
             "question": "Write a Python function square(x) that returns x squared.",
             "grading": {"keywords": [{"content": "def square", "weight": 1.0}],
                         "unit_test": {"weight": 2.0, "tests": [{"suffix": "assert square(3) == 9\n"},
                                                                 {"suffix": "assert square(-2) == 4\n"}]}},
             "full_score": 3.0, "null_score": 0.0},
        ]
        with open(os.path.join(out_dir, "questions.jsonl"), "w") as f:
            for q in questions:
                f.write(json.dumps(q) + "\n")
        return out_dir
