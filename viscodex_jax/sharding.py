"""Mesh construction and logical-axis rules: one code path for 1 CPU, 8 fake CPUs, a GPU host, a TPU pod.

Modules annotate params with logical axes ("embed", "mlp", "heads", ...);
configs hold the rules that map them to mesh axes ("data", "fsdp", "tensor").
A dimension whose size the mesh axes do not divide is left unsharded on those
axes (logged), rather than failing deep inside XLA.

Activations are constrained the same way (``constrain``), with their own
logical names ("act_embed", "act_mlp", ...) so that, for example, FSDP shards the
embed dimension of the weights but never of the activations: saved activations
are then divided over the batch like the batch itself, and per-chip memory at
a fixed number of rows per chip does not grow with the slice. Without an
``activation_sharding`` context (one CPU device, eager use) ``constrain`` is a no-op.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Default rules: FSDP over the model dimension, tensor parallelism over heads/mlp/vocab.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # activations: rows over every data-parallel axis, features over the tensor axis only
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # the sampler's KV cache [layers, batch, cache_length, kv_heads, head_dim]: rows like the batch,
    # kv-heads like the attention activations; the slots of one row stay on one chip
    ("cache_length", None),
)

CACHE_AXES = ("layers", "batch", "cache_length", "act_kv_heads", "head_dim")


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; -1 in one place takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = len(devices) // known
    n = int(np.prod(shape))
    if n > len(devices) or (n < len(devices) and jax.process_count() > 1):
        raise ValueError(f"mesh shape {tuple(shape)} needs {n} devices, have {len(devices)}")
    if n < len(devices):  # an explicit small mesh (e.g. a tiny model) on a bigger host: use the first devices
        log.info("mesh %s uses %d of %d devices", tuple(shape), n, len(devices))
        devices = devices[:n]
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - CPU/odd topologies: a plain reshape is fine
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in axes]))


def logical_to_mesh_spec(logical: P | None, shape: Sequence[int], mesh: Mesh, rules, name: str = "") -> P:
    """Maps one logical PartitionSpec to a mesh PartitionSpec, dropping axes that do not divide."""
    if logical is None or len(logical) == 0:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for dim, ax in zip(shape, logical):
        mesh_axes = table.get(ax) if ax is not None else None
        if mesh_axes is None:
            out.append(None)
            continue
        tup = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        tup = tuple(a for a in tup if a not in used and mesh.shape[a] > 1)
        if not tup:
            out.append(None)
            continue
        if dim % _axis_size(mesh, tup):
            log.info("%s: dim %d (%s) not divisible by mesh axes %s; replicated on them", name, dim, ax, tup)
            out.append(None)
            continue
        used.update(tup)
        out.append(tup[0] if len(tup) == 1 else tup)
    return P(*out)


def tree_shardings(shapes: Any, logical: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of arrays/ShapeDtypeStructs given its logical specs tree."""
    flat_l = {jax.tree_util.keystr(k): v for k, v in
              jax.tree_util.tree_flatten_with_path(logical, is_leaf=lambda x: x is None or isinstance(x, P))[0]}

    def one(path, x):
        key = jax.tree_util.keystr(path)
        return NamedSharding(mesh, logical_to_mesh_spec(flat_l.get(key), x.shape, mesh, rules, key))

    return jax.tree_util.tree_map_with_path(one, shapes)


def batch_sharding(mesh: Mesh, rules, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Sharding of a batch array: the batch axis over the rule for "batch", the rest replicated."""
    spec = [None] * ndim
    spec[batch_axis] = dict(rules).get("batch")
    return NamedSharding(mesh, P(*spec))


def named_sharding(mesh: Mesh, rules, logical: Sequence[str | None], shape: Sequence[int], name: str = "") -> NamedSharding:
    """The NamedSharding ``rules`` give an array of ``shape`` whose dims carry the ``logical`` names."""
    return NamedSharding(mesh, logical_to_mesh_spec(P(*logical), shape, mesh, rules, name))


_ACTIVE: contextvars.ContextVar[tuple[Mesh, Any] | None] = contextvars.ContextVar("activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules) -> Iterator[None]:
    """While tracing inside this context, ``constrain`` pins activations to ``rules`` on ``mesh``."""
    token = _ACTIVE.set((mesh, tuple(rules)) if mesh is not None else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, Any] | None:
    """The (mesh, rules) of the enclosing ``activation_sharding`` context, or None."""
    return _ACTIVE.get()


def rule_axes(rules, logical: str) -> tuple[str, ...]:
    """The mesh axes a logical name maps to (empty when unmapped)."""
    axes = dict(rules).get(logical)
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a name absent from the rules leaves its dim to XLA."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    if len(logical) != x.ndim:
        raise ValueError(f"constrain: {len(logical)} logical names {tuple(logical)} for an array of shape {x.shape}")
    known = {name for name, _ in rules}
    spec = logical_to_mesh_spec(P(*logical), x.shape, mesh, rules, "activation")
    spec = P(*(s if (n is None or n in known) else P.UNCONSTRAINED for s, n in zip(spec, logical)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
