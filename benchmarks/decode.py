"""Greedy decoding benchmark: our jitted sampler against transformers ``generate``, and a memory-bandwidth floor.

What it does:

1. Uses the randomly initialised Qwen2.5-0.5B-shaped text checkpoint that
   ``benchmarks/convert.py`` also uses (``Qwen2ForCausalLM``: vocab 151936,
   hidden 896, intermediate 4864, 24 layers, 14 heads, 2 kv heads, tied
   embeddings; bf16 safetensors, built by ``benchmarks/_checkpoints.py`` if
   missing). Both implementations load it as **float32** and compute in float32
   on the CPU, so they run the very same weights.

2. In one fresh subprocess per implementation (same CPU affinity and thread
   count for both; see "Threads" below), for batch 1 and batch 8 of seeded random
   128-token prompts (no padding), 64 new tokens, greedy:

   * ``ours``: ``viscodex_jax.sampling.generate_ids`` (prefill + a
     ``lax.while_loop`` of 64 decode steps in one jitted program; float32 KV
     cache of 192 slots, prompt_bucket 64) on the params split per layer once
     after loading (``causal_lm.unstack_layers(free=True)``: the layers run as a
     loop over their own buffers; ``--layers stacked`` keeps the ``nn.scan``
     over stacked params of training instead) with an EOS id (-1) that cannot
     occur, so all 64 tokens are generated. Prefill is timed on its own with
     the sampler's jitted ``_prefill`` (same cache length); decode = whole
     ``generate_ids`` - prefill, over 64 decode forward passes. The first call of
     each program is the untimed warm-up.
   * ``transformers``: ``Qwen2ForCausalLM.generate`` (greedy, sdpa attention,
     default dynamic KV cache) with ``eos_token_id=None`` (no EOS stopping), so
     it also generates exactly 64 tokens. Prefill = ``generate`` with
     ``max_new_tokens=1``; decode = ``generate(64)`` - ``generate(1)``, over 63
     decode forward passes (transformers' 64th token comes from the 63rd
     step's logits; ours runs one more step whose logits are unused).

   Times are the best of ``--repeats`` generate and ``--prefill_repeats``
   prefill calls after one untimed warm-up (best-of-N: this machine is shared,
   and other processes' bursts only ever add time); medians are in the JSON.
   Our compile time is measured ahead of time (``lower(...).compile()`` of the
   same jitted programs with the same arguments).

3. Memory-bandwidth floor: measured read bandwidth of this machine (best of
   numpy / torch / XLA sums over a 1 GiB float32 array, same threads) and the
   bytes one decode step must read at least: every float32 parameter once (the
   tied embedding once, as the lm_head; the embedding lookup is negligible) plus
   the valid part of the KV cache (float32, context 129..192, averaged).
   floor s/step = bytes / bandwidth; floor tokens/s = batch / floor s/step;
   "% of floor" = floor s/step / measured s/step.

4. Checks that greedy tokens agree between the two (fraction of equal tokens,
   and the mean fraction of each row before the first difference: random
   weights can make near-ties, after which the continuations differ).

5. Ablation (skip with ``--no_ablation``): one decode step (``sampling._step``)
   on the stacked params (``nn.scan`` over [L, ...] arrays, as training runs)
   against the same step on the per-layer params (a loop over per-layer
   buffers). It isolates what the scan over stacked params costs a
   memory-bound decode step on XLA:CPU, which copies each layer's weight slices
   out of the stacked arrays (a dynamic-slice fusion) before its matmuls.

6. Mixed-length workload (``--workload mixed``; both by default): 64 prompts
   whose prompt and output lengths are drawn from heavy-tailed (lognormal)
   distributions, each with its own output length (no EOS), on a tiny random
   Qwen2 (``_mixed_checkpoint``). Continuous batching (``sampling.slots``,
   8 slots: a freed slot takes the next prompt) against our lockstep
   ``generate_ids`` and transformers' ``generate`` on batches of 8 in
   submission order (a batch runs until its longest row). Generated tokens/s
   counts each prompt's own tokens; the three alternate pass by pass in one
   child, after a warm-up (ours: a whole pass, compiling every program);
   rows are checked token-equal across the three.

7. Prints Markdown tables and writes JSON to ``--json_out``.

Threads: each child process is pinned (``sched_setaffinity``) to the first
``--threads`` CPUs (default: all CPUs this process may use); torch gets
``torch.set_num_threads(threads)`` and OMP/MKL_NUM_THREADS; XLA's CPU thread
pool is sized from the affinity mask (with ``--threads 1`` we also pass
``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``).

Run from the repository root::

    .venv/bin/python benchmarks/decode.py              # ~6 min on 2 quiet cores (+ the mixed workload)
    .venv/bin/python benchmarks/decode.py --workload mixed --mixed_repeats 3
    .venv/bin/python benchmarks/decode.py --repeats 1 --prefill_repeats 2 --no_ablation  # quicker, noisier
    .venv/bin/python benchmarks/decode.py --retries 2  # rerun a child that other processes disturbed (>20% CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any

import _checkpoints as ck
import _harness as h

MODEL = "qwen2.5-0.5b"
PROMPT_LEN = 128
NEW_TOKENS = 64
BATCHES = (1, 8)
PROMPT_BUCKET = 64  # 128 tokens fill two buckets exactly: no padding, cache of round_up(128 + 64, 64) = 192 slots
NO_EOS = -1  # an id the model cannot produce: every row runs all NEW_TOKENS steps
IMPLS = (("ours", "ours: viscodex_jax generate_ids"), ("hf", "transformers generate"))


# ----------------------------------------------------------------------------- children


def _prompts(vocab: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, size=(max(BATCHES), PROMPT_LEN), dtype=np.int64)


def _times(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    """(first call s, [timed calls s]); the first call is the warm-up (compile for jitted code)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    return first, _times(fn, repeats)


def task_bandwidth(threads: int) -> dict[str, Any]:
    """Read (sum) and copy bandwidth over 1 GiB float32 arrays: numpy (1 thread), torch and XLA (``threads``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    n = 256 << 20
    a = np.ones(n, np.float32)
    b = np.empty_like(a)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ja = jnp.asarray(a)
    jsum = jax.jit(lambda x: x.sum())

    def best(fn, k=15):
        fn()
        ts = []
        for _ in range(k):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    nb = a.nbytes
    res = {
        "numpy_sum": nb / best(lambda: a.sum()) / 1e9,
        "torch_sum": nb / best(lambda: ta.sum()) / 1e9,
        "xla_sum": nb / best(lambda: jsum(ja).block_until_ready()) / 1e9,
        "numpy_copy_rw": 2 * nb / best(lambda: np.copyto(b, a)) / 1e9,
        "torch_copy_rw": 2 * nb / best(lambda: tb.copy_(ta)) / 1e9,
    }
    reads = {k: v for k, v in res.items() if k.endswith("_sum")}
    best_key = max(reads, key=reads.get)
    return dict(gb_per_s=res, read_gb_per_s=reads[best_key], read_source=best_key, array_bytes=nb)


def _param_bytes_tree(params) -> int:
    import jax

    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(params)))


def _summary(gen_times: list[float], pre_times: list[float]) -> dict[str, Any]:
    """Best (min) and median of the timed generate / prefill calls; decode = generate - prefill (best of each)."""
    g, p = min(gen_times), min(pre_times)
    return dict(generate_s=g, generate_median_s=statistics.median(gen_times), generate_times=gen_times,
                prefill_s=p, prefill_median_s=statistics.median(pre_times), prefill_times=pre_times,
                decode_s=g - p, decode_median_s=statistics.median(gen_times) - statistics.median(pre_times))


def _inference_params(params, layers: str):
    """Device params as the sampler runs them: split per layer once (the stacked arrays freed), or stacked."""
    import jax

    from viscodex_jax.model.causal_lm import unstack_layers

    params = jax.device_put(params)
    if layers == "per_layer":
        params = unstack_layers(params, free=True)
    return jax.block_until_ready(params)


def task_ours(ckpt: str, repeats: int, prefill_repeats: int, seed: int, layers: str) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from viscodex_jax.sampling import loop as sampling
    from viscodex_jax.checkpoint import load_hf_params
    from viscodex_jax.model.families.qwen2 import text_positions

    jax.devices()
    t0 = time.perf_counter()
    cfg, params = load_hf_params(ckpt, dtype=np.float32)
    params = _inference_params(params, layers)
    load_s = time.perf_counter() - t0
    settings = sampling.DecodeSettings(max_new_tokens=NEW_TOKENS, prompt_bucket=PROMPT_BUCKET, cache_dtype="float32")
    cache_dtype = jnp.dtype(settings.cache_dtype)
    prompts = _prompts(cfg.text.vocab_size, seed)
    # what is live on the device after loading: the params once (the stacked copy is gone when split)
    out: dict[str, Any] = dict(load_s=load_s, param_bytes=_param_bytes_tree(params), dtype=cfg.dtype, layers=layers,
                               live_bytes_after_load=int(sum(x.nbytes for x in jax.live_arrays())),
                               settings=dataclasses.asdict(settings), batches={})
    for b in BATCHES:
        ids = prompts[:b].astype(np.int32)
        mask = np.ones_like(ids)
        batch = {"input_ids": ids, "attention_mask": mask, "positions": text_positions(mask)}
        key, eos = jax.random.PRNGKey(0), [NO_EOS]
        res = {}

        def gen():
            res["tokens"] = sampling.generate_ids(cfg, params, batch, eos_ids=eos, pad_id=0,
                                                  sampler=sampling.Greedy(), key=key, settings=settings)

        # The same arguments generate_ids / its prefill pass to the jitted programs (for compile timing).
        p_ids, p_mask, p_pos, next_pos, extra = sampling._prepare(cfg, batch, settings)
        cache_len = sampling._round_up(p_ids.shape[1] + settings.max_new_tokens, settings.prompt_bucket)

        def prefill():
            jax.block_until_ready(sampling._prefill(params, p_ids, p_mask, p_pos, extra, cfg=cfg, cache_len=cache_len,
                                                    cache_dtype=cache_dtype))

        # Trace + compile time, measured ahead of time (the AOT executable is separate from jit's cache,
        # so the first real call below compiles again and is left out of the timings).
        t0 = time.perf_counter()
        sampling._generate_jit.lower(params, p_ids, p_mask, p_pos, next_pos, extra, key,
                                     jnp.asarray(eos, jnp.int32), 0, cfg=cfg, sampler=sampling.Greedy(),
                                     max_new=settings.max_new_tokens, cache_len=cache_len,
                                     cache_dtype=cache_dtype).compile()
        compile_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        sampling._prefill.lower(params, p_ids, p_mask, p_pos, extra, cfg=cfg, cache_len=cache_len,
                                cache_dtype=cache_dtype).compile()
        compile_pre = time.perf_counter() - t0
        g_first, g_times = _timed(gen, repeats)
        p_first, p_times = _timed(prefill, prefill_repeats)
        tokens = np.asarray(res["tokens"])
        x = _summary(g_times, p_times)
        x.update(compile_generate_s=compile_gen, compile_prefill_s=compile_pre, generate_first_s=g_first,
                 prefill_first_s=p_first, decode_steps=NEW_TOKENS, cache_len=cache_len,
                 tokens=tokens.tolist(), n_generated=int(tokens.shape[1]))
        out["batches"][str(b)] = x
        print(f"[ours] batch {b}: generate {g_times}, prefill {p_times}, compile {compile_gen:.1f}/{compile_pre:.1f}s",
              file=sys.stderr, flush=True)
    out["peak_rss"] = h.peak_rss()
    return out


def task_hf(ckpt: str, repeats: int, prefill_repeats: int, seed: int, threads: int) -> dict[str, Any]:
    import numpy as np
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = Qwen2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    prompts = _prompts(model.config.vocab_size, seed)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def gc(n):
        # eos_token_id=None: no EOS stopping criterion, so every row runs all n steps.
        return GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                pad_token_id=0, bos_token_id=None, num_beams=1, use_cache=True)

    out: dict[str, Any] = dict(load_s=load_s, param_bytes=param_bytes, dtype=str(next(model.parameters()).dtype),
                               attn_implementation=model.config._attn_implementation, batches={})
    for b in BATCHES:
        ids = torch.from_numpy(prompts[:b].copy())
        mask = torch.ones_like(ids)
        res = {}

        def run(n):
            def f():
                with torch.inference_mode():
                    res[n] = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc(n))
            return f

        t0 = time.perf_counter()
        run(2)()  # warm-up (first-call allocations, oneDNN primitive creation): prefill + one decode step
        warm_s = time.perf_counter() - t0
        g_times = _times(run(NEW_TOKENS), repeats)
        p_times = _times(run(1), prefill_repeats)
        tokens = res[NEW_TOKENS][:, PROMPT_LEN:].numpy().astype(np.int64)
        x = _summary(g_times, p_times)
        x.update(warmup_s=warm_s, decode_steps=NEW_TOKENS - 1, tokens=tokens.tolist(),
                 n_generated=int(tokens.shape[1]))
        out["batches"][str(b)] = x
        print(f"[hf] batch {b}: generate {g_times}, prefill {p_times} (warm-up {warm_s:.2f}s)", file=sys.stderr,
              flush=True)
    out["peak_rss"] = h.peak_rss()
    return out


def task_ablation(ckpt: str, repeats: int) -> dict[str, Any]:
    """One decode step (context 192 slots) of ``sampling._step`` on stacked params (``nn.scan``) and on the
    same params split per layer (a loop over per-layer buffers); same inputs, logits compared."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from viscodex_jax.sampling import loop as sampling
    from viscodex_jax.checkpoint import load_hf_params
    from viscodex_jax.model.causal_lm import unstack_layers

    cfg, params = load_hf_params(ckpt, dtype=np.float32)
    params = jax.device_put(params)
    per_layer = unstack_layers(params)  # both layouts live at once here, on purpose: one process times both
    tc = cfg.text
    n_layers, cache_len, slot = tc.num_layers, PROMPT_LEN + NEW_TOKENS, PROMPT_LEN + NEW_TOKENS // 2
    out: dict[str, Any] = dict(slot=slot, cache_len=cache_len, batches={})
    rng = np.random.default_rng(0)
    for b in BATCHES:
        shape = (n_layers, b, cache_len, tc.num_kv_heads, tc.head_dim)
        cache = {k: jnp.asarray(rng.standard_normal(shape, np.float32)) for k in ("k", "v")}
        kv_valid = jnp.asarray((np.arange(cache_len) < slot)[None].repeat(b, 0).astype(np.int32))
        tok = rng.integers(0, tc.vocab_size, b)
        logits_in = jax.nn.one_hot(tok, tc.vocab_size)[:, None] * 10.0  # greedy picks ``tok``
        position = jnp.full((b,), slot, jnp.int32)
        eos = jnp.asarray([NO_EOS], jnp.int32)
        res = {}

        def step(name, p):
            def f():
                res[name] = jax.block_until_ready(sampling._step(
                    p, cache, kv_valid, logits_in, jnp.zeros((b,), bool), jax.random.PRNGKey(0), slot, position,
                    eos, 0, cfg=cfg, sampler=sampling.Greedy(), mrope=False))
            return f

        fns = {"scan": step("scan", params), "unrolled": step("unrolled", per_layer)}
        times = {"scan": [], "unrolled": []}
        for fn in fns.values():
            fn()  # compile
        for _ in range(repeats):  # interleaved, so background load hits both alike
            for name, fn in fns.items():
                times[name] += _times(fn, 2)
        diff = float(jnp.max(jnp.abs(res["scan"][2] - res["unrolled"][2])))
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        out["batches"][str(b)] = dict(times=times, median_s=med, best_s=best, logits_max_abs_diff=diff,
                                      speedup=best["scan"] / best["unrolled"])
        print(f"[ablation] batch {b}: scan {best['scan'] * 1e3:.1f} ms, per-layer {best['unrolled'] * 1e3:.1f} ms, "
              f"max |logit diff| {diff:.2e}", file=sys.stderr, flush=True)
    return out


# ----------------------------------------------------------------------------- mixed workload


MIXED_PROMPTS = 64
MIXED_BATCH = 8
MIXED_BUCKET = 32
MIXED_MODEL = dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.05,
                   max_position_embeddings=4096)


def mixed_workload(seed: int, n: int = MIXED_PROMPTS):
    """Heavy-tailed prompt and output lengths: lognormal (sigma 1.0 / 1.1), clipped to [4, 400] / [2, 256]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prompt_lens = np.clip(np.round(rng.lognormal(np.log(32), 1.0, n)), 4, 400).astype(int)
    new_tokens = np.clip(np.round(rng.lognormal(np.log(24), 1.1, n)), 2, 256).astype(int)
    prompts = [rng.integers(0, MIXED_MODEL["vocab_size"], k).astype(np.int64) for k in prompt_lens]
    return prompts, new_tokens


def _mixed_checkpoint(work_dir: str) -> str:
    """A small random Qwen2 text model (saved once; the weights are seeded)."""
    from viscodex_jax.testing.tiny import hf_text_model

    path = os.path.join(work_dir, "mixed-tiny")
    if not os.path.isfile(os.path.join(path, "config.json")):
        tmp = f"{path}.tmp-{os.getpid()}"
        hf_text_model(MIXED_MODEL, 0).save_pretrained(tmp)
        os.replace(tmp, path)
    return path


def _left_pad(rows):
    import numpy as np

    t = max(len(r) for r in rows)
    ids, mask = np.zeros((len(rows), t), np.int64), np.zeros((len(rows), t), np.int64)
    for i, r in enumerate(rows):
        ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    return ids, mask


def task_mixed(ckpt: str, repeats: int, seed: int, threads: int, layers: str) -> dict[str, Any]:
    """64 prompts of heavy-tailed lengths, each with its own output length (no EOS): continuous batching
    (8 slots) against our lockstep loop and transformers' generate on batches of 8 in submission order
    (each batch runs until its longest row). Implementations alternate, repeat by repeat, after a warm-up
    pass of each that compiles every program the timed passes use."""
    import numpy as np
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    from viscodex_jax.checkpoint import load_hf_params
    from viscodex_jax.model.families.qwen2 import text_positions
    from viscodex_jax.sampling import loop as sampling
    from viscodex_jax.sampling.slots import Request, SlotSampler, SlotSettings

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    prompts, new_tokens = mixed_workload(seed)
    useful = int(new_tokens.sum())
    cfg, params = load_hf_params(ckpt, dtype=np.float32)
    params = _inference_params(params, layers)
    hf = Qwen2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    batches = [list(range(i, min(i + MIXED_BATCH, len(prompts)))) for i in range(0, len(prompts), MIXED_BATCH)]
    longest = int(max(sampling._round_up(len(p), MIXED_BUCKET) for p in prompts)) + int(new_tokens.max())
    slot_settings = SlotSettings(slots=MIXED_BATCH, cache_len=2 * longest, max_new_tokens=int(new_tokens.max()),
                                 prompt_bucket=MIXED_BUCKET, steps_per_call=256, windows=4)
    requests = [Request(p.astype(np.int32), np.arange(len(p), dtype=np.int32), max_new_tokens=int(k))
                for p, k in zip(prompts, new_tokens)]
    no_eos = [NO_EOS]
    out: dict[str, Any] = {}

    def continuous():
        engine = SlotSampler(cfg, params, no_eos, settings=slot_settings)
        got = engine.run(requests)
        out["continuous"] = [g.tolist() for g in got]
        out["continuous_stats"] = dict(engine.stats)

    def lockstep():
        rows = []
        for idx in batches:
            ids, mask = _left_pad([prompts[i] for i in idx])
            batch = {"input_ids": ids, "attention_mask": mask, "positions": text_positions(mask)}
            new = int(new_tokens[idx].max())
            o = sampling.generate_ids(cfg, params, batch, no_eos, settings=sampling.DecodeSettings(
                max_new_tokens=new, prompt_bucket=MIXED_BUCKET))
            rows += [o[j, :new_tokens[i]].tolist() for j, i in enumerate(idx)]
        out["lockstep"] = rows

    def transformers_generate():
        rows = []
        for idx in batches:
            ids, mask = _left_pad([prompts[i] for i in idx])
            new = int(new_tokens[idx].max())
            gc = GenerationConfig(do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                                  pad_token_id=0, bos_token_id=None, num_beams=1, use_cache=True)
            with torch.inference_mode():
                o = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                generation_config=gc)[:, ids.shape[1]:].numpy()
            rows += [o[j, :new_tokens[i]].tolist() for j, i in enumerate(idx)]
        out["hf"] = rows

    def transformers_warmup():  # nothing to compile: one short batch (first-call allocations)
        ids, mask = _left_pad([prompts[i] for i in batches[0]])
        gc = GenerationConfig(do_sample=False, max_new_tokens=2, min_new_tokens=2, eos_token_id=None, pad_token_id=0,
                              bos_token_id=None, num_beams=1, use_cache=True)
        with torch.inference_mode():
            hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), generation_config=gc)

    impls = {"continuous": continuous, "lockstep": lockstep, "hf": transformers_generate}
    warm = {}
    # ours: a whole pass, which compiles every program the timed passes use
    for name, fn in (("continuous", continuous), ("lockstep", lockstep), ("hf", transformers_warmup)):
        t0 = time.perf_counter()
        fn()
        warm[name] = time.perf_counter() - t0
    times = {name: [] for name in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    res = dict(prompts=len(prompts), batch=MIXED_BATCH, useful_tokens=useful,
               prompt_lens=[len(p) for p in prompts], new_tokens=new_tokens.tolist(),
               lockstep_steps=int(sum(new_tokens[idx].max() for idx in batches)), warmup_s=warm, times=times,
               slot_settings=dataclasses.asdict(slot_settings), stats=out["continuous_stats"],
               loadavg=list(os.getloadavg()))
    res["tok_s"] = {k: useful / min(v) for k, v in times.items()}
    res["tok_s_median"] = {k: useful / statistics.median(v) for k, v in times.items()}
    res["agreement"] = {k: agreement_rows(out["continuous"], out[k]) for k in ("lockstep", "hf")}
    return res


def agreement_rows(a, b) -> dict[str, Any]:
    same = sum(x == y for x, y in zip(a, b))
    return dict(rows_identical=int(same), rows=len(a))


def render_mixed(r: dict[str, Any]) -> str:
    names = {"continuous": f"ours: continuous batching ({r['batch']} slots)",
             "lockstep": f"ours: lockstep generate_ids (batches of {r['batch']})",
             "hf": f"transformers generate (batches of {r['batch']})"}
    cont = r["tok_s"]["continuous"]
    lines = [
        f"Mixed-length workload: {r['prompts']} prompts, prompt lengths {min(r['prompt_lens'])}..{max(r['prompt_lens'])} "
        f"(median {statistics.median(r['prompt_lens']):.0f}), output lengths {min(r['new_tokens'])}.."
        f"{max(r['new_tokens'])} (median {statistics.median(r['new_tokens']):.0f}), {r['useful_tokens']} tokens to "
        f"generate (lockstep runs {r['lockstep_steps']} steps per row); tiny random Qwen2 (float32, CPU); "
        f"best of {len(r['times']['continuous'])} alternating passes after a warm-up; load average "
        f"{r['loadavg'][0]:.2f} at the end of the child.",
        "",
        "| impl | best s | tokens/s (best) | tokens/s (median) | continuous ÷ this (best / median) | rows = continuous |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k, label in names.items():
        ratio = "" if k == "continuous" else (f"{cont / r['tok_s'][k]:.2f}× / "
                                             f"{r['tok_s_median']['continuous'] / r['tok_s_median'][k]:.2f}×")
        agree = "" if k == "continuous" else f"{r['agreement'][k]['rows_identical']}/{r['agreement'][k]['rows']}"
        lines.append(f"| {label} | {min(r['times'][k]):.2f} | {r['tok_s'][k]:.0f} | {r['tok_s_median'][k]:.0f} | "
                     f"{ratio} | {agree} |")
    lines += ["", f"continuous batching: {r['stats']} (inserts = prefills into a freed slot, rebases = cache rolls, "
              "decode_calls = jitted decode loops); tokens/s counts each prompt's own output tokens only."]
    return "\n".join(lines)


def run_child(a: dict[str, Any]) -> dict[str, Any]:
    cpus = h.pin(a["threads"])
    if a["task"] == "bandwidth":
        res = task_bandwidth(a["threads"])
    elif a["task"] == "ours":
        res = task_ours(a["ckpt"], a["repeats"], a["prefill_repeats"], a["seed"], a["layers"])
    elif a["task"] == "hf":
        res = task_hf(a["ckpt"], a["repeats"], a["prefill_repeats"], a["seed"], a["threads"])
    elif a["task"] == "mixed":
        res = task_mixed(_mixed_checkpoint(a["work_dir"]), a["repeats"], a["seed"], a["threads"], a["layers"])
    elif a["task"] == "ablation":
        res = task_ablation(a["ckpt"], a["repeats"])
    else:
        raise ValueError(f"unknown task {a['task']!r}")
    res["cpus"] = cpus
    return res


# ----------------------------------------------------------------------------- parent


def spawn(args: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    return h.spawn_retry(__file__, args, a.timeout, h.thread_env(a.threads), a.quiet_wait, a.retries, a.max_bg)


def kv_bytes_per_step(cfg_json: dict[str, Any], batch: int, context: float, itemsize: int = 4) -> float:
    hd = cfg_json["hidden_size"] // cfg_json["num_attention_heads"]
    return 2.0 * cfg_json["num_hidden_layers"] * batch * context * cfg_json["num_key_value_heads"] * hd * itemsize


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    import numpy as np

    x, y = np.asarray(a), np.asarray(b)
    if x.shape != y.shape:
        return dict(error=f"shapes differ: {x.shape} vs {y.shape}")
    eq = x == y
    first_diff = [int(np.argmin(r)) if not r.all() else r.size for r in eq]
    return dict(token_agreement=float(eq.mean()), prefix_agreement=float(np.mean(first_diff) / x.shape[1]),
                first_diff=first_diff, rows_identical=int(sum(r.all() for r in eq)), rows=int(x.shape[0]))


def render(r: dict[str, Any]) -> str:
    m, c = r["machine"], r["config"]
    bw = r["bandwidth"]
    lines = [
        f"Greedy decode, {MODEL} shapes (random weights, float32 on CPU), {PROMPT_LEN}-token prompts, "
        f"{NEW_TOKENS} new tokens; {c['threads']} threads each ({m['cpu_count']} CPUs, {m['cpu_model']}); "
        f"jax {m['versions']['jax']}, transformers {m['versions']['transformers']}, torch {m['versions']['torch']}; "
        f"best of {c['repeats']} generate / {c['prefill_repeats']} prefill calls after 1 warm-up; load average "
        f"{m['loadavg_at_start'][0]:.2f} at start, {m['loadavg_at_end'][0]:.2f} at end.",
        f"Measured read bandwidth {bw['read_gb_per_s']:.1f} GB/s ({bw['read_source']}); one decode step reads "
        f"≥ {r['param_bytes'] / 1e9:.3f} GB of float32 parameters + the KV cache.",
        "",
        "| impl | batch | prefill s | prefill tok/s | decode ms/step | decode tok/s | % of BW floor | "
        "compile s (gen / prefill) | decode speed ours÷HF | tokens = HF (all / prefix) | other load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in c["batches"]:
        fl = r["floor"][str(b)]
        for key, label in IMPLS:
            x = r["impls"][key]["batches"][str(b)]
            bg = r["impls"][key]["bg_cpu_frac"]
            comp = (f"{x['compile_generate_s']:.1f} / {x['compile_prefill_s']:.1f}" if key == "ours" else "—")
            ratio = f"{r['ratios'][str(b)]['decode_tok_s']:.2f}×" if key == "ours" else ""
            ag = r["agreement"][str(b)]
            agree = f"{ag['token_agreement'] * 100:.1f}% / {ag['prefix_agreement'] * 100:.1f}%" if key == "ours" else ""
            lines.append(
                f"| {label} | {b} | {x['prefill_s']:.2f} | {x['prefill_tok_s']:.0f} | {x['ms_per_step']:.1f} | "
                f"{x['decode_tok_s']:.1f} | {x['pct_of_floor']:.0f}% | {comp} | {ratio} | {agree} | {bg * 100:.0f}% |")
        lines.append(
            f"| floor: bytes / {bw['read_gb_per_s']:.1f} GB/s | {b} | | | {fl['s_per_step'] * 1e3:.1f} | "
            f"{fl['tok_s']:.1f} | 100% | | | | |")
    lines += [
        "",
        "prefill: ours = the sampler's jitted prefill alone; transformers = generate(max_new_tokens=1). "
        "decode = generate(64) − prefill, per decode forward pass (ours 64 passes incl. one whose logits are unused, "
        "transformers 63); decode tok/s = batch / s per step. compile = trace + XLA compile of the jitted "
        "generate program / of the prefill program alone, timed ahead of time (lower().compile()). "
        "floor = (float32 params + valid KV cache bytes) / measured read bandwidth; % of floor = floor s/step ÷ "
        "measured s/step. tokens = HF: share of equal greedy tokens / mean share of each row before its first "
        "difference. other load: share of the machine's CPU used by other processes during that child (this "
        "machine is shared; best-of-N timings are the least disturbed by it; medians are in the JSON).",
    ]
    ab = r.get("ablation")
    if ab:
        lines += [
            "",
            f"Ablation, one decode step of ours (context {ab['slot'] + 1} of {ab['cache_len']} slots), best of "
            f"{len(next(iter(ab['batches'].values()))['times']['scan'])} interleaved calls "
            f"(other load {ab['bg_cpu_frac'] * 100:.0f}%):",
            "",
            "| batch | sampling._step, stacked params (nn.scan) ms | sampling._step, per-layer params (loop) ms | "
            "scan ÷ loop | max abs logit diff |",
            "|---:|---:|---:|---:|---:|",
        ]
        for b, x in ab["batches"].items():
            lines.append(f"| {b} | {x['best_s']['scan'] * 1e3:.1f} | {x['best_s']['unrolled'] * 1e3:.1f} | "
                         f"{x['speedup']:.2f}× | {x['logits_max_abs_diff']:.1e} |")
    return "\n".join(lines)


def measure_fixed(a: argparse.Namespace, results: dict[str, Any], common: dict[str, Any], ckpt: str) -> None:
    """The fixed workload (steps 1-5 of the module docstring) into ``results``."""
    ck.ensure(MODEL, ckpt, 0, a.timeout)
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg_json = json.load(f)
    print("measuring memory bandwidth ...", file=sys.stderr, flush=True)
    results["bandwidth"] = spawn(dict(common, task="bandwidth"), a)
    for key, label in IMPLS:
        print(f"running {label} ...", file=sys.stderr, flush=True)
        results["impls"][key] = spawn(dict(common, task=key), a)

    param_bytes = results["impls"]["ours"]["param_bytes"]
    results["param_bytes"] = param_bytes
    bw = results["bandwidth"]["read_gb_per_s"] * 1e9
    results["floor"], results["agreement"], results["ratios"] = {}, {}, {}
    for b in BATCHES:
        ctx = PROMPT_LEN + (NEW_TOKENS + 1) / 2  # step i (1..64) attends to 128 + i keys
        nbytes = param_bytes + kv_bytes_per_step(cfg_json, b, ctx)
        fl = dict(bytes_per_step=nbytes, kv_bytes_per_step=nbytes - param_bytes, s_per_step=nbytes / bw)
        fl["tok_s"] = b / fl["s_per_step"]
        results["floor"][str(b)] = fl
        for key, _ in IMPLS:
            x = results["impls"][key]["batches"][str(b)]
            x["s_per_step"] = x["decode_s"] / x["decode_steps"]
            x["ms_per_step"] = x["s_per_step"] * 1e3
            x["decode_tok_s"] = b / x["s_per_step"]
            x["prefill_tok_s"] = b * PROMPT_LEN / x["prefill_s"]
            x["pct_of_floor"] = 100.0 * fl["s_per_step"] / x["s_per_step"]
        o, hf = results["impls"]["ours"]["batches"][str(b)], results["impls"]["hf"]["batches"][str(b)]
        results["agreement"][str(b)] = agreement(o["tokens"], hf["tokens"])
        results["ratios"][str(b)] = dict(decode_tok_s=o["decode_tok_s"] / hf["decode_tok_s"],
                                         prefill_tok_s=o["prefill_tok_s"] / hf["prefill_tok_s"],
                                         generate_s=o["generate_s"] / hf["generate_s"])
    if not a.no_ablation:
        print("ablation: one decode step, scanned vs unrolled layers ...", file=sys.stderr, flush=True)
        results["ablation"] = spawn(dict(common, task="ablation"), a)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work_dir", default=os.path.join(h.RESULTS_DIR, "ckpts"),
                   help="where the random checkpoints are cached (shared with convert.py)")
    p.add_argument("--json_out", default=os.path.join(h.RESULTS_DIR, "decode.json"))
    p.add_argument("--repeats", type=int, default=3, help="timed generate calls per batch size (best reported)")
    p.add_argument("--prefill_repeats", type=int, default=5, help="timed prefill calls per batch size (best reported)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="CPUs (affinity) and threads for each implementation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_ablation", action="store_true",
                   help="skip timing one decode step with the layers unrolled instead of scanned (~1 min)")
    h.add_child_args(p)
    p.add_argument("--workload", choices=("fixed", "mixed", "both"), default="both",
                   help="fixed: equal prompts, batch 1 and 8, with the bandwidth floor; mixed: 64 prompts of "
                        "heavy-tailed lengths, continuous batching vs lockstep vs transformers")
    p.add_argument("--layers", choices=("per_layer", "stacked"), default="per_layer",
                   help="ours: params split per layer once after loading (inference layout), or stacked [L, ...] "
                        "(nn.scan, the training layout)")
    p.add_argument("--mixed_repeats", type=int, default=3,
                   help="timed passes of each implementation over the mixed workload (alternating)")
    a = p.parse_args(argv)

    t_start = time.perf_counter()
    ckpt = os.path.join(a.work_dir, MODEL)
    results: dict[str, Any] = dict(
        machine=h.machine_info(),
        config=dict(model=MODEL, ckpt=ckpt, prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS, batches=list(BATCHES),
                    repeats=a.repeats, prefill_repeats=a.prefill_repeats, threads=a.threads, seed=a.seed,
                    prompt_bucket=PROMPT_BUCKET, layers=a.layers,
                    quiet_wait=a.quiet_wait, retries=a.retries, max_bg=a.max_bg, compute_dtype="float32",
                    threads_setup=h.THREADS_SETUP),
        impls={},
    )
    common = dict(ckpt=ckpt, repeats=a.repeats, prefill_repeats=a.prefill_repeats, seed=a.seed, threads=a.threads,
                  layers=a.layers)
    if a.workload in ("fixed", "both"):
        measure_fixed(a, results, common, ckpt)
    if a.workload in ("mixed", "both"):
        print("mixed-length workload: continuous batching, lockstep, transformers ...", file=sys.stderr, flush=True)
        results["mixed"] = spawn(dict(common, task="mixed", work_dir=a.work_dir, repeats=a.mixed_repeats), a)
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())  # before rendering: the fixed table states it
    results["wall_s"] = time.perf_counter() - t_start
    tables = ([render(results)] if a.workload in ("fixed", "both") else []) + (
        [render_mixed(results["mixed"])] if "mixed" in results else [])
    h.publish(results, "\n\n".join(tables), a.json_out)


if __name__ == "__main__":
    h.entry(main, run_child)
