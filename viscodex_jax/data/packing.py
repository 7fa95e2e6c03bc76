"""Packing ``EncodedRecord`` s (``data.encode``) into static-shape batches.

``Packer`` greedily fills rows of ``max_len`` tokens (next-fit: a record that
does not fit the open row, by tokens or by the row's image-patch budget, starts
a new row) and returns numpy batches with static shapes. Batch format::

    input_ids     [B, T]        int32   pad = tokenizer pad id
    labels        [B, T]        int32   -100 = ignored (padding, prompts, template)
    segment_ids   [B, T]        int32   1, 2, ... per record in the row; 0 = padding
    positions     [3, B, T]     int32   each record's own M-RoPE positions (restart per record)
                  [B, T]                text-only models (model_cfg.vision is None)
    pixel_values  [B, P, D]     float32 row's patches in image order, zero padded (VL only)
    vision_meta   {name: [B, ...]}      the tower's metadata(row grids, pad_to=P) per row (VL only)
    num_image_tokens [B]        int32   image-pad tokens (= real merged vision tokens) per row

where T = max_len, P = patches_per_row, D = 3 * temporal_patch * patch**2 (1176).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from viscodex_jax.data import mcd
from viscodex_jax.data.chat import IGNORE_INDEX, num_image_tokens
from viscodex_jax.data.encode import EncodedRecord
from viscodex_jax.model.config import VisionConfig
from viscodex_jax.model.families import REGISTRY, Tower

__all__ = ["Packer", "pack_records"]


class Packer:
    """Greedy next-fit packing of EncodedRecords into static-shape batches (see module doc)."""

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        pad_id: int,
        vision_cfg: VisionConfig | None = None,
        patches_per_row: int | None = None,
        stats: mcd.SkipStats | None = None,
        tower: Tower | None = None,
    ):
        """``tower``: the model family's (``cfg.family.tower``), whose metadata the rows carry; without one
        a ``vision_cfg`` means Qwen2.5-VL's, the only tower there was before families."""
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"batch_size and max_len must be positive, got {batch_size}, {max_len}")
        self.batch_size = batch_size
        self.max_len = max_len
        self.pad_id = int(pad_id)
        self.vision = vision_cfg
        self.tower = tower if tower is not None or vision_cfg is None else REGISTRY["qwen2_5_vl"].tower
        self.stats = stats if stats is not None else mcd.SkipStats()
        if vision_cfg is not None:
            unit = vision_cfg.spatial_merge_size**2
            if patches_per_row is None or patches_per_row <= 0 or patches_per_row % unit:
                raise ValueError(f"patches_per_row must be a positive multiple of {unit}, got {patches_per_row}")
        self.patches_per_row = patches_per_row if vision_cfg is not None else 0

    def fits_alone(self, rec: EncodedRecord) -> bool:
        """Whether a record can ever be packed; if not it is counted and logged as skipped."""
        reason = None
        if rec.length > self.max_len:
            reason, detail = mcd.MALFORMED, f"{rec.length} tokens > max_len={self.max_len} (encode with the same max_len)"
        elif self.vision is None and rec.num_patches:
            reason, detail = mcd.IMAGES_FOR_TEXT_MODEL, "record has image patches but the model has no vision tower"
        elif rec.num_patches > self.patches_per_row:
            reason = mcd.PATCHES_EXCEED_ROW_BUDGET
            detail = f"{rec.num_patches} image patches > patches_per_row={self.patches_per_row}"
        if reason is None:
            return True
        self.stats.add(mcd.MCDRecordError(rec.file or "<memory>", rec.index, reason, detail))
        return False

    def fits(self, row: list[EncodedRecord], rec: EncodedRecord) -> bool:
        tokens = sum(r.length for r in row) + rec.length
        patches = sum(r.num_patches for r in row) + rec.num_patches
        return tokens <= self.max_len and patches <= self.patches_per_row

    def make_batch(self, rows: Sequence[Sequence[EncodedRecord]]) -> dict[str, Any]:
        """Rows (lists of records that fit) -> the batch dict; missing rows are all padding."""
        b, t = self.batch_size, self.max_len
        if len(rows) > b:
            raise ValueError(f"{len(rows)} rows for batch_size {b}")
        input_ids = np.full((b, t), self.pad_id, np.int32)
        labels = np.full((b, t), IGNORE_INDEX, np.int32)
        segment_ids = np.zeros((b, t), np.int32)
        vl = self.vision is not None
        positions = np.zeros((3, b, t) if vl else (b, t), np.int32)
        n_img_tokens = np.zeros((b,), np.int32)
        if vl:
            p = self.patches_per_row
            pixel_values = np.zeros((b, p, self.vision.patch_dim), np.float32)
            metas = []
        for i in range(b):
            row = rows[i] if i < len(rows) else []
            off = poff = 0
            grids = []
            for seg, rec in enumerate(row, 1):
                n = rec.length
                if off + n > t:
                    raise ValueError(f"row {i} overflows max_len={t}")
                input_ids[i, off:off + n] = rec.input_ids
                labels[i, off:off + n] = rec.labels
                segment_ids[i, off:off + n] = seg
                if vl:
                    positions[:, i, off:off + n] = rec.positions
                    pixel_values[i, poff:poff + rec.num_patches] = rec.pixel_values
                    grids.extend(rec.grid_thw.tolist())
                else:
                    positions[i, off:off + n] = rec.positions
                off += n
                poff += rec.num_patches
            if vl:
                metas.append(self.tower.metadata(grids, self.vision, p))
                n_img_tokens[i] = sum(num_image_tokens(g, self.vision.spatial_merge_size) for g in grids)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "segment_ids": segment_ids,
            "positions": positions,
        }
        if vl:
            batch["pixel_values"] = pixel_values
            batch["vision_meta"] = {k: np.stack([m[k] for m in metas]) for k in metas[0]}
        batch["num_image_tokens"] = n_img_tokens
        return batch


def pack_records(records: Iterable[EncodedRecord], packer: Packer, drop_remainder: bool = False) -> Iterator[dict[str, Any]]:
    """Packs a stream of records into batches (plain-Python version of the grain transformation)."""
    rows: list[list[EncodedRecord]] = []
    cur: list[EncodedRecord] = []
    for rec in records:
        if not packer.fits_alone(rec):
            continue
        if cur and not packer.fits(cur, rec):
            rows.append(cur)
            cur = []
            if len(rows) == packer.batch_size:
                yield packer.make_batch(rows)
                rows = []
        cur.append(rec)
    if cur:
        rows.append(cur)
    if rows and not drop_remainder:
        yield packer.make_batch(rows)
