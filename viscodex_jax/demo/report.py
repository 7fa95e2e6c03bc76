"""The demo's report: stage timings, loss curves, the three models' scores next to the paper, examples."""

from __future__ import annotations

import base64
import html
import json
import os
from typing import Any

from viscodex_jax.eval.paper import RESULTS
from viscodex_jax.eval.report import markdown_table

MODELS = {"vlm": "tiny VLM (no SFT)", "vlm_sft": "tiny VLM + SFT (no merge)", "merged_sft": "tiny VisCodex (merge + SFT)"}
PAPER_ANALOGUE = {"vlm": "Qwen2.5-VL-7B-Instruct", "vlm_sft": "VisCodex-8B, no merge", "merged_sft": "VisCodex-8B"}
COLUMNS = ("chartmimic", "mmcode")


def _loss_plot(workdir: str, out_png: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from viscodex_jax.train.loop import read_metrics

    names = []
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    for name in ("vlm", "coder", "merged_sft", "vlm_sft"):
        m = read_metrics(os.path.join(workdir, "train", name))
        if m:
            ax.plot([x["step"] for x in m], [x["loss"] for x in m], label=name)
            names.append(name)
    ax.set_xlabel("step")
    ax.set_ylabel("token-mean cross-entropy")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("training loss")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return names


def _b64(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def _examples(workdir: str, files: str, n: int = 3) -> list[dict[str, Any]]:
    from viscodex_jax.eval.base import extract_code
    from viscodex_jax.eval.chartmimic.programs import run_chart

    path = os.path.join(workdir, "eval", "merged_sft", "chartmimic_items.jsonl")
    cm_root = os.path.join(workdir, "data", "heldout_chartmimic", "direct_demo")
    out = []
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        rows = [json.loads(line) for line in f][:n]
    for r in rows:
        _, _, png = run_chart(extract_code(r["generation"]), render="chart.png")
        drawn = None
        if png:
            drawn = os.path.join(files, f"{r['id']}_generated.png")
            with open(drawn, "wb") as g:
                g.write(png)
        out.append({"id": r["id"], "image": os.path.join(cm_root, f"{r['id']}.png"), "code": r["generation"],
                    "drawn": drawn, "score": r["score"]})
    return out


def write_report(workdir: str, seconds: dict[str, float], parity: dict[str, Any], config: dict[str, Any]):
    files = os.path.join(workdir, "report_files")
    os.makedirs(files, exist_ok=True)
    scores: dict[str, dict[str, float]] = {}
    for m in MODELS:
        with open(os.path.join(workdir, "eval", m, "summary.json")) as f:
            b = json.load(f)["benchmarks"]
        scores[m] = {c: b[c]["score"] for c in COLUMNS if c in b}
    loss_png = os.path.join(files, "loss.png")
    curves = _loss_plot(workdir, loss_png)
    examples = _examples(workdir, files)

    ours = {f"{MODELS[m]} ~ {PAPER_ANALOGUE[m]}": scores[m] for m in MODELS}
    paper = {f"{k} (paper)": {"chartmimic": v[2], "mmcode": v[4]} for k, v in RESULTS.items()
             if k in PAPER_ANALOGUE.values()}
    table = markdown_table({**ours, **paper}, columns=COLUMNS)
    timing = "\n".join(["| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in seconds.items()])
    md = ["# VisCodex in miniature", "",
          "Tiny models (2 layers, hidden 64, 4-layer vision tower) on generated data, CPU. The numbers say what "
          "these toy models did; they are not the paper's models and are not tuned to make the merge win.", "",
          "## Scores on held-out items", "", table, "",
          "ChartMimic: low-level score (mean of Text, Layout, Type, Color F1) on held-out charts; MMCode: pass@1 "
          "on held-out programming problems (new statements of task families seen in training).", "",
          "## Pipeline", "", timing, "",
          f"Parity (fp32, our Flax forward vs transformers, chat prompt with an image): max |logit diff| "
          f"{parity['max_abs_logit_diff']:.2e}; HF -> orbax -> HF round trip bit-identical: "
          f"{parity['roundtrip_bit_identical']}.", "",
          "## Training loss", "", "![loss](report_files/loss.png)", "",
          "## Held-out charts: reference, generated code (merged + SFT), and what that code draws", ""]
    for e in examples:
        md += [f"### {e['id']} (score {e['score']:.1f})", "", f"![reference]({os.path.relpath(e['image'], workdir)})",
               "", "```python", e["code"].strip(), "```", ""]
        md += [f"![generated]({os.path.relpath(e['drawn'], workdir)})" if e["drawn"] else "(the code drew nothing)", ""]
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")

    h = ["<html><head><meta charset='utf-8'><title>VisCodex in miniature</title><style>body{font-family:sans-serif;"
         "max-width:1000px} pre{background:#f6f6f6;padding:6px;overflow:auto} td{vertical-align:top;padding:6px}"
         "</style></head><body><h1>VisCodex in miniature</h1>",
         "<p>Tiny models on generated data (CPU). Honest toy numbers, next to the paper's.</p>",
         "<h2>Scores</h2><pre>" + html.escape(table) + "</pre>",
         "<h2>Pipeline</h2><pre>" + html.escape(timing) + "</pre>",
         f"<p>Parity max |logit diff| {parity['max_abs_logit_diff']:.2e}; round trip bit-identical "
         f"{parity['roundtrip_bit_identical']}.</p>",
         f"<h2>Training loss</h2><img src='{_b64(loss_png)}'>", "<h2>Held-out charts</h2><table>"]
    for e in examples:
        drawn = f"<img src='{_b64(e['drawn'])}' width=224>" if e["drawn"] else "(nothing drawn)"
        h.append(f"<tr><td><b>{html.escape(e['id'])}</b><br>score {e['score']:.1f}<br>"
                 f"<img src='{_b64(e['image'])}' width=224></td><td><pre>{html.escape(e['code'])}</pre></td>"
                 f"<td>{drawn}</td></tr>")
    h.append("</table></body></html>")
    with open(os.path.join(workdir, "report.html"), "w") as f:
        f.write("\n".join(h))
    return {"scores": scores, "stage_seconds": seconds, "parity": parity, "loss_curves": curves,
            "examples": [e["id"] for e in examples]}
