"""InfiBench's text graders with the official semantics (``grader_utils.py`` at commit 96cb098).

Official behaviours kept on purpose, because the published scores include them:
* keywords: a top-level rule's ``regex`` is ignored (only a nested ``content``
  mapping's ``regex`` counts); ``to_lower`` lowercases the pattern too (so a
  regex ``\\S`` becomes ``\\s``); nested ``to_lower`` is ignored; a ``neg`` rule
  subtracts its weight when found and adds nothing to the total.
* blank filling: the template is aligned with the response by the official LCS
  (its quirky first row/column, tie-breaking towards later matches, the
  one-character look-ahead and numpy's wrap-around when the back-pointer is -1);
  below 80% of the template's non-blank characters matched, every blank fails.
* similarity: ``rouge_score`` F-measure (no stemming, default tokenizer), the
  best over references as HF ``evaluate``'s rouge does, normalised by
  ``clip((raw - min) / (max - min), 0, 1)`` with defaults min 0.3 and max 0.53
  (rouge1) or 0.51.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

import numpy as np

from viscodex_jax.eval.infibench.spec import parse_cond


def _cond_ok(cond: str, context: list[str]) -> bool:
    idx, op, text = parse_cond(cond, "keyword cond")
    try:
        val = context[idx]
    except IndexError:
        # the official eval raises here, which errors the whole case; a false match is the closest we can score
        return False
    return val.startswith(text) if op == "startswith" else val == text


def keyword_match(rule: Any, to_lower: bool, regex: bool, response: str, context: list[str]) -> bool:
    if isinstance(rule, str):
        if to_lower:
            rule, response = rule.lower(), response.lower()
        return re.search(rule, response) is not None if regex else rule in response
    regex = rule.get("regex", regex)
    if "or" in rule:
        ans = any([keyword_match(c, to_lower, regex, response, context) for c in rule["or"]])
    elif "and" in rule:
        ans = all([keyword_match(c, to_lower, regex, response, context) for c in rule["and"]])
    else:
        ans = keyword_match(rule["content"], to_lower, regex, response, context)
    if "cond" in rule:
        ans = ans and _cond_ok(rule["cond"], context)
    return ans


def grade_keywords(rules: list, response: str, post_handler: Callable | None = None) -> tuple[float, float, list]:
    ans, tot, status = 0.0, 0.0, []
    for rule in rules:
        if isinstance(rule, str):
            content, weight, to_lower, neg = rule, 1.0, False, False
        else:
            if "post_handler" in rule:
                continue
            content, weight = rule["content"], float(rule.get("weight", 1.0))
            to_lower, neg = bool(rule.get("to_lower", False)), bool(rule.get("neg", False))
        if keyword_match(content, to_lower, False, response, status):
            status.append("match")
            ans += -weight if neg else weight
        else:
            status.append("unmatch")
        tot += 0.0 if neg else weight
    if post_handler is not None:
        ans, tot, _ = post_handler(ans, tot, status)
    return ans, tot, status


@functools.lru_cache(maxsize=1)
def _lcs_kernel():
    try:
        import numba
    except ImportError as e:  # the official uses numba too; pure Python would take minutes per case
        raise ImportError("InfiBench blank_filling needs numba (pip install 'viscodex_jax[eval]')") from e

    @numba.njit(cache=True)  # compiled once per machine, not per process
    def lcs(t, r):
        n, m = t.shape[0], r.shape[0]
        f = np.zeros((n, m), dtype=np.int64)
        s_all = np.zeros((n, m), dtype=np.int64)
        for i in range(n):
            for j in range(m):
                if i * j > 0:
                    if t[i] == r[j]:
                        f[i, j] = f[i - 1, j - 1] + 1
                        s_all[i, j] = j
                    else:
                        left, up = f[i, j - 1], f[i - 1, j]
                        f[i, j] = max(left, up)
                        if left == up:
                            s_all[i, j] = max(s_all[i, j - 1], s_all[i - 1, j])
                        elif left >= up:
                            s_all[i, j] = s_all[i, j - 1]
                        else:
                            s_all[i, j] = s_all[i - 1, j]
                elif t[i] == r[j]:
                    f[i, j] = 1
                    s_all[i, j] = j
        s = np.zeros(n, dtype=np.int64)
        p = s_all[n - 1, m - 1]
        for i in range(n - 1, -1, -1):
            if t[i] == r[p]:
                s[i] = p
            else:
                s[i] = p + 1  # the official one-character look-ahead
            if i > 0 and t[i] == r[p]:
                q = p - 1
                if q < 0:
                    q += m  # numpy wrap-around, as in the official njit code
                p = s_all[i - 1, q]
        return f[n - 1, m - 1], s

    return lcs


def lcs_align(template: str, response: str) -> tuple[int, np.ndarray]:
    """(LCS length as the official DP reports it, per-template-character response index)."""
    t = np.frombuffer(template.encode("utf-32-le"), dtype=np.uint32)
    r = np.frombuffer(response.encode("utf-32-le"), dtype=np.uint32)
    length, s = _lcs_kernel()(t, r)
    return int(length), s


def _fill(target_content: Any, response_str: str, to_lower: bool, substr: bool) -> tuple[bool, str]:
    """(matched, the official status text): handlers parse that text, so it is built the same way."""
    anses = [target_content] if isinstance(target_content, str) else target_content
    status = "unmatched"
    for a in anses:
        a_str = a if isinstance(a, str) else a["content"]
        a_re = False if isinstance(a, str) else a.get("regex", False)
        if not isinstance(a, str) and a.get("cond") is not None:
            raise ValueError(f"blank_filling cond {a['cond']!r} is not supported")
        status = f"response string: {response_str}, ans: {a_str}"
        if to_lower:  # the official lowercases response_str in place: later alternatives see it lowercased
            response_str, a_str = response_str.lower(), a_str.lower()
        if substr:
            ok = (a_str in response_str) if not a_re else re.search(a_str, response_str) is not None
        else:
            ok = (response_str == a_str) if not a_re else re.fullmatch(a_str, response_str) is not None
        if ok:
            return True, "matched: " + status
    return False, "unmatched: " + status


def grade_blank_filling(cfg: dict, response: str, post_handler: Callable | None = None) -> tuple[float, float, list]:
    template, blank = cfg["template"], cfg.get("blank_str", "[blank]")
    escape, targets = cfg.get("escape", " '\"`"), cfg["targets"]
    response = cfg.get("prefix", "") + response
    if response == "":
        response = " "
    length, s = lcs_align(template, response)
    places = [i for i in range(len(template)) if template.startswith(blank, i)]
    rate = length / (len(template) - len(places) * len(blank))
    now, tot, details = 0.0, 0.0, []
    for no, target in enumerate(targets):
        weight = 1.0 if isinstance(target, str) else target.get("weight", 1.0)
        to_lower = False if isinstance(target, str) else target.get("to_lower", False)
        substr = False if isinstance(target, str) else target.get("substr_match", False)
        tot += weight
        if rate < 0.8:
            details.append(f"unmatched: match rate too low - {rate}")
            continue
        end = s[places[no] + len(blank)]
        start = s[places[no]] if places[no] == 0 else s[places[no] - 1] + 1
        response_str = response[start:end].strip(escape)
        ok, status = _fill(target if isinstance(target, str) else target["content"], response_str, to_lower, substr)
        now += weight if ok else 0.0
        details.append(status)
    if post_handler is not None:
        now, tot, _ = post_handler(now, tot, details)
    return now, tot, details


@functools.lru_cache(maxsize=4)
def _rouge_scorer(metric: str):
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise ImportError("InfiBench similarity needs rouge-score (pip install 'viscodex_jax[eval]')") from e
    return rouge_scorer.RougeScorer([metric], use_stemmer=False)


def grade_similarity(metrics: list[dict], references: list[list[str]], response: str) -> tuple[float, float, list]:
    now, tot, details = 0.0, 0.0, []
    for m, refs in zip(metrics, references):
        scorer = _rouge_scorer(m["metric"])
        raw = max(scorer.score(ref, response)[m["metric"]].fmeasure for ref in refs)
        lo = float(m.get("min_score", 0.3))
        hi = float(m["max_score"]) if "max_score" in m else (0.53 if m["metric"] == "rouge1" else 0.51)
        norm = max(min((raw - lo) / (hi - lo), 1.0), 0.0)
        w = m.get("weight", 1.0)
        tot += w
        now += norm * w
        details.append({m["metric"]: raw, "normalized_score": norm})
    return now, tot, details
