"""Continuous batching hands results over as rows finish (``run(on_done=)``, ``stream``), and a sampled
request's tokens depend only on its seed and its step: not on its neighbours, the slot count or how the
requests are cut into runs."""

from __future__ import annotations

import numpy as np
import pytest

from viscodex_jax.model.config import ConfigError
from viscodex_jax.sampling import slots
from viscodex_jax.sampling.methods import Temperature
from viscodex_jax.sampling.slots import Request, SlotSampler, SlotSettings
from viscodex_jax.testing.models import load_cached

NO_EOS = [10**6]  # every row runs to its own limit


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load_cached(hf_checkpoint("qwen2_untied"))


def _req(n_prompt: int, new: int, seed: int | None = None, rng_seed: int = 0) -> Request:
    ids = np.random.default_rng(rng_seed + n_prompt).integers(3, 200, n_prompt).astype(np.int32)
    return Request(ids, np.arange(n_prompt, dtype=np.int32), max_new_tokens=new, seed=seed)


def _engine(cfg, params, n_slots, sampler=None, max_new=12):
    settings = SlotSettings(slots=n_slots, cache_len=96, max_new_tokens=max_new, prompt_bucket=16,
                            steps_per_call=64, windows=1)
    kw = {} if sampler is None else {"sampler": sampler}
    return SlotSampler(cfg, params, NO_EOS, settings=settings, **kw)


def test_on_done_reports_each_row_when_it_finishes(model):
    cfg, params = model
    reqs = [_req(30, 12), _req(5, 2), _req(9, 5), _req(12, 3)]
    engine = _engine(cfg, params, 2)
    seen: list[tuple[int, list, int]] = []
    got = engine.run(reqs, on_done=lambda i, t: seen.append((i, t.tolist(), engine.stats["decode_calls"])))
    # the short prompt (2 tokens) ends before the long one (12) that started with it, and is handed over
    # then: on a decode call before the long one's last
    order = [i for i, _, _ in seen]
    assert sorted(order) == [0, 1, 2, 3] and order.index(1) < order.index(0) and order.index(2) < order.index(0)
    calls = {i: c for i, _, c in seen}
    assert calls[1] < calls[0]
    assert [len(g) for g in got] == [12, 2, 5, 3]
    for i, tokens, _ in seen:  # what on_done got is the run's result
        assert tokens == got[i].tolist()


def test_stream_pulls_requests_as_slots_free_and_yields_as_rows_end(model):
    cfg, params = model
    reqs = [_req(5, 2), _req(20, 10), _req(7, 3), _req(6, 4), _req(8, 2)]
    pulled: list[int] = []

    def source():
        for i, r in enumerate(reqs):
            pulled.append(i)
            yield r

    engine = _engine(cfg, params, 1)
    stream = engine.stream(source())
    first = next(stream)
    assert first[0] == 0 and len(first[1]) == 2
    assert len(pulled) <= 2  # one running, at most one pulled ahead: the rest not yet prepared
    rest = dict(stream)
    assert sorted(rest) == [1, 2, 3, 4]
    want = _engine(cfg, params, 3).run(reqs)  # greedy: the same tokens on any slot count
    for i, g in [first, *rest.items()]:
        np.testing.assert_array_equal(g, want[i], err_msg=f"request {i}")


def test_a_bad_request_in_a_stream_is_named_when_its_turn_comes(model):
    cfg, params = model
    engine = _engine(cfg, params, 1)
    stream = engine.stream([_req(5, 2), _req(5, 2, seed=-1)])
    with pytest.raises(ConfigError, match=r"request 1: seed=-1 must be an integer in 0\.\.2\*\*31-1"):
        list(stream)


def test_sampled_tokens_depend_only_on_the_seed_and_step(model):
    cfg, params = model
    hot = Temperature(1.5)
    specs = [(5, 9, 11), (40, 3, 12), (60, 12, 13), (12, 6, 14), (3, 12, 15), (25, 7, 16)]
    reqs = [_req(p, n, seed) for p, n, seed in specs]
    ref = _engine(cfg, params, 1, hot).run(reqs)
    assert [len(r) for r in ref] == [n for _, n, _ in specs]

    def same(got, idx, what):
        for g, i in zip(got, idx):
            np.testing.assert_array_equal(g, ref[i], err_msg=f"{what}: request {i}")

    same(_engine(cfg, params, 3, hot).run(reqs), range(6), "3 slots")
    order = [4, 2, 0, 5, 1, 3]  # other neighbours and other slots
    same(_engine(cfg, params, 3, hot).run([reqs[i] for i in order]), order, "reordered")
    engine = _engine(cfg, params, 3, hot)  # cut into runs of 2 and 4 on one engine
    same(engine.run(reqs[:2]) + engine.run(reqs[2:]), range(6), "two runs")
    streamed = dict(_engine(cfg, params, 3, hot).stream(iter(reqs)))
    same([streamed[i] for i in range(6)], range(6), "stream")

    # the seed is what matters: another seed gives other tokens, the default seed is the index in the run
    other = _engine(cfg, params, 3, hot).run([_req(p, n, seed + 100) for p, n, seed in specs])
    assert sum(not np.array_equal(a, b) for a, b in zip(ref, other)) >= 4
    default = _engine(cfg, params, 3, hot).run([_req(p, n) for p, n, _ in specs])
    indexed = _engine(cfg, params, 1, hot).run([_req(p, n, i) for i, (p, n, _) in enumerate(specs)])
    for i, (a, b) in enumerate(zip(default, indexed)):
        np.testing.assert_array_equal(a, b, err_msg=f"default seed of request {i}")


def test_state_carries_each_rows_seed(model):
    cfg, params = model
    engine = _engine(cfg, params, 2)
    engine.run([_req(5, 2, seed=7), _req(5, 3, seed=2**31 - 1)])
    assert sorted(np.asarray(engine.state["seed"]).tolist()) == [7, 2**31 - 1]
    assert "seed" in slots._ROWS
