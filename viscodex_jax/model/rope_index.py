"""M-RoPE position ids for Qwen2.5-VL prompts, computed on the host.

Text tokens advance all three axes (t, h, w) together; the image-pad tokens of
one image get (t, row, col) coordinates on the merged grid offset by the text
position before it, and the text after an image resumes at
``start + max(rows, cols)``. Padding (attention_mask == 0) gets position 0.
Images are consumed from ``image_grid_thw`` in order across the whole batch,
as transformers' ``get_rope_index`` does.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def get_rope_index(
    input_ids: np.ndarray,
    image_grid_thw: Sequence[Sequence[int]] | np.ndarray | None,
    image_token_id: int,
    spatial_merge_size: int = 2,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (positions [3, B, T] int32, deltas [B] int32).

    ``deltas[b]`` is max position + 1 - number of valid tokens: what a decoder
    adds to the plain token index to continue row b's positions.
    """
    input_ids = np.asarray(input_ids)
    b, t = input_ids.shape
    mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = iter(np.asarray(image_grid_thw if image_grid_thw is not None else np.zeros((0, 3)), np.int64).tolist())
    positions = np.zeros((3, b, t), np.int64)
    deltas = np.zeros((b,), np.int64)
    for row in range(b):
        ids = input_ids[row][mask[row]]
        pos = np.zeros((3, len(ids)), np.int64)
        cur = 0
        i = 0
        while i < len(ids):
            if ids[i] != image_token_id:
                pos[:, i] = cur
                cur += 1
                i += 1
                continue
            try:
                gt, gh, gw = next(grids)
            except StopIteration:
                raise ValueError(
                    f"row {row}: more <|image_pad|> runs than images in image_grid_thw"
                ) from None
            lh, lw = gh // spatial_merge_size, gw // spatial_merge_size
            n = gt * lh * lw
            run = ids[i : i + n]
            if len(run) < n or np.any(run != image_token_id):
                raise ValueError(
                    f"row {row}: image with grid {(gt, gh, gw)} needs {n} consecutive image tokens at "
                    f"position {i}, found {int(np.sum(run == image_token_id))}"
                )
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(lh), np.arange(lw), indexing="ij")
            pos[:, i : i + n] = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + cur
            cur += max(lh, lw)
            i += n
        positions[:, row, mask[row]] = pos
        deltas[row] = (pos.max() + 1 - len(ids)) if len(ids) else 0
    leftover = sum(1 for _ in grids)
    if leftover:
        raise ValueError(f"{leftover} image(s) in image_grid_thw have no <|image_pad|> tokens in input_ids")
    return positions.astype(np.int32), deltas.astype(np.int32)


def text_positions(attention_mask: np.ndarray) -> np.ndarray:
    """1-D positions [B, T] that skip padding (left or right), 0 on padding."""
    m = np.asarray(attention_mask).astype(np.int64)
    return (np.maximum(np.cumsum(m, axis=-1) - 1, 0) * m).astype(np.int32)
