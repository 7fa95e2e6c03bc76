"""Reading the official InfiBench case layout (infi-coder/infibench-evaluator).

A suite YAML (``suite_v2.0.0_dev.yaml``) lists case YAMLs relative to the
suite's folder (``cases_dev/eval_<id>.yaml``); each case names its prompt file
and its ``grading`` rules (``keywords``, ``blank_filling``, ``unit_test``,
``similarity``, ``customized``, ``max_score``/``min_score``). Files a case
points at (prompts, reference answers, unit-test programs, handler modules)
are read relative to the case's folder; ``support_dirs`` adds fall-back
folders, because the published data sets sometimes leave the test programs
out (fetch them from the evaluator repository and pass its root).

Everything a case needs is read and checked here, so a broken case is one
``CaseError`` naming the file and what was expected, raised before scoring.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import yaml

GRADERS = ("keywords", "blank_filling", "unit_test", "similarity", "customized")

# grader_main.grade_response: language aliases -> executor name
LANG_ALIASES = {
    "python": "python", "c": "cpp", "c++": "cpp", "cpp": "cpp", "c/c++": "cpp", "c++/c": "cpp", "cpp/c": "cpp",
    "c/cpp": "cpp", "js": "javascript", "javascript": "javascript", "java": "java", "c#": "c#", "c-sharp": "c#",
    "csharp": "c#", "cs": "c#", "ts": "typescript", "typescript": "typescript", "r": "r", "go": "go",
}


class CaseError(ValueError):
    """A case that cannot be graded as written; the message starts with the file."""


@dataclasses.dataclass
class UnitTest:
    reference: str  # the test program appended after the candidate's code
    weight: float = 1.0
    prefix: str = ""  # prepended to the response before code extraction
    prefix_from_file: str = ""  # prepended to the extracted code
    timeout: float | None = None
    cleanup: str = ""  # official: run in the grader after the test; our sandbox dir is discarded instead
    only_longest: bool = False
    source: str = ""


@dataclasses.dataclass
class Case:
    id: str
    path: str
    lang: str
    type: str
    prompt: str
    grading: dict[str, Any]
    full_score: float = 1.0
    null_score: float = 0.0
    unit_lang: str | None = None  # executor name when the case has unit tests
    unit_tests: list[UnitTest] = dataclasses.field(default_factory=list)
    references: list[list[str]] = dataclasses.field(default_factory=list)  # per similarity metric
    handlers: dict[str, Any] = dataclasses.field(default_factory=dict)  # "keywords"/"blank_filling"/"customized" -> callable


_NOT_RUN = "\0not run"  # a support dir meaning "a missing file reads as empty": tests never run


def _find(case_dir: str, rel: str, support_dirs: Sequence[str], path: str, what: str) -> str:
    for d in (case_dir, *support_dirs):
        if d == _NOT_RUN:
            return d
        p = os.path.join(d, rel)
        if os.path.isfile(p):
            return p
    looked = ", ".join(d for d in (case_dir, *support_dirs) if d != _NOT_RUN)
    raise CaseError(f"{path}: {what} {rel!r} not found (looked in {looked})")


def _read(case_dir: str, rel: str, support_dirs: Sequence[str], path: str, what: str) -> str:
    found = _find(case_dir, rel, support_dirs, path, what)
    if found == _NOT_RUN:
        return ""
    with open(found) as f:
        return f.read()


def _load_handler(spec: Any, case_dir: str, support_dirs: Sequence[str], path: str) -> Any:
    """The official imports ``module`` (dotted, from the evaluator's root) and calls ``func``; we load the
    same file by its last dotted component from the case folder (or a support dir)."""
    if not isinstance(spec, dict) or "module" not in spec or "func" not in spec:
        raise CaseError(f"{path}: a handler needs 'module' and 'func', got {spec!r}")
    import importlib.util

    fname = spec["module"].rsplit(".", 1)[-1] + ".py"
    file = _find(case_dir, fname, support_dirs, path, "handler module")
    mod_spec = importlib.util.spec_from_file_location(f"infibench_handler_{abs(hash(file))}", file)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not hasattr(module, spec["func"]):
        raise CaseError(f"{path}: handler module {file} has no function {spec['func']!r}")
    return getattr(module, spec["func"])


_COND = re.compile(r"""^\s*context\[(-?\d+)\]\s*(?:\.startswith\((['"])(.*?)\2\)|==\s*(['"])(.*?)\4)\s*$""")


def parse_cond(cond: str, path: str) -> tuple[int, str, str]:
    """The official ``eval``s ``cond`` with ``context`` (earlier rules' "match"/"unmatch"); we accept the
    forms the suites use rather than evaluating arbitrary text: ``context[k].startswith('x')``, ``context[k] == 'x'``."""
    m = _COND.match(cond)
    if not m:
        raise CaseError(f"{path}: unsupported keyword cond {cond!r} (expected context[k].startswith('..') "
                        "or context[k] == '..')")
    if m.group(3) is not None:
        return int(m.group(1)), "startswith", m.group(3)
    return int(m.group(1)), "eq", m.group(5)


def _check_keyword_content(c: Any, path: str, where: str) -> None:
    if isinstance(c, str):
        return
    if not isinstance(c, dict):
        raise CaseError(f"{path}: {where}: a keyword is a string or a mapping, got {type(c).__name__}")
    if "cond" in c:
        parse_cond(c["cond"], path)
    if "or" in c or "and" in c:
        for k, sub in enumerate(c.get("or", c.get("and")) or []):
            _check_keyword_content(sub, path, f"{where}.{'or' if 'or' in c else 'and'}[{k}]")
    elif "content" in c:
        _check_keyword_content(c["content"], path, f"{where}.content")
    else:
        raise CaseError(f"{path}: {where}: a keyword mapping needs 'or', 'and' or 'content'")


def load_case(path: str, support_dirs: Sequence[str] = (), run_langs: Sequence[str] | None = None) -> Case:
    """One ``eval_<id>.yaml``; raises ``CaseError`` naming the file.

    ``run_langs``: the unit-test languages the caller will run (None: all). Test files of other languages
    may be missing (they are never read: those tests are reported as not run)."""
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise CaseError(f"{path}: cannot read case YAML: {e}") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("grading"), dict):
        raise CaseError(f"{path}: a case needs a 'grading' mapping")
    for key in ("id", "prompt_path"):
        if key not in cfg:
            raise CaseError(f"{path}: case lacks {key!r}")
    case_dir = os.path.dirname(os.path.abspath(path))
    g = cfg["grading"]
    if not any(k in g for k in GRADERS):
        raise CaseError(f"{path}: grading needs one of {', '.join(GRADERS)}")
    case = Case(id=str(cfg["id"]), path=path, lang=str(cfg.get("lang", "")), type=str(cfg.get("type", "")),
                prompt=_read(case_dir, cfg["prompt_path"], support_dirs, path, "prompt file"), grading=g,
                full_score=float(cfg.get("full_score", 1.0)), null_score=float(cfg.get("null_score", 0.0)))

    for k, rule in enumerate(g.get("keywords") or []):
        if isinstance(rule, dict) and "post_handler" in rule:
            case.handlers["keywords"] = _load_handler(rule["post_handler"], case_dir, support_dirs, path)
        elif isinstance(rule, dict):
            if "content" not in rule:
                raise CaseError(f"{path}: keywords[{k}] needs 'content'")
            _check_keyword_content(rule["content"], path, f"keywords[{k}]")
        elif not isinstance(rule, str):
            raise CaseError(f"{path}: keywords[{k}] must be a string or a mapping")

    if "blank_filling" in g:
        bf = g["blank_filling"]
        if not isinstance(bf, dict) or "template" not in bf or "targets" not in bf:
            raise CaseError(f"{path}: blank_filling needs 'template' and 'targets'")
        n_blank = bf["template"].count(bf.get("blank_str", "[blank]"))
        if n_blank != len(bf["targets"]):
            raise CaseError(f"{path}: blank_filling has {n_blank} blanks but {len(bf['targets'])} targets")
        if "post_handler" in bf:
            case.handlers["blank_filling"] = _load_handler(bf["post_handler"], case_dir, support_dirs, path)

    if "unit_test" in g:
        ut = g["unit_test"]
        if not isinstance(ut, dict) or not isinstance(ut.get("tests"), list) or not ut["tests"]:
            raise CaseError(f"{path}: unit_test needs a non-empty 'tests' list")
        lang = str(ut.get("lang", cfg.get("lang", ""))).lower()
        if lang not in LANG_ALIASES:
            raise CaseError(f"{path}: unit tests in unsupported language {lang!r}")
        case.unit_lang = LANG_ALIASES[lang]
        if run_langs is not None and case.unit_lang not in run_langs:
            test_dirs = (*support_dirs, _NOT_RUN)
        else:
            test_dirs = tuple(support_dirs)
        for k, t in enumerate(ut["tests"]):
            if isinstance(t, str):
                case.unit_tests.append(UnitTest(reference=t, source=f"tests[{k}]"))
                continue
            if "path" in t:
                ref, src = _read(case_dir, t["path"], test_dirs, path, "unit-test program"), t["path"]
            elif "content" in t:
                ref, src = t["content"], f"tests[{k}]"
            else:
                raise CaseError(f"{path}: unit_test tests[{k}] needs 'path' or 'content'")
            case.unit_tests.append(UnitTest(
                reference=ref, source=src, weight=float(t.get("weight", 1.0)), prefix=t.get("prefix", ""),
                prefix_from_file=_read(case_dir, t["prefix_path"], test_dirs, path, "unit-test prefix")
                if t.get("prefix_path") else "",
                timeout=float(t["timeout"]) if t.get("timeout") is not None else None,
                cleanup=_read(case_dir, t["cleanup_path"], test_dirs, path, "unit-test cleanup")
                if t.get("cleanup_path") else "",
                only_longest=bool(t.get("only_longest", False))))

    if "similarity" in g:
        if not isinstance(g["similarity"], list):
            raise CaseError(f"{path}: similarity must be a list of metrics")
        for k, m in enumerate(g["similarity"]):
            if m.get("metric") not in ("rouge1", "rouge2", "rougeL", "rougeLsum") or not m.get("references"):
                raise CaseError(f"{path}: similarity[{k}] needs a rouge metric and references")
            case.references.append([r if isinstance(r, str) else _read(case_dir, r["path"], support_dirs, path,
                                                                        "reference answer")
                                    for r in m["references"]])

    if "customized" in g:
        case.handlers["customized"] = _load_handler(g["customized"], case_dir, support_dirs, path)
    return case


def load_suite(suite_path: str) -> tuple[list[tuple[str, float]], dict[str, Any]]:
    """(case paths with weights, suite settings) from a suite YAML; paths are relative to its folder."""
    with open(suite_path) as f:
        suite = yaml.safe_load(f)
    if not isinstance(suite, dict) or not isinstance(suite.get("cases"), list):
        raise CaseError(f"{suite_path}: a suite needs a 'cases' list")
    base = os.path.dirname(os.path.abspath(suite_path))
    cases = []
    for c in suite["cases"]:
        rel, weight = (c, 1.0) if isinstance(c, str) else (c["path"], float(c.get("weight", 1.0)))
        cases.append((os.path.join(base, rel), weight))
    settings = {k: v for k, v in suite.items() if k != "cases"}
    return cases, settings
