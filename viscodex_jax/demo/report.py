"""The demo's report: what the toy models did, next to the paper, as a page people would rather look at.

``write_report`` reads the run directory and writes ``report.html`` (one self-contained file, images
as data URIs) and ``report.md`` (images under ``report_files/``) from the same blocks (``demo.html``).
Sections whose inputs the run lacks (no ablation, no sweep, a model never evaluated) are left out;
an input that exists but does not have its expected layout is an error naming the file.

Inputs under the run directory:

    eval/<model>/summary.json, <bench>_items.jsonl   the eval runner's outputs (launch/eval.py layout);
                                                      eval/<model>_shuffled/ (the ablation's runs) not in the table
    eval/vlm/describe.json                            {"n_items", "accuracy": {property: %}, "items": [{"id",
                                                       "reference", "generation"}]}: the VLM's descriptions
    scores.json                                       the pipeline's summary; its "task_vectors" ({"tau_vlm_relative",
                                                       "tau_coder_relative"}) if present
    models/<model>/config.json                        the models' shape, for the opening line
    train/<run>/metrics.jsonl                         loss curves
    data/heldout_chartmimic/<folder>/<id>.png         reference charts
    ablation.json                                     {"benchmark", "rows": [{"model", "n_items", "score",
                                                       "score_shuffled", "drop"}]}
    sweep/sweep.png, sweep/sweep.json                 merge.sweep.lambda_sweep's outputs
    sweep/per_benchmark.json                          {"rows": [{"lam", "chartmimic", "mmcode", "n_chartmimic",
                                                       "n_mmcode"}], "paper_lam", "scored_model", "sweep_score"}

and ``benchmarks/RESULTS.md`` of the checkout (``demo.recipe_table``) for what the real recipe needs.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import math
import os
import re
from typing import Any

from viscodex_jax.demo import html as H
from viscodex_jax.demo.figures import draw_generation, loss_plot, sweep_plot
from viscodex_jax.demo.recipe_table import HOW_TO_MAKE, TableError, read_compile_check
from viscodex_jax.eval.paper import PAPER_COLUMNS, RESULTS

MODELS = {"vlm": "tiny VLM (no SFT)", "vlm_sft": "tiny VLM + SFT (no merge)", "merged_sft": "tiny VisCodex (merge + SFT)"}
LABELS = {**MODELS, "coder": "tiny coder (no merge, no SFT)"}
ABLATION_SUFFIX = "_shuffled"  # eval/<model>_shuffled/: the image ablation's runs, shown in its own section
PAPER_ANALOGUE = {"vlm": "Qwen2.5-VL-7B-Instruct", "vlm_sft": "VisCodex-8B, no merge", "merged_sft": "VisCodex-8B"}
COLUMNS = ("chartmimic", "mmcode")
TITLE = "VisCodex in miniature"
N_BEST = N_WORST = 3


def label(key: str) -> str:
    return LABELS.get(key, key)


# ------------------------------------------------------------------------------------------------ inputs

def _load_json(path: str, what: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e}); expected {what}") from None


def _require(rec: Any, keys: tuple[str, ...], path: str, what: str) -> None:
    missing = [k for k in keys if not isinstance(rec, dict) or k not in rec]
    if missing:
        raise ValueError(f"{path}: {what} lacks {missing}")


def _items(path: str) -> list[dict[str, Any]]:
    """A runner's ``<bench>_items.jsonl``, first sample of each item ([] without the file)."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n}: not JSON ({e}); expected an eval runner item row") from None
                _require(r, ("id", "score"), f"{path} line {n}", "an item row")
                if r.get("sample", 0) == 0:
                    rows.append(r)
    return rows


def _num(v: Any) -> float | None:
    """A score as a float (JSON writes 50.0 as 50), so every score prints with the same digits."""
    return None if v is None else float(v)


def _eval_models(wd: str) -> dict[str, dict[str, Any]]:
    """model key -> its eval summary's benchmarks, for every ``eval/<key>/summary.json`` (pipeline order first)."""
    found = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(wd, "eval", "*", "summary.json")))
    found = [k for k in found if not k.endswith(ABLATION_SUFFIX)]
    order = [k for k in LABELS if k in found] + [k for k in found if k not in LABELS]
    out = {}
    for k in order:
        path = os.path.join(wd, "eval", k, "summary.json")
        s = _load_json(path, "the eval runner's summary")
        _require(s, ("benchmarks",), path, "an eval summary")
        out[k] = s["benchmarks"]
    return out


def _passes(wd: str, model: str, benches: dict[str, Any]) -> tuple[dict[str, bool], int, int] | None:
    """MMCode (per-item passed, passes, items) of a model; per-item only when its items file exists."""
    if "mmcode" not in benches:
        return None
    rows = _items(os.path.join(wd, "eval", model, "mmcode_items.jsonl"))
    if rows:
        per = {str(r["id"]): bool(r.get("passed", r["score"] > 0)) for r in rows}
        return per, sum(per.values()), len(per)
    b = benches["mmcode"]
    n = int(b.get("n_items", 0))
    return {}, round(b["score"] * n / 100), n


def _model_shape(wd: str) -> str:
    for m in ("merged_sft", "vlm_sft", "vlm"):
        path = os.path.join(wd, "models", m, "config.json")
        if os.path.isfile(path):
            c = _load_json(path, "an HF config")
            t, v = c.get("text_config", c), c.get("vision_config", {})
            return (f"{t.get('num_hidden_layers', '?')} decoder layers of width {t.get('hidden_size', '?')}, "
                    f"a {v.get('depth', '?')}-layer vision tower")
    return "tiny models"


# ------------------------------------------------------------------------------------------------ sections

def _scores_section(evals: dict[str, dict[str, Any]]) -> list[H.Block]:
    paper_of = {k: tuple(dict(zip(PAPER_COLUMNS, v))[c] for c in COLUMNS) for k, v in RESULTS.items()}
    ours = []
    for k, b in evals.items():
        cm, mm = b.get("chartmimic", {}), b.get("mmcode", {})
        analogue = PAPER_ANALOGUE.get(k)
        p_cm, p_mm = paper_of.get(analogue, (None, None))
        ours.append([label(k), cm.get("score"), mm.get("score"), cm.get("n_items"), mm.get("n_items"),
                     analogue or "-", p_cm, p_mm])
    paper = [[f"{k} (paper)", *v] for k, v in paper_of.items()]
    return [H.Heading("Scores on held-out items, next to the paper's"),
            H.Para("ChartMimic: the low-level score (mean of the Text, Layout, Type and Colour F1) on held-out "
                   "charts; MMCode: pass@1 on held-out programming problems. Each of our models sits next to the "
                   "paper's model in the same role. Ours are toy models on generated data, the paper's 8B-72B "
                   "models on the real benchmarks: compare the ordering of the rows, not the values."),
            H.Table(["model (ours)", "ChartMimic", "MMCode pass@1", "charts", "problems", "paper analogue",
                     "paper ChartMimic", "paper MMCode"], ours, numeric=[False, True, True, True, True, False, True, True]),
            H.Table(["model (paper)", "ChartMimic", "MMCode pass@1"], paper, numeric=[False, True, True],
                    caption="Jiang et al., ICLR 2026, main table")]


def _mcnemar_p(a: dict[str, bool], b: dict[str, bool]) -> float | None:
    """Exact two-sided McNemar test on the items both models were scored on (None without per-item rows)."""
    common = set(a) & set(b)
    if not common:
        return None
    x = sum(a[i] and not b[i] for i in common)
    y = sum(b[i] and not a[i] for i in common)
    n = x + y
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(x, y) + 1)) / 2 ** n)


def _sweep_sentence(rec: dict[str, Any]) -> str:
    """MMCode along the sweep: the VLM alone (lam = 1) against the best lam and the paper's."""
    rows = {r["lam"]: r for r in rec["rows"]}
    best = max(rec["rows"], key=lambda r: (r["mmcode"], -r["lam"]))
    parts = [f"In the sweep ({rec.get('scored_model') or 'merged model'}), MMCode pass@1 is "
             + (f"{float(rows[1]['mmcode']):.1f} at lam = 1 (the VLM alone), " if 1 in rows else "")
             + f"{float(best['mmcode']):.1f} at best (lam = {best['lam']:g})"]
    paper = rec.get("paper_lam")
    if paper in rows:
        parts.append(f"{float(rows[paper]['mmcode']):.1f} at the paper's lam = {paper:g}")
    n = rec["rows"][0].get("n_mmcode")
    return ", ".join(parts) + (f", on {n} problems." if n else ".")


def _transfer_section(wd: str, evals: dict[str, dict[str, Any]],
                      sweep: dict[str, Any] | None) -> tuple[list[H.Block], dict[str, Any]]:
    got = {m: _passes(wd, m, evals[m]) for m in ("merged_sft", "vlm_sft", "coder") if m in evals}
    got = {m: v for m, v in got.items() if v is not None}
    if "merged_sft" not in got or "vlm_sft" not in got:
        return [], {}
    (pm, a, n), (pv, b, nv) = got["merged_sft"], got["vlm_sft"]
    p = _mcnemar_p(pm, pv)
    ptxt = f" (exact paired test on the {len(set(pm) & set(pv))} shared problems: p = {p:.2g})" if p is not None else ""
    counts = (f"merged + SFT passes {a} of {n} held-out problems ({100 * a / max(n, 1):.1f}%), "
              f"VLM + SFT (no merge) {b} of {nv} ({100 * b / max(nv, 1):.1f}%)")
    if a > b and p is not None and p < 0.05:
        verdict, text = "yes", f"Yes: merging transferred coding ability at this scale. {counts}{ptxt}."
    elif a > b:
        verdict, text = "not shown", (f"Not shown: {counts}{ptxt}; with this few problems the difference is "
                                      "within chance, so this run does not show that merging transferred coding "
                                      "ability.")
    else:
        verdict, text = "no", f"No: merging did not transfer coding ability at this scale. {counts}{ptxt}."
    blocks = [H.Heading("Did merging transfer coding ability?"), H.Para(text, strong=True)]
    rows = [[label(m), v[1], v[2], 100 * v[1] / max(v[2], 1)] for m, v in got.items()]
    blocks.append(H.Table(["model", "problems passed", "problems", "MMCode pass@1"], rows))
    if "coder" in got:
        c = got["coder"]
        blocks.append(H.Para(f"The coder alone passes {c[1]} of {c[2]}: that is the coding ability the merge "
                             "had to transfer."))
    if sweep is not None:
        blocks.append(H.Para(_sweep_sentence(sweep)))
    return blocks, {"verdict": verdict, "merged_sft": [a, n], "vlm_sft": [b, nv], "p_value": p}


def _ablation_section(wd: str) -> tuple[list[H.Block], list[dict[str, Any]]]:
    path = os.path.join(wd, "ablation.json")
    if not os.path.isfile(path):
        return [], []
    rec = _load_json(path, "the image ablation")
    _require(rec, ("rows",), path, "the image ablation")
    rows = rec["rows"]
    for i, r in enumerate(rows):
        _require(r, ("model", "n_items", "score", "score_shuffled", "drop"), path, f"ablation row {i}")
    bench = rec.get("benchmark", "chartmimic")
    blocks = [H.Heading("Does the model look at the image?"),
              H.Para(f"The held-out {bench} items scored again with each item's image swapped for another item's "
                     "(the same images, shuffled). A model that reads its image loses points; a model that writes "
                     "the same chart whatever it sees does not." + (f" Shuffle: {rec['shuffle']}." if rec.get("shuffle")
                                                                       else ""))]
    for r in rows:
        change = f"drops its score by {r['drop']:.1f} points" if r["drop"] > 0 else "does not lower its score"
        tail = "" if r["drop"] > 0 else ": no sign that it uses the image"
        blocks.append(H.Para(f"{label(r['model'])}: shuffling the images {change} ({float(r['score']):.1f} -> "
                             f"{float(r['score_shuffled']):.1f} on {r['n_items']} items){tail}.", strong=True))
    blocks.append(H.Table(["model", "items", "score", "score, images shuffled", "drop"],
                          [[label(r["model"]), r["n_items"], _num(r["score"]), _num(r["score_shuffled"]),
                            _num(r["drop"])] for r in rows]))
    return blocks, rows


def _describe_section(wd: str) -> list[H.Block]:
    """The VLM's own task before any visual coding: describing held-out charts (``eval/vlm/describe.json``)."""
    path = os.path.join(wd, "eval", "vlm", "describe.json")
    if not os.path.isfile(path):
        return []
    rec = _load_json(path, "the VLM's held-out descriptions")
    _require(rec, ("n_items", "accuracy"), path, "the VLM's held-out descriptions")
    acc = rec["accuracy"]
    blocks: list[H.Block] = [
        H.Heading("What the VLM sees"),
        H.Para(f"Before any visual coding, the VLM was trained to describe charts. On {rec['n_items']} held-out charts "
               "(new values and titles), the share of descriptions that name each property right:"),
        H.Table(["property", "% right"], [[k, _num(v)] for k, v in acc.items()])]
    items = rec.get("items") or []
    if items:
        blocks.append(H.Details(f"its descriptions of the first {min(8, len(items))} held-out charts", [H.Table(
            ["chart", "true description", "the VLM's description"],
            [[str(r.get("id", "")), str(r.get("reference", "")), str(r.get("generation", ""))] for r in items[:8]])]))
    return blocks


def _task_vector_para(wd: str) -> list[H.Block]:
    """|tau| / |base| of the two fine-tunes, from the pipeline's ``scores.json`` (``task_vectors``)."""
    path = os.path.join(wd, "scores.json")
    tv = (_load_json(path, "the demo's summary") or {}).get("task_vectors") if os.path.isfile(path) else None
    if not tv or "tau_vlm_relative" not in tv or "tau_coder_relative" not in tv:
        return []
    return [H.Para(f"Task vectors relative to the base (L2 over the merged tensors): |VLM - base| / |base| = "
                   f"{tv['tau_vlm_relative']:.3f}, |coder - base| / |base| = {tv['tau_coder_relative']:.3f} "
                   "(task arithmetic assumes both are small next to the base, as real fine-tunes of a large pretrained "
                   "model are; a few hundred steps on a tiny model move it further, so read the merge results with "
                   "that in mind).")]


def _sweep_scores(wd: str) -> dict[str, Any] | None:
    """``sweep/per_benchmark.json`` with its rows sorted by lam (None without the file)."""
    per = os.path.join(wd, "sweep", "per_benchmark.json")
    if not os.path.isfile(per):
        return None
    rec = _load_json(per, "the sweep's per-benchmark scores")
    _require(rec, ("rows",), per, "the sweep's per-benchmark scores")
    if not rec["rows"]:
        raise ValueError(f"{per}: the sweep's per-benchmark scores have no rows (one per lam expected)")
    for i, r in enumerate(rec["rows"]):
        _require(r, ("lam", "chartmimic", "mmcode"), per, f"sweep row {i}")
    return {**rec, "rows": sorted(rec["rows"], key=lambda r: r["lam"])}


def _sweep_section(wd: str, files: str, rec: dict[str, Any] | None) -> list[H.Block]:
    d = os.path.join(wd, "sweep")
    if not os.path.isdir(d):
        return []
    blocks: list[H.Block] = [H.Heading("Merge weight sweep"),
                             H.Para("merged = base + lam * (VLM - base) + (1 - lam) * (coder - base), vision tower "
                                    "from the VLM: lam = 1 is the VLM alone, lam = 0 puts the coder's task vector "
                                    "in its place.")]
    if rec is not None:
        rows, paper_lam = rec["rows"], rec.get("paper_lam")
        png = os.path.join(files, "sweep_benchmarks.png")
        sweep_plot(rows, paper_lam, png)
        if rec.get("scored_model"):
            blocks.append(H.Para(f"Scored model at each lam: {rec['scored_model']}."))
        blocks.append(H.Image(png, "ChartMimic and MMCode against lam"))
        mark = lambda lam: f"{lam:g} (paper)" if paper_lam is not None and lam == paper_lam else f"{lam:g}"  # noqa: E731
        blocks.append(H.Table(["lam", "ChartMimic", "charts", "MMCode pass@1", "problems"],
                              [[mark(r["lam"]), _num(r["chartmimic"]), r.get("n_chartmimic"), _num(r["mmcode"]),
                                r.get("n_mmcode")]
                               for r in rows], numeric=[False, True, True, True, True]))
    summ = os.path.join(d, "sweep.json")
    if os.path.isfile(summ):
        s = _load_json(summ, "lambda_sweep's sweep.json")
        _require(s, ("best_lam", "metric"), summ, "lambda_sweep's sweep.json")
        metric = (rec or {}).get("sweep_score") if s["metric"] == "score" else s["metric"]
        blocks.append(H.Para(f"The sweep command (merge.sweep.lambda_sweep) picks lam = {s['best_lam']:g} by "
                             f"{metric or s['metric']}"
                             f"{' (higher is better)' if s.get('higher_is_better') else ' (lower is better)'}."))
    if os.path.isfile(os.path.join(d, "sweep.png")):
        blocks.append(H.Image(os.path.join(d, "sweep.png"), "the sweep command's plot"))
    return blocks if len(blocks) > 2 else []


def _reference_png(wd: str, item_id: str) -> str | None:
    hits = sorted(glob.glob(os.path.join(wd, "data", "heldout_chartmimic", "*", f"{glob.escape(item_id)}.png")))
    return hits[0] if hits else None


def _examples(wd: str, files: str) -> tuple[list[H.Block], list[str]]:
    """Best and worst held-out charts of merged + SFT (else the first model with ChartMimic items), with what
    its code and the no-merge model's code draw."""
    models = [m for m in ("merged_sft", "vlm_sft", "vlm") if os.path.isfile(
        os.path.join(wd, "eval", m, "chartmimic_items.jsonl"))]
    if not models:
        return [], []
    shown = models[:2]
    items = {m: {str(r["id"]): r for r in _items(os.path.join(wd, "eval", m, "chartmimic_items.jsonl"))} for m in shown}
    ranked = sorted(items[shown[0]].values(), key=lambda r: (-r["score"], str(r["id"])))
    pick = ranked[:N_BEST] + [r for r in ranked[max(N_BEST, len(ranked) - N_WORST):]]
    blocks: list[H.Block] = [
        H.Heading(f"Held-out charts: the best and worst of {label(shown[0])}"),
        H.Para(f"Up to {N_BEST} best and {N_WORST} worst of the {len(ranked)} held-out charts by {label(shown[0])}'s "
               "score. Each row: the reference chart, then what each model's answer draws when run as the scorer "
               "runs it (in the sandbox, tick labels cleared as the scorer's text metric does), with its ChartMimic "
               "score. The answers are under 'code'.")]
    jobs = [(str(r["id"]), m, items[m][str(r["id"])]) for r in pick for m in shown if str(r["id"]) in items[m]]
    outs = [os.path.join(files, re.sub(r"[^A-Za-z0-9_.-]", "_", f"{m}_{rid}") + ".png") for rid, m, _ in jobs]
    # each drawing is one sandbox process: a few at a time
    with concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        whys = list(pool.map(lambda j: draw_generation(j[0][2].get("generation", ""), j[1]), zip(jobs, outs)))
    drawn = {(rid, m): (row, out, why) for (rid, m, row), out, why in zip(jobs, outs, whys)}
    for rank, r in enumerate(pick):
        rid = str(r["id"])
        tiles = [H.Tile("reference", _reference_png(wd, rid), "reference image not found")]
        code = []
        for m in shown:
            if (rid, m) in drawn:
                row, out, why = drawn[(rid, m)]
                tiles.append(H.Tile(f"{label(m)}: {row['score']:.1f}", None if why else out, why))
                code.append((f"code: {label(m)}", row.get("generation", "")))
        blocks.append(H.SideBySide(f"{rid} ({'best' if rank < N_BEST else 'worst'})", tiles, code))
    return blocks, [str(r["id"]) for r in pick]


def _timing_section(seconds: dict[str, float], parity: dict[str, Any]) -> list[H.Block]:
    total = sum(seconds.values()) or 1.0
    rows = [[k, v, 100 * v / total] for k, v in seconds.items()] + [["total", total, 100.0]]
    blocks: list[H.Block] = [H.Heading("Pipeline"),
                             H.Table(["stage", "seconds", "% of the run"], rows)]
    if parity:
        diff = parity.get("max_abs_logit_diff")
        prows = [["max |logit difference|, our Flax forward vs transformers (fp32, chat prompt with an image)",
                  "-" if diff is None else f"{diff:.2e}"],
                 ["HF -> orbax -> HF round trip bit-identical", H.fmt(parity.get("roundtrip_bit_identical"))]]
        if "prompt_tokens" in parity:
            prows.append(["prompt tokens", str(parity["prompt_tokens"])])
        for k, name in (("top5_ours", "next-token top 5, ours"), ("top5_transformers", "next-token top 5, transformers")):
            if k in parity:
                prows.append([name, " ".join(repr(t) for t in parity[k])])
        blocks += [H.Heading("Parity with transformers", 3), H.Table(["check", "result"], prows)]
    return blocks


def _recipe_section() -> tuple[list[H.Block], int]:
    blocks: list[H.Block] = [H.Heading("What the real recipe needs")]
    try:
        t = read_compile_check()
    except (FileNotFoundError, TableError) as e:
        blocks.append(H.Para(f"No committed compile_check table could be read ({e}). It is made by {HOW_TO_MAKE}."))
        return blocks, 0
    blocks.append(H.Para(f"The 8B and 33B presets' SFT step on TPU slices, as committed in {t['source']} "
                         "(section compile_check): " + t["note"].replace("`", "")))
    numeric = [False, False, False, True, True, True, True, False, True, True, False]
    blocks.append(H.Table(t["header"], t["rows"], numeric=numeric[:len(t["header"])]))
    return blocks, len(t["rows"])


def _flatten(d: dict[str, Any], prefix: str = "") -> list[list[str]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append([f"{prefix}{k}", json.dumps(v) if not isinstance(v, str) else v])
    return out


# ------------------------------------------------------------------------------------------------ the report

def write_report(workdir: str, seconds: dict[str, float], parity: dict[str, Any], config: dict[str, Any]):
    """Writes ``<workdir>/report.html`` and ``report.md``; returns what they show (JSON-serialisable)."""
    wd = workdir
    files = os.path.join(wd, "report_files")
    os.makedirs(files, exist_ok=True)
    evals = _eval_models(wd)
    scores = {k: {c: b[c]["score"] for c in COLUMNS if c in b} for k, b in evals.items()}

    sweep_scores = _sweep_scores(wd)
    transfer, verdict = _transfer_section(wd, evals, sweep_scores)
    ablation, ablation_rows = _ablation_section(wd)
    sweep = _sweep_section(wd, files, sweep_scores)
    examples, example_ids = _examples(wd, files)
    loss_png = os.path.join(files, "loss.png")
    curves = loss_plot(wd, loss_png)
    recipe, n_recipe = _recipe_section()

    blocks: list[H.Block] = [H.Para(
        f"The whole VisCodex recipe (merge a VLM with a coder, then fine-tune on visual coding) on {_model_shape(wd)}, "
        "trained on generated data on CPU. The numbers say what these toy models did; they are not the paper's "
        "models and nothing is tuned to make the merge win.")] + _task_vector_para(wd)
    if evals:
        blocks += _scores_section(evals)
    blocks += transfer + _describe_section(wd) + ablation + sweep + examples
    if curves:
        blocks += [H.Heading("Training loss"), H.Image(loss_png, "training loss")]
    blocks += _timing_section(seconds, parity) + recipe
    if config:
        blocks.append(H.Details("Settings of this run", [H.Table(["setting", "value"], _flatten(dict(config)))]))

    H.write_atomic(os.path.join(wd, "report.md"), H.to_markdown(TITLE, blocks, wd))
    H.write_atomic(os.path.join(wd, "report.html"), H.to_html(TITLE, blocks))
    sections = [b.text for b in blocks if isinstance(b, H.Heading)]
    return {"scores": scores, "stage_seconds": seconds, "parity": parity, "loss_curves": curves,
            "examples": example_ids, "merge_transfer": verdict, "ablation": ablation_rows,
            "recipe_rows": n_recipe, "sections": sections}
