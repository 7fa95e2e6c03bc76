"""run_eval fed as one queue across benchmarks (a continuous-batching sampler's view), and split over the
processes of a multi-process JAX run: two gloo processes give the same per-item rows as one, each generates
only its share, and the cache resumes whatever process count wrote it.

Run as a script, this file is one process of such a run (see ``_worker``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmarks():
    """Two registered test benchmarks (TinyEcho of test_eval_registry under two names)."""
    from test_eval_registry import TinyEcho

    class TinyEchoB(TinyEcho):
        name = "tiny_echo_b"
        columns = ()

    return TinyEcho, TinyEchoB


def _text(item_id: str, sample: int, word: str) -> str:
    """What the fake model answers: wrong for item c, upper-cased (wrong) for sample 1 of item b."""
    text = word if item_id != "c" else word + "s"
    return text.upper() if (item_id, sample) == ("b", 1) else text


def _queue(log: list):
    def queue_fn(requests):
        log.extend([r.benchmark, r.item.id, r.sample] for r in requests)
        for i in reversed(range(len(requests))):  # finished out of order, as a continuous batcher does
            r = requests[i]
            yield i, _text(r.item.id, r.sample, r.item.reference)
    return queue_fn


def _worker(out: str, roots: str, ckpt: str, nproc: int, pid: int, port: str) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    import jax

    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from viscodex_jax.eval import registry
    from viscodex_jax.eval.runner import EvalSettings, run_eval

    for cls in _benchmarks():
        registry.register(cls)
    generated: list = []
    summary = run_eval(ckpt, json.loads(roots), out, EvalSettings(num_samples=2, batch_size=2),
                       queue_fn=_queue(generated))
    print("RESULT " + json.dumps({"processes": jax.process_count(), "generated": generated,
                                  "benchmarks": _scores(summary)}))


def _scores(summary) -> dict:
    return {n: {k: v for k, v in b.items() if k != "score_seconds"} for n, b in summary["benchmarks"].items()}


def _rows(out: str) -> dict:
    return {n: [json.loads(line) for line in open(os.path.join(out, f"{n}_items.jsonl"))]
            for n in ("tiny_echo", "tiny_echo_b")}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    from viscodex_jax.eval import registry

    a, b = _benchmarks()
    for cls in (a, b):
        monkeypatch.setitem(registry.REGISTRY, cls.name, cls)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    roots = {"tiny_echo": a.make_sample(str(tmp_path / "a")), "tiny_echo_b": b.make_sample(str(tmp_path / "b"))}
    return str(ckpt), roots, tmp_path


def test_queue_fn_gets_every_benchmark_at_once_and_resumes(setup):
    from viscodex_jax.eval.runner import EvalSettings, run_eval

    ckpt, roots, tmp = setup
    settings = EvalSettings(num_samples=2, batch_size=2)
    log: list = []
    summary = run_eval(ckpt, roots, str(tmp / "q"), settings, queue_fn=_queue(log))
    assert sorted(map(tuple, log)) == sorted((b, i, s) for b in roots for i in "abc" for s in (0, 1))  # one call
    assert summary["benchmarks"]["tiny_echo"]["score"] == pytest.approx(50.0)  # 3 of 6 (item, sample) right
    rows = _rows(str(tmp / "q"))
    assert [(r["id"], r["sample"], r["generation"]) for r in rows["tiny_echo_b"]] == [
        ("a", 0, "apple"), ("a", 1, "apple"), ("b", 0, "banana"), ("b", 1, "BANANA"), ("c", 0, "cherrys"),
        ("c", 1, "cherrys")]
    batches = run_eval(ckpt, roots, str(tmp / "batches"), settings,
                       generate_fn=lambda items, s: [_text(it.id, s, it.reference) for it in items])
    assert _scores(batches) == _scores(summary) and _rows(str(tmp / "batches")) == rows

    class Stop(Exception):
        pass

    def failing(requests):  # stops after 5 finished generations: those 5 are kept (flushed 2, 2, then 1)
        for n, (i, text) in enumerate(_queue([])(requests)):
            if n == 5:
                raise Stop()
            yield i, text

    with pytest.raises(Stop):
        run_eval(ckpt, roots, str(tmp / "r"), settings, queue_fn=failing)
    log.clear()
    again = run_eval(ckpt, roots, str(tmp / "r"), settings, queue_fn=_queue(log))
    assert len(log) == 12 - 5 and _scores(again) == _scores(summary) and _rows(str(tmp / "r")) == rows
    log.clear()
    run_eval(ckpt, roots, str(tmp / "r"), settings, queue_fn=_queue(log))
    assert log == []  # everything cached

    def short(requests):
        yield 0, "x"

    with pytest.raises(ValueError, match="stopped after 1 of 12 generations"):
        run_eval(ckpt, roots, str(tmp / "s"), settings, queue_fn=short)
    with pytest.raises(ValueError, match="pass generate_fn or queue_fn, not both"):
        run_eval(ckpt, roots, str(tmp / "s"), settings, queue_fn=short, generate_fn=lambda i, s: [])


def _run(out: str, roots: dict, ckpt: str, nproc: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    from test_training import _free_port  # the two-process training test's port picker

    port = str(_free_port())
    cmd = [sys.executable, os.path.abspath(__file__), out, json.dumps(roots), ckpt, str(nproc)]
    procs = [subprocess.Popen(cmd + [str(i), port], env=env, cwd=CHECKOUT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(nproc)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(next(line for line in o.splitlines() if line.startswith("RESULT "))[7:]) for o, _ in outs]


def test_two_processes_give_the_rows_of_one(setup):
    from viscodex_jax.eval.runner import EvalSettings, run_eval

    ckpt, roots, tmp = setup
    one, two = str(tmp / "one"), str(tmp / "two")
    settings = EvalSettings(num_samples=2, batch_size=2)  # as _worker runs it
    log: list = []
    single = _scores(run_eval(ckpt, roots, one, settings, queue_fn=_queue(log)))  # this process: one of one
    pair = _run(two, roots, ckpt, 2)
    assert [r["processes"] for r in pair] == [2, 2]
    shares = [sorted(map(tuple, r["generated"])) for r in pair]
    assert len(shares[0]) == len(shares[1]) == 6 and not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(map(tuple, log))
    assert pair[0]["benchmarks"] == pair[1]["benchmarks"] == single  # every process returns the summary
    assert _rows(two) == _rows(one)
    assert sorted(f for f in os.listdir(two) if f.startswith("generations")) == [
        "generations.0-of-2.jsonl", "generations.1-of-2.jsonl"]
    # resume: two processes again, then one, over the two-process cache: nothing left to generate
    assert [r["generated"] for r in _run(two, roots, ckpt, 2)] == [[], []]
    log.clear()
    again = _scores(run_eval(ckpt, roots, two, settings, queue_fn=_queue(log)))
    assert log == [] and again == single and _rows(two) == _rows(one)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
