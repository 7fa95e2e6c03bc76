"""The report's pictures: loss curves, scores against lam, and what a model's chart code draws.

Model-written code runs only in the sandbox (``eval.chartmimic.programs.run_chart``), as the scorer
runs it; the PNG it returns is untrusted too, so it is decoded and re-encoded here (bounded size)
before a report embeds it.
"""

from __future__ import annotations

import io
import os
from typing import Any, Sequence

# Loss curves in pipeline order; any other run under <workdir>/train/ follows, sorted.
TRAIN_ORDER = ("base", "pretrain_base", "vlm", "coder", "merged_sft", "vlm_sft")
MAX_PIXELS = 2048 * 2048  # a drawn chart is 224 px a side; anything far larger is not a chart to show
THUMB = 448


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    plt = _plt()
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)


def loss_plot(workdir: str, out_png: str) -> list[str]:
    """Training loss of every run under ``<workdir>/train/`` that logged metrics; returns their names
    (none: no plot is written)."""
    from viscodex_jax.train.loop import read_metrics

    root = os.path.join(workdir, "train")
    found = sorted(os.listdir(root)) if os.path.isdir(root) else []
    names = [n for n in TRAIN_ORDER if n in found] + [n for n in found if n not in TRAIN_ORDER]
    curves = {}
    for n in names:
        m = [x for x in read_metrics(os.path.join(root, n)) if "loss" in x]
        if m:
            curves[n] = m
    if not curves:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=100)
    for n, m in curves.items():
        ax.plot([x["step"] for x in m], [x["loss"] for x in m], label=n)
    ax.set_xlabel("step")
    ax.set_ylabel("token-mean cross-entropy")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("training loss")
    _save(fig, out_png)
    return list(curves)


def sweep_plot(rows: Sequence[dict[str, Any]], paper_lam: float | None, out_png: str) -> None:
    """ChartMimic and MMCode pass@1 against lam (lam weights the VLM's task vector, 1 - lam the coder's)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=100)
    lams = [r["lam"] for r in rows]
    for key, label, marker in (("chartmimic", "ChartMimic (low-level)", "o"), ("mmcode", "MMCode pass@1", "s")):
        pts = [(r["lam"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=label)
    if paper_lam is not None:
        ax.axvline(paper_lam, color="#888", linestyle="--", label=f"paper's lam = {paper_lam:g}")
    ax.set_xlabel("lam (VLM share; 1 - lam: coder)")
    ax.set_ylabel("score")
    ax.set_xticks(sorted(set(lams + ([paper_lam] if paper_lam is not None else []))))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("merge weight sweep")
    _save(fig, out_png)


def safe_png(data: bytes, out_png: str) -> bool:
    """Decodes untrusted PNG bytes and writes a re-encoded copy (at most ``THUMB`` px a side); False when
    they are not a PNG of a sensible size."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        if im.format != "PNG" or im.width * im.height > MAX_PIXELS:
            return False
        im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return False
    im.thumbnail((THUMB, THUMB))
    tmp = f"{out_png}.tmp-{os.getpid()}.png"
    im.save(tmp, format="PNG")
    os.replace(tmp, out_png)
    return True


def draw_generation(generation: str, out_png: str) -> str:
    """Runs a model's answer as the ChartMimic scorer does (its first ```python block, in the sandbox) and
    saves what it drew; returns "" when a picture was written, else why not."""
    from viscodex_jax.eval.chartmimic.programs import generation_program, run_chart

    program = generation_program(generation)
    if program is None:
        return "no ```python block (scored 0)"
    res, _, png = run_chart(program, role="generation", render="chart.png")
    if not png:
        return "the code drew nothing" + ("" if res.ok else " (it failed in the sandbox)")
    return "" if safe_png(png, out_png) else "the sandbox returned no usable PNG"
