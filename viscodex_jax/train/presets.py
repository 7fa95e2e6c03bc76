"""Hardware presets for the real recipes: one row per slice, applied to a training config.

A preset fixes the mesh, the rows of ``data.max_len`` tokens each chip holds per
micro-step, the attention kernel and the remat policy; the global batch per
optimizer step stays ``global_rows`` through gradient accumulation. ``topology``
names the slice for ``launch/compile_check.py``, which is how each TPU row's
rows-per-chip was chosen (the largest that fits with 10% HBM headroom; the
tables are in the configs' docstrings).
"""

from __future__ import annotations

import dataclasses

from viscodex_jax.model.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Preset:
    chips: int
    mesh: tuple[int, int, int]  # (data, fsdp, tensor)
    rows_per_chip: int
    attention: str
    remat: str
    topology: str = ""  # libtpu topology for compile_check ("" for GPUs)
    multi_host: bool = False


def apply_preset(c, presets: dict[str, Preset], name: str, global_rows: int) -> None:
    """Sets mesh, batch, accumulation, attention and remat of config ``c`` from ``presets[name]``."""
    if name not in presets:
        raise ConfigError(f"preset {name!r}: choose from {', '.join(presets)}")
    p = presets[name]
    rows = p.rows_per_chip * p.chips
    if global_rows % rows:
        raise ConfigError(f"preset {name!r}: {rows} rows per micro-step do not divide global_rows={global_rows}")
    c.mesh.shape = p.mesh
    c.data.batch_size = rows
    c.train.accum_steps = global_rows // rows
    c.model.attention_impl = p.attention
    c.model.remat_policy = p.remat
    c.distributed = p.multi_host
    c.topology = p.topology


MCD_ROWS = 598_000  # MCD records; one epoch at global_rows packed rows per optimizer step


def sft_recipe(presets: dict[str, Preset], name: str, global_rows: int = 128):
    """The VisCodex SFT settings shared by the 8B and 33B recipes, on slice preset ``name``.

    The paper publishes none; the authors' earlier configs used lr 1e-5 for full fine-tuning,
    cosine, warmup ratio 0.1, one epoch, bf16, cutoff 4096.
    """
    from viscodex_jax.train.config import base_config

    steps = MCD_ROWS // global_rows
    c = base_config()
    c.model.param_dtype = "bfloat16"
    c.model.dtype = "bfloat16"
    c.data.max_len = 4096
    c.data.patches_per_row = 4096
    c.data.worker_count = 8
    c.train.steps = steps
    c.train.vocab_chunk = 16384
    c.optim.lr = 1e-5
    c.optim.warmup_steps = steps // 10
    c.optim.total_steps = steps
    c.optim.weight_decay = 0.0
    c.checkpoint.save_every = 250
    apply_preset(c, presets, name, global_rows)
    return c
