"""Model families: the one place that names what differs between model types.

A :class:`Family` bundles how a ``config.json`` of its ``model_type`` is read,
the vision tower (if any) with the host-side metadata it takes, the position
index of a prompt, the chat template, and the HF tensor-name rules. The config
reader, the causal LM, the HF name map and the Processor look the family up
here instead of branching on ``model_type``. A new family (say Qwen3-VL) is
one new module that defines its ``FAMILY`` plus one entry in :data:`REGISTRY`.
"""

from __future__ import annotations

from viscodex_jax.model.families import qwen2, qwen2_5_vl
from viscodex_jax.model.families.base import Family, HFNames, Tower

__all__ = ["REGISTRY", "Family", "HFNames", "Tower", "get_family"]

REGISTRY: dict[str, Family] = {f.model_type: f for f in (qwen2.FAMILY, qwen2_5_vl.FAMILY)}


def get_family(model_type: str) -> Family:
    try:
        return REGISTRY[model_type]
    except KeyError:
        raise KeyError(f"unknown model family {model_type!r}; known: {', '.join(REGISTRY)}") from None
