"""Prompts (chat messages + images) -> model batch: token ids, positions, patches.

Messages are rendered by the model family's chat template (``data.chat``), the
same one training encodes with, not by the tokenizer's jinja template.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np

from viscodex_jax.data.chat import expand_image_tokens, num_image_tokens, token_ids
from viscodex_jax.data.image_processor import ImageProcessorConfig, process_images
from viscodex_jax.model.config import ModelConfig

log = logging.getLogger(__name__)

# Enough of a conversation to show whether a checkpoint's own jinja template writes what the family
# template writes (the image turn only for models that take images).
_PROBE = [
    {"role": "user", "content": "Describe it."},
    {"role": "assistant", "content": "A chart."},
    {"role": "user", "content": "Thanks."},
]
_PROBE_IMAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}]


class Processor:
    """Turns a batch of conversations into the arrays ``CausalLM`` takes.

    Rows are left-padded (so a decoder can append to every row at the same
    slot). ``vision_meta`` carries the host-computed window/segment indices.
    """

    def __init__(self, tokenizer, model_cfg: ModelConfig, image_cfg: ImageProcessorConfig | None = None):
        self.tokenizer = tokenizer
        self.cfg = model_cfg
        self.family = model_cfg.family
        self.image_cfg = image_cfg or ImageProcessorConfig()

    @classmethod
    def from_pretrained(cls, ckpt_dir: str, model_cfg: ModelConfig) -> "Processor":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ckpt_dir)
        pp = os.path.join(ckpt_dir, "preprocessor_config.json")
        image_cfg = ImageProcessorConfig.from_pretrained(ckpt_dir) if os.path.isfile(pp) else None
        proc = cls(tok, model_cfg, image_cfg)
        proc._warn_if_template_differs(ckpt_dir)
        return proc

    def _warn_if_template_differs(self, ckpt_dir: str) -> None:
        """The checkpoint's jinja template is not used; say so when it would have rendered differently."""
        if not isinstance(getattr(self.tokenizer, "chat_template", None), str):
            return
        probe = _PROBE + (_PROBE_IMAGE if self.cfg.is_multimodal else [])
        try:
            theirs = self.tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja raises whatever the template's code raises
            theirs = f"<error: {type(e).__name__}: {e}>"
        ours = self.render(probe)
        if theirs != ours:
            log.warning("%s: the tokenizer's chat template renders differently from the %s family template, which "
                        "training uses and this Processor uses too: %r vs %r", ckpt_dir, self.cfg.model_type,
                        theirs, ours)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text with one ``<|image_pad|>`` per image (as the HF jinja template writes it)."""
        return self.family.chat_template.render(messages, None, add_generation_prompt).text

    def encode(self, prompt: str | list[dict[str, Any]], grids: np.ndarray, add_generation_prompt: bool = True,
               ) -> np.ndarray:
        """Token ids of one prompt whose images have patch grids ``grids``, pads expanded."""
        merge = self.image_cfg.merge_size
        if isinstance(prompt, str):
            text = expand_image_tokens(prompt, grids, merge, self.family.chat_template.image_pad)
        else:
            counts = [num_image_tokens(g, merge) for g in grids]
            text = self.family.chat_template.render(prompt, counts, add_generation_prompt).text
        return token_ids(self.tokenizer, text)

    def __call__(
        self,
        prompts: Sequence[str | list[dict[str, Any]]],
        images: Sequence[Sequence[Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> dict[str, Any]:
        """prompts: chat message lists or already-rendered strings; images: per prompt, in order."""
        images = images or [[] for _ in prompts]
        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} image lists")
        all_images = [im for row in images for im in row]
        if all_images and not self.cfg.is_multimodal:
            raise ValueError(f"images given but the model ({self.cfg.model_type}) has no vision tower")
        processed = process_images(all_images, self.image_cfg) if all_images else None
        grids = processed.grid_thw if processed is not None else np.zeros((0, 3), np.int64)
        rows, k = [], 0
        for i, (p, ims) in enumerate(zip(prompts, images)):
            try:
                rows.append(self.encode(p, grids[k : k + len(ims)], add_generation_prompt))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
            k += len(ims)
        t = max(len(r) for r in rows)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids = np.full((len(rows), t), pad_id, np.int32)
        mask = np.zeros((len(rows), t), np.int32)
        for i, r in enumerate(rows):
            input_ids[i, t - len(r):] = r
            mask[i, t - len(r):] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
        positions, deltas = self.family.rope_index(input_ids, grids, mask, self.cfg)
        batch["positions"] = positions
        if deltas is not None:
            batch["rope_deltas"] = deltas
        if processed is not None:
            batch.update(
                pixel_values=processed.pixel_values,
                image_grid_thw=grids,
                vision_meta=self.family.tower.metadata(grids, self.cfg.vision, None),
            )
        return batch
