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
