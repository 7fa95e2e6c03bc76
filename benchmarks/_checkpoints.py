"""Random real-shape HF checkpoints for the benchmarks, built once and cached (with the spec they were built from).

Every model here has real Qwen2.5 / Qwen2.5-VL shapes and random weights: a benchmark measures bytes
and FLOPs, not answers. A checkpoint is built on the meta device (no init cost), materialised with
``to_empty``, filled from a seeded ``torch.Generator`` and written with ``save_pretrained`` (bf16,
500 MB shards) into a temp dir renamed when complete, so creation takes seconds and a half-written
cache is never mistaken for a checkpoint.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from typing import Any

import _harness as h

SPEC_FILE = "bench_spec.json"
SPEC_VERSION = 1
SHARD_SIZE = "500MB"

# Qwen2.5-0.5B's real text shapes.
TEXT = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32768, bos_token_id=151643,
            eos_token_id=151643)
ROPE_THETA = 1e6
# head_dim = 896 / 14 = 64, so sections must sum to 32; [8, 12, 12] keeps Qwen2.5-VL's 16:24:24 shape.
MROPE_SECTION = [8, 12, 12]
# Qwen2.5-VL's real vision tower (the same in 3B/7B/72B).
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=896,
              fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14, temporal_patch_size=2,
              spatial_merge_size=2, in_channels=3, tokens_per_second=2)
MODELS = {
    "qwen2.5-0.5b": dict(kind="text", text=TEXT, rope_theta=ROPE_THETA, tie_word_embeddings=True),
    "qwen2.5-vl-0.5b": dict(
        kind="vl", text=TEXT, rope_theta=ROPE_THETA, mrope_section=MROPE_SECTION, vision=VISION,
        tie_word_embeddings=True,
    ),
    # Qwen2.5-1.5B's text shapes (merge.py's optional 1.5b case).
    "qwen2.5-1.5b": dict(
        kind="text", text=dict(TEXT, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                               num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072),
        rope_theta=ROPE_THETA, tie_word_embeddings=True),
    # Qwen2.5-0.5B with 4 of its 24 layers (train_step.py: CPU time).
    "qwen2.5-0.5b-4l": dict(kind="text", text=dict(TEXT, num_hidden_layers=4), rope_theta=ROPE_THETA,
                            tie_word_embeddings=True),
}


def weight_files(ckpt_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(ckpt_dir, "*.safetensors")))


def ckpt_bytes(ckpt_dir: str) -> int:
    return sum(os.path.getsize(f) for f in weight_files(ckpt_dir))


def warm(files: list[str]) -> None:
    """Reads the files once so the timed runs start from a warm page cache."""
    buf = bytearray(64 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def spec(name: str) -> dict[str, Any]:
    return dict(version=SPEC_VERSION, name=name, shard_size=SHARD_SIZE, dtype="bfloat16", **MODELS[name])


def checkpoint_ready(ckpt_dir: str, name: str, seed: int | None = None) -> bool:
    """True when ``ckpt_dir`` holds ``name`` built from today's spec (and from ``seed``, if given)."""
    try:
        with open(os.path.join(ckpt_dir, SPEC_FILE)) as f:
            made = json.load(f)
    except (OSError, ValueError):
        return False
    return (made.get("spec") == spec(name) and (seed is None or made.get("seed") == seed)
            and bool(weight_files(ckpt_dir)))


def make_checkpoint(name: str, ckpt_dir: str, seed: int) -> dict[str, Any]:
    """Builds ``name`` on the meta device, fills it from a seeded RNG and saves it to ``ckpt_dir`` atomically."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

    from viscodex_jax.utils import atomic_dir

    if name not in MODELS:
        raise ValueError(f"unknown benchmark model {name!r} (known: {', '.join(MODELS)})")
    m = MODELS[name]
    t0 = time.perf_counter()
    if m["kind"] == "text":
        cfg = Qwen2Config(
            rope_parameters={"rope_type": "default", "rope_theta": m["rope_theta"]},
            tie_word_embeddings=m["tie_word_embeddings"], **m["text"],
        )
        cls = Qwen2ForCausalLM
    else:
        cfg = Qwen2_5_VLConfig(
            text_config=dict(
                rope_parameters={"rope_type": "default", "rope_theta": m["rope_theta"],
                                 "mrope_section": m["mrope_section"]},
                **m["text"],
            ),
            vision_config=dict(m["vision"]),
            tie_word_embeddings=m["tie_word_embeddings"],
        )
        cls = Qwen2_5_VLForConditionalGeneration
    cfg.dtype = torch.bfloat16
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    model.tie_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():  # tied weights are yielded once
            if "norm" in pname:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen).mul_(0.02))
    t_fill = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    with atomic_dir(ckpt_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
        with open(os.path.join(tmp, SPEC_FILE), "w") as f:
            json.dump(dict(spec=spec(name), seed=seed, n_params=n_params), f, indent=2)
    return dict(fill_s=t_fill, total_s=time.perf_counter() - t0, n_params=n_params)


def ensure(name: str, ckpt_dir: str, seed: int, timeout: float, recreate: bool = False) -> bool:
    """Builds ``name`` into ``ckpt_dir`` (in a child process) unless it is there already; returns whether it built.

    A child, so that the parent, which times other children, never holds torch or the model in memory.
    """
    if not recreate and checkpoint_ready(ckpt_dir, name, seed):
        return False
    print(f"[{name}] creating checkpoint (seed {seed}) in {ckpt_dir} ...", file=sys.stderr, flush=True)
    made = h.spawn_child(__file__, dict(name=name, ckpt_dir=ckpt_dir, seed=seed), timeout)
    print(f"[{name}] created in {made['total_s']:.1f}s ({made['n_params'] / 1e6:.1f}M params)",
          file=sys.stderr, flush=True)
    return True


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description="Builds one random benchmark checkpoint (the scripts do it when needed).")
    p.add_argument("name", choices=sorted(MODELS))
    p.add_argument("ckpt_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900)
    a = p.parse_args(argv)
    ensure(a.name, a.ckpt_dir, a.seed, a.timeout, recreate=True)


if __name__ == "__main__":
    h.entry(main, lambda a: make_checkpoint(**a))
