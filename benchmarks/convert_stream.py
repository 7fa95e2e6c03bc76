"""Streamed HF -> orbax conversion against the in-memory path and the raw-read floor, alternating, one run.

Each task runs in a fresh process (seconds exclude interpreter and imports; peak RSS is the child's VmHWM,
imports included, and the import-only RSS is reported so the baseline can be taken off):

* ``floor``     every safetensors file read with ``readinto`` into fresh memory;
* ``in-memory`` ``load_hf_params`` then ``save_orbax`` (the conversion before streaming);
* ``streamed``  ``convert_hf_to_orbax(compress=True)`` (``viscodex_jax.checkpoint.stream``, zstd chunks);
* ``streamed-nozstd``  the same with ``compress=False`` (chunks stored without zstd: the converter's default).

Rounds alternate the tasks so machine load hits them all alike, and each child waits ``SETTLE_S`` after its
imports so that memory freed by the task before is back with the hypervisor for every task alike (see
benchmarks/convert.py); the table gives medians
and the ratios the issue asks for (streamed peak RSS / checkpoint bytes, streamed seconds / floor seconds).

    .venv/bin/python benchmarks/convert_stream.py --ckpt /tmp/qwen0.5b          # an existing HF safetensors dir
    .venv/bin/python benchmarks/convert_stream.py --ckpt /tmp/qwen0.5b --make   # build it first (Qwen2.5-0.5B shapes)
    .venv/bin/python benchmarks/convert_stream.py --ckpt /tmp/vl0.5b --make --model qwen2.5-vl-0.5b

``--make`` builds benchmarks/_checkpoints.py's seeded random bf16 checkpoint (500 MB shards).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "@@RESULT@@ "
TASKS = ("floor", "in-memory", "streamed", "streamed-nozstd")
SETTLE_S = 3.0


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(line.split()[1]) * 1024
    return out


def child(task: str, ckpt: str, out: str) -> dict:
    import numpy as np

    if task != "floor":
        import jax

        from viscodex_jax import checkpoint
        from viscodex_jax.model.config import read_config_json

        jax.devices()
    time.sleep(SETTLE_S)
    before = _status()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if task == "floor":
        keep = []
        for path in sorted(glob.glob(os.path.join(ckpt, "*.safetensors"))):
            buf = np.empty(os.path.getsize(path), np.uint8)
            with open(path, "rb", buffering=0) as f:
                f.readinto(memoryview(buf))
            keep.append(buf)
    elif task == "in-memory":
        _, params = checkpoint.load_hf_params(ckpt, check_finite=True)
        checkpoint.save_orbax(params, read_config_json(ckpt), out, side_files_from=ckpt)
    else:
        checkpoint.convert_hf_to_orbax(ckpt, out, compress=task != "streamed-nozstd")
    seconds = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)  # all threads: tensorstore's compression included
    cpu = ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime
    return dict(seconds=seconds, cpu_s=cpu, rss_before=before["VmRSS"], peak_rss=_status()["VmHWM"])


def spawn(task: str, ckpt: str, out: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # no writeback of the previous task's output during this one
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "_child", task, ckpt, out], env=env,
                           cwd=REPO, capture_output=True, text=True, timeout=1800)
        out_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(out) for f in files)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
    if p.returncode or not lines:
        raise RuntimeError(f"{task} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    return dict(json.loads(lines[-1][len(MARK):]), out_bytes=out_bytes)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="HF safetensors checkpoint dir")
    ap.add_argument("--make", action="store_true", help="build --model's random bf16 checkpoint at --ckpt first")
    ap.add_argument("--model", default="qwen2.5-0.5b", help="a name in benchmarks/_checkpoints.py (with --make)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json_out", default=None)
    a = ap.parse_args(argv)
    if a.make:
        subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "_checkpoints.py"), a.model, a.ckpt],
                       check=True, cwd=REPO)
    nbytes = sum(os.path.getsize(p) for p in glob.glob(os.path.join(a.ckpt, "*.safetensors")))
    out = tempfile.mkdtemp(prefix="convert_stream_out-")
    load0 = open("/proc/loadavg").read().strip()
    samples: dict[str, list[dict]] = {t: [] for t in TASKS}
    for r in range(a.rounds):
        for task in TASKS:
            s = spawn(task, a.ckpt, os.path.join(out, "o"))
            samples[task].append(s)
            print(f"round {r + 1} {task}: {s['seconds']:.2f}s peak {s['peak_rss'] / 1e9:.3f} GB "
                  f"(imports {s['rss_before'] / 1e9:.3f} GB)", file=sys.stderr, flush=True)
    load1 = open("/proc/loadavg").read().strip()
    shutil.rmtree(out, ignore_errors=True)
    med = {t: dict(seconds=statistics.median(x["seconds"] for x in v), cpu=statistics.median(x["cpu_s"] for x in v),
                   peak=max(x["peak_rss"] for x in v), base=statistics.median(x["rss_before"] for x in v),
                   out=max(x["out_bytes"] for x in v))
           for t, v in samples.items()}
    floor_s, floor_cpu = med["floor"]["seconds"], med["floor"]["cpu"]
    lines = [f"checkpoint {a.ckpt}: {nbytes / 1e9:.3f} GB; {a.rounds} alternating rounds; "
             f"loadavg start [{load0}] end [{load1}]", "",
             "| task | s (median) | × floor | CPU s (median) | × floor | peak RSS GB (max) | ÷ ckpt bytes | imports RSS GB "
             "| (peak − imports) ÷ ckpt | output GB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in TASKS:
        m = med[t]
        lines.append(f"| {t} | {m['seconds']:.2f} | {m['seconds'] / floor_s:.2f} | {m['cpu']:.2f} | "
                     f"{m['cpu'] / floor_cpu:.2f} | {m['peak'] / 1e9:.3f} | "
                     f"{m['peak'] / nbytes:.2f} | {m['base'] / 1e9:.3f} | {(m['peak'] - m['base']) / nbytes:.2f} | "
                     f"{m['out'] / 1e9:.3f} |")
    s, o = med["streamed"], med["in-memory"]
    lines.append(f"\nstreamed ÷ in-memory: time {s['seconds'] / o['seconds']:.2f}×, CPU {s['cpu'] / o['cpu']:.2f}×, "
                 f"peak RSS {s['peak'] / o['peak']:.2f}×. CPU s = the task's user + system time over all its threads "
                 "(less sensitive than seconds to other processes on a shared machine).")
    print("\n".join(lines))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(dict(ckpt=a.ckpt, bytes=nbytes, loadavg=[load0, load1], samples=samples, medians=med), f, indent=2)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        print(MARK + json.dumps(child(*sys.argv[2:5])), flush=True)
    else:
        main(sys.argv[1:])
