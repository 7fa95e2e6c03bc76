"""Tiny, seeded HF-format checkpoints: a Qwen2 base, a Qwen2.5-VL "VLM" and a Qwen2 "coder".

The three share one text architecture, as Qwen2.5-7B-Instruct, Qwen2.5-VL-7B
and the Nemotron coder do, so task vectors between them are well defined.
They are written with transformers' own ``save_pretrained`` (real format:
safetensors, config.json, tokenizer files, preprocessor_config.json), so
everything downstream reads them through the same code as a 7B checkpoint.

The tokenizer is the real Qwen2.5 BPE cut to its first ``num_ranks`` ranks
with the special tokens right after them (see ``data.tokenizer``): a small
vocab keeps the tiny models' embeddings and logits cheap.
"""

from __future__ import annotations

import os
from typing import Any

from viscodex_jax.utils import atomic_dir

TINY_RANKS = 4096


def tiny_text_kwargs(vocab_size: int, **over) -> dict[str, Any]:
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    kw.update(over)
    return kw


def tiny_vision_kwargs(out_hidden_size: int, **over) -> dict[str, Any]:
    kw = dict(
        depth=4,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=out_hidden_size,
        fullatt_block_indexes=[1, 3],
        window_size=56,  # 2x2 merged tokens per window: several windows even on small images
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
        tokens_per_second=2,
    )
    kw.update(over)
    return kw


def _mrope_section(head_dim: int) -> list[int]:
    # Qwen2.5-VL uses 16/24/24 of 64 (head_dim 128): keep the 1:1.5:1.5 shape.
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _perturb(model, seed: int, scale: float) -> None:
    """Adds seeded noise to every language-model tensor (a stand-in for fine-tuning)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "visual" not in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def hf_text_model(text: dict[str, Any], seed: int, **token_ids):
    """A seeded transformers Qwen2ForCausalLM (random init) from text kwargs."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **text, **token_ids)
    return Qwen2ForCausalLM(cfg).eval()


def hf_vl_model(text: dict[str, Any], vision: dict[str, Any], seed: int, image_token_id: int,
                video_token_id: int, vision_start_token_id: int, vision_end_token_id: int, **token_ids):
    """A seeded transformers Qwen2_5_VLForConditionalGeneration (random init)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = text["hidden_size"] // text["num_attention_heads"]
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(head_dim)}
    text = dict(text)
    tie = text.pop("tie_word_embeddings", False)
    init = text.get("initializer_range")
    cfg = Qwen2_5_VLConfig(
        text_config=dict(rope_parameters=rope, **text, **token_ids),
        vision_config=dict(vision, **({"initializer_range": init} if init else {})),
        tie_word_embeddings=tie,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        vision_start_token_id=vision_start_token_id,
        vision_end_token_id=vision_end_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def make_tiny_checkpoints(
    out_dir: str,
    seed: int = 0,
    num_ranks: int = TINY_RANKS,
    text_overrides: dict[str, Any] | None = None,
    vision_overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, str]:
    """Writes ``base/``, ``vlm/`` and ``coder/`` under ``out_dir``; returns their paths.

    Deterministic in ``seed``: the same call writes the same bytes.
    """
    from transformers import Qwen2ForCausalLM, Qwen2VLImageProcessorPil

    from viscodex_jax.data.tokenizer import build_qwen2_tokenizer, save_tokenizer, special_token_ids

    tok = build_qwen2_tokenizer(num_ranks=num_ranks)
    ids = special_token_ids(tok)
    vocab = -(-len(tok) // 64) * 64  # padded like Qwen's 152064, to a multiple of 64
    text = tiny_text_kwargs(vocab, **(text_overrides or {}))
    common = dict(bos_token_id=ids["endoftext"], eos_token_id=ids["im_end"], pad_token_id=ids["endoftext"])
    image_proc = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)

    paths = {k: os.path.join(out_dir, k) for k in ("base", "vlm", "coder")}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        base = hf_text_model(text, seed, **common)
        vlm = hf_vl_model(
            text, tiny_vision_kwargs(text["hidden_size"], **(vision_overrides or {})), seed + 1,
            image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
            vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"], **common,
        )
        # The VLM's language model starts from the base, as Qwen2.5-VL's does from Qwen2.5.
        sd = {f"model.language_model.{k[len('model.'):]}" if k.startswith("model.") else k: v
              for k, v in base.state_dict().items()}
        missing, unexpected = vlm.load_state_dict(sd, strict=False)
        if unexpected or any("visual" not in m for m in missing):
            raise RuntimeError(f"tiny VLM text weights did not line up: {unexpected} {missing}")
        _perturb(vlm, seed + 2, 0.02)
        coder = Qwen2ForCausalLM(base.config)
        coder.load_state_dict(base.state_dict())
        _perturb(coder, seed + 3, 0.02)
        for name, model in (("base", base), ("vlm", vlm), ("coder", coder)):
            d = os.path.join(tmp, name)
            model.save_pretrained(d)
            save_tokenizer(tok, d)
        image_proc.save_pretrained(os.path.join(tmp, "vlm"))
    return paths


def tiny_train_config():
    """Training settings for the tiny checkpoints on CPU (``configs/tiny.py``; the demo starts from it)."""
    from viscodex_jax.train.config import base_config

    c = base_config()
    c.workdir = "runs/train_tiny"
    c.data.max_len = 512
    c.data.batch_size = 4
    c.data.patches_per_row = 256
    c.train.steps = 60
    c.train.vocab_chunk = 2048
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 5
    c.optim.total_steps = 60
    c.checkpoint.save_every = 20
    c.checkpoint.keep = 2
    return c


def ensure_tiny_checkpoints(out_dir: str, seed: int = 0) -> dict[str, str]:
    """Makes the tiny checkpoints unless a complete set is already there."""
    paths = {k: os.path.join(out_dir, k) for k in ("base", "vlm", "coder")}
    if all(os.path.isfile(os.path.join(p, "config.json")) for p in paths.values()):
        return paths
    return make_tiny_checkpoints(out_dir, seed=seed, overwrite=os.path.exists(out_dir))
