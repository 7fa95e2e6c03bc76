"""Where the sampler's arrays live on a Mesh: params by the training rules, rows over the batch axes,
the KV cache over rows and kv-heads. Without a mesh everything here is the identity, so one code path
serves one CPU, fake CPU devices, a GPU host and a TPU slice.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from viscodex_jax import sharding
from viscodex_jax.model.config import ModelConfig


def resolve_rules(mesh: Mesh | None, rules) -> tuple | None:
    """Hashable rules (they are a static argument of the jitted programs); the defaults when none given."""
    if mesh is None:
        return None
    rules = sharding.DEFAULT_RULES if rules is None else rules
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules)


def context(mesh: Mesh | None, rules):
    """The activation-sharding context the model's constraints and the attention's shard_map path read."""
    return sharding.activation_sharding(mesh, rules) if mesh is not None else contextlib.nullcontext()


def param_shardings(cfg: ModelConfig, shapes: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings of the params from the modules' logical axes, as training places them."""
    from viscodex_jax.model.causal_lm import layers_unstacked, logical_axes

    # The axes do not depend on the kernel or remat; a Pallas kernel traced in eval_shape can leak tracers.
    logical = logical_axes(cfg.replace(attention_impl="xla", remat_policy="none"))
    if layers_unstacked(shapes):  # per-layer params: each layer's axes are the stacked ones less "layers"
        model = dict(logical["model"])
        per_layer = jax.tree_util.tree_map(lambda spec: P(*spec[1:]), model.pop("layers"),
                                           is_leaf=lambda x: isinstance(x, P))
        model.update({k: per_layer for k in shapes["model"] if k.startswith("layers_")})
        logical = {**logical, "model": model}
    return sharding.tree_shardings(shapes, logical, mesh, rules)


def place_params(cfg: ModelConfig, params: Any, mesh: Mesh | None, rules) -> Any:
    """Params on the mesh by the rules (a no-op for arrays already placed so); device arrays without a mesh."""
    if mesh is None:
        return jax.tree_util.tree_map(jax.numpy.asarray, params)
    return jax.device_put(params, param_shardings(cfg, params, mesh, rules))


def batch_shards(mesh: Mesh | None, rules) -> int:
    """How many ways the rules split rows (the product of the mesh axes "batch" maps to)."""
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in sharding.rule_axes(rules, "batch")] or [1]))


def row_sharding(mesh: Mesh, rules, shape: Sequence[int], axis: int = 0) -> NamedSharding:
    logical = [None] * len(shape)
    logical[axis] = "batch"
    return sharding.named_sharding(mesh, rules, logical, shape, "rows")


def cache_sharding(mesh: Mesh, rules, shape: Sequence[int]) -> NamedSharding:
    return sharding.named_sharding(mesh, rules, sharding.CACHE_AXES, shape, "kv cache")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_rows(x: Any, mesh: Mesh | None, rules, axis: int = 0) -> Any:
    """A host array with rows on ``axis`` -> a device array split over the batch axes."""
    if mesh is None:
        return jax.numpy.asarray(x)
    return jax.device_put(x, row_sharding(mesh, rules, np.shape(x), axis))


def put_replicated(tree: Any, mesh: Mesh | None) -> Any:
    if mesh is None:
        return jax.tree_util.tree_map(jax.numpy.asarray, tree)
    return jax.device_put(tree, replicated(mesh))


def constrain_cache(cache: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Pins the KV cache to the rules of the enclosing activation-sharding context (no-op outside one)."""
    return {k: sharding.constrain(v, sharding.CACHE_AXES) for k, v in cache.items()}
