"""The three programs compile_check compiles, built from abstract inputs only.

Each builder returns ``(jitted function, abstract args)``: every arg a
``jax.ShapeDtypeStruct`` carrying its ``NamedSharding`` on the slice's mesh,
so ``jitted.lower(*args).compile()`` compiles exactly what the trainer or the
sampler would run there, without allocating a byte.

* ``train``: ``train.step.make_train_step`` (with the mesh and rules, so its
  activation constraints apply) jitted as ``train/loop.py`` jits it (state and
  batch shardings from ``state_shardings`` / ``batch_shardings``, state
  donated), on a batch laid out by ``data.packing.Packer``.
* ``prefill`` / ``decode``: the sampler's own jitted ``_prefill`` and ``_step``
  (``viscodex_jax.sampling``), lowered with sharded inputs; XLA picks their
  output shardings, as it does when the sampler runs.
* ``slots``: continuous batching's decode call (``sampling.slots._decode``:
  the while loop of steps over every slot, the state donated) on the state
  ``SlotSampler`` places on the mesh (cache over slots and kv-heads).
* ``sweep_merge``: the lam sweep's on-device merge (``merge.on_device``): the
  base, VLM and coder params placed by the rules in, the merged tensors out
  in the VLM's shardings. Its arguments are the three models, its output the
  merged copy (the copied vision tower is the VLM's own arrays), its
  temporaries the merge's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from viscodex_jax.sampling import loop as sampling
from viscodex_jax.sampling import slots
from viscodex_jax.sampling.methods import Greedy
from viscodex_jax.data.packing import Packer
from viscodex_jax.model.config import ModelConfig
from viscodex_jax.model.causal_lm import logical_axes, param_shapes
from viscodex_jax.model.families.qwen2_5_vl import metadata_arrays, vision_metadata
from viscodex_jax.sharding import CACHE_AXES, batch_sharding, logical_to_mesh_spec, tree_shardings
from viscodex_jax.train.step import (OptimConfig, batch_shardings, init_state, make_optimizer, make_train_step,
                                     state_shardings, trainable_keys)

# Token ids the decode step compares against (Qwen's <|im_end|> and <|endoftext|>): only their count matters.
N_EOS = 2


def rules_of(c) -> tuple:
    """The config's logical->mesh rules as hashable tuples (as train/loop.py reads them)."""
    return tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in c.mesh.rules)


def batch_shards(mesh: Mesh, rules) -> int:
    axes = dict(rules).get("batch")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def _shape_only(cfg: ModelConfig) -> ModelConfig:
    """The config to trace ``init`` with: params and their axes do not depend on the attention kernel or
    remat, and a Pallas kernel traced inside ``eval_shape`` can leak tracers from its cached tables."""
    return cfg.replace(attention_impl="xla", remat_policy="none")


def abstract_params(cfg: ModelConfig, dtype: Any) -> dict[str, Any]:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype)), param_shapes(_shape_only(cfg)))


def _with(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_batch(cfg: ModelConfig, rows: int, max_len: int, patches_per_row: int, accum_steps: int = 1) -> dict:
    """The packed batch's shapes (Packer's layout) for ``rows`` rows, with a leading accumulation axis if > 1."""
    one = Packer(1, max_len, 0, cfg.vision, patches_per_row or None).make_batch([])

    def grow(path, x):
        axis = 1 if str(getattr(path[0], "key", "")) == "positions" and x.ndim == 3 else 0
        shape = list(np.shape(x))
        shape[axis] = rows
        if accum_steps > 1:
            shape = [accum_steps] + shape
        return jax.ShapeDtypeStruct(tuple(shape), np.asarray(x).dtype)

    return jax.tree_util.tree_map_with_path(grow, one)


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What train/loop.py derives from the config before it jits the step."""

    keys: list[str]
    optimizer: Any
    abstract_params: dict[str, Any]


def train_setup(c, cfg: ModelConfig) -> TrainSetup:
    params = abstract_params(cfg, c.model.param_dtype)
    trainable = c.train.trainable if isinstance(c.train.trainable, str) else tuple(c.train.trainable)
    keys = trainable_keys(params, trainable)
    optimizer = make_optimizer(OptimConfig(**{k: c.optim[k] for k in c.optim.keys()}), keys)
    return TrainSetup(keys, optimizer, params)


def train_program(c, cfg: ModelConfig, mesh: Mesh, rules, rows: int, setup: TrainSetup):
    """(jitted step, (state, batch)) for ``rows`` global rows per micro-step."""
    state = jax.eval_shape(lambda p: init_state(p, setup.optimizer, setup.keys), setup.abstract_params)
    ssh = state_shardings(_shape_only(cfg), state, mesh, rules)
    accum = int(c.train.accum_steps)
    batch = abstract_batch(cfg, rows, c.data.max_len, c.data.patches_per_row, accum)
    bsh = batch_shardings(batch, mesh, rules, accum=accum > 1)
    step = make_train_step(cfg, setup.optimizer, setup.keys, accum, c.train.skip_nonfinite, c.train.vocab_chunk,
                           mesh=mesh, rules=rules)
    jitted = jax.jit(step, in_shardings=(ssh, bsh), out_shardings=(ssh, None), donate_argnums=0)
    return jitted, (_with(state, ssh), _with(batch, bsh)), step


def _param_args(cfg: ModelConfig, mesh: Mesh, rules, dtype: Any) -> dict[str, Any]:
    params = abstract_params(cfg, dtype)
    return _with(params, tree_shardings(params, logical_axes(_shape_only(cfg)), mesh, rules))


def _named(mesh: Mesh, rules, logical: tuple, shape: tuple) -> NamedSharding:
    return NamedSharding(mesh, logical_to_mesh_spec(P(*logical), shape, mesh, rules))


def prefill_args(cfg: ModelConfig, mesh: Mesh, rules, param_dtype: Any, rows: int, prompt_len: int,
                 patches: int) -> tuple:
    """Abstract (params, ids, mask, pos, extra) as ``sampling._prepare`` lays them out (images: one flat list)."""
    params = _param_args(cfg, mesh, rules, param_dtype)  # stacked: the layout accelerators sample with

    def rowwise(shape, dtype, axis=0):
        logical = [None] * len(shape)
        logical[axis] = "batch"
        return jax.ShapeDtypeStruct(shape, dtype, sharding=_named(mesh, rules, tuple(logical), shape))

    ids = rowwise((rows, prompt_len), jnp.int32)
    mask = rowwise((rows, prompt_len), jnp.int32)
    pos = rowwise((3, rows, prompt_len), jnp.int32, 1) if cfg.text.mrope_section else rowwise((rows, prompt_len),
                                                                                               jnp.int32)
    extra = {}
    if cfg.vision is not None and patches:
        m = cfg.vision.spatial_merge_size
        meta = metadata_arrays(vision_metadata([(1, 2 * m, 2 * m)], cfg.vision, pad_to=patches))
        replicated = NamedSharding(mesh, P())
        extra = {"pixel_values": jax.ShapeDtypeStruct((patches, cfg.vision.patch_dim), jnp.float32,
                                                      sharding=replicated),
                 "vision_meta": {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated)
                                 for k, v in meta.items()}}
    return params, ids, mask, pos, extra


def prefill_program(cfg: ModelConfig, mesh: Mesh, rules, param_dtype: Any, rows: int, prompt_len: int,
                    cache_len: int, patches: int, cache_dtype: Any):
    args = prefill_args(cfg, mesh, rules, param_dtype, rows, prompt_len, patches)
    static = dict(cfg=cfg, cache_len=cache_len, cache_dtype=jnp.dtype(cache_dtype), mesh=mesh, rules=tuple(rules))
    return _Bound(sampling._prefill, static), args, functools.partial(sampling._prefill_fn, **static)


def decode_args(cfg: ModelConfig, mesh: Mesh, rules, param_dtype: Any, rows: int, cache_len: int,
                cache_dtype: Any) -> tuple:
    """Abstract inputs of ``sampling._step_fn`` for ``rows`` rows against a ``cache_len`` cache."""
    t = cfg.text
    params = _param_args(cfg, mesh, rules, param_dtype)  # stacked: the layout accelerators sample with
    cshape = (t.num_layers, rows, cache_len, t.num_kv_heads, t.head_dim)
    csh = _named(mesh, rules, CACHE_AXES, cshape)
    cache = {k: jax.ShapeDtypeStruct(cshape, jnp.dtype(cache_dtype), sharding=csh) for k in ("k", "v")}
    row = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, rules, len(shape)))
    rep = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))
    kv_valid = row((rows, cache_len), jnp.int32)
    logits = row((rows, 1, t.vocab_size), jnp.dtype(cfg.dtype))
    done = row((rows,), jnp.bool_)
    key = rep((2,), jnp.uint32)
    slot = rep((), jnp.int32)
    position = row((rows,), jnp.int32)
    eos = rep((N_EOS,), jnp.int32)
    pad_id = rep((), jnp.int32)
    return params, cache, kv_valid, logits, done, key, slot, position, eos, pad_id


def decode_program(cfg: ModelConfig, mesh: Mesh, rules, param_dtype: Any, rows: int, cache_len: int,
                   cache_dtype: Any):
    args = decode_args(cfg, mesh, rules, param_dtype, rows, cache_len, cache_dtype)
    static = dict(cfg=cfg, sampler=Greedy(), mrope=cfg.text.mrope_section is not None, mesh=mesh, rules=tuple(rules))
    return _Bound(sampling._step, static), args, functools.partial(sampling._step_fn, **static)


class _Bound:
    """A module-level ``jax.jit`` with its static keyword arguments fixed (``.lower(*args)`` like a plain jit)."""

    def __init__(self, jitted, static: dict[str, Any]):
        self.jitted, self.static = jitted, static

    def lower(self, *args):
        return self.jitted.lower(*args, **self.static)


def slots_args(cfg: ModelConfig, mesh: Mesh, rules, param_dtype: Any, rows: int, cache_len: int,
               cache_dtype: Any, max_new_tokens: int = 1024) -> tuple:
    """Abstract (params, state, key, eos, stop_on_free, lo) of ``slots._decode`` for ``rows`` slots of ``cache_len``."""
    settings = slots.SlotSettings(slots=rows, cache_len=cache_len, max_new_tokens=min(max_new_tokens, cache_len // 2),
                                  prompt_bucket=min(64, cache_len // 2), cache_dtype=jnp.dtype(cache_dtype).name)
    state = jax.eval_shape(lambda: slots._empty_state(cfg, settings, 0))
    state = _with(state, slots.state_shardings(cfg, settings, mesh, rules))
    rep = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))
    params = _param_args(cfg, mesh, rules, param_dtype)  # stacked: the layout accelerators sample with
    return (params, state, rep((2,), jnp.uint32), rep((N_EOS,), jnp.int32),
            rep((), jnp.bool_), rep((), jnp.int32))


def slots_program(cfg: ModelConfig, mesh: Mesh, rules, param_dtype: Any, rows: int, cache_len: int,
                  cache_dtype: Any, steps: int = 16):
    args = slots_args(cfg, mesh, rules, param_dtype, rows, cache_len, cache_dtype)
    # the largest decode window (the whole cache): the program that needs the most memory
    static = dict(cfg=cfg, sampler=Greedy(), steps=steps, mrope=cfg.text.mrope_section is not None,
                  window=cache_len, mesh=mesh, rules=tuple(rules))
    return _Bound(slots._decode, static), args, functools.partial(slots._decode.__wrapped__, **static)


def text_only(cfg: ModelConfig) -> ModelConfig:
    """The language model of a VLM as a text-only checkpoint has it (Qwen2.5-VL's is a Qwen2: the base and the
    coder of the VisCodex merge); a text-only config unchanged."""
    return ModelConfig("qwen2", cfg.text) if cfg.is_multimodal else cfg


def sweep_merge_args(cfg: ModelConfig, mesh: Mesh, rules, in_dtype: Any, spec) -> tuple:
    """(plans, (trees, weights), out shardings): the abstract base, VLM and coder as ``MeshMerge`` holds them
    (flat "a/b/c" dicts, ``in_dtype``, sharded by the rules) and the per-param weights (replicated)."""
    from viscodex_jax.merge.on_device import leaf_weights, plan_leaves
    from viscodex_jax.utils import flatten

    text = text_only(cfg)
    trees = []
    for c in (text, cfg, text):
        tree = flatten(_param_args(c, mesh, rules, in_dtype))
        trees.append({"/".join(k): v for k, v in tree.items()})
    shapes = [{tuple(k.split("/")): v for k, v in t.items()} for t in trees]
    plans = plan_leaves(cfg, shapes, spec)
    rep = NamedSharding(mesh, P())
    weights = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rep) for k, v in leaf_weights(plans, spec).items()}
    out = {p.path: trees[1][p.path].sharding for p in plans}
    return plans, (trees, weights), out


def sweep_merge_program(cfg: ModelConfig, mesh: Mesh, rules, in_dtype: Any, spec):
    from viscodex_jax.merge.on_device import build_program

    plans, args, out = sweep_merge_args(cfg, mesh, rules, in_dtype, spec)
    shardings = [{k: v.sharding for k, v in t.items()} for t in args[0]]
    return build_program(plans, spec, shardings, out, mesh), args, None
