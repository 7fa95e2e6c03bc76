"""Compile-check table: do the 8B / 33B recipes fit the TPU slices they name? (ahead of time, no TPU needed)

What it does:

1. For each run ``CONFIG[:PRESET][@TOPOLOGY]`` (e.g. ``configs/viscodex_8b.py:v5p-8``; the slice
   defaults to the preset's ``topology``), each remat policy and attention implementation asked
   for (default: the preset's own) and each rows-per-chip value of the sweep (default: the
   preset's own rows), one fresh ``launch/compile_check.py`` process (under the
   interpreter with libtpu: ``.venv-tpu/bin/python`` or $VISCODEX_TPU_PYTHON) compiles the SFT
   step for the slice with the real model shape (VisCodex-8B = Qwen2.5-VL-7B's, 33B =
   Qwen2.5-VL-32B's; no weights) and reads XLA's per-chip memory. The first rows value of each
   sweep also compiles the sampler's prefill and decode step. A sweep stops at the first rows
   value that does not fit (``--keep_going`` to continue).
2. ``--set k=v`` overrides go to every run as ``--config.k=v``; the default sets
   ``data.patches_per_row=4096`` and ``data.max_len=4096``, the issue's goal setting (the configs
   budget 16384 patches per row).
3. Prints a Markdown table (program, slice, rows per chip, tokens per chip, per-chip GiB, fits,
   accumulation steps, compile s, remat policy, attention) plus the train step's FLOPs per token (6N + attention
   against the program's matmuls, so each remat policy's recompute is visible), and writes JSON
   to ``--json_out`` (each run's own JSON under ``runs/benchmarks/compile_check/``).

Run from the repository root (a fitting 7B step takes minutes to compile on 2 cores; an
out-of-memory verdict comes sooner)::

    .venv/bin/python benchmarks/compile_check.py                      # the default runs below
    .venv/bin/python benchmarks/compile_check.py --issue_table        # the issue's six rows (preset tpu)
    .venv/bin/python benchmarks/compile_check.py --runs configs/viscodex_8b.py:v5p-8 \
        --rows 1,2,4,6,8 --remat dots,full
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import _harness as h
from viscodex_jax.aot.topologies import GIB, tpu_python

REPO = h.REPO

# Built-in shape per config file (the merged models have their VLM base's architecture).
MODEL_OF = {"viscodex_8b.py": "qwen2.5-vl-7b", "viscodex_33b.py": "qwen2.5-vl-32b"}
# The issue's goals: 8B on v5p-8 / v6e-8, flat per-chip memory from 4 to 64 chips; 33B on v5p-64.
DEFAULT_RUNS = (
    "configs/viscodex_8b.py:v5p-8",
    "configs/viscodex_8b.py:v6e-8",
    "configs/viscodex_8b.py:v5p-32",
    "configs/viscodex_8b.py:v5p-128",
    "configs/viscodex_33b.py:v5p-64",
    "configs/viscodex_33b.py:v5p-128",
)
DEFAULT_SET = ("data.patches_per_row=4096", "data.max_len=4096")
# The issue's table: the `tpu` preset with FSDP over the whole slice, 4096 patches per row.
ISSUE_ROWS = (  # (topology, tokens per row, remat)
    ("v5p:2x2x1", 4096, "dots"), ("v5p:2x2x4", 4096, "dots"), ("v5p:2x2x1", 2048, "dots"),
    ("v5p:2x2x2", 2048, "dots"), ("v5p:2x2x1", 4096, "full"), ("v5p:2x2x2", 4096, "full"),
)


def model_for(config_spec: str, override: str) -> str:
    if override:
        return override
    name = os.path.basename(config_spec.split(":")[0])
    if name not in MODEL_OF:
        raise SystemExit(f"--model is needed for {config_spec} (known: {', '.join(MODEL_OF)})")
    return MODEL_OF[name]


def run_one(a, config_spec: str, topology: str, rows: int, sets: list[str], programs: str, out: str) -> dict:
    cmd = [tpu_python(REPO), os.path.join(REPO, "launch", "compile_check.py"), f"--config={config_spec}",
           f"--model_config={model_for(config_spec, a.model)}", f"--rows_per_chip={rows}", f"--programs={programs}",
           f"--prompt_len={a.prompt_len}", f"--cache_len={a.cache_len}", f"--json_out={out}"]
    cmd += ([f"--topology={topology}"] if topology else []) + [f"--config.{s}" for s in sets]
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    if os.path.exists(out):  # never read a previous run's JSON
        os.remove(out)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=a.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 and not os.path.isfile(out):  # a program that did not build still writes its JSON
        tail = proc.stderr.strip().splitlines()[-5:]
        print(f"  failed ({proc.returncode}): {' | '.join(tail)}", file=sys.stderr, flush=True)
        return {"config": config_spec, "topology": topology, "rows_per_chip": rows, "sets": sets,
                "failed": "\n".join(tail), "wall_s": wall}
    with open(out) as f:
        (report,) = json.load(f)["reports"]
    print("  " + "; ".join(f"{r['program']}: " + (
        f"error {r['error']}" if r["error_kind"] not in (None, "out_of_memory") else
        f"{'fits' if r['fits'] else 'does not fit'} (peak {(r.get('peak_bytes') or 0) / GIB:.1f} GiB, "
        f"temp {(r.get('temp_bytes') or 0) / GIB:.1f})") for r in report["results"]), file=sys.stderr, flush=True)
    return {"config": config_spec, "topology": topology, "rows_per_chip": rows, "sets": sets, "report": report,
            "wall_s": wall}


def sweep(a, config_spec: str, topology: str, rows_list: list[int], sets: list[str], tag: str) -> list[dict]:
    runs = []
    for i, rows in enumerate(rows_list):
        programs = "train,prefill,decode" if i == 0 and not a.train_only else "train"
        out = os.path.join(a.runs_dir, f"{tag}_r{rows}.json")
        r = run_one(a, config_spec, topology, rows, sets, programs, out)
        runs.append(r)
        train = [x for x in r.get("report", {}).get("results", []) if x["program"] == "train"]
        if not a.keep_going and (not train or not train[0].get("fits")):
            break
    return runs


def _tag(*parts: str) -> str:
    return "_".join(p.replace("/", "-").replace(":", "-").replace(".py", "").replace("=", "-") for p in parts if p)


def table(runs: list[dict]) -> str:
    lines = ["| program | config | slice | chips | rows/chip | tokens/chip | accum | temp GiB | peak GiB per chip "
             "| HBM GiB | fits | fits 90% | compile s | remat | attention |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|---|"]
    flops = ["| config | remat | attention | slice | rows/chip | 6N_total | 6N_trainable | 6N_matmul | 12LTd | "
             "formula (6N_matmul + 12LTd + vision) | program matmuls | program ÷ formula |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        if "report" not in run:
            lines.append(f"| — | {run['config']} | {run['topology']} | | {run['rows_per_chip']} | | | | | | failed: "
                         f"{run['failed'].splitlines()[-1][:120] if run['failed'] else '?'} | | | | |")
            continue
        rep = run["report"]
        for r in rep["results"]:
            if r["compiled"]:
                fits = "yes" if r["fits"] else "**no**"
            elif r.get("error_kind") == "out_of_memory":
                fits = "**no** (XLA: out of memory)"
            else:
                fits = f"**error**: {r['error'][:100]}"
            head = {True: "yes", False: "no"}.get(r.get("fits_headroom"), "—")
            peak = f"{r['peak_bytes'] / GIB:.1f}" if r.get("peak_bytes") is not None else "—"
            temp = f"{r['temp_bytes'] / GIB:.1f}" if r.get("temp_bytes") is not None else "—"
            accum = r.get("accum_steps", 1)
            per_chip_tokens = r["tokens"] / rep["chips"] / accum  # per micro-step, as rows/chip
            lines.append(f"| {r['program']} | {run['config']} | {rep['topology']} | {rep['chips']} | "
                         f"{r['rows_per_chip']:g} | {per_chip_tokens:g} | {accum} | {temp} | {peak} | "
                         f"{rep['hbm_bytes'] / GIB:.1f} | {fits} | {head} | {r['compile_s']:.0f} | "
                         f"{rep['remat_policy']} | {rep['attention_impl']} |")
            f = r.get("flops")
            if f:
                p = f["per_token"]
                g = lambda x: f"{x / 1e9:.1f}"  # noqa: E731
                flops.append(f"| {run['config']} | {rep['remat_policy']} | {rep['attention_impl']} | "
                             f"{rep['topology']} | {r['rows_per_chip']:g} | {g(p['6n_total'])} | "
                             f"{g(p['6n_trainable'])} | {g(p['6n_matmul'])} | {g(p['attention_dense_12LTd'])} | "
                             f"{g(p['formula_dense'])} | {g(f['program_matmul_per_token'])} | "
                             f"{f['program_over_formula_dense']:.2f} |")
    return "\n".join(
        ["Per-chip memory from XLA:TPU's ahead-of-time compile (launch/compile_check.py; no TPU used). "
         "peak = arguments + outputs - aliased (donated) + temporaries. fits 90%: peak within 90% of HBM. "
         "An out-of-memory row shows the temporaries XLA names. prefill / decode rows: the sampler "
         "(rows = sampler slots).", ""] + lines
        + ["", "Train step FLOPs per token (GFLOP). 6N with N = all params / trained params / the LLM's matmul "
           "weights; 12LTd = dense attention (causal: half); program matmuls = every dot in the traced step "
           "(scans x length, remat recompute included).", ""] + flops)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", nargs="*", default=list(DEFAULT_RUNS), help="CONFIG[:PRESET][@TOPOLOGY] ...")
    p.add_argument("--rows", default="0", help="rows-per-chip sweep for the train step, ascending "
                   "(0: the preset's data.batch_size)")
    p.add_argument("--remat", default="", help="comma-separated remat policies (default: each config's own)")
    p.add_argument("--attention", default="", help="comma-separated attention_impl values (default: the config's)")
    p.add_argument("--set", nargs="*", default=list(DEFAULT_SET), help="config overrides k=v for every run")
    p.add_argument("--model", default="", help="model shape for every run (default: by config file name)")
    p.add_argument("--prompt_len", type=int, default=2048)
    p.add_argument("--cache_len", type=int, default=4096)
    p.add_argument("--train_only", action="store_true", help="skip the sampler's prefill / decode")
    p.add_argument("--keep_going", action="store_true", help="compile larger rows after one does not fit")
    p.add_argument("--issue_table", action="store_true", help="the issue's six rows instead of --runs")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per compile_check process")
    p.add_argument("--runs_dir", default=os.path.join(REPO, "runs", "benchmarks", "compile_check"))
    p.add_argument("--json_out", default=os.path.join(REPO, "runs", "benchmarks", "compile_check.json"))
    a = p.parse_args(argv)
    os.makedirs(a.runs_dir, exist_ok=True)
    t_start = time.perf_counter()
    runs: list[dict] = []
    if a.issue_table:
        for topo, tokens, remat in ISSUE_ROWS:
            sets = ["mesh.shape=(1,-1,1)", "data.patches_per_row=4096", f"data.max_len={tokens}",
                    f"model.remat_policy={remat}"] + [s for s in a.set if s not in DEFAULT_SET] + \
                ([f"model.attention_impl={a.attention}"] if a.attention else [])
            out = os.path.join(a.runs_dir, _tag("issue", topo, str(tokens), remat) + ".json")
            runs.append(run_one(a, "configs/viscodex_8b.py:tpu", topo, 1, sets, "train", out))
    else:
        rows = [int(r) for r in a.rows.split(",") if r]
        remats = [r for r in a.remat.split(",") if r] or [""]
        attns = [x for x in a.attention.split(",") if x] or [""]
        for spec in a.runs:
            config_spec, _, topology = spec.partition("@")
            for remat in remats:
                for attn in attns:
                    sets = list(a.set) + ([f"model.remat_policy={remat}"] if remat else []) + \
                        ([f"model.attention_impl={attn}"] if attn else [])
                    runs += sweep(a, config_spec, topology, rows, sets, _tag(config_spec, topology, remat, attn))
    results = dict(machine=h.machine_info(), args=vars(a), runs=runs)
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results["wall_s"] = time.perf_counter() - t_start
    h.publish(results, table(runs), a.json_out)


if __name__ == "__main__":
    main(sys.argv[1:])
