"""Runs benchmarks on a checkpoint: batched JAX generation (cached, resumable) -> sandboxed scoring -> reports.

Generations are cached (``eval.cache``) under a key of (checkpoint fingerprint, benchmark, item, sample
index, sampling settings), appended and flushed as they finish: re-scoring never re-generates, and an
interrupted run resumes where it stopped.

Generation takes either a ``GenerateFn`` (a batch of one benchmark's items at a time) or a ``QueueFn``
(every missing generation of every benchmark at once, for a continuous-batching sampler); built in are
``model_generate_fn`` (lockstep batches) and ``slot_queue_fn`` (``sampling.slots``), each on a ``vx.Model``
(maybe on a mesh) or a checkpoint path. In a multi-process JAX run (``eval.hosts``) each process generates
and scores its share of the items with its own model, and the first process writes the reports from
everyone's rows.

Scoring is guarded per item: a scorer that raises scores that item 0, with the reason in its row
(``score_error``), and the run goes on, so a resumed run cannot crash again on the same cached item.
Items a loader could not read (``UnreadableItem``, with ``on_error="skip"``) are not generated and score 0
the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
import zlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import tqdm

from viscodex_jax.eval.base import Benchmark, Item, UnreadableItem
from viscodex_jax.eval.cache import GenerationCache, fingerprint
from viscodex_jax.eval.hosts import Hosts
from viscodex_jax.eval.registry import UsageError, build_benchmarks, make_benchmark, select_roots

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    max_new_tokens: int = 1024
    batch_size: int = 4  # GenerateFn batches; a QueueFn's finished generations are flushed this many at a time
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    num_samples: int = 1  # > 1 for pass@k
    limit: int | None = None

    def sampling_key(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("batch_size", "limit"):  # do not change what is generated
            d.pop(k)
        return d


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation a run needs: sample ``sample`` of ``item`` of ``benchmark``, drawn with ``seed``."""

    benchmark: str
    item: Item
    sample: int
    seed: int


GenerateFn = Callable[[Sequence[Item], int], list[str]]  # (items, sample index) -> texts, in order
QueueFn = Callable[[Sequence[Request]], Iterable[tuple[int, str]]]
"""Every generation a run needs at once, across benchmarks (e.g. a continuous-batching sampler): yields
(index into the requests, text) as each one finishes, in any order."""


ModelLike = Any  # a ``vx.Model`` (maybe on a mesh) or a checkpoint path to load


def load_model(checkpoint: ModelLike, dtype: str = "float32", mesh: Any = None) -> Any:
    """A ``vx.Model`` as given, or loaded from a path; on a ``mesh`` with the blockwise attention (a kernel
    that runs per shard, as sampling on a mesh needs). A model loaded here serves generation only, so its
    layer params take the sampler's layout for this backend (``causal_lm.inference_layout``: per layer on CPU,
    the stacked arrays freed as they split). A given model is used as it is (its caller may still need stacked params)."""
    import viscodex_jax as vx
    from viscodex_jax.model.causal_lm import inference_layout

    if not isinstance(checkpoint, str):
        return checkpoint
    if mesh is None:
        model = vx.load(checkpoint, dtype=dtype)
    else:
        model = vx.load(checkpoint, mesh=mesh, dtype=dtype, attention_impl="blockwise")
    model.params = inference_layout(model.params, free=True)
    return model


def model_generate_fn(model: ModelLike, settings: EvalSettings, dtype: str = "float32", mesh: Any = None) -> GenerateFn:
    """Lockstep batches with our JAX sampler, on a ``vx.Model`` or a checkpoint path (loaded now)."""
    import viscodex_jax as vx

    model = load_model(model, dtype, mesh)
    sampler = vx.sampler_from_settings(settings.temperature, settings.top_p, settings.top_k)

    def fn(items: Sequence[Item], sample: int) -> list[str]:
        return vx.generate(model, [it.messages for it in items], images=[it.images for it in items],
                           max_new_tokens=settings.max_new_tokens, sampler=sampler, seed=settings.seed + sample)

    return fn


def lazy_generate_fn(checkpoint: ModelLike, settings: EvalSettings, dtype: str = "float32",
                     mesh: Any = None) -> GenerateFn:
    """``model_generate_fn`` that loads the model only when something actually needs generating
    (a fully cached re-score never loads it)."""
    state: dict[str, GenerateFn] = {}

    def fn(items: Sequence[Item], sample: int) -> list[str]:
        if "f" not in state:
            state["f"] = model_generate_fn(checkpoint, settings, dtype, mesh)
        return state["f"](items, sample)

    return fn


def slot_queue_fn(model: ModelLike, settings: EvalSettings, slots: Any, dtype: str = "float32",
                  mesh: Any = None) -> QueueFn:
    """A ``QueueFn`` on the continuous-batching sampler (``sampling.slots``): ``slots`` is a ``SlotSettings``
    (its ``max_new_tokens`` at least ``settings.max_new_tokens``). A path is loaded at the first call.

    One ``SlotSampler`` serves every call and every request: prompts (and their images) are prepared
    ``max(batch_size, 4 * slots)`` at a time as slots need them, and each generation is yielded the moment
    its row ends, so an interrupted run keeps everything that finished. A sampled (temperature > 0)
    request draws with its own seed (``item_seed``: the benchmark, item id and sample seed), so its text
    does not depend on its neighbours, the slot count or the order of the queue; greedy generations equal
    the lockstep path's.
    """
    import jax

    import viscodex_jax as vx
    from viscodex_jax.model.config import ConfigError
    from viscodex_jax.sampling.slots import SlotSampler, requests_from_batch
    from viscodex_jax.sampling.text import eos_and_pad, row_text

    if slots.max_new_tokens < settings.max_new_tokens:
        raise ConfigError(f"SlotSettings.max_new_tokens={slots.max_new_tokens} is below the eval's "
                          f"max_new_tokens={settings.max_new_tokens}")
    sampler = vx.sampler_from_settings(settings.temperature, settings.top_p, settings.top_k)
    chunk = max(settings.batch_size, 4 * slots.slots)
    state: dict[str, Any] = {}

    def engine():
        if "engine" not in state:
            m = load_model(model, dtype, mesh)
            if m.processor is None:
                raise ValueError(f"{m.path}: checkpoint has no tokenizer files; cannot generate text")
            eos, pad = eos_and_pad(m.processor.tokenizer)
            state.update(model=m, eos=eos, engine=SlotSampler(
                m.config, m.params, eos, pad, sampler, slots, jax.random.PRNGKey(0), m.mesh, m.rules))
        return state["model"], state["engine"]

    def fn(requests: Sequence[Request]) -> Iterable[tuple[int, str]]:
        m, eng = engine()

        def prompts():
            for c in range(0, len(requests), chunk):
                part = requests[c:c + chunk]
                batch = m.processor([r.item.messages for r in part], images=[r.item.images for r in part])
                for r, req in zip(part, requests_from_batch(m.config, batch, settings.max_new_tokens)):
                    req.seed = item_seed(r)
                    yield req

        try:
            for i, tokens in eng.stream(prompts()):
                yield i, row_text(m.processor.tokenizer, tokens, state["eos"])
        except ConfigError as e:  # "request <i>: ..." counts the requests: name the item instead
            found = re.match(r"request (\d+): (.*)", str(e), re.S)
            if found is None:
                raise
            r = requests[int(found.group(1))]
            raise ConfigError(f"{r.benchmark} item {r.item.id!r}: {found.group(2)}") from e

    return fn


def item_seed(request: Request) -> int:
    """A request's sampling seed in 0..2**31-1, from its benchmark, item id and sample seed only."""
    return zlib.crc32(f"{request.benchmark}\0{request.item.id}\0{request.seed}".encode()) & 0x7FFFFFFF


def slot_settings(settings: EvalSettings, slots: int, cache_len: int | None = None) -> Any:
    """The ``SlotSettings`` an eval with ``slots`` slots runs on (``cache_len`` default: 4096 prompt tokens
    plus ``max_new_tokens``, rounded up to 256)."""
    from viscodex_jax.sampling.slots import SlotSettings

    if cache_len is None:
        cache_len = -(-(4096 + settings.max_new_tokens) // 256) * 256
    return SlotSettings(slots=slots, cache_len=cache_len, max_new_tokens=settings.max_new_tokens)


def score_guarded(bench: Benchmark, item: Item, generation: str | None) -> dict[str, Any]:
    """``bench.score``, except that an unreadable item or a scorer that raises gives score 0 and the reason."""
    if isinstance(item.reference, UnreadableItem):
        return {"score": 0.0, "score_error": item.reference.reason}
    try:
        return bench.score(item, generation)
    except Exception as e:  # noqa: BLE001  (one item's failure must not stop, or crash-loop, the run)
        log.warning("%s item %s: scorer failed, scored 0: %s: %s", bench.name, item.id, type(e).__name__, e)
        return {"score": 0.0, "score_error": f"{type(e).__name__}: {e}"}


def _fill_failed(rows: list[dict[str, Any]]) -> None:
    """Failed rows get 0 for every numeric metric the other rows have, so aggregates count them as failed."""
    keys = {k for r in rows if "score_error" not in r for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "sample"}
    for r in rows:
        if "score_error" in r:
            for k in keys:
                r.setdefault(k, 0.0)


Record = Callable[[Sequence[tuple[Request, str]]], None]


def _generate_batches(fn: GenerateFn, requests: Sequence[Request], batch_size: int, record: Record) -> None:
    """Per benchmark, ``batch_size`` requests at a time, one call per sample index in the batch."""
    by_bench: dict[str, list[Request]] = {}
    for r in requests:
        by_bench.setdefault(r.benchmark, []).append(r)
    for name, reqs in by_bench.items():
        bar = tqdm.tqdm(total=len(reqs), desc=f"generate {name}", unit="item")
        for i in range(0, len(reqs), batch_size):
            chunk = reqs[i:i + batch_size]
            by_sample: dict[int, list[Request]] = {}
            for r in chunk:
                by_sample.setdefault(r.sample, []).append(r)
            for s, rs in by_sample.items():
                record(list(zip(rs, fn([r.item for r in rs], s))))
            bar.update(len(chunk))
        bar.close()


def _generate_queue(fn: QueueFn, requests: Sequence[Request], flush_every: int, record: Record) -> None:
    """All requests in one call; finished generations are recorded ``flush_every`` at a time (and whatever
    finished when the call stops, even by an exception)."""
    done: set[int] = set()
    pending: list[tuple[Request, str]] = []
    bar = tqdm.tqdm(total=len(requests), desc="generate", unit="item")
    try:
        for i, text in fn(requests):
            if not isinstance(i, int) or not 0 <= i < len(requests) or i in done or not isinstance(text, str):
                raise ValueError(f"queue_fn yielded ({i!r}, {type(text).__name__}): expected (index, text) with "
                                 f"each index in 0..{len(requests) - 1} once")
            done.add(i)
            pending.append((requests[i], text))
            bar.update(1)
            if len(pending) >= flush_every:
                record(pending)
                pending = []
    finally:
        if pending:
            record(pending)
        bar.close()
    if len(done) != len(requests):
        raise ValueError(f"queue_fn stopped after {len(done)} of {len(requests)} generations")


def run_eval(
    checkpoint: str,
    roots: dict[str, str],
    out_dir: str,
    settings: EvalSettings = EvalSettings(),
    generate_fn: GenerateFn | None = None,
    benchmarks: dict[str, Benchmark] | None = None,
    model_name: str | None = None,
    dtype: str = "float32",
    queue_fn: QueueFn | None = None,
    model_fingerprint: str | None = None,
    hosts: Hosts | None = None,
    mesh: Any = None,
    slots: int = 0,
    cache_len: int | None = None,
) -> dict[str, Any]:
    """Generates (or reuses cached generations), scores, and writes per-item JSONL and the summary.

    ``roots``: benchmark name -> data root. ``benchmarks``: ready-made instances by name (default: each
    registered benchmark with its defaults). Generation: ``generate_fn`` (batches) or ``queue_fn`` (all at
    once), default our JAX sampler on ``checkpoint`` in ``dtype``, loaded only when something is not cached
    yet. ``model_fingerprint``: the weights' identity in the cache key (default: a hash of the checkpoint's
    files; give one for a model that lives only in memory). ``hosts``: this process's share (default: from
    ``jax.distributed``); every process gets the same summary, the first writes the files.

    Without a ``generate_fn``/``queue_fn``: ``slots`` > 0 generates on the continuous-batching sampler
    (``slot_queue_fn``, ``cache_len`` cache slots per row), 0 in lockstep batches; ``mesh`` (a
    ``jax.sharding.Mesh``) loads the model sharded over it (one process only: every process would have
    to run the same requests).
    """
    if generate_fn is not None and queue_fn is not None:
        raise ValueError("run_eval: pass generate_fn or queue_fn, not both")
    hosts = hosts or Hosts.from_jax()
    if mesh is not None and hosts.count > 1:
        raise ValueError(f"run_eval: a mesh with {hosts.count} processes: each process generates its own share "
                         "of the items, so the model cannot be sharded across processes; run one process")
    if slots and generate_fn is None and queue_fn is None:
        queue_fn = slot_queue_fn(checkpoint, settings, slot_settings(settings, slots, cache_len), dtype, mesh)
    os.makedirs(out_dir, exist_ok=True)
    fp = model_fingerprint or fingerprint(checkpoint, os.path.join(out_dir, ".fingerprints.json"))
    cache = GenerationCache.in_dir(out_dir, hosts.index, hosts.count)
    skey = settings.sampling_key()

    def key(name: str, item_id: str, sample: int) -> str:
        return GenerationCache.key(fp, name, item_id, sample, skey)

    benches: dict[str, Benchmark] = {}
    all_items: dict[str, list[Item]] = {}
    for name, root in roots.items():
        benches[name] = (benchmarks or {}).get(name) or make_benchmark(name)
        all_items[name] = benches[name].load(root, settings.limit)
    hosts.barrier("eval: cache read")  # every process splits the same list of missing generations
    todo = [Request(name, it, s, settings.seed + s) for name, items in all_items.items()
            for s in range(settings.num_samples) for it in items
            if not isinstance(it.reference, UnreadableItem) and key(name, it.id, s) not in cache.entries]
    mine = hosts.share(todo)

    def record(done: Sequence[tuple[Request, str]]) -> None:
        cache.add([{"key": key(r.benchmark, r.item.id, r.sample), "benchmark": r.benchmark, "id": r.item.id,
                    "sample": r.sample, "generation": t} for r, t in done])

    if mine and queue_fn is not None:
        _generate_queue(queue_fn, mine, settings.batch_size, record)
    elif mine:
        _generate_batches(generate_fn or lazy_generate_fn(checkpoint, settings, dtype, mesh), mine,
                          settings.batch_size, record)
    hosts.barrier("eval: generated")
    cache.reload()  # the other processes' generations

    scored, seconds = [], []
    for name, items in all_items.items():
        t0 = time.time()
        work = [(i, s) for i in range(len(items)) for s in range(settings.num_samples)]
        for i, s in tqdm.tqdm(hosts.share(work), desc=f"score {name}", unit="item"):
            scored.append([name, i, s, score_guarded(benches[name], items[i], cache.entries.get(
                key(name, items[i].id, s)))])
        seconds.append([name, time.time() - t0])
    scored = hosts.gather(out_dir, "eval-scores", scored)
    wall = {}
    for name, t in hosts.gather(out_dir, "eval-seconds", seconds):
        wall[name] = max(wall.get(name, 0.0), t)
    by_key = {(name, i, s): row for name, i, s, row in scored}

    summary: dict[str, Any] = {"checkpoint": os.path.abspath(checkpoint), "fingerprint": fp,
                               "model": model_name or os.path.basename(os.path.normpath(checkpoint)),
                               "settings": dataclasses.asdict(settings), "benchmarks": {}}
    for name, items in all_items.items():
        rows = [{"id": it.id, "sample": s, **by_key[(name, i, s)]} for i, it in enumerate(items)
                for s in range(settings.num_samples)]
        _fill_failed(rows)
        clean = [{k: v for k, v in r.items() if k != "score_error"} for r in rows]
        agg = benches[name].aggregate(clean, num_samples=settings.num_samples)
        n_failed = sum("score_error" in r for r in rows)
        summary["benchmarks"][name] = {"n_items": len(items), "n_score_errors": n_failed,
                                       "score_seconds": wall[name], **agg}
        if hosts.first:
            with open(os.path.join(out_dir, f"{name}_items.jsonl"), "w") as f:
                for r in rows:
                    gen = cache.entries.get(key(name, r["id"], r["sample"]), "")
                    f.write(json.dumps({**r, "generation": gen}) + "\n")  # "": an unreadable item, never generated
        log.info("%s: %s", name, {k: round(v, 2) for k, v in agg.items() if isinstance(v, float)})
    if hosts.first:
        from viscodex_jax.eval.report import write_reports

        write_reports(summary, out_dir, all_items)
    hosts.barrier("eval: reports written")
    return summary


def evaluate(checkpoint: str, benchmarks: Sequence[str], roots: Mapping[str, str | None], out_dir: str,
             settings: EvalSettings = EvalSettings(), options: Mapping[str, Any] | None = None,
             on_error: str = "raise", dtype: str = "float32", model_name: str | None = None,
             mesh: Sequence[int] | None = None, slots: int = 0, cache_len: int | None = None) -> dict[str, Any]:
    """``launch/eval.py``: the named benchmarks (data roots and launch flag values by name, as
    ``registry.root_flags``/``option_flags`` name them) on a checkpoint; see ``run_eval``. ``mesh``: a
    (data, fsdp, tensor) shape to shard the model over (None: one device). A name, root, option, mesh or
    slot setting that does not fit is a ``registry.UsageError``."""
    from viscodex_jax.model.config import ConfigError

    chosen = select_roots(benchmarks, roots)
    benches = build_benchmarks(list(chosen), options, on_error)
    if slots < 0:
        raise UsageError(f"--slots={slots}: expected 0 (lockstep batches) or a number of slots")
    on = None
    if mesh is not None:
        from viscodex_jax.sharding import make_mesh

        try:
            on = make_mesh(mesh)
        except ValueError as e:
            raise UsageError(f"--mesh={','.join(map(str, mesh))}: {e}") from None
    if slots:
        try:  # refuse bad slot settings before any benchmark loads or the model reads
            slot_settings(settings, slots, cache_len)
        except ConfigError as e:
            raise UsageError(f"--slots={slots} --cache_len={cache_len}: {e}") from None
    return run_eval(checkpoint, chosen, out_dir, settings, benchmarks=benches, model_name=model_name, dtype=dtype,
                    mesh=on, slots=slots, cache_len=cache_len)
