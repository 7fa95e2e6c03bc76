"""MCD records -> token ids / labels / positions / patches: one ``EncodedRecord`` per record.

``encode_record`` renders a conversation with the model family's chat template
(``data.chat``, the one the inference ``Processor`` uses too): a default
system turn when the first turn is not a system turn, and every ``<image>`` tag
of a system/user turn becomes ``<|vision_start|>`` + ``<|image_pad|>`` * n +
``<|vision_end|>`` (n from the processed image grid). The whole string is
tokenized at once, so the ids equal ``tokenizer.apply_chat_template`` after the
same image-pad expansion. Labels are the ids of assistant content tokens and of
the ``<|im_end|>`` closing each assistant turn, -100 elsewhere; they are
aligned with ``input_ids`` (not shifted): the loss at slot t predicts
``labels[t + 1]``. A token whose characters straddle the assistant header and
content (BPE can merge the header's ``\\n`` with leading newlines of the
content) counts as content. ``data.packing`` packs the records into batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from viscodex_jax.data import mcd
from viscodex_jax.data.chat import IGNORE_INDEX, num_image_tokens
# Under a module-level name so that a test can make encoding fail for one record.
from viscodex_jax.data.chat import tokenize_with_labels as _tokenize_with_labels
from viscodex_jax.data.image_processor import ImageProcessorConfig, process_images
from viscodex_jax.data.tokenizer import special_token_ids
from viscodex_jax.model.config import ConfigError, ModelConfig

__all__ = ["IGNORE_INDEX", "EncodedRecord", "encode_record", "to_hf_messages"]


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
    ``{"type": "image"}`` content items), as ``data.chat`` and ``tokenizer.apply_chat_template`` take them."""
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
    text, spans = model_cfg.family.chat_template.render(to_hf_messages(record["messages"]), pad_counts)
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

    positions, _ = model_cfg.family.rope_index(ids[None], grids, None, model_cfg)
    positions = positions[..., 0, :]  # [3, L] (M-RoPE) or [L]
    return EncodedRecord(
        input_ids=ids.astype(np.int32),
        labels=labels.astype(np.int32),
        positions=positions.astype(np.int32),
        pixel_values=np.ascontiguousarray(pixel_values, np.float32),
        grid_thw=np.asarray(grids, np.int64).reshape(-1, 3),
        index=index,
        file=file,
    )
