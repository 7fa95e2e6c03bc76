"""Runs benchmarks on a checkpoint: batched JAX generation (cached, resumable) -> sandboxed scoring -> reports.

Generations are cached in ``<out_dir>/generations.jsonl`` under a key of
(checkpoint fingerprint, benchmark, item, sample index, sampling settings), one
line appended and flushed per finished batch: re-scoring never re-generates,
and an interrupted run resumes where it stopped.

Scoring is guarded per item: a scorer that raises scores that item 0, with the reason in its row
(``score_error``), and the run goes on, so a resumed run cannot crash again on the same cached item.
Items a loader could not read (``UnreadableItem``, with ``on_error="skip"``) are not generated and score 0
the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import tqdm

from viscodex_jax.eval.base import Benchmark, Item, UnreadableItem
from viscodex_jax.eval.registry import build_benchmarks, make_benchmark, select_roots

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    max_new_tokens: int = 1024
    batch_size: int = 4
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


def fingerprint(ckpt_dir: str, cache_path: str | None = None) -> str:
    """sha256 over the checkpoint's files (weights, config, tokenizer), cached by (path, size, mtime)."""
    files = []
    for root, _, names in os.walk(ckpt_dir):
        for n in sorted(names):
            p = os.path.join(root, n)
            st = os.stat(p)
            files.append((os.path.relpath(p, ckpt_dir), st.st_size, st.st_mtime_ns))
    files.sort()
    stamp = hashlib.sha256(json.dumps([os.path.abspath(ckpt_dir), files]).encode()).hexdigest()
    cache = {}
    if cache_path and os.path.isfile(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)
        if stamp in cache:
            return cache[stamp]
    h = hashlib.sha256()
    for rel, _, _ in files:
        h.update(rel.encode())
        with open(os.path.join(ckpt_dir, rel), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    digest = h.hexdigest()[:16]
    if cache_path:
        cache[stamp] = digest
        with open(cache_path, "w") as f:
            json.dump(cache, f)
    return digest


class GenerationCache:
    """Append-only JSONL of finished generations."""

    def __init__(self, path: str):
        self.path = path
        self.entries: dict[str, str] = {}
        if os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        key, gen = rec["key"], rec["generation"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut by an interruption (or not ours); that item is generated again
                    if isinstance(key, str) and isinstance(gen, str):
                        self.entries[key] = gen

    @staticmethod
    def key(fp: str, bench: str, item_id: str, sample: int, settings: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps([fp, bench, item_id, sample, settings], sort_keys=True).encode()).hexdigest()

    def add(self, records: Sequence[dict[str, Any]]) -> None:
        with open(self.path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
                self.entries[r["key"]] = r["generation"]
            f.flush()
            os.fsync(f.fileno())


GenerateFn = Callable[[Sequence[Item], int], list[str]]  # (items, sample index) -> texts


def model_generate_fn(checkpoint: str, settings: EvalSettings, dtype: str = "float32") -> GenerateFn:
    """Batched generation with our JAX sampler."""
    import viscodex_jax as vx

    model = vx.load(checkpoint, dtype=dtype)
    sampler = vx.sampler_from_settings(settings.temperature, settings.top_p, settings.top_k)

    def fn(items: Sequence[Item], sample: int) -> list[str]:
        return vx.generate(model, [it.messages for it in items], images=[it.images for it in items],
                           max_new_tokens=settings.max_new_tokens, sampler=sampler, seed=settings.seed + sample)

    return fn


def lazy_generate_fn(checkpoint: str, settings: EvalSettings, dtype: str = "float32") -> GenerateFn:
    """``model_generate_fn`` that loads the model only when something actually needs generating
    (a fully cached re-score never loads it)."""
    state: dict[str, GenerateFn] = {}

    def fn(items: Sequence[Item], sample: int) -> list[str]:
        if "f" not in state:
            state["f"] = model_generate_fn(checkpoint, settings, dtype)
        return state["f"](items, sample)

    return fn


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


def run_eval(
    checkpoint: str,
    roots: dict[str, str],
    out_dir: str,
    settings: EvalSettings = EvalSettings(),
    generate_fn: GenerateFn | None = None,
    benchmarks: dict[str, Benchmark] | None = None,
    model_name: str | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Generates (or reuses cached generations), scores, and writes per-item JSONL and the summary.

    ``roots``: benchmark name -> data root. ``benchmarks``: ready-made instances by name (default: each
    registered benchmark with its defaults). ``generate_fn`` default: our JAX sampler on ``checkpoint`` in
    ``dtype``, loaded only when something is not cached yet.
    """
    os.makedirs(out_dir, exist_ok=True)
    fp = fingerprint(checkpoint, os.path.join(out_dir, ".fingerprints.json"))
    cache = GenerationCache(os.path.join(out_dir, "generations.jsonl"))
    skey = settings.sampling_key()
    summary: dict[str, Any] = {"checkpoint": os.path.abspath(checkpoint), "fingerprint": fp,
                               "model": model_name or os.path.basename(os.path.normpath(checkpoint)),
                               "settings": dataclasses.asdict(settings), "benchmarks": {}}
    all_items: dict[str, list[Item]] = {}
    for name, root in roots.items():
        bench = (benchmarks or {}).get(name) or make_benchmark(name)
        items = all_items[name] = bench.load(root, settings.limit)
        todo = [(it, s) for s in range(settings.num_samples) for it in items
                if not isinstance(it.reference, UnreadableItem)
                and GenerationCache.key(fp, name, it.id, s, skey) not in cache.entries]
        if todo:
            if generate_fn is None:
                generate_fn = lazy_generate_fn(checkpoint, settings, dtype)
            bar = tqdm.tqdm(total=len(todo), desc=f"generate {name}", unit="item")
            for i in range(0, len(todo), settings.batch_size):
                chunk = todo[i:i + settings.batch_size]
                by_sample: dict[int, list[Item]] = {}
                for it, s in chunk:
                    by_sample.setdefault(s, []).append(it)
                for s, its in by_sample.items():
                    texts = generate_fn(its, s)
                    cache.add([{"key": GenerationCache.key(fp, name, it.id, s, skey), "benchmark": name,
                                "id": it.id, "sample": s, "generation": t} for it, t in zip(its, texts)])
                bar.update(len(chunk))
            bar.close()
        rows = []
        t0 = time.time()
        for it in tqdm.tqdm(items, desc=f"score {name}", unit="item"):
            for s in range(settings.num_samples):
                gen = cache.entries.get(GenerationCache.key(fp, name, it.id, s, skey))
                rows.append({"id": it.id, "sample": s, **score_guarded(bench, it, gen)})
        _fill_failed(rows)
        clean = [{k: v for k, v in r.items() if k != "score_error"} for r in rows]
        agg = bench.aggregate(clean, num_samples=settings.num_samples)
        n_failed = sum("score_error" in r for r in rows)
        summary["benchmarks"][name] = {"n_items": len(items), "n_score_errors": n_failed,
                                       "score_seconds": time.time() - t0, **agg}
        with open(os.path.join(out_dir, f"{name}_items.jsonl"), "w") as f:
            for r in rows:
                gen = cache.entries.get(GenerationCache.key(fp, name, r["id"], r["sample"], skey), "")
                f.write(json.dumps({**r, "generation": gen}) + "\n")  # "": an unreadable item, never generated
        log.info("%s: %s", name, {k: round(v, 2) for k, v in agg.items() if isinstance(v, float)})
    from viscodex_jax.eval.report import write_reports

    write_reports(summary, out_dir, all_items)
    return summary


def evaluate(checkpoint: str, benchmarks: Sequence[str], roots: Mapping[str, str | None], out_dir: str,
             settings: EvalSettings = EvalSettings(), options: Mapping[str, Any] | None = None,
             on_error: str = "raise", dtype: str = "float32", model_name: str | None = None) -> dict[str, Any]:
    """``launch/eval.py``: the named benchmarks (data roots and launch flag values by name, as
    ``registry.root_flags``/``option_flags`` name them) on a checkpoint; see ``run_eval``. A name, root or
    option that does not fit is a ``registry.UsageError``."""
    chosen = select_roots(benchmarks, roots)
    benches = build_benchmarks(list(chosen), options, on_error)
    return run_eval(checkpoint, chosen, out_dir, settings, benchmarks=benches, model_name=model_name, dtype=dtype)
