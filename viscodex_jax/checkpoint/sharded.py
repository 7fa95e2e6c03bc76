"""A checkpoint read straight into its sharding on a Mesh: no host or device holds a replica it does not serve.

``read_sharded`` places every param by its logical axes (``rules``, the training rules by default) while it
reads: safetensors tensor by tensor into each local device's shard (a host holds one tensor plus its own
shards), orbax restores straight into the shardings, ``.bin`` checkpoints are read whole, then placed.
``vx.load(path, mesh=...)`` and the lam sweep (three models at once) both read this way.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from viscodex_jax.model.config import ModelConfig


def read_sharded(path: str, cfg: ModelConfig, mesh: Mesh, rules, param_dtype: Any = None) -> dict[str, Any]:
    """The params of the checkpoint at ``path`` as jax.Arrays sharded on ``mesh`` by ``rules``."""
    from viscodex_jax import checkpoint
    from viscodex_jax.checkpoint.orbax_io import PARAMS_SUBDIR, is_orbax_dir
    from viscodex_jax.checkpoint.stream import is_safetensors_dir, plan_hf_params
    from viscodex_jax.sampling import mesh as on_mesh

    if is_orbax_dir(path):
        import orbax.checkpoint as ocp

        where = os.path.abspath(os.path.join(path, PARAMS_SUBDIR))
        ckptr = ocp.StandardCheckpointer()
        stored = ckptr.metadata(where).item_metadata
        stored = getattr(stored, "tree", stored)
        shardings = on_mesh.param_shardings(cfg, stored, mesh, rules)
        target = jax.tree_util.tree_map(
            lambda m, sh: jax.ShapeDtypeStruct(m.shape, np.dtype(param_dtype or m.dtype), sharding=sh), stored, shardings)
        return ckptr.restore(where, target)
    if not is_safetensors_dir(path):
        _, params, _ = checkpoint.load_params(path, param_dtype=param_dtype)
        return on_mesh.place_params(cfg, params, mesh, rules)
    plan = plan_hf_params(path, cfg, param_dtype)
    shardings = on_mesh.param_shardings(cfg, plan, mesh, rules)
    return jax.tree_util.tree_map(read_leaf, plan, shardings)


def read_leaf(src, sharding) -> jax.Array:
    """One param (a ``checkpoint.stream.ParamSource``) into its local shards: each HF tensor is read once
    and copied into every distinct local shard that covers it."""
    from viscodex_jax.checkpoint import hf_map

    shards: dict[tuple, tuple[tuple, list, np.ndarray]] = {}
    for device, index in sharding.addressable_devices_indices_map(src.shape).items():
        bounds = tuple(sl.indices(n)[:2] for sl, n in zip(index, src.shape))
        if bounds not in shards:
            shards[bounds] = (index, [], np.empty([b - a for a, b in bounds], src.dtype))
        shards[bounds][1].append(device)

    def read(part):
        value = hf_map.to_flax(src.key, part.file.read(part.name), src.slot_shape).astype(src.dtype)
        src.check_tied(value)
        return value

    for part in src.parts:
        covering = [(b, idx, buf) for b, (idx, _, buf) in shards.items()
                    if part.layer is None or b[0][0] <= part.layer < b[0][1]]
        if not covering:
            continue
        value = read(part)
        for b, idx, buf in covering:
            if part.layer is None:
                buf[...] = value[idx]
            else:
                buf[part.layer - b[0][0]] = value[idx[1:]]
    arrays = [jax.device_put(buf, d) for _, devices, buf in shards.values() for d in devices]
    return jax.make_array_from_single_device_arrays(src.shape, sharding, arrays)
