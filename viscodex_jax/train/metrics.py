"""Training metrics: FLOP counts for MFU, and a writer to TensorBoard event files + metrics.jsonl."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from viscodex_jax.model.config import ModelConfig

# bf16 dense peak per device (vendor numbers), for MFU when the config gives none.
_PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "tpu v5p": 459.0, "tpu v5 lite": 197.0,
                "tpu v5e": 197.0, "tpu v6 lite": 918.0, "tpu v6e": 918.0, "tpu v4": 275.0}


def peak_flops_per_device(configured_tflops: float = 0.0) -> float:
    """FLOP/s of one device: the configured value, else a known device's bf16 peak, else 0 (unknown)."""
    if configured_tflops:
        return configured_tflops * 1e12
    kind = jax.devices()[0].device_kind.lower()
    for k, v in _PEAK_TFLOPS.items():
        if k in kind:
            return v * 1e12
    return 0.0


def text_params(cfg: ModelConfig) -> int:
    """Matmul parameters of the decoder + lm_head (what 6N counts)."""
    t = cfg.text
    attn = t.hidden_size * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)
    mlp = 3 * t.hidden_size * t.intermediate_size
    return t.num_layers * (attn + mlp) + t.hidden_size * t.vocab_size


def vision_params(cfg: ModelConfig) -> int:
    v = cfg.vision
    if v is None:
        return 0
    block = 4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size
    merged = v.hidden_size * v.spatial_merge_size**2
    return v.depth * block + v.patch_dim * v.hidden_size + merged * merged + merged * v.out_hidden_size


def train_flops(cfg: ModelConfig, batch: dict[str, Any], accum: int = 1) -> float:
    """Model FLOPs of one train step (forward + backward of the LLM, forward of the frozen vision tower).

    6 N per token plus causal attention (6 * L * T * d per token, half of the
    dense 12 L T d), counted over every position of the packed rows.
    """
    t = cfg.text
    ids = np.asarray(batch["input_ids"])
    tokens, seq = ids.size, ids.shape[-1]
    flops = 6.0 * text_params(cfg) * tokens + 6.0 * t.num_layers * seq * t.hidden_size * tokens
    if cfg.vision is not None and "pixel_values" in batch:
        patches = int((np.asarray(batch["vision_meta"]["image_segments"]) >= 0).sum())
        flops += 2.0 * vision_params(cfg) * patches
    return flops


class MetricWriter:
    """Scalars to TensorBoard (``<workdir>/tb``) and ``<workdir>/metrics.jsonl`` (one line per step)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.tb = None
        self.path = os.path.join(workdir, "metrics.jsonl")
        if enabled:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in metrics.items():
            if k != "step":
                self.tb.add_scalar(f"train/{k}", v, step)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: v for k, v in metrics.items() if k != "step"}}) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
