"""InfiBench parity: our scores against the official evaluator's, response by response, on the dev suite.

Reads ``<root>/expected.jsonl`` + ``responses/*.jsonl.gz`` (the shipped GPT-4 / GPT-3.5 responses and
their official scores; see ``<root>/README.md``) through ``InfiBenchV.check_pairs`` and prints, per
grading kind and runtime, how many responses agree with the official score (|diff| < 1e-6), how many
were not run (no runtime for the language) and every disagreement. The unit-test programs and handler
modules are not shipped in the data folder: pass ``--support_dir`` = the ``cases_dev`` folder of an
infibench-evaluator checkout at commit 96cb098. Python unit tests run in the sandbox (about 2 s each,
mostly the official import header); ``--workers`` runs several at once.

    .venv/bin/python benchmarks/infibench_parity.py --support_dir /path/to/infibench-evaluator/cases_dev
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from viscodex_jax.eval.infibench.benchmark import InfiBenchV, reduce_scores  # noqa: E402
from viscodex_jax.eval.infibench.spec import Case  # noqa: E402

DEFAULT_ROOT = os.path.join(os.path.dirname(REPO), "shared", "benchmarks", "infibench")


def kind_of(item) -> str:
    ref = item.reference
    if not isinstance(ref, Case):
        return "unreadable"
    kinds = "+".join(k for k in ("keywords", "blank_filling", "unit_test", "similarity", "customized") if k in ref.grading)
    return f"{kinds} ({ref.unit_lang})" if ref.unit_lang else kinds


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=DEFAULT_ROOT)
    p.add_argument("--support_dir", action="append", default=[], help="extra folder for test programs/handlers")
    p.add_argument("--workers", type=int, default=2, help="responses graded at once (unit tests run in subprocesses)")
    p.add_argument("--python", default=None, help="interpreter for Python unit tests (default: this one)")
    p.add_argument("--no_exec", action="store_true", help="skip unit-test cases (text graders only)")
    p.add_argument("--json_out", default=os.path.join(REPO, "runs", "benchmarks", "infibench_parity.json"))
    a = p.parse_args(argv)

    bench = InfiBenchV(support_dirs=a.support_dir, python=a.python, on_error="skip")
    pairs = [(i, it, resp, exp) for i, (it, resp, exp) in enumerate(bench.check_pairs(a.root))]
    meta = []
    with open(os.path.join(a.root, "expected.jsonl")) as f:
        for line in f:
            e = json.loads(line)
            meta.append((e["model"], e["case_id"], e["response_index"]))
    if a.no_exec:
        pairs = [x for x in pairs if not (isinstance(x[1].reference, Case) and x[1].reference.unit_lang)]
    t0 = time.time()

    done = [0]

    def grade(x):
        i, it, resp, exp = x
        got = bench.score(it, resp)
        done[0] += 1
        if done[0] % 200 == 0:
            print(f"{done[0]}/{len(pairs)} graded ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
        return i, it, exp, got

    with concurrent.futures.ThreadPoolExecutor(max(a.workers, 1)) as pool:
        graded = list(pool.map(grade, pairs))
    wall = time.time() - t0

    groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    disagreements, ours, theirs = [], collections.defaultdict(dict), collections.defaultdict(dict)
    for i, it, exp, got in graded:
        g = groups[kind_of(it)]
        g["pairs"] += 1
        model, cid, idx = meta[i]
        if "score_error" in got:
            g["unreadable"] += 1
        elif got.get("not_run"):
            g["not_run"] += 1
        elif abs(got["official_score"] - exp["official_score"]) < 1e-6:
            g["agree"] += 1
        else:
            g["disagree"] += 1
            disagreements.append({"model": model, "case": cid, "response_index": idx,
                                  "expected": exp["official_score"], "ours": got["official_score"],
                                  "detail": got.get("detail", got.get("error", ""))[:1500]})
        ours[model].setdefault(cid, {})[idx] = got.get("official_score", math.nan)
        theirs[model].setdefault(cid, {})[idx] = exp["official_score"]

    rows = ["| grading (runtime) | pairs | agree | disagree | not run | unreadable | agreement of graded |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    tot = collections.Counter()
    for k in sorted(groups):
        g = groups[k]
        tot.update(g)
        n = g["agree"] + g["disagree"]
        rows.append(f"| {k} | {g['pairs']} | {g['agree']} | {g['disagree']} | {g['not_run']} | {g['unreadable']} | "
                    f"{(100.0 * g['agree'] / n if n else float('nan')):.2f}% |")
    n = tot["agree"] + tot["disagree"]
    rows.append(f"| **all** | {tot['pairs']} | {tot['agree']} | {tot['disagree']} | {tot['not_run']} | "
                f"{tot['unreadable']} | {(100.0 * tot['agree'] / n if n else float('nan')):.2f}% |")

    with open(os.path.join(a.root, "summary.json")) as f:
        official = json.load(f)
    totals = {}
    for model, cases in ours.items():
        graded_ids = [c for c, v in cases.items() if all(not math.isnan(s) for s in v.values())]

        def total(table):
            return sum(reduce_scores([table[c][k] for k in sorted(table[c])], bench.reduce_mode) for c in graded_ids)

        totals[model] = {"cases_graded": len(graded_ids), "our_total_over_graded": total(cases),
                         "official_total_over_graded": total(theirs[model]),
                         "official_total_all_cases": official.get(model, {}).get("total")}
    table = "\n".join(rows) + "\n\n" + "\n".join(
        f"{m}: suite total over the {t['cases_graded']} graded cases: ours {t['our_total_over_graded']:.4f}, "
        f"official {t['official_total_over_graded']:.4f} (official over all cases {t['official_total_all_cases']:.4f})"
        for m, t in totals.items())
    if disagreements:
        table += "\n\nDisagreements:\n" + "\n".join(
            f"- {d['model']} {d['case']} #{d['response_index']}: official {d['expected']:.4f}, ours {d['ours']:.4f}"
            for d in disagreements)
    results = {"root": a.root, "support_dirs": a.support_dir, "wall_s": wall, "groups": {k: dict(v) for k, v in groups.items()},
               "totals": totals, "disagreements": disagreements, "markdown": table}
    os.makedirs(os.path.dirname(os.path.abspath(a.json_out)), exist_ok=True)
    with open(a.json_out, "w") as f:
        json.dump(results, f, indent=2)
    print(table)
    print(f"\nwrote {a.json_out} ({wall:.0f}s)", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
