"""Runs the convert, merge, decode, train-step and compile-check benchmarks; writes one Markdown results page.

    .venv/bin/python benchmarks/run_all.py                 # the full form: under 30 min on 2 quiet cores
    .venv/bin/python benchmarks/run_all.py --quick         # under 5 min: fewer repeats, one case each
    .venv/bin/python benchmarks/run_all.py --collect_only  # rebuild the page from the scripts' last JSON

Each script prints its own table and writes JSON (the full form under runs/benchmarks/, the quick one
under runs/benchmarks/quick/); this collects their tables (ours next to transformers / mergekit,
ratios, peak RSS, floors) with the machine they ran on into benchmarks/RESULTS.md (the quick form:
runs/benchmarks/quick/RESULTS.md, so a quick check never replaces the page the README links). Run it
on a quiet machine: every table records how much CPU other processes took while it ran. The first
run also builds the random checkpoints the scripts share (a few minutes, not counted in the budgets).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import _harness as h

# script -> (arguments of the full form, of the quick form; None: left out of that form). The full form fits
# 30 min on 2 quiet cores: convert takes 2 alternating rounds (its default 3 took 10-14 min under load), merge
# one round of ties and dare_ties (mergekit takes 30-70 s per run there; task_arithmetic keeps 2 rounds);
# compile_check is the one 8B preset (v5p-8, train step only): minutes per compile, with .venv-tpu from
# launch/setup_env.sh (its full sweep, `compile_check.py` alone, takes hours here).
PLAN = {
    "convert": (["--repeats", "2"], ["--quick", "--repeats", "1", "--warmup", "0"]),
    "merge": (["--sparse_repeats", "1"], ["--cases", "0.5b", "--methods", "task_arithmetic"]),
    "decode": ([], ["--repeats", "1", "--prefill_repeats", "1", "--no_ablation", "--workload", "fixed"]),
    "train_step": ([], ["--quick"]),
    "compile_check": (["--runs", "configs/viscodex_8b.py:v5p-8", "--train_only"], None),
}
BUDGET_S = {"full": 30 * 60, "quick": 5 * 60}


def page(names: list[str], json_dir: str, form: str, seconds: dict[str, float]) -> str:
    parts = ["# Benchmark results", "", f"Machine: {h.machine_line(h.machine_info())}.", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/run_all.py"
             f"{' --quick' if form == 'quick' else ''}` from each script's JSON in "
             f"`{os.path.relpath(json_dir, h.REPO)}/`. Speed and memory are never asserted in tests.", ""]
    if seconds:
        parts += [f"Whole run: {sum(seconds.values()) / 60:.1f} min ({form} form; budget "
                  f"{BUDGET_S[form] / 60:.0f} min on 2 quiet cores).", ""]
    for name in names:
        path = os.path.join(json_dir, f"{name}.json")
        parts += [f"## {name}", ""]
        if not os.path.isfile(path):
            parts += [f"(no results: run `benchmarks/{name}.py`)", ""]
            continue
        with open(path) as f:
            res = json.load(f)
        parts.append(res.get("markdown") or "```\n" + json.dumps(res, indent=1)[:4000] + "\n```")
        if name in seconds:
            parts.append(f"\n(whole script: {seconds[name]:.0f} s)")
        parts.append("")
    return "\n".join(parts) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the quick form (see PLAN): under 5 min")
    p.add_argument("--collect_only", action="store_true", help="do not run; rebuild the page from existing JSON")
    p.add_argument("--only", default="", help="comma-separated subset of " + ",".join(PLAN))
    p.add_argument("--out", default="", help="the page (default: benchmarks/RESULTS.md; quick: in its JSON dir)")
    args = p.parse_args()
    form = "quick" if args.quick else "full"
    json_dir = os.path.join(h.RESULTS_DIR, "quick") if args.quick else h.RESULTS_DIR
    out = args.out or (os.path.join(json_dir, "RESULTS.md") if args.quick
                       else os.path.join(h.REPO, "benchmarks", "RESULTS.md"))
    names = [n for n in args.only.split(",") if n] or list(PLAN)
    unknown = sorted(set(names) - set(PLAN))
    if unknown:
        p.error(f"--only: unknown scripts {unknown} (known: {', '.join(PLAN)})")
    names = [n for n in names if PLAN[n][form == "quick"] is not None]
    seconds: dict[str, float] = {}
    if not args.collect_only:
        h.warn_if_loaded()
        for name in names:
            cmd = [sys.executable, os.path.join(h.REPO, "benchmarks", f"{name}.py"), *PLAN[name][form == "quick"],
                   "--json_out", os.path.join(json_dir, f"{name}.json")]
            print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
            t0 = time.time()
            subprocess.run(cmd, check=True, cwd=h.REPO)
            seconds[name] = time.time() - t0
        total = sum(seconds.values())
        if total > BUDGET_S[form]:
            print(f"warning: the {form} form took {total / 60:.1f} min, over its {BUDGET_S[form] / 60:.0f} min budget",
                  file=sys.stderr)
    text = page(names, json_dir, form, seconds)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
