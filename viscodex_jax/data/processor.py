"""Prompts (chat messages + images) -> model batch: token ids, M-RoPE positions, patches."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from viscodex_jax.data.image_processor import ImageProcessorConfig, expand_image_tokens, process_images
from viscodex_jax.model.config import ModelConfig
from viscodex_jax.model.families.qwen2_5_vl import get_rope_index, text_positions
from viscodex_jax.model.families.qwen2_5_vl import metadata_arrays, vision_metadata


class Processor:
    """Turns a batch of conversations into the arrays ``CausalLM`` takes.

    Rows are left-padded (so a decoder can append to every row at the same
    slot). ``vision_meta`` carries the host-computed window/segment indices.
    """

    def __init__(self, tokenizer, model_cfg: ModelConfig, image_cfg: ImageProcessorConfig | None = None):
        self.tokenizer = tokenizer
        self.cfg = model_cfg
        self.image_cfg = image_cfg or ImageProcessorConfig()

    @classmethod
    def from_pretrained(cls, ckpt_dir: str, model_cfg: ModelConfig) -> "Processor":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ckpt_dir)
        pp = os.path.join(ckpt_dir, "preprocessor_config.json")
        image_cfg = ImageProcessorConfig.from_pretrained(ckpt_dir) if os.path.isfile(pp) else None
        return cls(tok, model_cfg, image_cfg)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

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
            text = p if isinstance(p, str) else self.render(p, add_generation_prompt)
            try:
                text = expand_image_tokens(text, grids[k : k + len(ims)], self.image_cfg.merge_size)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
            k += len(ims)
            rows.append(self.tokenizer.encode(text, add_special_tokens=False))
        t = max(len(r) for r in rows)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids = np.full((len(rows), t), pad_id, np.int32)
        mask = np.zeros((len(rows), t), np.int32)
        for i, r in enumerate(rows):
            input_ids[i, t - len(r):] = r
            mask[i, t - len(r):] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
        if self.cfg.is_multimodal:
            pos, deltas = get_rope_index(input_ids, grids, self.cfg.image_token_id,
                                         self.cfg.vision.spatial_merge_size, mask)
            batch.update(positions=pos, rope_deltas=deltas)
        else:
            batch["positions"] = text_positions(mask)
        if processed is not None:
            batch.update(
                pixel_values=processed.pixel_values,
                image_grid_thw=grids,
                vision_meta=metadata_arrays(vision_metadata(grids, self.cfg.vision)),
            )
        return batch
