"""The main job on the embedded default: tiny checkpoints -> convert -> our forward vs transformers.

Later stages (merge, train, generate, score) extend this pipeline; each stage
is also a command of its own (see README).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def demo_chart(width: int = 160, height: int = 120, seed: int = 0):
    """A small bar chart drawn with PIL: the kind of image VisCodex turns into code."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.line([(15, 10), (15, height - 15), (width - 5, height - 15)], fill="black", width=1)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    for i, v in enumerate(rng.uniform(0.2, 1.0, 4)):
        x0 = 25 + i * 33
        d.rectangle([x0, height - 15 - v * (height - 30), x0 + 22, height - 16], fill=colors[i])
    return img


@dataclasses.dataclass
class StageTimer:
    times: dict[str, float] = dataclasses.field(default_factory=dict)

    def run(self, name: str, fn, *args, **kw):
        log.info("[%s] start", name)
        t0 = time.time()
        out = fn(*args, **kw)
        self.times[name] = time.time() - t0
        log.info("[%s] done in %.1fs", name, self.times[name])
        return out


def run_demo(workdir: str, seed: int = 0) -> dict[str, Any]:
    """Runs the pipeline; returns a summary (also written to ``<workdir>/summary.json``)."""
    import torch
    from transformers import AutoModelForImageTextToText

    import viscodex_jax as vx
    from viscodex_jax import checkpoint
    from viscodex_jax.tiny import ensure_tiny_checkpoints

    timer = StageTimer()
    paths = timer.run("make tiny checkpoints", ensure_tiny_checkpoints, os.path.join(workdir, "tiny"), seed)
    orbax_dir = os.path.join(workdir, "vlm_orbax")
    if not os.path.isdir(orbax_dir):
        timer.run("convert HF -> orbax", checkpoint.convert_hf_to_orbax, paths["vlm"], orbax_dir)
    model = timer.run("load orbax", vx.load, orbax_dir)
    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Write matplotlib code that reproduces this chart."}]}]
    batch = model.processor([messages], images=[[demo_chart(seed=seed)]])
    ours = np.asarray(timer.run("our forward (jit)", model.logits, batch))

    hf = AutoModelForImageTextToText.from_pretrained(paths["vlm"], attn_implementation="eager").eval()
    with torch.no_grad():
        ref = timer.run("transformers forward", lambda: hf(
            input_ids=torch.tensor(batch["input_ids"]).long(),
            attention_mask=torch.tensor(batch["attention_mask"]),
            position_ids=torch.tensor(batch["positions"]).long(),
            pixel_values=torch.tensor(batch["pixel_values"]),
            image_grid_thw=torch.tensor(batch["image_grid_thw"]),
        ).logits.numpy())
    max_diff = float(np.abs(ours - ref).max())

    export_dir = os.path.join(workdir, "vlm_export_hf")
    timer.run("export orbax -> HF", checkpoint.convert_orbax_to_hf, orbax_dir, export_dir, overwrite=True)
    reloaded = AutoModelForImageTextToText.from_pretrained(export_dir).eval()
    src = dict(hf.state_dict())
    roundtrip_equal = all(torch.equal(src[k], v) for k, v in reloaded.state_dict().items())

    tok = model.processor.tokenizer
    last_ours, last_ref = ours[0, -1], ref[0, -1]
    top = [
        (tok.decode([int(a)]), float(last_ours[a]), tok.decode([int(b)]), float(last_ref[b]))
        for a, b in zip(np.argsort(-last_ours)[:5], np.argsort(-last_ref)[:5])
    ]
    summary = {
        "prompt_tokens": int(batch["input_ids"].shape[1]),
        "image_grid_thw": batch["image_grid_thw"].tolist(),
        "image_tokens": int((batch["input_ids"] == model.config.image_token_id).sum()),
        "max_abs_logit_diff": max_diff,
        "roundtrip_bit_identical": bool(roundtrip_equal),
        "top5_last_position": top,
        "stage_seconds": timer.times,
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"prompt: {s['prompt_tokens']} tokens, image grid {s['image_grid_thw']} -> {s['image_tokens']} image tokens",
        "",
        "top-5 next tokens at the last position",
        f"{'ours':>16} {'logit':>9}   | {'transformers':>16} {'logit':>9}",
    ]
    for a, la, b, lb in s["top5_last_position"]:
        lines.append(f"{a!r:>16} {la:>9.5f}   | {b!r:>16} {lb:>9.5f}")
    lines += [
        "",
        f"max |logit diff| ours vs transformers (fp32, all positions): {s['max_abs_logit_diff']:.3g}",
        f"HF -> orbax -> HF round trip bit-identical: {s['roundtrip_bit_identical']}",
        "stage timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in s["stage_seconds"].items()),
    ]
    return "\n".join(lines)
