"""The merge on a Mesh: base and models loaded once, sharded; every spec merged there by one jitted program.

    m = MeshMerge(base_dir, [vlm_dir, coder_dir], spec, mesh, rules)   # reads each tensor into its shards
    params, report = m.merge(spec_for_lam)                              # per lam: on device, no host copy

The program takes the three params trees (sharded by the training rules) and the per-tensor weights, and
returns the merged tensors in the primary's shardings (``jax.jit`` in/out shardings: no device holds a
replica of a model it does not serve). Tensors the spec does not merge (the vision tower, by default) are
the primary's own arrays, shared, not copied.

Each merged param runs ``tensor.merge_math``, the streamed merge's own per-tensor function, once per HF
tensor (``lax.map`` over the layers of a stacked param, so the float32 temporaries are one layer's), with
the same inputs it gets there:

* TIES / breadcrumbs thresholds: ``methods.kth_largest_magnitudes_on_device``, an exact selection equal to
  the host's numpy selection;
* DARE's keep mask: drawn in HF layout with the streamed merge's keys (seed, tensor name, and row chunk for
  a big tensor, cut by ``tensor.row_chunks``), then laid out as our param;
* different vocab sizes: the shared rows merged, the primary's others kept (``merge_with_vocab_policy``).

Every step is elementwise but the thresholds (exact) and the report's sums, so the merged params are bit
for bit the checkpoint ``merge_checkpoints`` writes. One exception: DARE with ``dare_rescale="l1"`` sums
each task vector's L1 norm in float32 on device, over the whole tensor, where the streamed merge adds
float32 sums of row chunks in float64 on the host; its rescale factor can differ in the last bits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from viscodex_jax.checkpoint import hf_map
from viscodex_jax.merge.methods import dare_mask, kth_largest_magnitudes_on_device
from viscodex_jax.merge.report import MergeReport
from viscodex_jax.merge.spec import MergeError, MergeSpec
from viscodex_jax.merge.tensor import _chunk_key, _name_hash, merge_math, row_chunks, stats_from_sums, traced_spec
from viscodex_jax.model.config import ModelConfig

Key = tuple[str, ...]
EMBED = ("model", "embed_tokens", "embedding")
LM_HEAD = ("lm_head", "kernel")


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """One merged param: its HF tensors (one per layer of a stacked param) and how each source provides it."""

    key: Key
    names: tuple[str, ...]  # canonical HF name per layer (one for an unstacked param): the DARE keys
    slot_shape: tuple[int, ...]  # our shape of one layer's merged part
    hf_shape: tuple[int, ...]  # its HF shape
    vocab_rows: int | None  # embeddings / lm_head when vocab sizes differ: the rows every model has
    tied: tuple[bool, ...]  # per source (base, models...): lm_head is that model's tied embedding

    @property
    def path(self) -> str:
        return "/".join(self.key)

    @property
    def stacked(self) -> bool:
        return hf_map.is_stacked(self.key)

    @property
    def vocab_axis(self) -> int:
        return 0 if self.key == EMBED else len(self.slot_shape) - 1


def plan_leaves(cfg: ModelConfig, shapes: Sequence[dict[Key, Any]], spec: MergeSpec,
                names: dict[tuple[Key, int | None], str] | None = None) -> list[LeafPlan]:
    """The merged params of the primary (``shapes[1]``; ``shapes[0]`` is the base) from the trees' shapes.

    ``names`` maps (param, layer) to the canonical HF name the checkpoint used (the streamed merge's name);
    by default ``hf_map.path_to_hf``.
    """
    primary = shapes[1]
    plans = []
    for key, leaf in primary.items():
        path = "/".join(key)
        if not spec.merges(path):
            continue
        tied = tuple(key not in s and key == LM_HEAD and EMBED in s for s in shapes)
        for s, t in zip(shapes, tied):
            if key not in s and not t:
                raise MergeError(f"param {path} is merged but one model has no such tensor (exclude it to copy it)")
        full = tuple(leaf.shape)
        slot = full[1:] if hf_map.is_stacked(key) else full
        rows = None
        if key in (EMBED, LM_HEAD):
            axis = 0 if key == EMBED else len(slot) - 1
            vocabs = [(s[EMBED].shape[0] if t else s[key].shape[axis]) for s, t in zip(shapes, tied)]
            if len(set(vocabs)) > 1:
                rows = min(vocabs)
                slot = slot[:axis] + (rows,) + slot[axis + 1:]
        layers = range(full[0]) if hf_map.is_stacked(key) else [None]
        hf_names = tuple((names or {}).get((key, i)) or hf_map.path_to_hf(key, i) for i in layers)
        plans.append(LeafPlan(key, hf_names, slot, hf_map.hf_shape(key, slot, cfg), rows, tied))
    return plans


def _one_tensor(plan: LeafPlan, spec: MergeSpec, out_dtype, weights, base, thetas, name_hash):
    """``merge_math`` on one HF tensor in our layout, given the streamed merge's thresholds and mask."""
    n = len(thetas)
    sparsify = spec.method_pieces.sparsify
    numel = max(int(np.prod(plan.hf_shape)), 1)
    ranks = tuple(sparsify.ranks(spec, numel)) if sparsify and sparsify.ranks else ()
    thresh = kth_largest_magnitudes_on_device(base, thetas, ranks) if ranks else jnp.zeros((n, 0), jnp.float32)
    draw = None
    if sparsify and sparsify.keyed:
        whole, bounds = row_chunks(plan.hf_shape, spec)
        parts = [dare_mask(_chunk_key(spec, name_hash, c, not whole), n, (hi - lo,) + plan.hf_shape[1:], spec)
                 for c, (lo, hi) in enumerate(bounds)]
        hf = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        mask = jnp.stack([hf_map.to_flax(plan.key, hf[i], plan.slot_shape) for i in range(n)])
        draw = lambda d: mask  # noqa: E731
    return merge_math(base, tuple(thetas), weights, thresh, draw, spec, out_dtype)


def merge_leaf(plan: LeafPlan, spec: MergeSpec, sources: Sequence[jax.Array], weights):
    """One merged param (traced) from its sources in our layout (base first, then the models): (merged, sums)."""
    out_dtype = jnp.dtype(spec.out_dtype)
    srcs = [x.T if t else x for x, t in zip(sources, plan.tied)]  # a tied embedding [V, H] is lm_head [H, V]
    primary = srcs[1]
    if plan.vocab_rows is not None:
        srcs = [jax.lax.slice_in_dim(x, 0, plan.vocab_rows, axis=plan.vocab_axis) for x in srcs]
    hashes = jnp.asarray(np.array([_name_hash(n) for n in plan.names], np.uint32))
    one = functools.partial(_one_tensor, plan, spec, out_dtype, weights)
    if plan.stacked:
        merged, sums = jax.lax.map(lambda xs: one(xs[0], xs[1], xs[2]), (srcs[0], tuple(srcs[1:]), hashes))
    else:
        merged, sums = one(srcs[0], srcs[1:], hashes[0])
    if plan.vocab_rows is not None:
        rest = jax.lax.slice_in_dim(primary, plan.vocab_rows, primary.shape[plan.vocab_axis], axis=plan.vocab_axis)
        merged = jnp.concatenate([merged, rest.astype(out_dtype)], axis=plan.vocab_axis)
    return merged, sums


def _source(tree: dict[str, Any], plan: LeafPlan, tied: bool):
    return tree["/".join(EMBED)] if tied else tree[plan.path]


def build_program(plans: Sequence[LeafPlan], spec: MergeSpec, in_shardings: Sequence[dict[str, Any]],
                  out_shardings: dict[str, Any], mesh: Mesh):
    """The jitted merge: (trees [base, *models] as flat dicts "a/b/c" -> array, weights path -> float32 [n])
    -> (merged path -> array, sums path -> report sums). Unused inputs (the vision tower) stay arguments, so
    the program's memory is that of the three models plus the merged tensors plus its temporaries."""
    spec = traced_spec(spec)
    rep = NamedSharding(mesh, P())

    def program(trees, weights):
        out, sums = {}, {}
        for p in plans:
            srcs = [_source(t, p, tied) for t, tied in zip(trees, p.tied)]
            out[p.path], sums[p.path] = merge_leaf(p, spec, srcs, weights[p.path])
        return out, sums

    return jax.jit(program, in_shardings=(list(in_shardings), rep), out_shardings=(out_shardings, rep),
                   keep_unused=True)


def leaf_weights(plans: Sequence[LeafPlan], spec: MergeSpec) -> dict[str, np.ndarray]:
    return {p.path: np.asarray(spec.weights_for(p.path), np.float32) for p in plans}


def report_from_sums(plans: Sequence[LeafPlan], sums: dict[str, Any], spec: MergeSpec, names: Sequence[str],
                     copied: Sequence[str]) -> MergeReport:
    """The streamed merge's report (per HF tensor) from the program's per-layer sums."""
    report = MergeReport(spec, names)
    sums = jax.device_get(sums)
    for p in plans:
        numel = max(int(np.prod(p.hf_shape)), 1)
        for i, name in enumerate(p.names):
            one = {k: np.asarray(v[i] if p.stacked else v, np.float64) for k, v in sums[p.path].items()}
            stats = stats_from_sums(name, one, numel)
            if p.vocab_rows is not None:
                stats["vocab_rows_merged"] = p.vocab_rows
            report.merged(name, stats)
    for name in copied:
        report.copied(name)
    return report


@jax.jit
def _count_nonfinite(tree):
    return {k: jnp.sum(~jnp.isfinite(x)) for k, x in tree.items()}


class MeshMerge:
    """Base and models read once into their shardings; ``merge(spec)`` forms the merged params on device.

    Every check of the streamed merge (``drivers.plan_merge``) is made from the headers first; the tensors
    copied from the primary are checked finite once, on device, after loading.
    """

    def __init__(self, base_dir: str, model_dirs: Sequence[str], spec: MergeSpec, mesh: Mesh, rules,
                 require_vision: bool = False):
        from viscodex_jax.checkpoint.sharded import read_sharded
        from viscodex_jax.checkpoint.validate import is_float_dtype
        from viscodex_jax.merge.drivers import hf_dir_source, plan_merge
        from viscodex_jax.model.causal_lm import param_shapes
        from viscodex_jax.model.config import load_config
        from viscodex_jax.utils import flatten

        dirs = [base_dir, *model_dirs]
        self.cfg = load_config(model_dirs[0])
        self.mesh, self.rules, self.spec = mesh, rules, traced_spec(spec)
        expected = flatten(param_shapes(self.cfg))
        sources = [hf_dir_source(d, expected) for d in dirs]
        plan = plan_merge(sources[0], sources[1:], spec, self.cfg, require_vision)
        self.names = plan.names
        hf_names = {(t.key, t.layer): canon for canon, t, srcs in plan.steps if srcs is not None}
        self.copied = [canon for canon, _, srcs in plan.steps if srcs is None]
        self.trees = []
        for d in dirs:
            tree = flatten(read_sharded(d, load_config(d), mesh, rules))
            self.trees.append({"/".join(k): v for k, v in tree.items()})
        shapes = [{tuple(k.split("/")): v for k, v in t.items()} for t in self.trees]
        self.plans = plan_leaves(self.cfg, shapes, spec, hf_names)
        merged = {p.path for p in self.plans}
        primary = self.trees[1]
        copied = {path: x for path, x in primary.items() if path not in merged}
        for path, x in copied.items():
            if not is_float_dtype(x.dtype):
                raise MergeError(f"{model_dirs[0]}: param {path} has dtype {x.dtype}, but model parameters are "
                                 "floating point")
        for path, bad in jax.device_get(_count_nonfinite(copied)).items():  # one program for them all
            if bad:
                raise MergeError(f"{model_dirs[0]}: param {path} (copied into the output) has NaN/Inf: {bad} of "
                                 f"{copied[path].size} values")
        out_sh = {p.path: primary[p.path].sharding for p in self.plans}
        shardings = [{k: v.sharding for k, v in t.items()} for t in self.trees]
        self.program = build_program(self.plans, spec, shardings, out_sh, mesh)

    def merge(self, spec: MergeSpec) -> tuple[dict[str, Any], dict[str, Any]]:
        """(merged params tree, report dict) for ``spec`` (which may differ from the first only in its weights)."""
        from viscodex_jax.utils import unflatten

        if traced_spec(spec) != self.spec:
            raise MergeError(f"the program was built for {self.spec}; {spec} differs in more than its weights")
        out, sums = self.program(self.trees, leaf_weights(self.plans, spec))
        report = report_from_sums(self.plans, sums, spec, self.names, self.copied)
        report.check_task_vectors()
        report.data["summary"] = report.summary()
        params = {k: out.get(k, v) for k, v in self.trees[1].items()}
        return unflatten({tuple(k.split("/")): v for k, v in params.items()}), report.data

    def close(self) -> None:
        """Drops the loaded models (their device memory is freed once no merged params refer to them)."""
        self.trees = []


def per_device_bytes(shapes: dict[Any, tuple[int, ...]], itemsize: dict[Any, float],
                     shardings: dict[Any, Any], devices: Sequence[Any]) -> dict[Any, float]:
    """Bytes each device holds of a tree given each leaf's shape, bytes per element and sharding."""
    per = {d: 0.0 for d in devices}
    for k, shape in shapes.items():
        for d, index in shardings[k].devices_indices_map(tuple(shape)).items():
            per[d] += np.prod([len(range(*i.indices(n))) for i, n in zip(index, shape)]) * itemsize[k]
    return per


def default_mesh() -> Mesh:
    """A one-device mesh: the same code path without ``--config.mesh``."""
    from viscodex_jax.sharding import make_mesh

    return make_mesh((1, 1, 1), jax.devices()[:1])


__all__ = ["LeafPlan", "MeshMerge", "build_program", "default_mesh", "merge_leaf", "plan_leaves", "traced_spec"]
