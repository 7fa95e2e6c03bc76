"""run_eval on the continuous-batching sampler (runner.slot_queue_fn, ``slots=``): on a tiny checkpoint, greedy
generations and scores equal the lockstep batch path's item for item, on one device and on a (2, 2, 2) mesh of
the fake CPU devices, and the generation cache still resumes (a second run generates nothing)."""

from __future__ import annotations

import json
import os

import pytest

from viscodex_jax.eval import registry
from viscodex_jax.eval.base import Benchmark, Item
from viscodex_jax.eval.runner import EvalSettings, evaluate, run_eval
from viscodex_jax.testing.images import demo_chart

NEW = 8
# (id, words in the prompt, images): prompts of mixed lengths, some with a chart, to refill slots unevenly
PROMPTS = [("p0", 3, 0), ("p1", 40, 1), ("p2", 1, 0), ("p3", 12, 1), ("p4", 25, 0), ("p5", 7, 1)]


class SlotBench(Benchmark):
    """Items from PROMPTS; the score is a deterministic function of the generation (its length), so equal
    generations give equal scores and any difference shows."""

    name = "slot_bench"

    def load(self, root, limit=None):
        items = []
        for i, (item_id, words, n_img) in enumerate(PROMPTS[:limit]):
            content = [{"type": "image"}] * n_img + [{"type": "text", "text": " ".join(["describe"] * words)}]
            images = [demo_chart(56, 56, seed=i)] * n_img
            items.append(Item(item_id, [{"role": "user", "content": content}], images, None))
        return items

    def score(self, item, generation):
        return {"score": float(len(generation) % 7), "length": len(generation)}

    @staticmethod
    def make_sample(out_dir):
        os.makedirs(out_dir, exist_ok=True)
        return out_dir


@pytest.fixture
def setup(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, SlotBench.name, SlotBench)
    return tiny_checkpoints(0)["vlm"], {SlotBench.name: SlotBench.make_sample(str(tmp_path / "data"))}, tmp_path


def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "slot_bench_items.jsonl"))]


def _counting(fn, log):
    def wrapped(requests):
        log.extend(requests)
        return fn(requests)
    return wrapped


def test_slots_equal_lockstep_on_one_device_and_a_mesh_and_resume(setup, monkeypatch):
    import viscodex_jax as vx
    from viscodex_jax.eval import runner

    ckpt, roots, tmp = setup
    settings = EvalSettings(max_new_tokens=NEW, batch_size=3)
    lock = run_eval(ckpt, roots, str(tmp / "lock"), settings)
    want = _rows(str(tmp / "lock"))
    assert [r["id"] for r in want] == [p[0] for p in PROMPTS]
    assert all(r["generation"] for r in want) and len({r["generation"] for r in want}) > 1  # not a constant

    # 2 slots for 6 prompts: rows refilled as they end; a cache of 4 prompt buckets
    model = vx.load(ckpt)
    queued: list = []
    fn = runner.slot_queue_fn(model, settings, runner.slot_settings(settings, 2, cache_len=256))
    got = run_eval(ckpt, roots, str(tmp / "slots"), settings, queue_fn=_counting(fn, queued))
    assert len(queued) == len(PROMPTS)
    assert [(r["id"], r["generation"], r["score"]) for r in _rows(str(tmp / "slots"))] == [
        (r["id"], r["generation"], r["score"]) for r in want]
    assert got["benchmarks"]["slot_bench"]["score"] == lock["benchmarks"]["slot_bench"]["score"]

    # launch/eval.py's path: evaluate(mesh=, slots=) loads the model sharded (blockwise attention) and runs
    # 4 slots, one per data x fsdp shard; then a second run finds everything cached and loads nothing
    loads: list = []
    real_load = runner.load_model
    monkeypatch.setattr(runner, "load_model", lambda *a: loads.append(a[2]) or real_load(*a))
    out = str(tmp / "mesh")
    meshed = evaluate(ckpt, ["slot_bench"], roots, out, settings, mesh=(2, 2, 2), slots=4, cache_len=256)
    assert len(loads) == 1 and dict(loads[0].shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert [(r["id"], r["generation"], r["score"]) for r in _rows(out)] == [
        (r["id"], r["generation"], r["score"]) for r in want]
    again = evaluate(ckpt, ["slot_bench"], roots, out, settings, mesh=(2, 2, 2), slots=4, cache_len=256)
    assert len(loads) == 1  # nothing to generate: the model was not even loaded
    assert again["benchmarks"]["slot_bench"]["score"] == meshed["benchmarks"]["slot_bench"]["score"]
    assert _rows(out) == _rows(str(tmp / "slots"))


def test_bad_slot_or_mesh_flags_are_usage_errors(setup):
    ckpt, roots, tmp = setup
    settings = EvalSettings(max_new_tokens=NEW)
    with pytest.raises(registry.UsageError, match="--slots=-1"):
        evaluate(ckpt, ["slot_bench"], roots, str(tmp / "o"), settings, slots=-1)
    with pytest.raises(registry.UsageError, match=r"--slots=2 --cache_len=32: cache_len=32: must hold one prompt"):
        evaluate(ckpt, ["slot_bench"], roots, str(tmp / "o"), settings, slots=2, cache_len=32)
    with pytest.raises(registry.UsageError, match=r"--mesh=4,4,1: mesh shape \(4, 4, 1\) needs 16 devices"):
        evaluate(ckpt, ["slot_bench"], roots, str(tmp / "o"), settings, mesh=(4, 4, 1), slots=4)
    assert not os.path.exists(str(tmp / "o"))  # refused before anything ran or was written


def test_items_are_recorded_as_they_finish_so_a_killed_run_resumes_with_them(setup, monkeypatch):
    from viscodex_jax.eval import runner
    from viscodex_jax.sampling import slots

    ckpt, roots, tmp = setup
    settings = EvalSettings(max_new_tokens=NEW, batch_size=1)
    run_eval(ckpt, roots, str(tmp / "lock"), settings)
    want = _rows(str(tmp / "lock"))
    # killed on the first decode call after two items finished: all six are one chunk of prompts
    # (max(batch_size, 4 * slots) = 8), so only per-item hand-over can have kept those two
    finished = [0]
    real_collect, real_decode = slots.SlotSampler._collect, slots._decode

    def collect(self, holder, active):
        done = real_collect(self, holder, active)
        finished[0] += len(done)
        return done

    def decode(*a, **k):
        if finished[0] >= 2:
            raise RuntimeError("killed mid-run")
        return real_decode(*a, **k)

    monkeypatch.setattr(slots.SlotSampler, "_collect", collect)
    monkeypatch.setattr(slots, "_decode", decode)
    out = str(tmp / "killed")
    with pytest.raises(RuntimeError, match="killed mid-run"):
        run_eval(ckpt, roots, out, settings, slots=2, cache_len=256)
    kept = [json.loads(line) for f in os.listdir(out) if f.startswith("generations")
            for line in open(os.path.join(out, f))]
    assert 2 <= len(kept) < len(PROMPTS)
    monkeypatch.setattr(slots, "_decode", real_decode)
    queued: list = []
    fn = runner.slot_queue_fn(ckpt, settings, runner.slot_settings(settings, 2, cache_len=256))
    run_eval(ckpt, roots, out, settings, queue_fn=_counting(fn, queued))
    assert len(queued) == len(PROMPTS) - len(kept)  # the finished ones were not generated again
    assert {r.item.id for r in queued}.isdisjoint({k["id"] for k in kept})
    assert [(r["id"], r["generation"]) for r in _rows(out)] == [(r["id"], r["generation"]) for r in want]


def test_sampled_generations_do_not_depend_on_slots_chunks_or_order(setup):
    from viscodex_jax.eval import runner

    ckpt, roots, _ = setup
    items = SlotBench().load(roots[SlotBench.name])

    def queue(n_slots, batch_size):
        settings = EvalSettings(max_new_tokens=NEW, batch_size=batch_size, temperature=1.5)
        return runner.slot_queue_fn(ckpt, settings, runner.slot_settings(settings, n_slots, cache_len=256))

    def texts(fn, seed=3, order=range(len(items))):
        reqs = [runner.Request(SlotBench.name, items[i], 0, seed) for i in order]
        return {reqs[i].item.id: t for i, t in fn(reqs)}

    one, three = queue(1, 1), queue(3, 12)
    want = texts(one)
    assert len(want) == len(items) and len(set(want.values())) > 1
    assert texts(three) == want  # other slot count, all prompts in one chunk of prompts
    assert texts(three, order=[5, 3, 1, 0, 2, 4]) == want  # other neighbours and order
    other = texts(three, seed=4)
    assert sum(other[k] != want[k] for k in want) >= 3  # the sample seed still matters
