"""The demo's measurements: benchmark evals, the VLM's descriptions, the image ablation, the lam sweep and
the task vectors' sizes. Each writes its files under the workdir and returns what its stage records.

Files (read by ``demo.report``):

    eval/<model>/<bench>_items.jsonl, summary.json     launch/eval.py's layout, per evaluated model
    eval/<model>_shuffled/chartmimic_items.jsonl       the same charts, images shuffled across items
    ablation.json                                      score with own images vs shuffled, per model
    eval/vlm/describe.json                             the VLM's held-out descriptions and their accuracy
    sweep/{sweep.json,sweep.md,sweep.png}              merge.sweep.lambda_sweep's outputs
    sweep/per_benchmark.json                           ChartMimic and MMCode per lam
    sweep/eval/lam_<lam>/                              the per-item eval of each lam
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np

from viscodex_jax.eval.chartmimic.benchmark import ChartMimic

# evaluated models -> what the report calls them (the coder is text-only: MMCode only)
LABELS = {"vlm": "tiny VLM (no SFT)", "coder": "tiny coder (no merge, no SFT)",
          "vlm_sft": "tiny VLM + SFT (no merge)", "merged_sft": "tiny VisCodex (merge + SFT)"}
EVAL_MODELS = tuple(LABELS)
ABLATION_MODELS = ("vlm_sft", "merged_sft")
PAPER_LAM = 0.7


def write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def settings(c):
    from viscodex_jax.eval.runner import EvalSettings

    return EvalSettings(max_new_tokens=c.max_new_tokens, batch_size=c.eval_batch_size)


def roots(d: dict[str, str], model: str = "vlm") -> dict[str, str]:
    if model == "coder":
        return {"mmcode": d["heldout_mmcode"]}
    return {"chartmimic": d["heldout_chartmimic"], "mmcode": d["heldout_mmcode"]}


def item_counts(d: dict[str, str]) -> dict[str, int]:
    with open(d["heldout_charts"]) as f:
        n_charts = len(json.load(f))
    with open(os.path.join(d["heldout_mmcode"], "mmcode_test.jsonl")) as f:
        n_problems = sum(1 for line in f if line.strip())
    return {"chartmimic": n_charts, "mmcode": n_problems}


def evaluate_model(c, m: str, d: dict[str, str]) -> dict[str, float]:
    """The held-out benchmarks on ``<workdir>/models/<m>``, greedy, with launch/eval.py's defaults otherwise."""
    from viscodex_jax.eval.runner import run_eval

    summary = run_eval(os.path.join(c.workdir, "models", m), roots(d, m), os.path.join(c.workdir, "eval", m),
                       settings(c), benchmarks={"chartmimic": chartmimic()}, model_name=LABELS[m])
    return {name: b["score"] for name, b in summary["benchmarks"].items()}


# ------------------------------------------------------------------------------------------------ ablation


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation without fixed points: item i gets the image of item perm[i] != i."""
    if n < 2:
        raise ValueError(f"the image ablation needs at least 2 held-out charts, got {n}")
    order = np.random.default_rng([seed, 3000]).permutation(n)
    perm = [0] * n
    for k in range(n):
        perm[int(order[k])] = int(order[(k + 1) % n])
    return perm


_CHARTMIMIC: list[ChartMimic] = []


def chartmimic() -> ChartMimic:
    """One ChartMimic for every eval of the demo's process: it runs each reference program once (its cache),
    not once per evaluated model, lam and ablation."""
    if not _CHARTMIMIC:
        _CHARTMIMIC.append(ChartMimic())
    return _CHARTMIMIC[0]


class ShuffledChartMimic(ChartMimic):
    """ChartMimic whose items carry another item's image (a seeded derangement); references unchanged."""

    def __init__(self, seed: int, **kw):
        super().__init__(**kw)
        self.seed = seed

    def reference_info(self, item):
        return chartmimic().reference_info(item)

    def load(self, root: str, limit: int | None = None):
        items = super().load(root, limit)
        perm = derangement(len(items), self.seed)
        return [dataclasses.replace(it, images=items[p].images) for it, p in zip(items, perm)]


def image_ablation(c, d: dict[str, str]) -> dict[str, Any]:
    """Each ablation model on the held-out charts with shuffled images -> ``ablation.json``."""
    from viscodex_jax.eval.runner import run_eval

    rows = []
    for m in ABLATION_MODELS:
        with open(os.path.join(c.workdir, "eval", m, "summary.json")) as f:
            own = json.load(f)["benchmarks"]["chartmimic"]
        summary = run_eval(os.path.join(c.workdir, "models", m), {"chartmimic": d["heldout_chartmimic"]},
                           os.path.join(c.workdir, "eval", f"{m}_shuffled"), settings(c),
                           benchmarks={"chartmimic": ShuffledChartMimic(c.seed)},
                           model_name=f"{LABELS[m]}, images shuffled")
        shuf = summary["benchmarks"]["chartmimic"]
        rows.append({"model": m, "n_items": own["n_items"], "score": own["score"], "score_shuffled": shuf["score"],
                     "drop": own["score"] - shuf["score"]})
    out = {"benchmark": "chartmimic", "rows": rows,
           "shuffle": f"a seeded derangement of the held-out images (seed {c.seed}): no chart keeps its own"}
    write_json(os.path.join(c.workdir, "ablation.json"), out)
    return out


# ------------------------------------------------------------------------------------------------ describe


def describe_accuracy(c, m: str, d: dict[str, str]) -> dict[str, Any]:
    """The model's descriptions of the held-out charts (the VLM's training task) and how often each part
    (kind, colour, count, title) is right -> ``eval/<m>/describe.json``."""
    from PIL import Image

    import viscodex_jax as vx
    from viscodex_jax.data.encode import to_hf_messages
    from viscodex_jax.demo import toy
    from viscodex_jax.demo.data import DESCRIBE_PROMPT

    with open(d["heldout_charts"]) as f:
        held = json.load(f)
    specs = [toy.ChartSpec(h["kind"], h["color"], tuple(h["values"]), h["title"]) for h in held]
    model = vx.load(os.path.join(c.workdir, "models", m))
    msgs = to_hf_messages([{"role": "user", "content": DESCRIBE_PROMPT}])
    texts = []
    for i in range(0, len(held), c.eval_batch_size):
        part = held[i:i + c.eval_batch_size]
        images = [[Image.open(h["image"]).convert("RGB")] for h in part]
        texts += vx.generate(model, [msgs] * len(part), images=images, max_new_tokens=40)
    out = {"n_items": len(held), "accuracy": toy.description_accuracy(specs, texts),
           "items": [{"id": h["id"], "reference": toy.describe_chart(s), "generation": t}
                     for h, s, t in zip(held, specs, texts)]}
    os.makedirs(os.path.join(c.workdir, "eval", m), exist_ok=True)
    write_json(os.path.join(c.workdir, "eval", m, "describe.json"), out)
    return {"n_items": out["n_items"], "accuracy": out["accuracy"]}


# ------------------------------------------------------------------------------------------------ task vectors


def task_vector_norms(m) -> dict[str, Any]:
    """|theta_model - theta_base| / |theta_base| over the language-model tensors the merge combines."""
    from viscodex_jax import checkpoint
    from viscodex_jax.utils import flatten

    _, base = checkpoint.load_hf_params(m.base_dir)
    base = flatten(base)
    out = {"base_norm": float(np.sqrt(sum(float(np.sum(np.square(np.asarray(v, np.float64)))) for v in base.values())))}
    for name, path in (("vlm", m.vlm_dir), ("coder", m.coder_dir)):
        _, p = checkpoint.load_hf_params(path)
        p = flatten(p)
        common = [k for k in base if k in p and np.shape(p[k]) == np.shape(base[k])]
        sq = sum(float(np.sum(np.square(np.asarray(p[k], np.float64) - np.asarray(base[k], np.float64))))
                 for k in common)
        out[f"tau_{name}_norm"] = float(np.sqrt(sq))
        out[f"tau_{name}_relative"] = out[f"tau_{name}_norm"] / out["base_norm"]
    return out


# ------------------------------------------------------------------------------------------------ sweep


def _file_hash(d: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(d)):
        if name.endswith(".safetensors"):
            with open(os.path.join(d, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def sweep(c, merge_cfg, d: dict[str, str]) -> dict[str, Any]:
    """``lambda_sweep`` over ``c.sweep_lams``, each lam's merge (before SFT) scored on the held-out charts and
    problems; the sweep's own score is the mean of the two (both 0-100)."""
    from viscodex_jax.eval.runner import model_generate_fn, run_eval
    from viscodex_jax.merge.sweep import lambda_sweep, parse_sweep_lams

    lams = parse_sweep_lams(c.sweep_lams)
    out_dir = os.path.join(c.workdir, "sweep")
    m = merge_cfg.copy_and_resolve_references()
    m.out_dir = out_dir
    inputs = {k: _file_hash(getattr(m, k)) for k in ("base_dir", "vlm_dir", "coder_dir")}
    s = settings(c)
    rows: list[dict[str, Any]] = []

    def score(model, lam: float) -> float:
        ident = json.dumps({"lam": lam, "method": m.method, "inputs": inputs}, sort_keys=True)
        summary = run_eval(os.path.join(out_dir, f"lam_{lam:g}"), roots(d), os.path.join(out_dir, "eval", f"lam_{lam:g}"),
                           s, generate_fn=model_generate_fn(model, s), benchmarks={"chartmimic": chartmimic()},
                           model_name=f"merged, lam={lam:g}, before SFT",
                           model_fingerprint=hashlib.sha256(ident.encode()).hexdigest()[:16])
        b = summary["benchmarks"]
        rows.append({"lam": lam, "chartmimic": b["chartmimic"]["score"], "mmcode": b["mmcode"]["score"],
                     "n_chartmimic": b["chartmimic"]["n_items"], "n_mmcode": b["mmcode"]["n_items"]})
        return (rows[-1]["chartmimic"] + rows[-1]["mmcode"]) / 2

    result = lambda_sweep(m, lams, score=score, higher_is_better=True)
    if [r["lam"] for r in rows] != lams:
        raise RuntimeError(f"sweep: scored lams {[r['lam'] for r in rows]}, expected {lams}")
    out = {"rows": rows, "paper_lam": PAPER_LAM, "scored_model": "merged, before SFT",
           "sweep_score": "mean of ChartMimic low-level and MMCode pass@1", "best_lam": result["best_lam"]}
    write_json(os.path.join(out_dir, "per_benchmark.json"), out)
    return out
