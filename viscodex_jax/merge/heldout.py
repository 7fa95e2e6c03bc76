"""Scoring a model by its mean next-token loss on held-out texts (the sweep's default score)."""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from viscodex_jax.merge.spec import MergeError

# Held-out texts for the default sweep score: short programs of the three kinds VisCodex writes.
DEFAULT_HELDOUT = (
    "import matplotlib.pyplot as plt\nplt.bar(['a', 'b', 'c'], [3, 1, 2], color='tab:blue')\nplt.title('Sales')\nplt.show()\n",
    "def two_sum(nums, target):\n    seen = {}\n    for i, x in enumerate(nums):\n        if target - x in seen:\n            return seen[target - x], i\n        seen[x] = i\n",
    "<html><body><h1>Welcome</h1><p>Sign up for our newsletter.</p><button>Join</button></body></html>\n",
)


def heldout_loss(model: Any, texts: Sequence[str]) -> float:
    """Mean next-token NLL of ``texts`` under a ``vx.Model`` (lower is better)."""
    import jax
    import jax.numpy as jnp

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


def read_heldout_jsonl(path: str) -> list[str]:
    """``{"text": ...}`` per line -> the texts; a bad line is named by file and line number."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise MergeError(f"{path}:{n}: expected a JSON object with a 'text' string ({e!r})") from None
            if not isinstance(text, str):
                raise MergeError(f"{path}:{n}: 'text' is {type(text).__name__}, not a string")
            texts.append(text)
    if not texts:
        raise MergeError(f"{path}: no held-out texts (one {{\"text\": ...}} object per line)")
    return texts
