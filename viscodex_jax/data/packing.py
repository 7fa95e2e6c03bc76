"""MCD records -> token ids / labels / M-RoPE positions / patches, and packing into static batches.

``encode_record`` renders a conversation exactly as the Qwen2-VL chat template
does (default system prompt when the first turn is not a system turn), with
every ``<image>`` tag of a system/user turn replaced by
``<|vision_start|>`` + ``<|image_pad|>`` * n + ``<|vision_end|>`` (n from the
processed image grid), and tokenizes the whole string at once, so the ids equal
``tokenizer.apply_chat_template`` after the same image-pad expansion. Labels are
the ids of assistant content tokens and of the ``<|im_end|>`` closing each
assistant turn, -100 elsewhere; they are aligned with ``input_ids`` (not
shifted): the loss at slot t predicts ``labels[t + 1]``. A token whose
characters straddle the assistant header and content (BPE can merge the
header's ``\\n`` with leading newlines of the content) counts as content.

``Packer`` greedily fills rows of ``max_len`` tokens (next-fit: a record that
does not fit the open row, by tokens or by the row's image-patch budget, starts
a new row) and returns numpy batches with static shapes. Batch format::

    input_ids     [B, T]        int32   pad = tokenizer pad id
    labels        [B, T]        int32   -100 = ignored (padding, prompts, template)
    segment_ids   [B, T]        int32   1, 2, ... per record in the row; 0 = padding
    positions     [3, B, T]     int32   each record's own M-RoPE positions (restart per record)
                  [B, T]                text-only models (model_cfg.vision is None)
    pixel_values  [B, P, D]     float32 row's patches in image order, zero padded (VL only)
    vision_meta   {name: [B, ...]}      vision_metadata(row grids, pad_to=P) per row (VL only)
    num_image_tokens [B]        int32   image-pad tokens (= real merged vision tokens) per row

where T = max_len, P = patches_per_row, D = 3 * temporal_patch * patch**2 (1176).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from viscodex_jax.data import mcd
from viscodex_jax.data.image_processor import ImageProcessorConfig, num_image_tokens, process_images
from viscodex_jax.data.tokenizer import DEFAULT_SYSTEM_PROMPT, special_token_ids
from viscodex_jax.model.config import ConfigError, ModelConfig, VisionConfig
from viscodex_jax.model.families.qwen2_5_vl import get_rope_index
from viscodex_jax.model.families.qwen2_5_vl import metadata_arrays, vision_metadata

__all__ = [
    "IGNORE_INDEX",
    "EncodedRecord",
    "Packer",
    "encode_record",
    "pack_records",
    "render_chat",
    "to_hf_messages",
]

IGNORE_INDEX = -100
VISION_META_KEYS = ("window_perm", "merged_inverse", "window_segments", "image_segments", "rotary_pos")


@dataclasses.dataclass
class EncodedRecord:
    """One tokenized record (after truncation)."""

    input_ids: np.ndarray  # [L] int32
    labels: np.ndarray  # [L] int32, IGNORE_INDEX where not trained on
    positions: np.ndarray  # [3, L] int32 (M-RoPE) or [L] int32 (text-only)
    pixel_values: np.ndarray  # [N, D] float32 (N = 0 without images)
    grid_thw: np.ndarray  # [n_images, 3] int64
    index: int = -1  # record index in its file (for logs)
    file: str = ""

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_patches(self) -> int:
        return int(self.pixel_values.shape[0])


def to_hf_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """MCD messages -> HF chat messages (``<image>`` tags of system/user turns become
    ``{"type": "image"}`` content items), for ``tokenizer.apply_chat_template``."""
    out = []
    for msg in messages:
        role, content = msg["role"], msg["content"]
        if role == "assistant" or mcd.IMAGE_TAG not in content:
            out.append({"role": role, "content": content})
            continue
        items: list[dict[str, Any]] = []
        for k, part in enumerate(content.split(mcd.IMAGE_TAG)):
            if k:
                items.append({"type": "image"})
            if part:
                items.append({"type": "text", "text": part})
        out.append({"role": role, "content": items})
    return out


def render_chat(
    messages: Sequence[Mapping[str, Any]], image_pad_counts: Sequence[int] = ()
) -> tuple[str, list[tuple[int, int]]]:
    """The chat-template string and the character spans that carry labels.

    ``image_pad_counts[k]``: number of ``<|image_pad|>`` for the k-th ``<image>`` tag.
    """
    pieces: list[tuple[str, bool]] = []
    if not messages or messages[0]["role"] != "system":
        pieces.append((f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n", False))
    k = 0
    for msg in messages:
        role, content = msg["role"], msg["content"]
        pieces.append((f"<|im_start|>{role}\n", False))
        if role == "assistant":
            pieces.append((content, True))
            pieces.append(("<|im_end|>", True))
            pieces.append(("\n", False))
            continue
        parts = content.split(mcd.IMAGE_TAG)
        text = parts[0]
        for part in parts[1:]:
            text += "<|vision_start|>" + "<|image_pad|>" * int(image_pad_counts[k]) + "<|vision_end|>" + part
            k += 1
        pieces.append((text + "<|im_end|>\n", False))
    if k != len(image_pad_counts):
        raise ValueError(f"{k} <image> tags but {len(image_pad_counts)} image pad counts")
    text, spans, pos = "", [], 0
    for piece, labeled in pieces:
        if labeled and piece:
            spans.append((pos, pos + len(piece)))
        text += piece
        pos += len(piece)
    return text, spans


def _tokenize_with_labels(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The Rust tokenizer directly: same ids as the transformers wrapper (no
        # BOS, byte-level post-processor), and safe to share between grain's
        # read threads (the wrapper mutates truncation/padding state per call).
        enc = backend.encode(text, add_special_tokens=False)
        ids_list, offsets_list = enc.ids, enc.offsets
    else:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids_list, offsets_list = enc["input_ids"], enc["offset_mapping"]
    ids = np.asarray(ids_list, np.int32)
    offsets = np.asarray(offsets_list, np.int64).reshape(-1, 2)
    char_mask = np.zeros(len(text) + 1, np.int64)
    for s, e in spans:
        char_mask[s:e] = 1
    csum = np.concatenate([[0], np.cumsum(char_mask)])
    labeled = (csum[offsets[:, 1]] - csum[offsets[:, 0]]) > 0
    labels = np.where(labeled, ids, IGNORE_INDEX).astype(np.int32)
    return ids, labels


def _image_spans(ids: np.ndarray, start_id: int, end_id: int) -> list[tuple[int, int]]:
    """[start, end) of each <|vision_start|> ... <|vision_end|> span, in order."""
    starts = np.flatnonzero(ids == start_id)
    ends = np.flatnonzero(ids == end_id)
    if len(starts) != len(ends) or np.any(ends < starts):
        raise ValueError("unbalanced <|vision_start|>/<|vision_end|> tokens")
    return [(int(s), int(e) + 1) for s, e in zip(starts, ends)]


def encode_record(
    record: Mapping[str, Any],
    images: Sequence[Any],
    tokenizer,
    image_cfg: ImageProcessorConfig | None,
    model_cfg: ModelConfig,
    max_len: int,
    *,
    index: int = -1,
    file: str = "<memory>",
) -> EncodedRecord:
    """Tokenizes one MCD record (already validated images, in order) for training.

    Truncation to ``max_len`` never cuts inside an image span: if the cut
    falls inside one, everything from that span's ``<|vision_start|>`` on is
    dropped (so the text kept ends after the last complete image span), and
    the dropped images' patches go too.

    Raises:
        MCDRecordError: a bad record (see ``mcd.check_messages``); images on
            a text-only model; image tokens alone longer than ``max_len``
            (reason ``image_tokens_exceed_max_len``); nothing left to train on
            after truncation (``no_labels_after_truncation``). The pipeline
            counts and skips these under ``on_error="skip"``.
    """
    mcd.check_messages(record, index, file)
    if len(images) != sum(m["content"].count(mcd.IMAGE_TAG) for m in record["messages"] if m["role"] != "assistant"):
        raise mcd.MCDRecordError(file, index, mcd.IMAGE_TAG_MISMATCH,
                                 f"{len(images)} images given for the record's <image> tags")
    vision = model_cfg.vision
    if images and vision is None:
        raise mcd.MCDRecordError(file, index, mcd.IMAGES_FOR_TEXT_MODEL,
                                 f"record has {len(images)} image(s) but the model has no vision tower")
    image_cfg = image_cfg or ImageProcessorConfig()
    if images:
        try:
            processed = process_images(list(images), image_cfg)
        except (ValueError, TypeError) as e:  # e.g. an aspect ratio over 200: this record's image, not a bug
            raise mcd.MCDRecordError(file, index, mcd.BAD_IMAGE, str(e)) from None
        pixel_values, grids = processed.pixel_values, processed.grid_thw
    else:
        patch_dim = vision.patch_dim if vision is not None else image_cfg.patch_dim
        pixel_values, grids = np.zeros((0, patch_dim), np.float32), np.zeros((0, 3), np.int64)
    merge = image_cfg.merge_size
    pad_counts = [num_image_tokens(g, merge) for g in grids]
    text, spans = render_chat(record["messages"], pad_counts)
    ids, labels = _tokenize_with_labels(tokenizer, text, spans)

    special = special_token_ids(tokenizer)
    image_id = special["image_pad"]
    if vision is not None and model_cfg.image_token_id not in (None, image_id):
        raise ConfigError(
            f"model image_token_id {model_cfg.image_token_id} != tokenizer <|image_pad|> id {image_id}"
        )
    img_spans = _image_spans(ids, special["vision_start"], special["vision_end"])
    if len(img_spans) != len(grids) or int(np.sum(ids == image_id)) != sum(pad_counts):
        raise mcd.MCDRecordError(file, index, mcd.ENCODE_ERROR, "image tokens do not match the images after "
                                 "tokenization")

    n_keep = len(grids)
    if len(ids) > max_len:
        image_tokens = sum(e - s for s, e in img_spans)
        if image_tokens > max_len:
            raise mcd.MCDRecordError(
                file, index, mcd.IMAGE_TOKENS_EXCEED_MAX_LEN,
                f"{image_tokens} image tokens (grids {grids.tolist()}) exceed max_len={max_len}",
            )
        cut = max_len
        for k, (s, e) in enumerate(img_spans):
            if s < cut < e:
                cut = s
            if e > cut:
                n_keep = min(n_keep, k)
        ids, labels = ids[:cut], labels[:cut]
    if not np.any(labels != IGNORE_INDEX):
        raise mcd.MCDRecordError(file, index, mcd.NO_LABELS_AFTER_TRUNCATION,
                                 f"no assistant tokens left within max_len={max_len} (record has {len(text)} chars)")
    grids = grids[:n_keep]
    n_patches = int(np.prod(grids, axis=-1).sum()) if n_keep else 0
    pixel_values = pixel_values[:n_patches]

    if vision is not None:
        positions, _ = get_rope_index(ids[None], grids, image_id, vision.spatial_merge_size)
        positions = positions[:, 0, :]
    else:
        positions = np.arange(len(ids), dtype=np.int32)
    return EncodedRecord(
        input_ids=ids.astype(np.int32),
        labels=labels.astype(np.int32),
        positions=positions.astype(np.int32),
        pixel_values=np.ascontiguousarray(pixel_values, np.float32),
        grid_thw=np.asarray(grids, np.int64).reshape(-1, 3),
        index=index,
        file=file,
    )


def _empty_vision_meta(pad_to: int, merge_size: int) -> dict[str, np.ndarray]:
    """The padding-only metadata of a row without images (same layout as vision_metadata's padding)."""
    return {
        "window_perm": np.arange(pad_to, dtype=np.int32),
        "merged_inverse": np.arange(pad_to // merge_size**2, dtype=np.int32),
        "window_segments": -np.ones(pad_to, np.int32),
        "image_segments": -np.ones(pad_to, np.int32),
        "rotary_pos": np.zeros((pad_to, 2), np.int32),
    }


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
    ):
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"batch_size and max_len must be positive, got {batch_size}, {max_len}")
        self.batch_size = batch_size
        self.max_len = max_len
        self.pad_id = int(pad_id)
        self.vision = vision_cfg
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
                if grids:
                    meta = vision_metadata(grids, self.vision, pad_to=p)
                    n_img_tokens[i] = meta.num_valid_tokens
                    metas.append(metadata_arrays(meta))
                else:
                    metas.append(_empty_vision_meta(p, self.vision.spatial_merge_size))
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "segment_ids": segment_ids,
            "positions": positions,
        }
        if vl:
            batch["pixel_values"] = pixel_values
            batch["vision_meta"] = {k: np.stack([m[k] for m in metas]) for k in VISION_META_KEYS}
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
