"""Eval reports: summary.json, summary.md (next to the paper's table) and report.html (items side by side)."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from typing import Any

from viscodex_jax.eval import registry
from viscodex_jax.eval.base import Item
from viscodex_jax.eval.paper import PAPER_COLUMNS, RESULTS


def markdown_table(rows: dict[str, dict[str, float | None]], columns=None) -> str:
    """``columns`` default: every registered benchmark's columns and the paper's average."""
    columns = registry.table_columns() if columns is None else columns
    labels = registry.labels()
    cols = [c for c in columns if any(r.get(c) is not None for r in rows.values())]
    out = ["| model | " + " | ".join(labels.get(c, c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        out.append(f"| {name} | " + " | ".join("-" if r.get(c) is None else f"{r[c]:.1f}" for c in cols) + " |")
    return "\n".join(out)


def paper_rows() -> dict[str, dict[str, float | None]]:
    return {f"{m} (paper)": dict(zip(PAPER_COLUMNS, v)) for m, v in RESULTS.items()}


def our_row(summary: dict[str, Any]) -> dict[str, float | None]:
    return registry.table_row(summary["benchmarks"])


def _thumb(img, max_side: int = 320) -> str:
    im = img.copy()
    im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_reports(summary: dict[str, Any], out_dir: str, items: dict[str, list[Item]]) -> None:
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    rows = {f"{summary['model']} (ours)": our_row(summary), **paper_rows()}
    md = [f"# Evaluation of {summary['model']}", "", f"checkpoint: `{summary['checkpoint']}` "
          f"(fingerprint {summary['fingerprint']})", "", markdown_table(rows), "",
          "Per-benchmark details:", ""]
    for name, agg in summary["benchmarks"].items():
        md.append(f"- **{name}** ({agg['n_items']} items): " + ", ".join(
            f"{k} {v:.2f}" for k, v in agg.items() if isinstance(v, float) and k != "score_seconds"))
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(summary['model'])}</title>"
             "<style>body{font-family:sans-serif} td{vertical-align:top;border-top:1px solid #ccc;padding:6px}"
             "pre{max-width:640px;max-height:360px;overflow:auto;background:#f6f6f6}</style></head><body>",
             f"<h1>{html.escape(summary['model'])}</h1>", "<pre>" + html.escape(markdown_table(rows)) + "</pre>"]
    for name, its in items.items():
        path = os.path.join(out_dir, f"{name}_items.jsonl")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            scored = [json.loads(line) for line in f]
        by_id = {it.id: it for it in its}
        parts.append(f"<h2>{html.escape(name)}</h2><table>")
        for r in scored:
            it = by_id.get(r["id"])
            imgs = "".join(f"<img src='{_thumb(im)}'>" for im in (it.images if it else []))
            metrics = "<br>".join(f"{html.escape(k)}: {v:.3g}" for k, v in r.items() if isinstance(v, (int, float)))
            parts.append(f"<tr><td><b>{html.escape(str(r['id']))}</b><br>{metrics}</td><td>{imgs}</td>"
                         f"<td><pre>{html.escape(r['generation'])}</pre></td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write("\n".join(parts))
