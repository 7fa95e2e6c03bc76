"""Config -> merge: the VisCodex recipe, its output formats, and the lambda sweep."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Sequence

import numpy as np

from viscodex_jax.merge import MergeError, MergeSpec
from viscodex_jax.merge_checkpoints import merge_checkpoints

log = logging.getLogger(__name__)

# Held-out texts for the default sweep score until benchmark scoring is wired in: short programs.
DEFAULT_HELDOUT = (
    "import matplotlib.pyplot as plt\nplt.bar(['a', 'b', 'c'], [3, 1, 2], color='tab:blue')\nplt.title('Sales')\nplt.show()\n",
    "def two_sum(nums, target):\n    seen = {}\n    for i, x in enumerate(nums):\n        if target - x in seen:\n            return seen[target - x], i\n        seen[x] = i\n",
    "<html><body><h1>Welcome</h1><p>Sign up for our newsletter.</p><button>Join</button></body></html>\n",
)


def spec_from_config(c) -> MergeSpec:
    if not 0.0 <= c.lam <= 1.0:
        raise MergeError(f"--config.lam must be in [0, 1], got {c.lam}")
    exclude = tuple(p for p in c.exclude.split(",") if p) if c.exclude else ()
    if not c.merge_embeddings:
        exclude += (r"^model/embed_tokens/", r"^lm_head/")
    groups = ()
    if c.attn_lam >= 0:
        groups = ((r"/self_attn/", (c.attn_lam, 1.0 - c.attn_lam)),)
    return MergeSpec(method=c.method, weights=(c.lam, 1.0 - c.lam), lam=c.scale, density=c.density, seed=c.seed,
                     dare_rescale=c.dare_rescale, exclude=exclude, group_weights=groups, out_dtype=c.out_dtype)


def _require(c, *names):
    for n in names:
        if not getattr(c, n):
            raise MergeError(f"--config.{n} is required (a local checkpoint directory)")
        if n.endswith("_dir") and n != "out_dir" and not os.path.isdir(getattr(c, n)):
            raise MergeError(f"--config.{n}={getattr(c, n)!r} is not a directory")


def run_merge(c, out_dir: str | None = None, spec: MergeSpec | None = None) -> dict[str, Any]:
    """One merge from a config: HF dir (+ optional orbax dir); returns the report."""
    _require(c, "base_dir", "vlm_dir", "coder_dir", "out_dir")
    out_dir = out_dir or c.out_dir
    report = merge_checkpoints(c.base_dir, [c.vlm_dir, c.coder_dir], out_dir, spec or spec_from_config(c),
                               max_shard_bytes=int(c.max_shard_mb * 10**6), overwrite=c.overwrite)
    if c.orbax_dir:
        from viscodex_jax import checkpoint

        checkpoint.convert_hf_to_orbax(out_dir, c.orbax_dir, overwrite=c.overwrite)
    return report


def heldout_loss(ckpt_dir: str, texts: Sequence[str]) -> float:
    """Mean next-token NLL of ``texts`` under a checkpoint (lower is better)."""
    import jax
    import jax.numpy as jnp

    import viscodex_jax as vx

    model = vx.load(ckpt_dir, param_dtype=np.float32)
    tok = model.processor.tokenizer
    total, count = 0.0, 0
    for text in texts:
        ids = np.array([tok.encode(text, add_special_tokens=False)], np.int32)
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        pos = np.arange(ids.shape[1], dtype=np.int32)[None]
        batch["positions"] = np.broadcast_to(pos, (3,) + pos.shape) if model.config.is_multimodal else pos
        logits = model.logits(batch)
        lp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), -1)
        nll = -jnp.take_along_axis(lp, jnp.asarray(ids[0, 1:, None]), -1)
        total += float(nll.sum())
        count += ids.shape[1] - 1
    return total / count


def lambda_sweep(c, lams: Sequence[float], score: Callable[[str], float] | None = None,
                 higher_is_better: bool = False) -> dict[str, Any]:
    """Merges once per lam into ``<out_dir>/lam_<lam>`` and scores each; returns the table and the best lam.

    The paper picked lam = 0.7 from {0.7, 0.8, 0.85, 0.9} by MMCode pass@1. Until
    evaluation is plugged in, the default score is the held-out loss.
    """
    _require(c, "base_dir", "vlm_dir", "coder_dir", "out_dir")
    if score is None:
        texts = DEFAULT_HELDOUT
        if c.heldout_jsonl:
            with open(c.heldout_jsonl) as f:
                texts = [json.loads(line)["text"] for line in f if line.strip()]
        score = lambda d: heldout_loss(d, texts)  # noqa: E731
    rows = []
    for lam in lams:
        sub = c.copy_and_resolve_references()
        sub.lam = float(lam)
        sub.orbax_dir = ""
        out = os.path.join(c.out_dir, f"lam_{lam:g}")
        run_merge(sub, out_dir=out)
        s = float(score(out))
        log.info("lam=%g score=%.5f", lam, s)
        rows.append({"lam": float(lam), "score": s, "dir": out})
    best = (max if higher_is_better else min)(rows, key=lambda r: r["score"])
    result = {"rows": rows, "best_lam": best["lam"], "higher_is_better": higher_is_better}
    with open(os.path.join(c.out_dir, "sweep.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result
