"""Prompt id rows and model batches for the tiny test models (``testing.models``' token ids)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from viscodex_jax.testing.models import IMG, VEND, VSTART

PATCH_DIM = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch, as every tiny tower has


def vl_prompt(n_images_grids: list[tuple[int, int, int]], text_lens: list[int], rng: np.random.Generator) -> list[int]:
    """Token ids: text, then for each image <vs><img>*n<ve> followed by text (images mid-text)."""
    ids = list(rng.integers(0, 290, text_lens[0]))
    for g, tl in zip(n_images_grids, text_lens[1:]):
        ids += [VSTART] + [IMG] * (g[0] * g[1] * g[2] // 4) + [VEND]
        ids += list(rng.integers(0, 290, tl))
    return ids


def pad_rows(rows: Sequence[Sequence[int]], side: str, dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids -> (ids, mask) [B, T], padded with 0 on the ``side`` ("left": generation, "right": training)."""
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}: expected 'left' or 'right'")
    t = max(map(len, rows))
    ids = np.zeros((len(rows), t), dtype)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        cols = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, cols] = r
        mask[i, cols] = 1
    return ids, mask


def left_padded_prompts(grids: list[tuple[int, int, int]], lens: list[list[int]], rng: np.random.Generator):
    """Rows of vl_prompt (images consumed from ``grids`` in order), left-padded: (ids, mask) int64 [B, T]."""
    rows, k = [], 0
    for row_lens in lens:
        n = len(row_lens) - 1
        rows.append(vl_prompt(grids[k:k + n], row_lens, rng))
        k += n
    return pad_rows(rows, "left")


def inference_batch(ids: np.ndarray, mask: np.ndarray, grids: Sequence[Sequence[int]], rng: np.random.Generator,
                    multimodal: bool) -> dict[str, np.ndarray]:
    """The forward/generation batch for left-padded ``ids``: positions (M-RoPE for a VL model, 1-D for a text
    model) and, for a VL model with images, random pixel patches for ``grids`` drawn from ``rng``."""
    from viscodex_jax.model.families.qwen2 import text_positions
    from viscodex_jax.model.families.qwen2_5_vl import get_rope_index

    batch = {"input_ids": ids, "attention_mask": mask}
    if not multimodal:
        batch["positions"] = text_positions(mask)
        return batch
    batch["positions"], _ = get_rope_index(ids, grids if len(grids) else np.zeros((0, 3), np.int64), IMG, 2, mask)
    if len(grids):
        n = sum(g[0] * g[1] * g[2] for g in grids)
        batch["pixel_values"] = rng.standard_normal((n, PATCH_DIM)).astype(np.float32)
        batch["image_grid_thw"] = np.asarray(grids, np.int64)
    return batch
