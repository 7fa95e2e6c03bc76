"""Train-step benchmark: our jitted step (viscodex_jax.train.step) against the same step in transformers + torch.

What it does:

1. Two text-only Qwen2 models (random weights, stored bf16 or fp32, loaded by
   both implementations as **float32** and trained in float32 on the CPU):

   * ``tiny``: the base text model of ``viscodex_jax.testing.tiny.make_tiny_checkpoints``
     (hidden 64, intermediate 128, 2 layers, 4/2 heads, vocab 4160 padded,
     untied lm_head), batch 4 x 512 tokens;
   * ``0.5b-wide-4l``: Qwen2.5-0.5B's shapes (vocab 151936, hidden 896,
     intermediate 4864, 14/2 heads, tied embeddings) but **4 layers instead of
     24** to keep CPU time sane (the tied 136M-parameter embedding / lm_head is
     then ~70% of the matmul parameters), batch 2 x 256 tokens. Built by
     ``benchmarks/_checkpoints.py`` (meta device, seeded fill, bf16
     ``save_pretrained``) and cached under ``--work_dir``.

2. Fresh subprocesses per (model, implementation), ``--rounds`` of them each,
   alternating ours, transformers, ours, transformers, ... so that load which
   comes and goes on a shared machine hits both alike; same CPU affinity and
   thread count for both (see decode.py's "Threads"; documented in the JSON):

   * ``ours``: ``make_train_step(cfg, make_optimizer(OptimConfig(...)), trainable_keys(params, "llm"),
     vocab_chunk=8192)`` jitted with ``donate_argnums=0`` as ``train/loop.py`` does;
     batch {input_ids, labels = input_ids, segment_ids = 1, positions = arange};
     loss = token-mean cross-entropy (chunked over the vocab), AdamW (b1 0.9, b2
     0.999, eps 1e-8, weight decay 0), global-norm clipping at 1.0.
   * ``transformers``: ``Qwen2ForCausalLM(input_ids, labels=labels).loss.backward()``,
     ``clip_grad_norm_(1.0)``, ``torch.optim.AdamW`` (same hyper-parameters,
     torch's CPU default implementation), ``zero_grad(set_to_none=True)``;
     sdpa attention.

   Both train all parameters (ours: the "llm" preset = every text parameter).
   In each process ``--warmup`` untimed steps first (ours' first one includes the jit compile,
   reported separately as first step - median step), then ``--steps`` timed steps; a row
   reports the median over all rounds' timed steps (each timed to completion: ``block_until_ready`` /
   synchronous torch). Model FLOP/s uses ``viscodex_jax.train.metrics.train_flops``
   (6 N per token + causal attention) for both. The first step's loss of the
   two implementations is compared (same weights, same batch).

3. Prints a Markdown table (with ours ÷ transformers in tokens/s, and the range of the
   per-round ratios) and writes JSON to ``--json_out``.

Run from the repository root::

    .venv/bin/python benchmarks/train_step.py                 # both models, 2 rounds: ~5 min on 2 quiet cores
    .venv/bin/python benchmarks/train_step.py --quick         # 0.5b-wide-4l, 1 round: ~1 min (+~30 s first time)
    .venv/bin/python benchmarks/train_step.py --models tiny   # under a minute
    .venv/bin/python benchmarks/train_step.py --retries 2     # rerun a child other processes disturbed (>20% CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import _checkpoints as ck
import _harness as h

WIDE = "qwen2.5-0.5b-4l"  # in _checkpoints.MODELS
MODELS = {
    # name: (checkpoint kind, batch, seq_len, timed steps, warm-up steps)
    "tiny": dict(batch=4, seq=512, steps=10, warmup=5),
    "0.5b-wide-4l": dict(batch=2, seq=256, steps=3, warmup=1),
}
# --quick: the headline model only, one round, fewer steps (about a minute on 2 quiet cores).
QUICK = dict(models="0.5b-wide-4l", rounds=1, steps=2, warmup=1)
ROUNDS = 2
IMPLS = (("ours", "ours: viscodex_jax train step (jit)"), ("hf", "transformers + torch AdamW"))
OPTIM = dict(lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0)
VOCAB_CHUNK = 8192


# ----------------------------------------------------------------------------- children


def _batch(vocab: int, b: int, t: int, seed: int) -> dict[str, Any]:
    import numpy as np

    ids = np.random.default_rng(seed).integers(0, vocab, size=(b, t)).astype(np.int32)
    return {"input_ids": ids, "labels": ids.copy(), "segment_ids": np.ones_like(ids),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}


def task_ours(ckpt: str, b: int, t: int, steps: int, warmup: int, seed: int) -> dict[str, Any]:
    import jax
    import numpy as np

    from viscodex_jax.checkpoint import load_hf_params
    from viscodex_jax.train.metrics import text_params, train_flops
    from viscodex_jax.train.step import (OptimConfig, init_state, make_optimizer, make_train_step,
                                         trainable_keys)

    jax.devices()
    cfg, params = load_hf_params(ckpt, dtype=np.float32)
    keys = trainable_keys(params, "llm")
    opt = make_optimizer(OptimConfig(warmup_steps=0, total_steps=1000, **OPTIM), keys)
    state = jax.device_put(init_state(jax.device_put(params), opt, keys))
    del params
    step = jax.jit(make_train_step(cfg, opt, keys, vocab_chunk=VOCAB_CHUNK), donate_argnums=0)
    batch = _batch(cfg.text.vocab_size, b, t, seed)
    dev_batch = jax.device_put(batch)
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, m = step(state, dev_batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
        losses.append(float(m["loss"]))
        print(f"[ours] step {i}: {times[-1]:.3f}s loss {losses[-1]:.5f}", file=sys.stderr, flush=True)
    med = statistics.median(times[warmup:])
    return dict(step_s=med, step_times=times[warmup:], warmup_times=times[:warmup], first_step_s=times[0],
                compile_s=times[0] - med, losses=losses, flops=train_flops(cfg, batch),
                matmul_params=text_params(cfg), n_trainable=len(keys),
                n_params=int(sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))),
                peak_rss=h.peak_rss())


def task_hf(ckpt: str, b: int, t: int, steps: int, warmup: int, seed: int, threads: int) -> dict[str, Any]:
    import torch
    from transformers import Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    model = Qwen2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=OPTIM["lr"], betas=(OPTIM["b1"], OPTIM["b2"]), eps=OPTIM["eps"],
                            weight_decay=OPTIM["weight_decay"])
    batch = _batch(model.config.vocab_size, b, t, seed)
    ids = torch.from_numpy(batch["input_ids"]).long()
    labels = ids.clone()
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, OPTIM["clip_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        print(f"[hf] step {i}: {times[-1]:.3f}s loss {losses[-1]:.5f}", file=sys.stderr, flush=True)
    med = statistics.median(times[warmup:])
    return dict(step_s=med, step_times=times[warmup:], warmup_times=times[:warmup], first_step_s=times[0],
                losses=losses, n_params=sum(p.numel() for p in params),
                attn_implementation=model.config._attn_implementation,
                adamw=dict(foreach=opt.defaults.get("foreach"), fused=opt.defaults.get("fused")),
                peak_rss=h.peak_rss())


def run_child(a: dict[str, Any]) -> dict[str, Any]:
    cpus = h.pin(a["threads"])
    if a["task"] == "make_tiny":
        from viscodex_jax.testing.tiny import ensure_tiny_checkpoints

        res = ensure_tiny_checkpoints(a["ckpt"], seed=a["seed"])
    elif a["task"] == "ours":
        res = task_ours(a["ckpt"], a["batch"], a["seq"], a["steps"], a["warmup"], a["seed"])
    elif a["task"] == "hf":
        res = task_hf(a["ckpt"], a["batch"], a["seq"], a["steps"], a["warmup"], a["seed"], a["threads"])
    else:
        raise ValueError(f"unknown task {a['task']!r}")
    res["cpus"] = cpus
    return res


# ----------------------------------------------------------------------------- parent


def spawn(args: dict[str, Any], a: argparse.Namespace, retry: bool = True) -> dict[str, Any]:
    env = h.thread_env(a.threads)
    if not retry:
        return h.spawn_child(__file__, args, a.timeout, env)
    return h.spawn_retry(__file__, args, a.timeout, env, a.quiet_wait, a.retries, a.max_bg)


def pool_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One implementation's rounds as one row: the median over every round's timed steps; each round kept."""
    times = [t for r in runs for t in r["step_times"]]
    x = dict(step_s=statistics.median(times), step_times=times, losses=runs[0]["losses"],
             maxrss=max(r["maxrss"] for r in runs), bg_cpu_frac=statistics.mean(r["bg_cpu_frac"] for r in runs),
             rounds=runs)
    if "compile_s" in runs[0]:
        x["compile_s"] = statistics.median(r["compile_s"] for r in runs)
    return x


def render(r: dict[str, Any]) -> str:
    m, c = r["machine"], r["config"]
    lines = [
        f"Train step (forward + backward + clip + AdamW), float32 on CPU, {c['threads']} threads each "
        f"({m['cpu_count']} CPUs, {m['cpu_model']}); jax {m['versions']['jax']}, transformers "
        f"{m['versions']['transformers']}, torch {m['versions']['torch']}; load average "
        f"{m['loadavg_at_start'][0]:.2f} at start, {m['loadavg_at_end'][0]:.2f} at end.",
        "",
        "| model | batch × seq | impl | step s (median) | min–max | tokens/s | model GFLOP/s | ours ÷ transformers "
        "(tokens/s) | compile s | first-step loss | peak RSS GB | other load |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, mr in r["models"].items():
        for key, label in IMPLS:
            x = mr["impls"][key]
            rr = mr["round_ratios"]
            ratio = (f"{mr['ratio_tokens_per_s']:.2f}×" + (f" ({min(rr):.2f}–{max(rr):.2f})" if len(rr) > 1 else "")
                     if key == "ours" else "")
            comp = f"{x['compile_s']:.1f}" if key == "ours" else "—"
            lines.append(
                f"| {name} | {mr['batch']} × {mr['seq']} | {label} | {x['step_s']:.3f} | "
                f"{min(x['step_times']):.3f}–{max(x['step_times']):.3f} | {x['tokens_per_s']:.0f} | "
                f"{x['gflops_per_s']:.1f} | {ratio} | {comp} | {x['losses'][0]:.5f} | {x['maxrss'] / 1e9:.2f} | "
                f"{x['bg_cpu_frac'] * 100:.0f}% |")
    lines += [
        "",
        f"Each implementation ran in {c['rounds']} fresh process(es), alternating ours, transformers, ours, ... "
        "step s: median of all rounds' timed steps after each process's warm-up steps ("
        + "; ".join(f"{n}: {mr['steps']} after {mr['warmup']}" for n, mr in r["models"].items())
        + "). ours ÷ transformers: tokens/s ratio of those medians (in brackets: the range of the per-round "
        "ratios). 0.5b-wide-4l is Qwen2.5-0.5B with 4 of its 24 layers (CPU time). model GFLOP/s = train_flops "
        "(6 N per token + causal attention; the same count for both) / step s. compile = ours' first step − median step. first-step loss: "
        "same weights and batch, so the two should agree to ~1e-5. other load: share of the machine's CPU used by "
        "other processes during that child (this machine is shared).",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work_dir", default=os.path.join(h.RESULTS_DIR, "ckpts"))
    p.add_argument("--json_out", default=os.path.join(h.RESULTS_DIR, "train_step.json"))
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK['models']} only, {QUICK['rounds']} round, {QUICK['steps']} timed steps after "
                        f"{QUICK['warmup']} (flags given explicitly still win)")
    p.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)} (default: all)")
    p.add_argument("--rounds", type=int, default=None,
                   help=f"fresh processes per implementation, alternating ours / transformers (default {ROUNDS})")
    p.add_argument("--steps", type=int, default=None, help="timed steps per process (default: per model)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: per model)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="CPUs (affinity) and threads for each implementation")
    p.add_argument("--seed", type=int, default=0)
    h.add_child_args(p)
    a = p.parse_args(argv)
    for k, v in (QUICK if a.quick else dict(models=",".join(MODELS), rounds=ROUNDS)).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.rounds < 1:
        p.error(f"--rounds must be at least 1, got {a.rounds}")
    names = [n for n in a.models.split(",") if n]
    unknown = set(names) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}")

    t_start = time.perf_counter()
    ckpts = {}
    common = dict(seed=a.seed, threads=a.threads)
    if "tiny" in names:
        tiny_dir = os.path.join(a.work_dir, "tiny")
        ckpts["tiny"] = spawn(dict(common, task="make_tiny", ckpt=tiny_dir), a, retry=False)["base"]
    if "0.5b-wide-4l" in names:
        ckpt = os.path.join(a.work_dir, WIDE)
        ck.ensure(WIDE, ckpt, a.seed, a.timeout)
        ckpts["0.5b-wide-4l"] = ckpt
    results: dict[str, Any] = dict(
        machine=h.machine_info(),
        config=dict(threads=a.threads, seed=a.seed, optim=OPTIM, vocab_chunk=VOCAB_CHUNK, compute_dtype="float32",
                    quiet_wait=a.quiet_wait, retries=a.retries, max_bg=a.max_bg, rounds=a.rounds, quick=a.quick,
                    threads_setup=h.THREADS_SETUP),
        models={},
    )
    for name in names:
        spec = dict(MODELS[name])
        if a.steps is not None:
            spec["steps"] = a.steps
        if a.warmup is not None:
            spec["warmup"] = a.warmup
        with open(os.path.join(ckpts[name], "config.json")) as f:
            cfg_json = json.load(f)
        mr: dict[str, Any] = dict(ckpt=ckpts[name], config={k: cfg_json.get(k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "tie_word_embeddings")}, **spec, impls={})
        # A B A B: load that comes and goes on a shared machine then hits both implementations alike.
        runs: dict[str, list[dict[str, Any]]] = {key: [] for key, _ in IMPLS}
        for rnd in range(a.rounds):
            for key, label in IMPLS:
                print(f"[{name}] round {rnd + 1}/{a.rounds}: {label} ...", file=sys.stderr, flush=True)
                runs[key].append(spawn(dict(common, task=key, ckpt=ckpts[name], **spec), a))
        flops = runs["ours"][0]["flops"]
        mr["flops_per_step"] = flops
        for key, _ in IMPLS:
            mr["impls"][key] = x = pool_rounds(runs[key])
            x["tokens_per_s"] = spec["batch"] * spec["seq"] / x["step_s"]
            x["gflops_per_s"] = flops / x["step_s"] / 1e9
        o, hf = mr["impls"]["ours"], mr["impls"]["hf"]
        mr["ratio_tokens_per_s"] = o["tokens_per_s"] / hf["tokens_per_s"]
        mr["round_ratios"] = [y["step_s"] / x["step_s"] for x, y in zip(runs["ours"], runs["hf"])]
        mr["first_loss_abs_diff"] = abs(o["losses"][0] - hf["losses"][0])
        print(f"[{name}] ours ÷ transformers (tokens/s): {mr['ratio_tokens_per_s']:.3f} "
              f"(rounds: {', '.join(f'{x:.3f}' for x in mr['round_ratios'])})", file=sys.stderr, flush=True)
        results["models"][name] = mr
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results["wall_s"] = time.perf_counter() - t_start
    h.publish(results, render(results), a.json_out)


if __name__ == "__main__":
    h.entry(main, run_child)
