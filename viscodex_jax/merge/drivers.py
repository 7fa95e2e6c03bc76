"""One merge driver over tensor sources: params pytrees in memory, or HF checkpoint dirs streamed.

A source is one model's tensors by canonical HF name, each read on demand in
HF layout. The driver checks everything up front (one weight per model, the
primary holds every tensor its config describes, every merged tensor is in
every model, no model has a merged tensor the primary lacks, a tied model's
embedding stands in for its lm_head), then merges tensor by tensor with
``tensor.merge_with_vocab_policy`` and hands each output tensor to a sink (a
safetensors writer, or a params tree being filled). Since both kinds of input
feed the same per-tensor function the same HF-layout arrays, the streamed and
the in-memory merge agree bit for bit.

The first fine-tuned model is the *primary* (the VLM for VisCodex): the output
has its structure, config and side files, and every tensor that is not merged
(the vision tower and the merger, by default) is copied from it bit for bit.
Copied tensors must be floating point and finite (merged ones are checked
inside the merge). Warnings about the base (see ``report``) are logged here.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import tqdm

from viscodex_jax.checkpoint import hf_map
from viscodex_jax.checkpoint.hf import copy_side_files, iter_hf_tensors
from viscodex_jax.checkpoint.planned_writer import PlannedWriter
from viscodex_jax.checkpoint.safetensors_io import SafetensorsFile, ShardedWriter
from viscodex_jax.checkpoint.validate import count_nonfinite, is_float_dtype
from viscodex_jax.merge.file_tensor import FileTensor
from viscodex_jax.merge.report import MergeReport
from viscodex_jax.merge.spec import MergeError, MergeSpec
from viscodex_jax.merge.tensor import _STAGING, io_thread, merge_with_vocab_policy
from viscodex_jax.model.causal_lm import param_shapes
from viscodex_jax.model.config import ModelConfig, config_from_dict, read_config_json
from viscodex_jax.utils import atomic_dir, flatten, unflatten

log = logging.getLogger(__name__)

Key = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Tensor:
    key: Key | None  # our param path (None: no param of the primary's model type maps to it)
    layer: int | None  # index into a stacked param
    read: Callable[[], Any]  # the tensor in HF layout: an array, or a FileTensor that reads itself in chunks
    where: str  # the file, or the model's name, for error messages
    label: str  # the tensor, for error messages
    shape: tuple[int, ...] | None = None  # HF layout, when known without reading
    dtype: Any = None  # when known without reading (not for .bin files)


@dataclasses.dataclass(frozen=True)
class TensorSource:
    """One model's tensors by canonical HF name. ``name`` goes in the report, ``label`` in errors."""

    name: str
    label: str
    tensors: dict[str, _Tensor]

    def get(self, canon: str) -> _Tensor | None:
        t = self.tensors.get(canon)
        if t is None and canon == "lm_head.weight":
            t = self.tensors.get("model.embed_tokens.weight")  # a tied model: the embedding is its head
        return t


def hf_dir_source(ckpt_dir: str, expected: dict[Key, Any]) -> TensorSource:
    """The tensors of a HF checkpoint dir (indexed now, read later); ``expected`` maps names onto params."""
    tensors: dict[str, _Tensor] = {}
    files: dict[str, SafetensorsFile] = {}
    for file, name, shape, read in iter_hf_tensors(ckpt_dir):
        dtype = None
        if file.endswith(".safetensors"):
            # Read later in chunks straight into the merge's staging buffers (see file_tensor).
            f = files.get(file) or files.setdefault(file, SafetensorsFile(file))
            ref = FileTensor.of(f, name)
            read, dtype = (lambda ref=ref: ref), ref.dtype
        canon = hf_map.canonical_name(name)
        if canon in tensors:
            raise MergeError(f"{file}: tensor {name!r} appears twice in {ckpt_dir}")
        hit = hf_map.hf_to_path(canon, expected)
        key, layer = hit if hit is not None else (None, None)
        tensors[canon] = _Tensor(key, layer, read, file, repr(canon), tuple(shape), dtype)
    return TensorSource(os.path.basename(os.path.normpath(ckpt_dir)), ckpt_dir, tensors)


def tree_source(params: dict[str, Any], cfg: ModelConfig, name: str) -> TensorSource:
    """The tensors of a params pytree, one HF tensor (one layer of a stacked param) at a time."""
    tensors: dict[str, _Tensor] = {}
    for key, leaf in flatten(params).items():
        layers = range(leaf.shape[0]) if hf_map.is_stacked(key) else [None]
        for i in layers:
            def read(leaf=leaf, key=key, i=i):
                x = np.asarray(leaf[i] if i is not None else leaf)
                return hf_map.to_hf(key, x, hf_map.hf_shape(key, x.shape, cfg))
            label = "/".join(key) + (f" (layer {i})" if i is not None else "")
            shape = hf_map.hf_shape(key, leaf.shape[1:] if i is not None else leaf.shape, cfg)
            tensors[hf_map.path_to_hf(key, i)] = _Tensor(key, i, read, name, label, tuple(shape), np.dtype(leaf.dtype))
    return TensorSource(name, name, tensors)


_SHAPES: dict[str, dict[Key, Any]] = {}


def _param_shapes(cfg: ModelConfig) -> dict[Key, Any]:
    """``param_shapes`` flattened, once per config (tracing the model's init takes about a second)."""
    key = repr(cfg)
    if key not in _SHAPES:
        if len(_SHAPES) >= 4:
            _SHAPES.clear()
        _SHAPES[key] = flatten(param_shapes(cfg))
    return _SHAPES[key]


def _expected_hf_names(cfg: ModelConfig) -> list[str]:
    """Canonical HF names of every tensor a model of ``cfg`` has (one per layer for stacked params)."""
    out = []
    for key, shape in _param_shapes(cfg).items():
        layers = range(shape.shape[0]) if hf_map.is_stacked(key) else [None]
        out += [hf_map.path_to_hf(key, i) for i in layers]
    return out


def _check_copied_dtype(dtype: Any, t: _Tensor) -> None:
    if not is_float_dtype(np.dtype(dtype)):
        raise MergeError(f"{t.where}: tensor {t.label} has dtype {dtype}, but model parameters are floating point")


def _copy_error(t: _Tensor, bad: int, size: int) -> MergeError:
    return MergeError(f"{t.where}: tensor {t.label} (copied into the output) has NaN/Inf: {bad} of {size} values")


def _check_copied(arr: Any, t: _Tensor) -> None:
    """Tensors copied from the primary skip the merge's own NaN check: check them here."""
    arr = np.asarray(arr)
    _check_copied_dtype(arr.dtype, t)
    bad = count_nonfinite(arr)
    if bad:
        raise _copy_error(t, bad, arr.size)


# Copied tensors are streamed through two buffers of this many bytes (one is read while the other is written).
COPY_CHUNK_BYTES = 1 << 24


def _stream_copy(ref: FileTensor, t: _Tensor, sink: Callable[[int, np.ndarray], Any]) -> None:
    """A copied tensor read in chunks into two reused buffers, checked finite and handed to ``sink``; a sink
    that writes later returns a future, and a buffer is reused only once its write is done."""
    _check_copied_dtype(ref.dtype, t)
    step = max(1, COPY_CHUNK_BYTES // ref.dtype.itemsize)
    bad = 0
    writes: list[Any] = [None, None]
    for j, lo in enumerate(range(0, ref.size, step)):
        hi = min(lo + step, ref.size)
        if writes[j % 2] is not None:
            writes[j % 2].result()
        chunk = _STAGING.buf(("copy", j % 2), (hi - lo) * ref.dtype.itemsize).view(ref.dtype)
        ref.read_into(chunk, lo, hi)
        bad += count_nonfinite(chunk)
        if not bad:
            writes[j % 2] = sink(lo, chunk)
    for w in writes:
        if w is not None:
            w.result()
    if bad:
        raise _copy_error(t, bad, ref.size)


class _AsyncWrites:
    """A ``PlannedWriter``'s writes on the merge's I/O thread, so ``pwrite`` (a copy into the page cache) runs
    while the next chunk merges; at most ``depth`` pieces wait (bounded memory), and a write's error is raised
    in the merge at the next write or at ``drain``."""

    def __init__(self, writer: PlannedWriter, depth: int = 8):
        self.writer, self.depth = writer, depth
        self._pending: collections.deque = collections.deque()
        self._failed = False

    def _write(self, name: str, piece: np.ndarray, start: int) -> None:
        if self._failed:  # after a failed write (a full disk) the queued ones are dropped, not tried
            return
        try:
            self.writer.write(name, piece, start)
        except BaseException:
            self._failed = True
            raise

    def write(self, name: str, start: int, piece: np.ndarray):
        if self._failed:
            self.drain()  # raises the failed write's error now
        while len(self._pending) >= self.depth:
            self._pending.popleft().result()
        fut = io_thread("write").submit(self._write, name, piece, start)
        self._pending.append(fut)
        return fut

    def drain(self, raise_errors: bool = True) -> None:
        while self._pending:
            fut = self._pending.popleft()
            if raise_errors:
                fut.result()
            else:
                concurrent.futures.wait([fut])


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """A checked merge: per primary tensor, the sources to merge (None: copied from the primary)."""

    spec: MergeSpec
    primary: TensorSource
    steps: list[tuple[str, _Tensor, list[_Tensor] | None]]
    names: list[str]


def plan_merge(base: TensorSource, models: Sequence[TensorSource], spec: MergeSpec, cfg: ModelConfig,
               require_vision: bool = False) -> MergePlan:
    """Every check that needs no tensor data, before any work or output.

    ``cfg`` is the primary's config. ``require_vision``: the primary must be a
    VLM (the VisCodex recipe copies its vision tower); a text-only primary
    means the models were swapped.
    """
    if len(spec.weights) != len(models):
        raise MergeError(f"{len(models)} models to merge but {len(spec.weights)} weights given")
    primary, sources = models[0], [base, *models]
    if require_vision and not cfg.is_multimodal:
        raise MergeError(
            f"{primary.label}: model_type {cfg.model_type!r} has no vision tower, but the merge copies the vision "
            "tower from this model (the VLM); were the VLM and coder swapped, or the base given as the VLM?"
        )
    absent = [n for n in _expected_hf_names(cfg) if n not in primary.tensors]
    if absent:
        raise MergeError(
            f"{primary.label}: its config.json describes a {cfg.model_type} model but it has no tensor {absent[0]!r}"
            + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else "")
            + "; the output takes its structure and copied tensors from this model"
        )
    steps = []
    for canon, t in primary.tensors.items():
        if t.key is None:
            raise MergeError(f"{t.where}: tensor {canon!r} does not belong to a {cfg.model_type} model")
        if not spec.merges("/".join(t.key)):
            steps.append((canon, t, None))
            continue
        srcs = [s.get(canon) for s in sources]
        for s, src in zip(sources, srcs):
            if src is None:
                raise MergeError(f"tensor {canon!r} is in {primary.label} but not in {s.label} "
                                 "(exclude it to copy it instead)")
        steps.append((canon, t, srcs))
    for s in [base, *models[1:]]:
        for canon, t in s.tensors.items():
            if (canon not in primary.tensors and t.key is not None and spec.merges("/".join(t.key))
                    and not (canon == "lm_head.weight" and cfg.text.tie_word_embeddings)):
                raise MergeError(f"tensor {canon!r} is in {s.label} but not in {primary.label}")
    return MergePlan(spec, primary, steps, [s.name for s in sources])


def run_plan(plan: MergePlan, put: Callable[[str, _Tensor, Any], None] | None,
             progress: Callable[[int], None] = lambda nbytes: None,
             sink_for: Callable[[str], Callable[[int, np.ndarray], None]] | None = None) -> MergeReport:
    """Merges (or copies) each tensor of the plan and hands it to ``put(name, primary tensor, array)``, or, with
    ``sink_for``, in pieces to ``sink_for(name)(first element, flat piece)`` as they are made."""
    report = MergeReport(plan.spec, plan.names)
    for canon, t, srcs in plan.steps:
        sink = sink_for(canon) if sink_for is not None else None
        if srcs is None:
            arr = t.read()
            if sink is not None and isinstance(arr, FileTensor):
                _stream_copy(arr, t, sink)
            else:
                arr = np.asarray(arr)
                _check_copied(arr, t)
                sink(0, arr.reshape(-1)) if sink is not None else put(canon, t, arr)
            report.copied(canon)  # copied untouched: the vision tower stays the VLM's
            progress(arr.nbytes)
            continue
        arrays = [s.read() for s in srcs]
        merged, stats = merge_with_vocab_policy(canon, arrays[0], arrays[1:], arrays[1], plan.spec,
                                                "/".join(t.key), sink)
        if sink is None:
            put(canon, t, merged)
        report.merged(canon, stats)
        progress(sum(x.nbytes for x in arrays))
        del arrays, merged
    _STAGING.clear()
    for w in report.check_task_vectors():
        log.warning("merge: %s", w)
    report.data["summary"] = report.summary()
    return report


def merge_params(
    base: dict[str, Any], models: Sequence[dict[str, Any]], spec: MergeSpec, cfg: ModelConfig,
    model_names: Sequence[str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """In-memory merge of params pytrees; ``models[0]`` is the primary (its structure is kept)."""
    names = list(model_names or [f"model{i + 1}" for i in range(len(models))])
    plan = plan_merge(tree_source(base, cfg, "base"), [tree_source(m, cfg, n) for m, n in zip(models, names)],
                      spec, cfg)
    shapes = {k: np.shape(v) for k, v in flatten(models[0]).items()}
    out: dict[Key, np.ndarray] = {}

    def put(canon: str, t: _Tensor, arr: Any):
        full = shapes[t.key]
        value = hf_map.to_flax(t.key, np.asarray(arr), full[1:] if t.layer is not None else full)
        if t.key not in out:
            out[t.key] = np.empty(full, value.dtype)
        out[t.key][t.layer if t.layer is not None else ...] = value

    report = run_plan(plan, put)
    return unflatten(out), report.data


def merge_models(base: Any, models: Sequence[Any], spec: MergeSpec | None = None, **fields) -> Any:
    """``vx.Model``s in, the merged ``vx.Model`` out: ``models[0]`` (the VLM) gives its config, processor and
    untouched tensors. ``spec``, or MergeSpec ``fields`` such as ``weights=(0.7, 0.3), method="ties"``."""
    import jax
    import jax.numpy as jnp

    from viscodex_jax.api import Model

    if spec is not None and fields:
        raise MergeError(f"give a MergeSpec or its fields, not both (got spec and {sorted(fields)})")
    spec = spec or MergeSpec(**fields)
    primary = models[0]
    names = [os.path.basename(os.path.normpath(m.path)) if m.path else f"model{i + 1}" for i, m in enumerate(models)]
    params, _ = merge_params(base.params, [m.params for m in models], spec, primary.config, names)
    raw = {k: v for k, v in primary.raw_config.items() if k != "torch_dtype"}
    raw["dtype"] = spec.out_dtype
    return Model(primary.config, jax.tree_util.tree_map(jnp.asarray, params), raw, primary.path, primary.processor)


def _output_entries(plan: MergePlan) -> list[tuple[str, Any, tuple[int, ...]]] | None:
    """(name, dtype, shape) of every output tensor in write order, or None when a dtype is not in a header."""
    out = []
    for canon, t, srcs in plan.steps:
        if t.dtype is None or t.shape is None:
            return None
        out.append((canon, np.dtype(plan.spec.out_dtype) if srcs is not None else t.dtype, t.shape))
    return out


def merge_checkpoints(
    base_dir: str,
    model_dirs: Sequence[str],
    out_dir: str,
    spec: MergeSpec,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    require_vision: bool = False,
) -> dict[str, Any]:
    """Streams a merge of HF checkpoint dirs into a HF dir; returns the report.

    Peak host memory: a few chunks of each model's tensor in hand (each merged piece is written to its place in
    its output shard as soon as it is made; a .bin primary falls back to buffering one output shard), plus for
    TIES and breadcrumbs a tensor of up to ``tensor.RESIDENT_BYTES`` (all models) and its float32 magnitudes;
    bigger tensors' thresholds are found in two streamed passes at chunk memory.
    ``model_dirs[0]`` is the primary: its config.json and side files are written.
    ``require_vision``: see ``plan_merge``.
    """
    raw = read_config_json(model_dirs[0])
    cfg = config_from_dict(raw, os.path.join(model_dirs[0], "config.json"))
    expected = _param_shapes(cfg)
    sources = [hf_dir_source(d, expected) for d in [base_dir, *model_dirs]]
    plan = plan_merge(sources[0], sources[1:], spec, cfg, require_vision)
    files = {t.where for s in sources for t in s.tensors.values()}
    t0 = time.time()
    try:
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            bar = tqdm.tqdm(total=int(sum(os.path.getsize(f) for f in files)), unit="B", unit_scale=True,
                            desc="merge (input read)", mininterval=1.0)
            entries = _output_entries(plan)
            if entries is None:  # a primary tensor in a .bin file: its dtype is known once read
                writer = ShardedWriter(tmp, max_shard_bytes)
                report = run_plan(plan, lambda canon, t, arr: writer.add(canon, np.asarray(arr)), bar.update)
                writer.finish()
            else:
                planned = PlannedWriter(tmp, entries, max_shard_bytes)
                writes = _AsyncWrites(planned)
                try:
                    report = run_plan(plan, None, bar.update,
                                      sink_for=lambda canon: functools.partial(writes.write, canon))
                    writes.drain()
                    planned.finish()
                finally:
                    writes.drain(raise_errors=False)  # no write may still run when the files are closed
                    planned.abort()
            bar.close()
            out_cfg = dict(raw)
            out_cfg["dtype"] = spec.out_dtype
            out_cfg.pop("torch_dtype", None)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(out_cfg, f, indent=2)
            copy_side_files(model_dirs[0], tmp)
            report.data["seconds"] = time.time() - t0
            report.write(os.path.join(tmp, "merge_report.json"))
    except OSError as e:
        if isinstance(e, FileExistsError):
            raise
        raise MergeError(f"{out_dir}: cannot write the merged checkpoint ({e.strerror or e})") from e
    log.info("merged %d tensors, copied %d, in %.1fs -> %s", len(report.data["merged"]),
             len(report.data["copied"]), time.time() - t0, out_dir)
    return report.data
