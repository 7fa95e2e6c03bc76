"""What every benchmark script shares: measured child processes, the quiet-machine wait, the machine line, publishing.

A script measures each task in a fresh child process (``script _child '<json args>'``, dispatched by
``entry``), so peak RSS and CPU time are that task's alone: ``spawn_child`` reads them from ``wait4``,
and records how much of the machine's CPU other processes took meanwhile (this machine is shared).
Each script ends with ``publish``: its Markdown table goes to stdout and, with every number behind it,
into JSON under ``runs/benchmarks/``, which ``run_all.py`` collects into ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "runs", "benchmarks")
RESULT_MARK = "@@RESULT@@ "
CHILD_ENV = dict(
    JAX_PLATFORMS="cpu",
    HF_HUB_OFFLINE="1",
    HF_HUB_DISABLE_PROGRESS_BARS="1",
    TRANSFORMERS_VERBOSITY="error",
    TOKENIZERS_PARALLELISM="false",
    TF_CPP_MIN_LOG_LEVEL="2",
    TQDM_DISABLE="1",
)
THREADS_SETUP = ("each child pinned to the first N CPUs (sched_setaffinity); torch.set_num_threads(N), "
                 "OMP/MKL_NUM_THREADS=N; XLA sizes its CPU pool from the affinity mask (N=1: also "
                 "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1)")
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


# ----------------------------------------------------------------------------- inside a child


def proc_status() -> dict[str, int]:
    """VmHWM/VmRSS/RssAnon/RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out


def peak_rss() -> int:
    return proc_status()["VmHWM"]


def pin(threads: int) -> list[int]:
    """Pins this process to the first ``threads`` CPUs it may use (XLA sizes its pool from the mask)."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    return cpus


def thread_env(threads: int) -> dict[str, str]:
    """Environment that gives torch/OpenMP and XLA the same ``threads`` (see THREADS_SETUP)."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if threads == 1:
        env["XLA_FLAGS"] = " ".join(x for x in (os.environ.get("XLA_FLAGS", ""), XLA_ONE_THREAD) if x)
    return env


def entry(main: Callable[[list[str]], None], run_child: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """A benchmark script's command line: ``_child '<json>'`` runs one measured task, anything else the driver.

    The child prints its result dict as one marked JSON line, which ``spawn_child`` picks out of stdout
    (libraries may print anything else around it).
    """
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        res = run_child(json.loads(sys.argv[2]))
        sys.stdout.write(RESULT_MARK + json.dumps(res) + "\n")
        sys.stdout.flush()
    else:
        main(sys.argv[1:])


# ----------------------------------------------------------------------------- the parent


def cpu_busy_s() -> float:
    """Seconds of CPU time the whole machine has spent busy (all CPUs, /proc/stat) since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def own_cpu_s() -> float:
    """CPU seconds of this process plus its waited-for children."""
    ru_s, ru_c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru_s.ru_utime + ru_s.ru_stime + ru_c.ru_utime + ru_c.ru_stime


def wait_quiet(max_wait: float, busy_frac: float = 0.15) -> float:
    """Waits (up to max_wait s) for a 1 s window with the machine at most busy_frac busy; returns s waited."""
    t0 = time.monotonic()
    ncpu = os.cpu_count() or 1
    while time.monotonic() - t0 < max_wait:
        b0, w0 = cpu_busy_s(), time.monotonic()
        time.sleep(1.0)
        if (cpu_busy_s() - b0) / ((time.monotonic() - w0) * ncpu) <= busy_frac:
            break
    return time.monotonic() - t0


def run_proc(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs cmd (killed after ``timeout`` s); returns rc, wall and CPU s, its own peak RSS, stdout and stderr.

    ``maxrss`` and ``cpu_s`` come from ``wait4`` on this child alone (RUSAGE_CHILDREN would be the maximum
    over every child so far). ``bg_cpu_s``: CPU seconds other processes used meanwhile; ``bg_cpu_frac``:
    that as a share of the machine (0 on a quiet machine).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        busy0 = cpu_busy_s()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **CHILD_ENV, **(env or {})},
                                cwd=REPO)
        timed_out = False
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                timed_out = True
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        cpu = ru.ru_utime + ru.ru_stime
        bg = max(0.0, cpu_busy_s() - busy0 - cpu)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return dict(rc=proc.returncode, wall_s=wall, cpu_s=cpu, bg_cpu_s=bg,
                    bg_cpu_frac=bg / (wall * (os.cpu_count() or 1)), maxrss=ru.ru_maxrss * 1024,
                    timed_out=timed_out,
                    stdout=out.read().decode(errors="replace"), stderr=err.read().decode(errors="replace"))


def spawn_child(script: str, args: dict[str, Any], timeout: float, env: dict[str, str] | None = None,
                quiet_wait: float = 0.0, busy_frac: float = 0.15) -> dict[str, Any]:
    """Runs ``script _child <json args>``; returns the child's result dict plus run_proc's measurements.

    With ``quiet_wait`` it first waits (up to that many s) for other people's jobs to calm down.
    """
    waited = wait_quiet(quiet_wait, busy_frac) if quiet_wait > 0 else 0.0
    p = run_proc([sys.executable, os.path.abspath(script), "_child", json.dumps(args)], timeout, env)
    lines = [ln for ln in p["stdout"].splitlines() if ln.startswith(RESULT_MARK)]
    if p["rc"] != 0 or not lines:
        why = f"timed out after {timeout:.0f} s" if p["timed_out"] else f"exit {p['rc']}"
        raise RuntimeError(f"{os.path.basename(script)} child {args} failed ({why}):\n"
                           f"{p['stdout'][-3000:]}\n{p['stderr'][-6000:]}")
    res = json.loads(lines[-1][len(RESULT_MARK):])
    res.update({k: p[k] for k in ("wall_s", "cpu_s", "bg_cpu_s", "bg_cpu_frac", "maxrss")},
               waited_for_quiet_s=waited)
    return res


def spawn_retry(script: str, args: dict[str, Any], timeout: float, env: dict[str, str] | None = None,
                quiet_wait: float = 0.0, retries: int = 0, max_bg: float = 0.2) -> dict[str, Any]:
    """spawn_child, run again (up to ``retries`` more times) while other processes took > ``max_bg`` of the CPU;
    returns the run with the least background load (all runs' loads are kept in ``bg_cpu_frac_tries``)."""
    runs = [spawn_child(script, args, timeout, env, quiet_wait)]
    while runs[-1]["bg_cpu_frac"] > max_bg and len(runs) <= retries:
        print(f"  (other processes took {runs[-1]['bg_cpu_frac'] * 100:.0f}% of the CPU: running it again)",
              file=sys.stderr, flush=True)
        runs.append(spawn_child(script, args, timeout, env, quiet_wait))
    best = min(runs, key=lambda r: r["bg_cpu_frac"])
    best["bg_cpu_frac_tries"] = [r["bg_cpu_frac"] for r in runs]
    return best


def warn_if_loaded() -> None:
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs: other work will skew timings",
              file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- machine and results


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


def machine_line(m: dict[str, Any]) -> str:
    """One line naming the machine (the RESULTS.md header)."""
    mem = f", {m['mem_total_gb']:.0f} GB RAM" if m.get("mem_total_gb") else ""
    return (f"{m['cpu_count']} CPUs ({m['cpu_model'] or 'unknown CPU'}){mem}, {m['platform']}, "
            f"Python {m['python']}")


def fmt(x, spec: str, suffix: str = "") -> str:
    return "—" if x is None else format(x, spec) + suffix


def publish(results: dict[str, Any], table: str, json_out: str) -> None:
    """Stores the Markdown table in the results, writes the JSON and prints the table (every benchmark ends so)."""
    results["markdown"] = table
    os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
    tmp = f"{json_out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, json_out)  # run_all never reads half a file
    print(table)
    print(f"\nwrote {json_out} ({results['wall_s']:.0f}s)", file=sys.stderr)


def add_child_args(p) -> None:
    """The argparse options of ``spawn_retry``'s children, shared by the scripts that use it."""
    p.add_argument("--quiet_wait", type=float, default=30,
                   help="before each child, wait up to this long for a quiet machine (<15%% busy for 1 s)")
    p.add_argument("--retries", type=int, default=0,
                   help="run a child again (at most this many times) when other processes took > --max_bg of the CPU")
    p.add_argument("--max_bg", type=float, default=0.2)
    p.add_argument("--timeout", type=float, default=900, help="seconds per child process")
