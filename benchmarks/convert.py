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
   excluded from the peak, and is reported separately):

   * ``floor: raw read``       every safetensors file read with ``readinto`` into
                               fresh anonymous memory (what any loader that
                               copies must at least pay);
   * ``floor: safe_open mmap`` ``safe_open(framework="pt").get_tensor`` for every
                               tensor, then every 4 KiB page touched (zero-copy);
   * ``ours: load_hf_params``  ``viscodex_jax.checkpoint.load_hf_params(dir)``;
   * ``ours: convert->orbax``  ``viscodex_jax.checkpoint.convert_hf_to_orbax(dir, out)``
                               (output deleted afterwards);
   * ``transformers``          ``from_pretrained(dir, dtype=torch.bfloat16)``, as
                               returned (transformers 5 keeps bf16 safetensors
                               weights mmap-backed, so this reads almost nothing);
   * ``transformers + touch``  the same, then every page of every parameter
                               touched so all bytes really are in memory.

3. Prints a Markdown table and writes JSON (with machine info) to ``--json_out``.

Run from the repository root::

    .venv/bin/python benchmarks/convert.py            # both models: ~4 min on 2 idle cores (+30 s the first time)
    .venv/bin/python benchmarks/convert.py --quick    # text 0.5B only: ~1.5 min

Timings are with a warm page cache (the files are read once before measuring);
``--cold`` instead asks the kernel to drop each file's cached pages
(posix_fadvise DONTNEED) before every task, which helps only where the disk is
not itself cached by a host. On a shared machine, ``--wait_idle 30`` waits (up
to 30 s) for idle CPUs before each run, and the "others' CPU" column says how
much CPU other processes took while each row ran: rows far from 0% are skewed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC_FILE = "bench_spec.json"
SPEC_VERSION = 1
RESULT_MARK = "@@RESULT@@ "

# Qwen2.5-0.5B's real text shapes.
TEXT = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    bos_token_id=151643,
    eos_token_id=151643,
)
ROPE_THETA = 1e6
# head_dim = 896 / 14 = 64, so sections must sum to 32; [8, 12, 12] keeps Qwen2.5-VL's 16:24:24 shape.
MROPE_SECTION = [8, 12, 12]
# Qwen2.5-VL's real vision tower (the same in 3B/7B/72B).
VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=896,
    fullatt_block_indexes=[7, 15, 23, 31],
    window_size=112,
    patch_size=14,
    temporal_patch_size=2,
    spatial_merge_size=2,
    in_channels=3,
    tokens_per_second=2,
)
MODELS = {
    "qwen2.5-0.5b": dict(kind="text", text=TEXT, rope_theta=ROPE_THETA, tie_word_embeddings=True),
    "qwen2.5-vl-0.5b": dict(
        kind="vl", text=TEXT, rope_theta=ROPE_THETA, mrope_section=MROPE_SECTION, vision=VISION,
        tie_word_embeddings=True,
    ),
}
SHARD_SIZE = "500MB"

TASKS = [
    # (key, label, group)
    ("floor_raw", "floor: raw read (copy)", "floor"),
    ("floor_safetensors", "floor: safe_open mmap + touch (zero-copy)", "floor"),
    ("ours_load", "ours: load_hf_params", "ours"),
    ("ours_convert", "ours: convert_hf_to_orbax", "ours"),
    ("hf_load", "transformers from_pretrained (lazy mmap)", "ref"),
    ("hf_load_touch", "transformers from_pretrained + touch", "ref"),
]
FLOOR_TASK = "floor_raw"
REF_TASK = "hf_load_touch"

CHILD_ENV = dict(
    JAX_PLATFORMS="cpu",
    HF_HUB_OFFLINE="1",
    HF_HUB_DISABLE_PROGRESS_BARS="1",
    TRANSFORMERS_VERBOSITY="error",
    TOKENIZERS_PARALLELISM="false",
    TF_CPP_MIN_LOG_LEVEL="2",
)


# ----------------------------------------------------------------------------- helpers


def _proc_status() -> dict[str, int]:
    """VmHWM/VmRSS/RssAnon/RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out


def weight_files(ckpt_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(ckpt_dir, "*.safetensors")))


def ckpt_bytes(ckpt_dir: str) -> int:
    return sum(os.path.getsize(f) for f in weight_files(ckpt_dir))


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


# ----------------------------------------------------------------------------- checkpoint creation


def _spec(name: str) -> dict[str, Any]:
    return dict(version=SPEC_VERSION, name=name, shard_size=SHARD_SIZE, dtype="bfloat16", **MODELS[name])


def checkpoint_ready(ckpt_dir: str, name: str) -> bool:
    try:
        with open(os.path.join(ckpt_dir, SPEC_FILE)) as f:
            return json.load(f)["spec"] == _spec(name) and bool(weight_files(ckpt_dir))
    except (OSError, ValueError, KeyError):
        return False


def make_checkpoint(name: str, ckpt_dir: str, seed: int) -> dict[str, Any]:
    """Builds the model on the meta device, fills it from a seeded RNG, save_pretrained()s it (atomically)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

    spec = MODELS[name]
    t0 = time.perf_counter()
    if spec["kind"] == "text":
        cfg = Qwen2Config(
            rope_parameters={"rope_type": "default", "rope_theta": spec["rope_theta"]},
            tie_word_embeddings=spec["tie_word_embeddings"], **spec["text"],
        )
        cls = Qwen2ForCausalLM
    else:
        cfg = Qwen2_5_VLConfig(
            text_config=dict(
                rope_parameters={"rope_type": "default", "rope_theta": spec["rope_theta"],
                                 "mrope_section": spec["mrope_section"]},
                **spec["text"],
            ),
            vision_config=dict(spec["vision"]),
            tie_word_embeddings=spec["tie_word_embeddings"],
        )
        cls = Qwen2_5_VLForConditionalGeneration
    cfg.dtype = torch.bfloat16
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    model.tie_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():  # tied weights are yielded once
            if "norm" in pname:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen).mul_(0.02))
    t_fill = time.perf_counter() - t0
    parent = os.path.dirname(os.path.abspath(ckpt_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(ckpt_dir)}.tmp-", dir=parent)
    try:
        model.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
        n_params = sum(p.numel() for p in model.parameters())
        with open(os.path.join(tmp, SPEC_FILE), "w") as f:
            json.dump(dict(spec=_spec(name), seed=seed, n_params=n_params), f, indent=2)
        if os.path.exists(ckpt_dir):
            shutil.rmtree(ckpt_dir)
        os.replace(tmp, ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dict(fill_s=t_fill, total_s=time.perf_counter() - t0, n_params=n_params)


# ----------------------------------------------------------------------------- child tasks


def run_task(task: str, ckpt_dir: str, kind: str, out_dir: str | None) -> dict[str, Any]:
    """Runs one task in this (fresh) process; imports first, then times only the task."""
    extra: dict[str, Any] = {}
    t_imp = time.perf_counter()
    if task == "floor_raw":
        import numpy as np

        files = weight_files(ckpt_dir)
        before = _proc_status()
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

        files = weight_files(ckpt_dir)
        before = _proc_status()
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
    elif task in ("ours_load", "ours_convert"):
        import jax

        from viscodex_jax.checkpoint import convert_hf_to_orbax, load_hf_params

        jax.devices()  # backend init outside the timing
        before = _proc_status()
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
            convert_hf_to_orbax(ckpt_dir, out_dir)
            dt = time.perf_counter() - t0
            extra["out_bytes"] = dir_bytes(out_dir)
    elif task in ("hf_load", "hf_load_touch"):
        import torch
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        cls = Qwen2ForCausalLM if kind == "text" else Qwen2_5_VLForConditionalGeneration
        before = _proc_status()
        t0 = time.perf_counter()
        model = cls.from_pretrained(ckpt_dir, dtype=torch.bfloat16)
        if task == "hf_load_touch":
            extra["checksum"] = _touch_torch(list(model.parameters()) + list(model.buffers()))
        dt = time.perf_counter() - t0
        extra["bytes_read"] = sum(p.numel() * p.element_size() for p in model.parameters())
        extra["dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    else:
        raise ValueError(f"unknown task {task!r}")
    after = _proc_status()
    return dict(
        seconds=dt,
        import_s=t0 - t_imp,
        rss_before=before["VmRSS"],
        peak_rss=after["VmHWM"],
        rss_after=after["VmRSS"],
        rss_file_after=after.get("RssFile", 0),
        rss_anon_after=after.get("RssAnon", 0),
        **extra,
    )


def child_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--kind", default="text")
    p.add_argument("--out", default=None)
    p.add_argument("--make", default=None, help="model name: create the checkpoint instead of a task")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.make:
        res = make_checkpoint(a.make, a.ckpt, a.seed)
    else:
        res = run_task(a.task, a.ckpt, a.kind, a.out)
    sys.stdout.write(RESULT_MARK + json.dumps(res) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- parent


def spawn(args: list[str], timeout: float) -> dict[str, Any]:
    """Runs this script as a child; returns its result dict plus wait4's ru_maxrss for that child."""
    env = dict(os.environ, **CHILD_ENV)
    cmd = [sys.executable, os.path.abspath(__file__), "_child", *args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO)
        t0 = time.monotonic()
        while True:  # os.wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over all)
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - t0 > timeout:
                proc.kill()
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"child {' '.join(args)} failed (exit {proc.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}"
        )
    res = json.loads(lines[-1][len(RESULT_MARK):])
    res["wait4_maxrss"] = ru.ru_maxrss * 1024
    res["child_cpu_s"] = ru.ru_utime + ru.ru_stime
    return res


def evict(files: list[str]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files: list[str]) -> None:
    buf = bytearray(64 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def _busy_cpu_s() -> float:
    """CPU seconds spent busy by the whole machine so far (all processes, from /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def _own_cpu_s() -> float:
    """CPU seconds of this process plus its waited-for children."""
    import resource

    ru_s, ru_c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru_s.ru_utime + ru_s.ru_stime + ru_c.ru_utime + ru_c.ru_stime


def wait_idle(max_s: float, min_idle: float = 0.9) -> float:
    """Waits (up to max_s) for a 1 s window with the CPUs at least min_idle idle; returns seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < max_s:
        b0, w0 = _busy_cpu_s(), time.monotonic()
        time.sleep(1.0)
        busy = (_busy_cpu_s() - b0) / ((time.monotonic() - w0) * (os.cpu_count() or 1))
        if busy <= 1 - min_idle:
            break
    return time.monotonic() - t0


def machine_info() -> dict[str, Any]:
    def ver(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    cpu_model = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    return dict(
        loadavg_at_start=list(os.getloadavg()),
        cpu_count=os.cpu_count(),
        cpu_affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        cpu_model=cpu_model,
        mem_total_gb=round(mem / 1e9, 2) if mem else None,
        platform=platform.platform(),
        python=platform.python_version(),
        versions={p: ver(p) for p in ("jax", "jaxlib", "orbax-checkpoint", "transformers", "torch", "safetensors",
                                      "numpy", "viscodex_jax")},
    )


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Checkpoint conversion, {m['cpu_count']} CPUs ({m['cpu_model']}), {m['platform']}; "
        f"jax {m['versions']['jax']}, orbax {m['versions']['orbax-checkpoint']}, "
        f"transformers {m['versions']['transformers']}, torch {m['versions']['torch']}; "
        f"{results['config']['cache']} page cache; median of {results['config']['repeats']} fresh processes per task "
        f"(after {results['config']['warmup']} untimed); load average {m['loadavg_at_start'][0]:.2f} at start, "
        f"{m.get('loadavg_at_end', [float('nan')])[0]:.2f} at end; other processes took "
        f"{results.get('foreign_cpu_frac', float('nan')):.0%} of the CPU while the timed processes ran.",
        "",
        "| model | task | s | s min–max | GB/s | peak RSS GB | RSS before GB | × floor | ours / transformers "
        "| others' CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, mres in results["models"].items():
        gb = mres["ckpt_bytes"] / 1e9
        for key, label, group in TASKS:
            r = mres["tasks"].get(key)
            if r is None:
                continue
            vs_ref = r.get("vs_transformers")
            lines.append(
                f"| {name} ({gb:.2f} GB) | {label} | {r['seconds']:.2f} | {r['seconds_min']:.2f}–{r['seconds_max']:.2f} | "
                f"{_fmt(r['gb_per_s'], '.2f')} | "
                f"{r['peak_rss_gb']:.2f} | {r['rss_before_gb']:.2f} | {_fmt(r['vs_floor'], '.2f')}× | "
                f"{(_fmt(vs_ref, '.2f') + '×') if vs_ref is not None else ''} | {r['foreign_cpu_frac']:.0%} |"
            )
    lines += [
        "",
        "GB/s = safetensors bytes / seconds. Seconds exclude interpreter and library import; peak RSS is the "
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
        # share of the machine's CPU that other processes used while these children ran
        foreign_cpu_frac=sum(s.get("foreign_cpu_s", 0.0) for s in samples)
        / max(1e-9, sum(s.get("child_wall_s", 0.0) for s in samples) * (os.cpu_count() or 1)),
        samples=samples,
    )


def publish(results: dict, table: str, json_out: str) -> None:
    """Stores the Markdown table in the results, writes the JSON and prints the table (every benchmark ends so)."""
    results["markdown"] = table
    os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
    with open(json_out, "w") as f:
        json.dump(results, f, indent=2)
    print(table)
    print(f"\nwrote {json_out} ({results['wall_s']:.0f}s)", file=sys.stderr)


def entry(main, child_main) -> None:
    """A benchmark script's command line: ``_child ...`` runs one measured task, anything else the driver."""
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child_main(sys.argv[2:])
    else:
        main(sys.argv[1:])


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work_dir", default=os.path.join(REPO, "runs", "benchmarks", "ckpts"),
                   help="where the random checkpoints are cached (and orbax output is written, then deleted)")
    p.add_argument("--json_out", default=os.path.join(REPO, "runs", "benchmarks", "convert.json"))
    p.add_argument("--quick", action="store_true", help="text 0.5B model only")
    p.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--tasks", default=None, help=f"comma-separated subset of {','.join(t[0] for t in TASKS)}")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per task; the median time is reported")
    p.add_argument("--wait_idle", type=float, default=0,
                   help="before each run, wait up to this many seconds for the CPUs to be >=90%% idle (shared hosts)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed fresh processes per task first (a VM backs freshly touched memory slowly)")
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
    t_start, busy0, own0 = time.perf_counter(), _busy_cpu_s(), _own_cpu_s()
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: other work will skew timings",
              file=sys.stderr, flush=True)
    results: dict[str, Any] = dict(
        machine=machine_info(),
        config=dict(repeats=a.repeats, warmup=a.warmup, cache="cold (fadvise DONTNEED)" if a.cold else "warm",
                    shard_size=SHARD_SIZE, seed=a.seed, work_dir=a.work_dir, models={n: _spec(n) for n in names},
                    floor_task=FLOOR_TASK, reference_task=REF_TASK),
        models={},
    )
    for name in names:
        kind = MODELS[name]["kind"]
        ckpt = os.path.join(a.work_dir, name)
        if a.recreate or not checkpoint_ready(ckpt, name):
            print(f"[{name}] creating checkpoint in {ckpt} ...", file=sys.stderr, flush=True)
            made = spawn(["--task", "make", "--ckpt", ckpt, "--make", name, "--seed", str(a.seed)], a.timeout)
            print(f"[{name}] created in {made['total_s']:.1f}s ({made['n_params'] / 1e6:.1f}M params)",
                  file=sys.stderr, flush=True)
        files = weight_files(ckpt)
        nbytes = ckpt_bytes(ckpt)
        with open(os.path.join(ckpt, SPEC_FILE)) as f:
            n_params = json.load(f)["n_params"]
        mres: dict[str, Any] = dict(path=ckpt, ckpt_bytes=nbytes, n_files=len(files), n_params=n_params, tasks={})
        if not a.cold:
            warm(files)
        for key, label, _ in tasks:
            samples = []
            for rep in range(-a.warmup, a.repeats):
                out_dir = None
                if key == "ours_convert":
                    out_dir = os.path.join(a.work_dir, f"_orbax_out-{name}")
                    shutil.rmtree(out_dir, ignore_errors=True)
                os.sync()  # no writeback of the last task's output during this one
                if a.cold:
                    evict(files)
                try:
                    args = ["--task", key, "--ckpt", ckpt, "--kind", kind]
                    if out_dir:
                        args += ["--out", out_dir]
                    waited = wait_idle(a.wait_idle) if a.wait_idle > 0 else 0.0
                    busy0, w0 = _busy_cpu_s(), time.monotonic()
                    s = spawn(args, a.timeout)
                    # CPU time other processes took while this child ran (contention diagnostic).
                    s["foreign_cpu_s"] = max(0.0, _busy_cpu_s() - busy0 - s["child_cpu_s"])
                    s["child_wall_s"] = time.monotonic() - w0
                    s["waited_idle_s"] = waited
                finally:
                    if out_dir:
                        shutil.rmtree(out_dir, ignore_errors=True)
                if rep >= 0:
                    samples.append(s)
                print(f"[{name}] {label} {'warmup' if rep < 0 else '#' + str(rep + 1)}: {s['seconds']:.2f}s, "
                      f"peak RSS {s['peak_rss'] / 1e9:.2f} GB, other processes {s['foreign_cpu_s']:.1f} CPU-s",
                      file=sys.stderr, flush=True)
            mres["tasks"][key] = summarise(samples, nbytes)
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
    results["machine"]["foreign_cpu_s"] = max(0.0, (_busy_cpu_s() - busy0) - (_own_cpu_s() - own0))
    all_samples = [x for mres in results["models"].values() for t in mres["tasks"].values() for x in t["samples"]]
    results["foreign_cpu_frac"] = sum(x["foreign_cpu_s"] for x in all_samples) / max(
        1e-9, sum(x["child_wall_s"] for x in all_samples) * (os.cpu_count() or 1))
    publish(results, render(results), a.json_out)


if __name__ == "__main__":
    entry(main, child_main)
