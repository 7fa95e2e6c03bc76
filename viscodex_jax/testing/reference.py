"""Reference outputs from transformers for our batches: what parity checks compare our forward against."""

from __future__ import annotations

from typing import Any

import numpy as np


def transformers_logits(model, batch: dict[str, Any]) -> np.ndarray:
    """Float32 logits of a transformers model (no grad) for one of our batches: ids, mask, our positions
    (M-RoPE for a VL model) and, when present, pixel patches (cast to the model's dtype) with their grids."""
    import torch

    kw = dict(input_ids=torch.tensor(np.asarray(batch["input_ids"])).long(),
              attention_mask=torch.tensor(np.asarray(batch["attention_mask"])),
              position_ids=torch.tensor(np.asarray(batch["positions"])).long())
    if "pixel_values" in batch:
        kw.update(pixel_values=torch.tensor(np.asarray(batch["pixel_values"])).to(model.dtype),
                  image_grid_thw=torch.tensor(np.asarray(batch["image_grid_thw"])))
    with torch.no_grad():
        return model(**kw).logits.float().numpy()
