"""Checkpoint conversion benchmark: HF safetensors -> our params / orbax, against a read floor and transformers.

What it does:

1. Writes randomly initialised, real-shape HF checkpoints (bfloat16, sharded
   safetensors via ``save_pretrained(max_shard_size="500MB")``) and caches them
   under ``--work_dir``:

   * ``qwen2.5-0.5b``: ``Qwen2ForCausalLM`` with Qwen2.5-0.5B's shapes (vocab
     151936, hidden 896, intermediate 4864, 24 layers, 14 heads, 2 kv heads,
     tied embeddings, rope_theta 1e6).
   * ``qwen2.5-vl-0.5b``: ``Qwen2_5_VLForConditionalGeneration`` with that same
     text config plus the real Qwen2.5-VL vision tower (depth 32, hidden 1280,
     intermediate 3420, 16 heads, out 896, full attention in blocks 7/15/23/31,
     window 112). Its head_dim is 64, so mrope_section must sum to 32: we use
     [8, 12, 12], the 1:1.5:1.5 split of Qwen2.5-VL's [16, 24, 24] (head_dim 128).

   The models are built on the meta device (no init cost), materialised with
   ``to_empty`` and filled from a seeded ``torch.Generator``, so creation is
   seconds, not minutes.

2. Times each task in a fresh subprocess (peak RSS = the child's VmHWM, so it is
   per task; import time is excluded from the seconds, import RSS is not
   excluded from the peak, and is reported separately). Rounds alternate the
   tasks (one run of each per round), and every child waits ``--settle``
   seconds after its imports before its timed part: on a VM with free page
   reporting (this one), memory freed by the previous task goes back to the
   hypervisor within about 2 s, and a page touched afterwards costs a host fault
   (reading 1 GB into fresh memory: 0.45 s right after a task freed 1 GB, 3.7 s
   otherwise). Without the wait, a task that imports little (the floor) reuses
   its predecessor's pages and one that imports jax does not:

   * ``floor: raw read``       every safetensors file read with ``readinto`` into
                               fresh anonymous memory (what any loader that
                               copies must at least pay);
   * ``floor: safe_open mmap`` ``safe_open(framework="pt").get_tensor`` for every
                               tensor, then every 4 KiB page touched (zero-copy);
   * ``ours: load_hf_params``  ``viscodex_jax.checkpoint.load_hf_params(dir)``;
   * ``ours: convert->orbax``  ``viscodex_jax.checkpoint.convert_hf_to_orbax(dir, out, compress=...)``,
                               zstd and without (output size recorded, then deleted);
   * ``transformers``          ``from_pretrained(dir, dtype=torch.bfloat16)``, as
                               returned (transformers 5 keeps bf16 safetensors
                               weights mmap-backed, so this reads almost nothing);
   * ``transformers + touch``  the same, then every page of every parameter
                               touched so all bytes really are in memory.

3. Prints a Markdown table and writes JSON (with machine info) to ``--json_out``.

Run from the repository root::

    .venv/bin/python benchmarks/convert.py            # both models: ~10 min on 2 shared cores (+30 s the first time)
    .venv/bin/python benchmarks/convert.py --quick    # text 0.5B only: ~4 min (run_all: --repeats 1 --warmup 0, ~1.5 min)

Timings are with a warm page cache (the files are read once before measuring);
``--cold`` instead asks the kernel to drop each file's cached pages
(posix_fadvise DONTNEED) before every task, which helps only where the disk is
not itself cached by a host. On a shared machine, ``--wait_idle 30`` waits (up
to 30 s) for idle CPUs before each run, and the "others' CPU" column says how
much CPU other processes took while each row ran: rows far from 0% are skewed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from typing import Any

import _checkpoints as ck
import _harness as h

MODELS = ("qwen2.5-0.5b", "qwen2.5-vl-0.5b")  # in _checkpoints.MODELS
TASKS = [
    # (key, label, group)
    ("floor_raw", "floor: raw read (copy)", "floor"),
    ("floor_safetensors", "floor: safe_open mmap + touch (zero-copy)", "floor"),
    ("ours_load", "ours: load_hf_params", "ours"),
    ("ours_convert", "ours: convert_hf_to_orbax (zstd)", "ours"),
    ("ours_convert_raw", "ours: convert_hf_to_orbax (no zstd)", "ours"),
    ("hf_load", "transformers from_pretrained (lazy mmap)", "ref"),
    ("hf_load_touch", "transformers from_pretrained + touch", "ref"),
]
FLOOR_TASK = "floor_raw"
REF_TASK = "hf_load_touch"

# ----------------------------------------------------------------------------- helpers


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def _touch_torch(tensors) -> int:
    """Reads one byte of every 4 KiB page of each tensor; returns a checksum so nothing is skipped."""
    import torch

    s = 0
    seen = set()
    for t in tensors:
        if t.numel() == 0 or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        flat = t.detach().reshape(-1).view(torch.uint8)
        s += int(flat[::4096].sum()) + int(flat[-1])
    return s


# ----------------------------------------------------------------------------- child tasks


_CPU0 = [0.0]


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)  # every thread's: tensorstore's compression included
    return ru.ru_utime + ru.ru_stime


def _settled(settle: float) -> dict[str, int]:
    """Waits ``settle`` s (memory freed before now goes back to the hypervisor), then this process's status."""
    time.sleep(settle)
    _CPU0[0] = _cpu_s()
    return h.proc_status()


def run_task(task: str, ckpt_dir: str, kind: str, out_dir: str | None, settle: float = 0.0) -> dict[str, Any]:
    """Runs one task in this (fresh) process; imports first, then times only the task."""
    extra: dict[str, Any] = {}
    t_imp = time.perf_counter()
    if task == "floor_raw":
        import numpy as np

        files = ck.weight_files(ckpt_dir)
        before = _settled(settle)
        t0 = time.perf_counter()
        keep = []
        for path in files:
            n = os.path.getsize(path)
            buf = np.empty(n, np.uint8)
            with open(path, "rb", buffering=0) as f:
                got = f.readinto(memoryview(buf))
            if got != n:
                raise RuntimeError(f"{path}: short read {got} of {n}")
            keep.append(buf)
        dt = time.perf_counter() - t0
        extra["bytes_read"] = sum(b.nbytes for b in keep)
    elif task == "floor_safetensors":
        import torch  # noqa: F401  (framework="pt" needs it; import outside the timing)
        from safetensors import safe_open

        files = ck.weight_files(ckpt_dir)
        before = _settled(settle)
        t0 = time.perf_counter()
        keep = []
        for path in files:
            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    keep.append(f.get_tensor(k))
        extra["checksum"] = _touch_torch(keep)
        dt = time.perf_counter() - t0
        extra["n_tensors"] = len(keep)
        extra["bytes_read"] = sum(t.numel() * t.element_size() for t in keep)
    elif task in ("ours_load", "ours_convert", "ours_convert_raw"):
        import jax

        from viscodex_jax.checkpoint import convert_hf_to_orbax, load_hf_params

        jax.devices()  # backend init outside the timing
        before = _settled(settle)
        if task == "ours_load":
            t0 = time.perf_counter()
            _, params = load_hf_params(ckpt_dir)
            dt = time.perf_counter() - t0
            leaves = jax.tree_util.tree_leaves(params)
            extra["n_leaves"] = len(leaves)
            extra["bytes_read"] = sum(x.nbytes for x in leaves)
            extra["dtypes"] = sorted({str(x.dtype) for x in leaves})
        else:
            t0 = time.perf_counter()
            convert_hf_to_orbax(ckpt_dir, out_dir, compress=task == "ours_convert")
            dt = time.perf_counter() - t0
    elif task in ("hf_load", "hf_load_touch"):
        import torch
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        cls = Qwen2ForCausalLM if kind == "text" else Qwen2_5_VLForConditionalGeneration
        before = _settled(settle)
        t0 = time.perf_counter()
        model = cls.from_pretrained(ckpt_dir, dtype=torch.bfloat16)
        if task == "hf_load_touch":
            extra["checksum"] = _touch_torch(list(model.parameters()) + list(model.buffers()))
        dt = time.perf_counter() - t0
        extra["bytes_read"] = sum(p.numel() * p.element_size() for p in model.parameters())
        extra["dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    else:
        raise ValueError(f"unknown task {task!r}")
    after = h.proc_status()
    return dict(
        seconds=dt,
        timed_cpu_s=_cpu_s() - _CPU0[0],
        import_s=t0 - t_imp - settle,
        rss_before=before["VmRSS"],
        peak_rss=after["VmHWM"],
        rss_after=after["VmRSS"],
        rss_file_after=after.get("RssFile", 0),
        rss_anon_after=after.get("RssAnon", 0),
        **extra,
    )


def run_child(a: dict[str, Any]) -> dict[str, Any]:
    return run_task(a["task"], a["ckpt"], a["kind"], a.get("out"), a.get("settle", 0.0))


# ----------------------------------------------------------------------------- parent


def evict(files: list[str]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Checkpoint conversion, {m['cpu_count']} CPUs ({m['cpu_model']}), {m['platform']}; "
        f"jax {m['versions']['jax']}, orbax {m['versions']['orbax-checkpoint']}, "
        f"transformers {m['versions']['transformers']}, torch {m['versions']['torch']}; "
        f"{results['config']['cache']} page cache; median of {results['config']['repeats']} alternating rounds of fresh "
        f"processes (after {results['config']['warmup']} untimed), each timed after a "
        f"{results['config'].get('settle_s', 0):.0f} s settle; load average {m['loadavg_at_start'][0]:.2f} at start, "
        f"{m.get('loadavg_at_end', [float('nan')])[0]:.2f} at end; other processes took "
        f"{results.get('foreign_cpu_frac', float('nan')):.0%} of the CPU while the timed processes ran.",
        "",
        "| model | task | s | s min–max | × floor | CPU s | GB/s | peak RSS GB | peak RSS ÷ ckpt | RSS before GB "
        "| on disk GB | ours / transformers | others' CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, mres in results["models"].items():
        gb = mres["ckpt_bytes"] / 1e9
        for key, label, group in TASKS:
            r = mres["tasks"].get(key)
            if r is None:
                continue
            vs_ref = r.get("vs_transformers")
            out = r.get("out_bytes")
            lines.append(
                f"| {name} ({gb:.2f} GB) | {label} | {r['seconds']:.2f} | {r['seconds_min']:.2f}–{r['seconds_max']:.2f} | "
                f"{h.fmt(r['vs_floor'], '.2f')}× | {r['timed_cpu_s']:.2f} | {h.fmt(r['gb_per_s'], '.2f')} | "
                f"{r['peak_rss_gb']:.2f} | {r['peak_rss_vs_ckpt']:.2f} | {r['rss_before_gb']:.2f} | "
                f"{h.fmt(out / 1e9 if out else None, '.3f')} | "
                f"{(h.fmt(vs_ref, '.2f') + '×') if vs_ref is not None else ''} | {r['foreign_cpu_frac']:.0%} |"
            )
    lines += [
        "",
        "GB/s = safetensors bytes / seconds. Seconds exclude interpreter and library import (and the settle); CPU s: "
        "the timed part's user + system time, all threads (steadier than seconds on a shared machine); on disk: the "
        "orbax output. Peak RSS is the "
        "child's VmHWM (includes imports, which 'RSS before' shows, and file-backed mmap pages). "
        "× floor = seconds / 'floor: raw read (copy)'. ours / transformers = seconds / "
        "'transformers from_pretrained + touch' (weights actually paged in); the lazy row reads almost "
        "nothing because transformers 5 keeps bf16 safetensors weights mmap-backed. others' CPU = share of the "
        "machine's CPU time that other processes used while this row's processes ran (0% = uncontended).",
    ]
    return "\n".join(lines)


def summarise(samples: list[dict[str, Any]], nbytes: int) -> dict[str, Any]:
    secs = [s["seconds"] for s in samples]
    med = statistics.median(secs)
    peak = max(s["peak_rss"] for s in samples)
    before = statistics.median(s["rss_before"] for s in samples)
    return dict(
        seconds=med,
        seconds_min=min(secs),
        seconds_max=max(secs),
        gb_per_s=nbytes / 1e9 / med if med > 0 else None,
        peak_rss_gb=peak / 1e9,
        rss_before_gb=before / 1e9,
        peak_rss_delta_gb=(peak - before) / 1e9,
        peak_rss_vs_ckpt=peak / nbytes,
        out_bytes=max(s.get("out_bytes", 0) for s in samples) or None,
        timed_cpu_s=statistics.median(s["timed_cpu_s"] for s in samples),
        # share of the machine's CPU that other processes used while these children ran
        foreign_cpu_frac=sum(s["bg_cpu_s"] for s in samples) / max(1e-9, sum(s["wall_s"] for s in samples)
                                                                    * (os.cpu_count() or 1)),
        samples=samples,
    )


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work_dir", default=os.path.join(h.RESULTS_DIR, "ckpts"),
                   help="where the random checkpoints are cached (and orbax output is written, then deleted)")
    p.add_argument("--json_out", default=os.path.join(h.RESULTS_DIR, "convert.json"))
    p.add_argument("--quick", action="store_true", help="text 0.5B model only")
    p.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--tasks", default=None, help=f"comma-separated subset of {','.join(t[0] for t in TASKS)}")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per task; the median time is reported")
    p.add_argument("--wait_idle", type=float, default=0,
                   help="before each run, wait up to this many seconds for the CPUs to be >=90%% idle (shared hosts)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed fresh processes per task first (a VM backs freshly touched memory slowly)")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds each child waits after its imports before the timed part (see the module doc)")
    p.add_argument("--cold", action="store_true", help="posix_fadvise(DONTNEED) the files before every task")
    p.add_argument("--recreate", action="store_true", help="rebuild the cached checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900, help="seconds per child process")
    a = p.parse_args(argv)

    names = ["qwen2.5-0.5b"] if a.quick else list(MODELS)
    if a.models:
        names = [n for n in a.models.split(",") if n]
        unknown = set(names) - set(MODELS)
        if unknown:
            p.error(f"unknown models {sorted(unknown)}")
    tasks = [t for t in TASKS if a.tasks is None or t[0] in a.tasks.split(",")]
    t_start, busy0, own0 = time.perf_counter(), h.cpu_busy_s(), h.own_cpu_s()
    h.warn_if_loaded()
    results: dict[str, Any] = dict(
        machine=h.machine_info(),
        config=dict(repeats=a.repeats, warmup=a.warmup, cache="cold (fadvise DONTNEED)" if a.cold else "warm",
                    shard_size=ck.SHARD_SIZE, seed=a.seed, work_dir=a.work_dir, models={n: ck.spec(n) for n in names},
                    floor_task=FLOOR_TASK, reference_task=REF_TASK, settle_s=a.settle, alternating=True),
        models={},
    )
    for name in names:
        kind = ck.MODELS[name]["kind"]
        ckpt = os.path.join(a.work_dir, name)
        ck.ensure(name, ckpt, a.seed, a.timeout, recreate=a.recreate)
        files = ck.weight_files(ckpt)
        nbytes = ck.ckpt_bytes(ckpt)
        with open(os.path.join(ckpt, ck.SPEC_FILE)) as f:
            n_params = json.load(f)["n_params"]
        mres: dict[str, Any] = dict(path=ckpt, ckpt_bytes=nbytes, n_files=len(files), n_params=n_params, tasks={})
        if not a.cold:
            ck.warm(files)
        samples: dict[str, list[dict[str, Any]]] = {key: [] for key, _, _ in tasks}
        for rep in range(-a.warmup, a.repeats):  # each round runs every task once: load and memory hit all alike
            for key, label, _ in tasks:
                out_dir = None
                if key.startswith("ours_convert"):
                    out_dir = os.path.join(a.work_dir, f"_orbax_out-{name}")
                    shutil.rmtree(out_dir, ignore_errors=True)
                os.sync()  # no writeback of the last task's output during this one
                if a.cold:
                    evict(files)
                try:
                    # >= 90% idle before each run (--wait_idle), a stricter bar than the other scripts' 85%
                    s = h.spawn_child(__file__, dict(task=key, ckpt=ckpt, kind=kind, out=out_dir, settle=a.settle),
                                      a.timeout, quiet_wait=a.wait_idle, busy_frac=0.1)
                    if out_dir:
                        s["out_bytes"] = dir_bytes(out_dir)
                finally:
                    if out_dir:
                        shutil.rmtree(out_dir, ignore_errors=True)
                if rep >= 0:
                    samples[key].append(s)
                print(f"[{name}] {label} {'warmup' if rep < 0 else '#' + str(rep + 1)}: {s['seconds']:.2f}s, "
                      f"peak RSS {s['peak_rss'] / 1e9:.2f} GB, other processes {s['bg_cpu_s']:.1f} CPU-s, "
                      f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        for key, _, _ in tasks:
            mres["tasks"][key] = summarise(samples[key], nbytes)
        floor = mres["tasks"].get(FLOOR_TASK)
        ref = mres["tasks"].get(REF_TASK)
        for key, _, group in tasks:
            r = mres["tasks"][key]
            r["vs_floor"] = r["seconds"] / floor["seconds"] if floor else None
            r["peak_rss_vs_floor"] = r["peak_rss_gb"] / floor["peak_rss_gb"] if floor else None
            r["vs_transformers"] = r["seconds"] / ref["seconds"] if (ref and group == "ours") else None
            r["peak_rss_vs_transformers"] = r["peak_rss_gb"] / ref["peak_rss_gb"] if (ref and group == "ours") else None
        ratios = {}
        for ours in ("ours_load", "ours_convert"):
            for refk in ("hf_load", "hf_load_touch"):
                if ours in mres["tasks"] and refk in mres["tasks"]:
                    o, r = mres["tasks"][ours], mres["tasks"][refk]
                    ratios[f"{ours}/{refk}"] = dict(seconds=o["seconds"] / r["seconds"],
                                                     peak_rss=o["peak_rss_gb"] / r["peak_rss_gb"])
        mres["ours_vs_transformers"] = ratios
        results["models"][name] = mres
    results["wall_s"] = time.perf_counter() - t_start
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    # CPU time other processes used during the run: the machine's busy time minus ours (2 CPUs -> 2 s/s max).
    results["machine"]["foreign_cpu_s"] = max(0.0, (h.cpu_busy_s() - busy0) - (h.own_cpu_s() - own0))
    all_samples = [x for mres in results["models"].values() for t in mres["tasks"].values() for x in t["samples"]]
    results["foreign_cpu_frac"] = sum(x["bg_cpu_s"] for x in all_samples) / max(
        1e-9, sum(x["wall_s"] for x in all_samples) * (os.cpu_count() or 1))
    h.publish(results, render(results), a.json_out)


if __name__ == "__main__":
    h.entry(main, run_child)
