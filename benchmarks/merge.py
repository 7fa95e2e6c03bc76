"""Checkpoint merge benchmark: ours (merge_checkpoints) against mergekit and an I/O floor.

What it does:

1. Builds (and caches under ``--work_dir``) randomly initialised bf16 HF
   checkpoints with real shapes, 500 MB shards, with ``benchmarks/_checkpoints.py``
   (meta-device model, seeded fill, ``save_pretrained``):

   * ``0.5b``: three text-only ``Qwen2ForCausalLM`` checkpoints with Qwen2.5-0.5B's
     shapes (vocab 151936, hidden 896, intermediate 4864, 24 layers, 14/2 heads,
     tied): ``base`` (seed ``--seed``) and ``model1``/``model2`` = base + seeded
     Gaussian noise (std ``--noise_std``, computed in fp32, stored bf16; same
     files/shard layout as the base).
   * ``vl`` (our real VisCodex case): a ``Qwen2_5_VLForConditionalGeneration`` with the
     same text shapes and the real Qwen2.5-VL vision tower (depth 32, hidden 1280,
     intermediate 3420, 16 heads, out 896, full attention in 7/15/23/31, window 112,
     mrope_section [8, 12, 12]) whose text tensors are base + noise, merged as
     model1 (the primary) with the text ``model2`` as the coder and the text base.
   * ``1.5b`` (off by default): like ``0.5b`` with Qwen2.5-1.5B's shapes (hidden
     1536, intermediate 8960, 28 layers, 12/2 heads, tied).

2. For task_arithmetic, ties (density 0.5) and dare_ties (density 0.5), with
   weights (0.7, 0.3), times in a fresh subprocess each:

   * ``ours``      ``merge_checkpoints(base, [model1, model2], out, MergeSpec(...),
                   max_shard_bytes=500e6)`` (bf16 out, fp32 compute);
   * ``mergekit``  ``mergekit-yaml`` (its CLI, from a separate venv, ``--mergekit``)
                   on the same three text checkpoints in two settings (``--mergekit_dtypes``):
                   ``dtype: float32`` (compute, as ours) with ``out_dtype: bfloat16``, and
                   ``dtype: bfloat16`` (the setting most configs use); ``--out-shard-size 250M``
                   (parameters, = 500 MB bf16), ``--lazy-unpickle``; text cases only;
   * ``floor``     every byte of the three inputs read once (pread into one reused buffer) and
                   one model's worth (the primary's tensors) written once (pwrite into planned
                   500 MB shards), the I/O primitives ours uses: what any streaming merge must pay.

   ``--ours_xla_flags`` sets XLA_FLAGS for our runs (default: none). jaxlib 0.10's CPU backend used to
   run a reduction over the 2-3 model axis 100-400x slower than a chain of adds; merge.tensor._merge_core now
   adds the models unrolled, and ``--ours_xla_flags=--xla_cpu_experimental_ynn_fusion_type=-reduce``
   shows the difference the flag still makes.

   Peak RSS is the child's ``ru_maxrss`` from ``wait4`` (it includes interpreter and
   library imports, and for mergekit any mmap'd file pages it touched).
   ``wall s`` is the whole child process (what a user waits for, imports included);
   ``work s`` excludes imports (known for ours and the floor only). ours/mergekit
   compares wall seconds; ours/floor compares work seconds. Ours' outputs are
   compared with mergekit's (fraction of bit-equal bf16 values, max |diff|).
   For the VL case (task_arithmetic only by default, ``--vl_methods``) it also tries
   mergekit once without and once with ``--allow-crimes`` and records what it says.
   The machine may be shared: before each task it waits (up to ``--quiet_wait`` s) for
   other load to drop, and reports the share of CPU that other processes used meanwhile.

   Ours and each mergekit setting alternate (ours, mk fp32, mk bf16, ours, ...) over ``--repeats``
   rounds, so load changes on a shared machine hit them alike; each row is the median, and the
   ratios are ours' median over each setting's median.

3. Prints a Markdown table and writes JSON to ``--json_out``.

Settings, ours vs mergekit (aligned where possible): both compute in fp32 and write bf16;
lambda 1; task_arithmetic normalize false; ties and dare_ties normalize true (our disjoint
mean; mergekit's dare_ties default is false); dare_ties rescale by per-tensor L1 norm (ours
``dare_rescale="l1"``, mergekit's ``rescale: true``; our default "inverse_p" is not what
mergekit does). Not alignable: DARE masks (JAX PRNG keyed by seed and tensor name vs torch's
global RNG); TIES keeps ceil(density*n) entries plus ties at the threshold, mergekit exactly
int(density*n); where sum_i w_i d_i is exactly 0 we elect no sign, mergekit elects +;
task_arithmetic sums in a different order (a few values differ by one bf16 ulp).

Run from the repository root (mergekit in its own venv, CPU torch pinned first)::

    python3 -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 && /tmp/mk/bin/pip install mergekit
    .venv/bin/python benchmarks/merge.py                    # 0.5b + vl, ~15 min on 2 cores (+2 min first time)
    .venv/bin/python benchmarks/merge.py --cases 0.5b --methods task_arithmetic   # quick
    .venv/bin/python benchmarks/merge.py --cases 0.5b,vl,1.5b   # add 1.5B (+9.3 GB disk, ~14 GB RAM for ours)

Page cache is warm (inputs are read once before timing). Outputs are deleted after
each task (mergekit's after comparison with ours).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import sys
import time
import zlib
from typing import Any

import _checkpoints as ck
import _harness as h

REPO = h.REPO

CASES = {
    # name: (text model for base/model1/model2, VL model for model1 or None)
    "0.5b": ("qwen2.5-0.5b", None),
    "vl": ("qwen2.5-0.5b", "qwen2.5-vl-0.5b"),
    "1.5b": ("qwen2.5-1.5b", None),
}
METHODS = ("task_arithmetic", "ties", "dare_ties")
WEIGHTS = (0.7, 0.3)
SHARD_BYTES = 500 * 10**6
DERIVED_SPEC = "merge_bench_spec.json"
DERIVED_VERSION = 1
# jaxlib 0.10's CPU backend hands reductions to YNNPACK; a sum over the model axis of a broadcast product
# (jnp.sum(w[:, None, None] * x, axis=0), as in merge.tensor._merge_core) then runs ~400x slower (4 s instead of 10 ms
# for a 2x4864x896 f32 array; a whole task_arithmetic merge_tensor of one 4864x896 MLP weight: 8.5 s CPU instead
# of 0.12 s). This flag keeps those reductions in XLA's own emitter.
YNN_REDUCE_OFF = "--xla_cpu_experimental_ynn_fusion_type=-reduce"


# The merge code under test (it may be edited between runs): the methods table, the per-tensor pipeline, the
# driver over tensor sources and the spec, plus the safetensors reader/writer the driver streams through.
CODE_FILES = ("viscodex_jax/merge/methods.py", "viscodex_jax/merge/tensor.py", "viscodex_jax/merge/drivers.py",
              "viscodex_jax/merge/spec.py", "viscodex_jax/merge/file_tensor.py", "viscodex_jax/checkpoint/safetensors_io.py",
              "viscodex_jax/checkpoint/planned_writer.py")
# mergekit's two settings: fp32 compute as ours (dtype float32, out_dtype bfloat16), and the bf16 compute most
# users write (dtype bfloat16).
MERGEKIT_SETTINGS = {"float32": "mergekit fp32→bf16", "bfloat16": "mergekit bf16"}


def code_hash() -> str:
    """A short hash of the merge code under test."""
    hsh = hashlib.sha256()
    for f in CODE_FILES:
        hsh.update(f.encode())
        with open(os.path.join(REPO, f), "rb") as fh:
            hsh.update(fh.read())
    return hsh.hexdigest()[:12]


def spec_kwargs(method: str, density: float) -> dict[str, Any]:
    kw: dict[str, Any] = dict(method=method, weights=WEIGHTS, out_dtype="bfloat16")
    if method != "task_arithmetic":
        kw["density"] = density
    if method == "dare_ties":
        kw["dare_rescale"] = "l1"  # mergekit's DARE rescale: keep each task vector's per-tensor L1 norm
    return kw


# ----------------------------------------------------------------------------- checkpoints


def derive_checkpoint(src: str, base: str, out: str, seed: int, std: float, spec: dict[str, Any]) -> dict[str, Any]:
    """Writes ``src`` with every tensor that the base also has replaced by bf16(base + std * N(0, 1)).

    Keeps src's file layout, index and side files; other tensors (the vision tower) are src's.
    """
    import numpy as np

    from viscodex_jax.checkpoint import hf_map
    from viscodex_jax.checkpoint.hf import copy_side_files, iter_hf_tensors
    from viscodex_jax.utils import atomic_dir
    from viscodex_jax.checkpoint.safetensors_io import SafetensorsFile, iter_index, write_safetensors

    t0 = time.perf_counter()
    base_ix = {hf_map.canonical_name(n): read for _, n, _, read in iter_hf_tensors(base)}
    noised = 0
    with atomic_dir(out, overwrite=True) as tmp:
        for path, _ in iter_index(src):
            f = SafetensorsFile(path)
            tensors = {}
            for name in f.keys():
                read_base = base_ix.get(hf_map.canonical_name(name))
                if read_base is None:
                    tensors[name] = f.read(name)
                    continue
                b = read_base()
                if b.shape != f.shape(name):
                    raise ValueError(f"{name}: shape {f.shape(name)} in {src} but {b.shape} in {base}")
                rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
                noise = rng.standard_normal(b.shape, dtype=np.float32)
                noise *= std
                noise += b.astype(np.float32)
                tensors[name] = noise.astype(b.dtype)
                noised += b.size
                del b, noise
            write_safetensors(os.path.join(tmp, os.path.basename(path)), tensors, f.metadata or {"format": "pt"})
            del tensors
        for name in ("config.json", "model.safetensors.index.json"):
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
        copy_side_files(src, tmp)
        with open(os.path.join(tmp, DERIVED_SPEC), "w") as fh:
            json.dump(spec, fh, indent=2)
    return dict(total_s=time.perf_counter() - t0, noised_params=noised)


def derived_ready(ckpt: str, spec: dict[str, Any]) -> bool:
    try:
        with open(os.path.join(ckpt, DERIVED_SPEC)) as f:
            return json.load(f) == spec and bool(ck.weight_files(ckpt))
    except (OSError, ValueError):
        return False


def prepare(work: str, text: str, vl: str | None, a: argparse.Namespace) -> dict[str, str]:
    """Creates (or reuses) base, model1 (text or VL) and model2; returns their dirs."""
    dirs = {"base": os.path.join(work, f"{text}-base"), "model2": os.path.join(work, f"{text}-model2"),
            "model1": os.path.join(work, f"{vl or text}-model1")}

    ck.ensure(text, dirs["base"], a.seed, a.timeout, recreate=a.recreate)
    for role, src_name, noise_seed in (("model1", vl or text, a.seed + 1), ("model2", text, a.seed + 2)):
        spec = dict(version=DERIVED_VERSION, source=src_name, source_seed=a.seed + 10 if vl and role == "model1" else a.seed,
                    base=text, base_seed=a.seed, noise_seed=noise_seed, noise_std=a.noise_std)
        if not a.recreate and derived_ready(dirs[role], spec):
            continue
        src, raw = dirs["base"], None
        if src_name != text:  # a fresh random VL checkpoint, whose text tensors are then replaced
            raw = os.path.join(work, f".{src_name}-raw")
            ck.ensure(src_name, raw, spec["source_seed"], a.timeout, recreate=True)
            src = raw
        print(f"  deriving {role} = base + noise from {src} ...", file=sys.stderr, flush=True)
        r = spawn(dict(task="derive", src=src, base=dirs["base"], out=dirs[role], seed=noise_seed,
                             std=a.noise_std, spec=spec), a.timeout)
        print(f"  derived in {r['wall_s']:.0f}s", file=sys.stderr, flush=True)
        if raw:
            shutil.rmtree(raw, ignore_errors=True)
    return dirs


# ----------------------------------------------------------------------------- child tasks


def task_ours(base: str, models: list[str], out: str, method: str, density: float) -> dict[str, Any]:
    import jax

    from viscodex_jax.merge import MergeSpec, merge_checkpoints

    jax.devices()
    code = code_hash()  # read right after the imports: the code this child runs
    workaround = None
    spec = MergeSpec(**spec_kwargs(method, density))
    before = h.proc_status()
    t0 = time.perf_counter()
    report = merge_checkpoints(base, models, out, spec, max_shard_bytes=SHARD_BYTES, overwrite=True)
    dt = time.perf_counter() - t0
    return dict(work_s=dt, rss_before=before["VmRSS"], peak_rss=h.proc_status()["VmHWM"], out_bytes=ck.ckpt_bytes(out),
                n_out_files=len(ck.weight_files(out)), merged_tensors=len(report["merged"]),
                copied_tensors=len(report["copied"]), workaround=workaround,
                code=code)


def task_floor(base: str, models: list[str], out: str) -> dict[str, Any]:
    """Every byte of the three inputs read once (pread into one reused buffer, as ours reads) and the primary's
    tensors written once (pwrite into planned 500 MB shards, as ours writes): the I/O any streaming merge pays."""
    import numpy as np

    from viscodex_jax.checkpoint.planned_writer import PlannedWriter
    from viscodex_jax.checkpoint.safetensors_io import SafetensorsFile, iter_index
    from viscodex_jax.merge.file_tensor import FileTensor
    from viscodex_jax.utils import atomic_dir

    before = h.proc_status()
    t0 = time.perf_counter()
    read = 0
    buf = np.empty(1 << 24, np.uint8)
    with atomic_dir(out, overwrite=True) as tmp:
        writer = None
        for j, d in enumerate([models[0], base, *models[1:]]):
            refs = [(n, FileTensor.of(f, n)) for p, _ in iter_index(d) for f in [SafetensorsFile(p)] for n in f.keys()]
            if j == 0:  # one model's worth written: the primary's tensors
                writer = PlannedWriter(tmp, [(n, r.dtype, r.shape) for n, r in refs], SHARD_BYTES)
            for name, ref in refs:
                step = buf.size // ref.dtype.itemsize
                for lo in range(0, ref.size, step):
                    hi = min(lo + step, ref.size)
                    chunk = buf[:(hi - lo) * ref.dtype.itemsize].view(ref.dtype)
                    ref.read_into(chunk, lo, hi)
                    read += chunk.nbytes
                    if j == 0:
                        writer.write(name, chunk, lo)
                if j == 0 and ref.size == 0:
                    writer.write(name, np.empty(0, ref.dtype))
        writer.finish()
    dt = time.perf_counter() - t0
    return dict(work_s=dt, rss_before=before["VmRSS"], peak_rss=h.proc_status()["VmHWM"], bytes_read=read,
                out_bytes=ck.ckpt_bytes(out))


def task_compare(ours: str, theirs: str) -> dict[str, Any]:
    # In a child: reading two checkpoints would leave the parent's RSS at their size, and every child forked
    # after that (ours, mergekit) would report at least that much as its peak (ru_maxrss counts the pre-exec copy).
    return compare(ours, theirs)


def run_child(a: dict[str, Any]) -> dict[str, Any]:
    tasks = dict(derive=derive_checkpoint, ours=task_ours, floor=task_floor, compare=task_compare)
    t = a.pop("task")
    if t not in tasks:
        raise ValueError(f"unknown task {t!r} (expected one of {', '.join(tasks)})")
    return tasks[t](**a)


# ----------------------------------------------------------------------------- parent


def spawn(args: dict[str, Any], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    res = h.spawn_child(__file__, args, timeout, env)
    res["peak_rss"] = max(res.get("peak_rss", 0), res["maxrss"])
    return res


def mergekit_yaml(method: str, density: float, dirs: dict[str, str], compute_dtype: str) -> str:
    def params(w):
        return f"{{weight: {w}}}" if method == "task_arithmetic" else f"{{weight: {w}, density: {density}}}"

    shared = "{normalize: false, lambda: 1.0}" if method == "task_arithmetic" else "{normalize: true, lambda: 1.0}"
    return (f"merge_method: {method}\nbase_model: {dirs['base']}\nmodels:\n"
            f"  - model: {dirs['model1']}\n    parameters: {params(WEIGHTS[0])}\n"
            f"  - model: {dirs['model2']}\n    parameters: {params(WEIGHTS[1])}\n"
            f"parameters: {shared}\ndtype: {compute_dtype}\nout_dtype: bfloat16\n")


def run_mergekit(a, method: str, dirs: dict[str, str], out: str, compute_dtype: str,
                 extra: list[str] = ()) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cfg = out.rstrip("/") + ".yml"
    with open(cfg, "w") as f:
        f.write(mergekit_yaml(method, a.density, dirs, compute_dtype))
    cmd = [a.mergekit, cfg, out, "--out-shard-size", "250M", "--lazy-unpickle", "--no-copy-tokenizer",
           "--no-write-model-card", "--random-seed", str(a.seed), "--quiet", *extra]
    p = h.run_proc(cmd, a.timeout, env={"HF_HUB_OFFLINE": "1"})
    return dict(cmd=" ".join(cmd), config=open(cfg).read(), rc=p["rc"], wall_s=p["wall_s"], cpu_s=p["cpu_s"],
                bg_cpu_frac=p["bg_cpu_frac"], peak_rss=p["maxrss"],
                timed_out=p["timed_out"], stderr_tail=p["stderr"][-4000:],
                out_bytes=ck.ckpt_bytes(out) if os.path.isdir(out) else 0)


def _median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median wall time, with every run's wall s, work s and peak RSS kept alongside."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    med = dict(ordered[(len(ordered) - 1) // 2])
    med.update(walls=[r["wall_s"] for r in runs], works=[r.get("work_s") for r in runs],
               peak_rsss=[r["peak_rss"] for r in runs], wall_s=statistics.median(r["wall_s"] for r in runs),
               peak_rss=statistics.median(r["peak_rss"] for r in runs))
    if all(r.get("work_s") is not None for r in runs):
        med["work_s"] = statistics.median(r["work_s"] for r in runs)
    return med


def sparse_rounds(a, method: str) -> int:
    """Rounds for ``method``: ``--sparse_repeats`` for ties and dare_ties (a minute or more per mergekit run)."""
    return a.sparse_repeats if method != "task_arithmetic" and a.sparse_repeats else a.repeats


def run_method(a, cname: str, method: str, dirs: dict[str, str], models: list[str], out: dict[str, str],
               floor: dict[str, Any], ours_env: dict[str, str], default_xla: bool, with_mk: bool, row, quiet
               ) -> list[dict[str, Any]]:
    """Ours and each mergekit setting, alternating over ``a.repeats`` rounds (A B C A B C); one median row each.

    Ours' output of the first round is compared with each mergekit setting's first output.
    """
    impls = [("ours", ours_env)] + ([("ours, default XLA", {})] if default_xla else [])
    mk_impls = [(MERGEKIT_SETTINGS[d], d) for d in a.mergekit_dtypes] if with_mk else []
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in impls + mk_impls}
    compares: dict[str, dict[str, Any]] = {}
    rounds = sparse_rounds(a, method)
    for rnd in range(rounds):
        for impl, env in impls:
            w = quiet()
            r = spawn(dict(task="ours", base=dirs["base"], models=models, out=out["ours"], method=method,
                           density=a.density), a.timeout, env)
            runs[impl].append(row(r, method, impl, w))
        for impl, dtype in mk_impls:
            w = quiet()
            mk = row(run_mergekit(a, method, dirs, out["mergekit"], dtype), method, impl, w)
            runs[impl].append(mk)
            if mk["rc"] != 0:
                print(f"[{cname}] {impl} failed:\n{mk['stderr_tail']}", file=sys.stderr)
            elif rnd == 0 and not a.no_compare:
                compares[impl] = {k: v for k, v in spawn(dict(task="compare", ours=out["ours"], theirs=out["mergekit"]),
                                                         a.timeout).items() if k in COMPARE_KEYS}
                print(f"[{cname}]   ours vs {impl}: {compares[impl]}", file=sys.stderr, flush=True)
            shutil.rmtree(out["mergekit"], ignore_errors=True)
    shutil.rmtree(out["ours"], ignore_errors=True)
    rows = []
    for impl, _ in impls:
        r = _median_row(runs[impl])
        r["x_floor"] = r["work_s"] / floor["work_s"]
        rows.append(r)
    for impl, _ in mk_impls:
        failed = [r for r in runs[impl] if r["rc"] != 0]
        if failed:
            rows.append(dict(failed[0], failed=True))
            continue
        mk = _median_row(runs[impl])
        mk["compare"] = compares.get(impl)
        for r in rows[:len(impls)]:
            r.setdefault("x_mergekit", {})[impl] = dict(time=r["wall_s"] / mk["wall_s"],
                                                        rss=r["peak_rss"] / mk["peak_rss"])
        rows.append(mk)
    for impl, _ in impls:
        for mk_impl, x in rows[0].get("x_mergekit", {}).items():
            print(f"[{cname}] {method}: {impl} / {mk_impl}: time {x['time']:.2f}x, peak RSS {x['rss']:.2f}x "
                  f"(medians of {rounds})", file=sys.stderr, flush=True)
    return rows


COMPARE_KEYS = ("only_ours", "only_mergekit", "n_compared", "bit_equal_fraction", "max_abs_diff", "error")


def compare(ours: str, theirs: str) -> dict[str, Any]:
    """Bit-equal fraction and max |diff| between two bf16 HF checkpoints, by canonical tensor name."""
    import numpy as np

    from viscodex_jax.checkpoint import hf_map
    from viscodex_jax.checkpoint.hf import iter_hf_tensors

    a = {hf_map.canonical_name(n): r for _, n, _, r in iter_hf_tensors(ours)}
    b = {hf_map.canonical_name(n): r for _, n, _, r in iter_hf_tensors(theirs)}
    n = eq = 0
    maxdiff = 0.0
    for k in sorted(set(a) & set(b)):
        x, y = a[k](), b[k]()
        if x.shape != y.shape or x.dtype != y.dtype:
            return dict(error=f"{k}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
        n += x.size
        eq += int(np.count_nonzero(x.view(np.uint16) == y.view(np.uint16)))
        maxdiff = max(maxdiff, float(np.max(np.abs(x.astype(np.float32) - y.astype(np.float32)))))
    return dict(only_ours=sorted(set(a) - set(b)), only_mergekit=sorted(set(b) - set(a)),
                n_compared=n, bit_equal_fraction=eq / n if n else None, max_abs_diff=maxdiff)


def render(results: dict[str, Any]) -> str:
    m, v, cfg = results["machine"], results["versions"], results["config"]
    lines = [
        f"Checkpoint merge: base + 2 models, weights {list(WEIGHTS)}, density {cfg['density']} (ties, dare_ties), "
        f"bf16 in/out, 500 MB shards; {m['cpu_count']} CPUs ({m['cpu_model']}), jax {m['versions']['jax']}, "
        f"mergekit {v.get('mergekit', '—')} (torch {v.get('mergekit_torch', '—')}); warm page cache; "
        f"one fresh process per run; ours and mergekit alternate over {cfg['repeats']} rounds "
        f"({cfg.get('sparse_repeats', cfg['repeats'])} for ties and dare_ties) and each row is the median; "
        f"merge code {cfg['code']}.",
        f"'ours' runs with XLA_FLAGS={cfg['ours_xla_flags'] or '(none)'}"
        + ("; 'ours, default XLA' without it." if cfg["ours_default_xla"] else "."),
        "",
        "| case | method | impl | wall s | work s | CPU s | input GB/s | peak RSS GB | ours ÷ this mergekit "
        "(time / RSS) | ours ÷ floor (work s) | = ours: bit-equal / max abs diff | other load |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cname, c in results["cases"].items():
        label = f"{cname} ({c['input_bytes'] / 1e9:.2f} GB in)"
        for r in c["rows"]:
            if r.get("failed"):
                lines.append(f"| {label} | {r['method']} | {r['impl']} | failed (exit {r['rc']}) | | | | | | | | |")
                continue
            cm = r.get("compare") or {}
            cmp_s = (f"{cm['bit_equal_fraction'] * 100:.2f}% / {cm['max_abs_diff']:.2g}"
                     if cm.get("bit_equal_fraction") is not None else "")
            ours = next((o for o in c["rows"] if o["method"] == r["method"] and o["impl"] == "ours"), {})
            x = ours.get("x_mergekit", {}).get(r["impl"])
            vs_mk = f"{x['time']:.2f}× / {x['rss']:.2f}×" if x else ""
            lines.append(
                f"| {label} | {r['method']} | {r['impl']} | {r['wall_s']:.1f} | {h.fmt(r.get('work_s'), '.1f')} | "
                f"{r['cpu_s']:.1f} | {r['gb_per_s']:.3f} | {r['peak_rss'] / 1e9:.2f} | {vs_mk} | "
                f"{h.fmt(r.get('x_floor'), '.2f', '×') if r['impl'].startswith('ours') else ''} | {cmp_s} | "
                f"{r['bg_cpu_frac'] * 100:.0f}% |")
    lines += [
        "",
        "wall s: the whole child process (interpreter and imports included); work s: without imports (ours: "
        "jit compiles included), known for ours and the floor only; CPU s: the child's user+sys. input GB/s = "
        "bytes of the three input checkpoints / wall s. Peak RSS: the child's ru_maxrss (imports included; for "
        "mergekit also the mmap'd input pages it touched). ours ÷ mergekit: wall s and peak RSS; ours ÷ floor: "
        "work s. floor: every tensor of the three inputs read + the primary's tensors written (500 MB shards). "
        "mergekit fp32→bf16: dtype float32 (compute, as ours), out_dtype bfloat16; mergekit bf16: dtype bfloat16 "
        "(what most configs say). dare_ties draws differ (torch vs "
        "JAX RNG), so its bit-equal share is that of tensors where nothing is dropped. other load: the share of "
        "the machine's CPU used by other processes during the row (this machine is shared).",
    ]
    if v.get("mergekit_import_s"):
        lines.append(f"mergekit's imports (torch, transformers, mergekit) alone take {v['mergekit_import_s']:.1f} s "
                     "of its wall s.")
    for cname, c in results["cases"].items():
        for tag, t in c.get("mergekit_attempts", {}).items():
            lines.append(f"{cname}: mergekit {tag}: exit {t['rc']} after {t['wall_s']:.1f} s: {t['summary']}")
    return "\n".join(lines)


def _summary_line(stderr: str) -> str:
    """The last exception line of a traceback; a multi-line message is shortened to its first and last lines."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"^[\w.]+(Error|Exception):", lines[i]):
            return (lines[i] + (" … " + lines[-1] if i < len(lines) - 1 else ""))[:300]
    return lines[-1][:300] if lines else "(no output)"


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work_dir", default=os.path.join(REPO, "runs", "benchmarks", "merge_ckpts"),
                   help="cached input checkpoints; outputs are written here and deleted")
    p.add_argument("--json_out", default=os.path.join(REPO, "runs", "benchmarks", "merge.json"))
    p.add_argument("--cases", default="0.5b,vl", help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--vl_methods", default="task_arithmetic",
                   help="methods for the vl case (VisCodex uses task_arithmetic; the others add text-only work)")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--mergekit", default="/tmp/mk/bin/mergekit-yaml", help="mergekit-yaml path ('' to skip)")
    p.add_argument("--mergekit_dtypes", default="float32,bfloat16",
                   help="mergekit compute dtypes to run, each with out_dtype bfloat16 (ours computes in float32)")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds of ours and each mergekit setting, alternating (A B A B); medians are reported")
    p.add_argument("--sparse_repeats", type=int, default=0,
                   help="rounds for ties and dare_ties (0: --repeats); run_all's full form uses 1 to fit its budget")
    p.add_argument("--ours_xla_flags", default="",
                   help="XLA_FLAGS for ours ('' for none); the default avoids a >100x slow XLA CPU reduction path")
    p.add_argument("--ours_default_xla", default="",
                   help="comma-separated methods to also run ours with no extra XLA flags (slow: minutes each)")
    p.add_argument("--no_compare", action="store_true", help="skip comparing ours' output with mergekit's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise_std", type=float, default=0.002, help="std of model_i - base (weights have std 0.02)")
    p.add_argument("--quiet_wait", type=float, default=15,
                   help="before each task, wait up to this many s for the machine to be <15%% busy")
    p.add_argument("--recreate", action="store_true", help="rebuild the cached input checkpoints")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    a = p.parse_args(argv)
    a.mergekit_dtypes = [d for d in a.mergekit_dtypes.split(",") if d]
    for bad in set(a.mergekit_dtypes) - set(MERGEKIT_SETTINGS):
        p.error(f"--mergekit_dtypes: {bad!r} is not one of {', '.join(MERGEKIT_SETTINGS)}")
    if a.repeats < 1:
        p.error(f"--repeats must be at least 1, got {a.repeats}")
    if a.sparse_repeats < 0:
        p.error(f"--sparse_repeats must be 0 (as --repeats) or more, got {a.sparse_repeats}")
    cases = [c for c in a.cases.split(",") if c]
    methods = [m for m in a.methods.split(",") if m]
    vl_methods = [m for m in a.vl_methods.split(",") if m]
    default_xla = [m for m in a.ours_default_xla.split(",") if m]
    for bad in (set(cases) - set(CASES)) | (set(methods + vl_methods + default_xla) - set(METHODS)):
        p.error(f"unknown case or method {bad!r}")
    use_mk = bool(a.mergekit) and os.path.exists(a.mergekit)
    if a.mergekit and not use_mk:
        print(f"mergekit not found at {a.mergekit}: ours vs floor only", file=sys.stderr)
    ours_env = {"XLA_FLAGS": " ".join(x for x in (os.environ.get("XLA_FLAGS", ""), a.ours_xla_flags) if x)}

    t_start = time.perf_counter()
    versions: dict[str, Any] = {}
    if use_mk:
        mkpy = os.path.join(os.path.dirname(a.mergekit), "python")
        q = h.run_proc([mkpy, "-c", "from importlib import metadata as m; print(m.version('mergekit'), "
                      "m.version('torch'), m.version('transformers'))"], 120)
        versions["mergekit"], versions["mergekit_torch"], versions["mergekit_transformers"] = q["stdout"].split()
        versions["mergekit_import_s"] = h.run_proc(
            [mkpy, "-c", "import torch, transformers, mergekit.merge, mergekit.scripts.run_yaml"], 300)["wall_s"]
    results: dict[str, Any] = dict(
        machine=h.machine_info(), versions=versions,
        config=dict(cases=cases, methods=methods, vl_methods=vl_methods, weights=list(WEIGHTS), density=a.density,
                    shard_bytes=SHARD_BYTES, seed=a.seed, noise_std=a.noise_std, mergekit_dtypes=a.mergekit_dtypes,
                    repeats=a.repeats, sparse_repeats=a.sparse_repeats or a.repeats,
                    ours_xla_flags=ours_env["XLA_FLAGS"], ours_default_xla=default_xla, code=code_hash(),
                    ours_specs={m: spec_kwargs(m, a.density) for m in METHODS}),
        cases={})
    os.makedirs(a.work_dir, exist_ok=True)

    def quiet():
        os.sync()  # no writeback of the last task's output during the next one
        return h.wait_quiet(a.quiet_wait)

    for cname in cases:
        text, vl = CASES[cname]
        print(f"[{cname}] preparing checkpoints", file=sys.stderr, flush=True)
        dirs = prepare(a.work_dir, text, vl, a)
        ins = [dirs["base"], dirs["model1"], dirs["model2"]]
        nbytes = sum(ck.ckpt_bytes(d) for d in ins)
        for d in ins:
            ck.warm(ck.weight_files(d))
        c: dict[str, Any] = dict(dirs=dirs, input_bytes=nbytes, rows=[], mergekit_attempts={})
        results["cases"][cname] = c
        out = {k: os.path.join(a.work_dir, f"_out-{k}-{cname}") for k in ("ours", "mergekit", "floor")}
        models = [dirs["model1"], dirs["model2"]]

        def row(r, method, impl, waited):
            r.update(method=method, impl=impl, gb_per_s=nbytes / 1e9 / r["wall_s"], quiet_wait_s=waited)
            print(f"[{cname}] {method:>15} {impl:>18}: wall {r['wall_s']:.1f}s"
                  f"{'' if r.get('work_s') is None else ', work %.1fs' % r['work_s']}, CPU {r['cpu_s']:.1f}s, "
                  f"peak RSS {r['peak_rss'] / 1e9:.2f} GB, other load {r['bg_cpu_frac'] * 100:.0f}%",
                  file=sys.stderr, flush=True)
            return r

        w = quiet()
        floor = row(spawn(dict(task="floor", base=dirs["base"], models=models, out=out["floor"]), a.timeout),
                    "(any)", "floor", w)
        shutil.rmtree(out["floor"], ignore_errors=True)
        for method in (vl_methods if vl else methods):
            c["rows"].extend(run_method(a, cname, method, dirs, models, out, floor, ours_env,
                                        method in default_xla, use_mk and not vl, row, quiet))
        c["rows"].append(floor)
        if use_mk and vl:
            for tag, extra in (("without --allow-crimes", []), ("with --allow-crimes", ["--allow-crimes"])):
                quiet()
                mk = run_mergekit(a, "task_arithmetic", dirs, out["mergekit"], a.mergekit_dtypes[0], extra)
                if mk["rc"]:
                    mk["summary"] = _summary_line(mk["stderr_tail"])
                else:
                    with open(os.path.join(out["mergekit"], "config.json")) as f:
                        mk["out_architectures"] = json.load(f).get("architectures")
                    mk["summary"] = (f"succeeded: wrote {mk['out_bytes'] / 1e9:.2f} GB "
                                     f"({mk['out_architectures']}), peak RSS {mk['peak_rss'] / 1e9:.2f} GB")
                c["mergekit_attempts"][tag] = mk
                print(f"[{cname}] mergekit {tag}: exit {mk['rc']}: {mk['summary']}", file=sys.stderr, flush=True)
                shutil.rmtree(out["mergekit"], ignore_errors=True)
    results["wall_s"] = time.perf_counter() - t_start
    seen = {r["code"] for c in results["cases"].values() for r in c["rows"] if r.get("code")} | {results["config"]["code"]}
    if len(seen) > 1:
        results["config"]["code"] = "CHANGED DURING THE RUN: " + ", ".join(sorted(seen))
    h.publish(results, render(results), a.json_out)


if __name__ == "__main__":
    h.entry(main, run_child)
