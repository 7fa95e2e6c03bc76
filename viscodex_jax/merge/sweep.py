"""The lam sweep: load base, VLM and coder once, sharded on the mesh; merge on device per lam, score, keep the best.

    lambda_sweep(c)  ->  <out_dir>/sweep.json, sweep.md (table), sweep.png (score against lam),
                         <out_dir>/lam_<best>/ (HF checkpoint; every lam's with --config.write_all)

The three models are read once, each tensor straight into its shards (``checkpoint.sharded``). Each lam's
merge is one jitted program on the mesh (``merge.on_device``): the streamed merge's per-tensor function with
in/out shardings the params' own, so the params scored are bit for bit the checkpoint that would be
written, and no device holds a replica it does not serve. Task arithmetic, TIES (thresholds by an exact
selection on device) and DARE (masks drawn on device) all run there. Scores: ``heldout`` (mean next-token
NLL on held-out texts, lower is better) or ``mmcode`` (MMCode pass@1 through the eval runner with an
in-memory generate function, higher is better; the paper picked lam = 0.7 from {0.7, 0.8, 0.85, 0.9} this
way). The checkpoints are written at the end by the streamed merge, after the device copies are dropped.

Memory: printed from the checkpoint headers and the shardings before anything is loaded: per device, its
shards of the three models plus of one merged copy (the merged tensors; the copied vision tower is the
VLM's own arrays), the largest over the devices. ``--config.mesh`` (data,fsdp,tensor, e.g. 1,8,1) places
everything by the training rules and generation runs sharded; without it all of it is on one device.
The merge program's temporaries come on top: ``launch/compile_check.py --programs=sweep_merge`` reports them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

from viscodex_jax.checkpoint import hf_map
from viscodex_jax.checkpoint.safetensors_io import SafetensorsFile, iter_index
from viscodex_jax.merge.on_device import MeshMerge, default_mesh
from viscodex_jax.merge.recipe import check_outputs, check_vlm, require_dirs, run_merge, spec_from_config
from viscodex_jax.merge.spec import MergeError, MergeSpec, finite_number
from viscodex_jax.model.causal_lm import param_shapes
from viscodex_jax.model.config import load_config
from viscodex_jax.utils import flatten

log = logging.getLogger(__name__)

SCORES = {  # name -> (what it measures, higher is better)
    "heldout": ("held-out loss (mean NLL)", False),
    "mmcode": ("MMCode pass@1 (%)", True),
}


def parse_sweep_lams(text: str) -> list[float]:
    """``--config.sweep_lams`` ("0.7,0.8") -> floats; a bad entry is named."""
    lams = []
    for i, item in enumerate(text.split(",")):
        try:
            lams.append(float(item))
        except ValueError:
            raise MergeError(f"--config.sweep_lams={text!r}: entry {i + 1} {item.strip()!r} is not a number") from None
    return lams


def sweep_specs(c, lams: Sequence[float]) -> list[tuple[float, Any, MergeSpec, str]]:
    """(lam, config, MergeSpec, checkpoint dir) per lam, all checked before the first merge."""
    if not len(lams):
        raise MergeError("--config.sweep_lams is empty: give comma-separated lams, e.g. 0.7,0.8")
    out, seen = [], {}
    for lam in lams:
        sub = c.copy_and_resolve_references()
        try:
            sub.lam = finite_number(lam, "lam")
            spec = spec_from_config(sub)
        except MergeError as e:
            raise MergeError(f"--config.sweep_lams: {lam!r}: {e}") from None
        sub.orbax_dir, sub.sweep_lams = "", ""
        name = f"lam_{sub.lam:g}"
        if name in seen:
            raise MergeError(f"--config.sweep_lams: {seen[name]!r} and {lam!r} both write {name}")
        seen[name] = lam
        out.append((sub.lam, sub, spec, os.path.join(c.out_dir, name)))
    for _, sub, _, ckpt in out:  # any lam may turn out best, so every lam dir must be free
        check_outputs(sub, ckpt)
    return out


# ------------------------------------------------------------------------------------------------ memory


def _stored(ckpt_dir: str) -> list[tuple[str, tuple[int, ...], int]]:
    """(canonical name, shape, bytes as stored) per tensor, from the file headers alone."""
    out = []
    for path, _ in iter_index(ckpt_dir):
        if not path.endswith(".safetensors"):  # .bin: no header to read; its size is the tensors'
            out.append(("", (), os.path.getsize(path)))
            continue
        f = SafetensorsFile(path)
        out += [(hf_map.canonical_name(n), f.shape(n), f.nbytes(n)) for n in f.keys()]
    return out


def memory_needed(c, spec: MergeSpec, mesh=None, rules=None) -> dict[str, int]:
    """Bytes from the checkpoint headers and the shardings, before anything is loaded.

    ``base``/``vlm``/``coder``: each input as stored; ``merged``: one merged copy (merged tensors in
    ``spec.out_dtype``, copied ones as stored); ``host_total``: their sum (what the devices hold together;
    the host reads one tensor at a time). ``per_device``: the largest per-device share of the merged params
    as scored (copied tensors included); ``<model>_per_device``: the largest share of each input;
    ``device_total``: the largest per-device sum of the three inputs' shares and of the merged tensors the
    merge adds (copied ones are the VLM's own arrays). Without a mesh, one device holds everything.
    """
    from viscodex_jax.merge.on_device import default_mesh, per_device_bytes
    from viscodex_jax.sampling import mesh as on_mesh

    if mesh is None:
        mesh = default_mesh()
        rules = on_mesh.resolve_rules(mesh, None)
    devices = list(mesh.devices.flat)
    out_size = jnp.dtype(spec.out_dtype).itemsize
    mem: dict[str, int] = {}
    total = {d: 0.0 for d in devices}
    for k in ("base", "vlm", "coder"):
        d = getattr(c, f"{k}_dir")
        cfg = load_config(d)
        expected = flatten(param_shapes(cfg))
        stored = _stored(d)
        mem[k] = sum(b for _, _, b in stored)
        itemsize, merged = {}, 0
        for canon, shape, nbytes in stored:
            hit = hf_map.hf_to_path(canon, expected) if canon else None
            if hit:
                itemsize[hit[0]] = nbytes / max(int(np.prod(shape)), 1)
            merges = hit is not None and spec.merges("/".join(hit[0]))
            merged += int(np.prod(shape)) * out_size if merges else nbytes
        shapes = {key: expected[key].shape for key in itemsize}
        shards = flatten(on_mesh.param_shardings(cfg, param_shapes(cfg), mesh, rules))
        share = per_device_bytes(shapes, itemsize, shards, devices)
        mem[f"{k}_per_device"] = int(max(share.values()))
        if k == "vlm":
            merges = {key for key in shapes if spec.merges("/".join(key))}
            mem["merged"] = merged
            size = {key: out_size if key in merges else itemsize[key] for key in shapes}
            mem["per_device"] = int(max(per_device_bytes(shapes, size, shards, devices).values()))
            adds = per_device_bytes({key: shapes[key] for key in merges}, size, shards, devices)
            share = {dev: share[dev] + adds[dev] for dev in devices}
        total = {dev: total[dev] + share[dev] for dev in devices}
    mem["host_total"] = mem["base"] + mem["vlm"] + mem["coder"] + mem["merged"]
    mem["device_total"] = int(max(total.values()))
    return mem


def parse_mesh(text: str):
    """``--config.mesh`` ("1,8,1": data, fsdp, tensor; -1 takes the remaining devices) -> a Mesh, or None if empty."""
    if not text:
        return None
    from viscodex_jax.sharding import make_mesh

    try:
        shape = [int(x) for x in text.split(",")]
    except ValueError:
        raise MergeError(f"--config.mesh={text!r}: expected three integers data,fsdp,tensor, e.g. 1,8,1") from None
    if len(shape) != 3 or any(x == 0 or x < -1 for x in shape):
        raise MergeError(f"--config.mesh={text!r}: expected three positive integers (one may be -1) data,fsdp,tensor")
    try:
        return make_mesh(shape)
    except ValueError as e:
        raise MergeError(f"--config.mesh={text!r}: {e}") from None


def human_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


# ------------------------------------------------------------------------------------------------ scores


def _inputs_stamp(c) -> dict[str, Any]:
    """What identifies the inputs without reading them: paths, sizes and mtimes (as the eval cache's stamp)."""
    stamp = {}
    for k in ("base_dir", "vlm_dir", "coder_dir"):
        d = getattr(c, k)
        files = sorted((os.path.relpath(os.path.join(r, n), d), os.path.getsize(os.path.join(r, n)),
                        os.stat(os.path.join(r, n)).st_mtime_ns) for r, _, ns in os.walk(d) for n in ns)
        stamp[k] = [os.path.abspath(d), hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]]
    return stamp


def _mmcode_score(c) -> Callable[[Any, float, MergeSpec], float]:
    """MMCode pass@1 through the eval runner; generations cached per lam under <out_dir>/eval/lam_<lam>.

    An in-memory merge has no files for the runner to fingerprint: its cache key is a hash of what
    defines the merge (the MergeSpec and the inputs' stamps, also written to merge_spec.json there),
    so a rerun of the same sweep reuses its generations and a changed one does not.
    """
    from viscodex_jax.eval.runner import EvalSettings, model_generate_fn, run_eval

    if not c.mmcode_root or not os.path.isdir(c.mmcode_root):
        raise MergeError(f"--config.mmcode_root={c.mmcode_root!r} is not a directory (--config.score=mmcode "
                         "needs the MMCode data)")
    for flag in ("eval_max_new_tokens", "eval_batch_size"):
        if not isinstance(c[flag], int) or c[flag] < 1:
            raise MergeError(f"--config.{flag} must be a positive integer, got {c[flag]!r}")
    if not isinstance(c.eval_limit, int) or c.eval_limit < 0:
        raise MergeError(f"--config.eval_limit must be 0 (all) or a positive integer, got {c.eval_limit!r}")
    settings = EvalSettings(max_new_tokens=c.eval_max_new_tokens, batch_size=c.eval_batch_size,
                            limit=c.eval_limit or None)
    stamp = _inputs_stamp(c)

    def score(model, lam: float, spec: MergeSpec) -> float:
        out = os.path.join(c.out_dir, "eval", f"lam_{lam:g}")
        os.makedirs(out, exist_ok=True)
        ident = json.dumps({"spec": repr(spec), "inputs": stamp}, indent=1, sort_keys=True)
        _write_atomic(os.path.join(out, "merge_spec.json"), ident.encode())
        summary = run_eval(os.path.join(c.out_dir, f"lam_{lam:g}"), {"mmcode": c.mmcode_root}, out, settings,
                           generate_fn=model_generate_fn(model, settings), model_name=f"merged, lam={lam:g}",
                           model_fingerprint=hashlib.sha256(ident.encode()).hexdigest()[:16])
        return float(summary["benchmarks"]["mmcode"]["score"])

    return score


def _heldout_score(c) -> Callable[[Any, float, MergeSpec], float]:
    from viscodex_jax.merge.heldout import DEFAULT_HELDOUT, heldout_loss, read_heldout_jsonl

    texts = read_heldout_jsonl(c.heldout_jsonl) if c.heldout_jsonl else DEFAULT_HELDOUT
    return lambda model, lam, spec: heldout_loss(model, texts)


# ------------------------------------------------------------------------------------------------ outputs


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _plot(rows: Sequence[dict[str, Any]], best: float, metric: str) -> bytes:
    """Score against lam as a PNG (the Agg canvas directly: no global matplotlib backend is set)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lams, scores = [r["lam"] for r in rows], [r["score"] for r in rows]
    order = np.argsort(lams)
    ax.plot(np.asarray(lams)[order], np.asarray(scores)[order], "o-", color="tab:blue")
    b = next(r for r in rows if r["lam"] == best)
    ax.plot([b["lam"]], [b["score"]], "*", color="tab:red", markersize=14, label=f"best lam = {best:g}")
    ax.set_xticks(sorted(lams))
    ax.set_xlabel("lam (weight of the VLM's task vector)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _table(rows: Sequence[dict[str, Any]], best: float, metric: str) -> str:
    lines = [f"| lam | {metric} | merge s | score s | checkpoint |", "|---:|---:|---:|---:|---|"]
    for r in rows:
        mark = " (best)" if r["lam"] == best else ""
        lines.append(f"| {r['lam']:g}{mark} | {r['score']:.5g} | {r['merge_seconds']:.1f} | "
                     f"{r['score_seconds']:.1f} | {r['dir'] or '-'} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ the sweep


def lambda_sweep(c, lams: Sequence[float] | None = None,
                 score: Callable[[Any, float], float] | None = None,
                 higher_is_better: bool | None = None) -> dict[str, Any]:
    """Merges on device and scores once per lam; writes the table, plot, sweep.json and the best checkpoint.

    ``lams`` default: ``--config.sweep_lams``. ``score(model, lam)`` (``model``: a ``vx.Model`` holding the
    params merged at ``lam``) replaces ``--config.score``; ``higher_is_better`` then says which way it points (default: lower).
    Every setting, lam and output dir is checked before anything is loaded.
    """
    import jax

    from viscodex_jax.api import Model
    from viscodex_jax.data.processor import Processor
    from viscodex_jax.sampling import mesh as on_mesh

    require_dirs(c, "base_dir", "vlm_dir", "coder_dir", "out_dir")
    runs = sweep_specs(c, parse_sweep_lams(c.sweep_lams) if lams is None else lams)
    check_vlm(c)
    mesh = parse_mesh(c.mesh)
    rules = on_mesh.resolve_rules(mesh, None)
    if score is None:
        if c.score not in SCORES:
            raise MergeError(f"--config.score={c.score!r}: choose from {', '.join(SCORES)}")
        metric, up = SCORES[c.score]
        scorer = (_mmcode_score if c.score == "mmcode" else _heldout_score)(c)
    else:
        metric, up = "score", bool(higher_is_better)
        scorer = lambda model, lam, spec: score(model, lam)  # noqa: E731
    mem = memory_needed(c, runs[0][2], mesh, rules)
    where = f"each of {mesh.size} devices of mesh {dict(mesh.shape)}" if mesh is not None else "the device"
    b = {k: human_bytes(v) for k, v in mem.items()}
    line = (f"sweep memory: base {b['base']} + VLM {b['vlm']} + coder {b['coder']} + one merged copy {b['merged']} "
            f"= {b['host_total']}; {where}: at most {b['device_total']} (its shards of base "
            f"{b['base_per_device']} + VLM {b['vlm_per_device']} + coder {b['coder_per_device']} + the merged "
            f"tensors), of which {b['per_device']} is the merged params as scored; the merge's temporaries "
            "come on top (launch/compile_check.py --programs=sweep_merge)")
    log.info("%s", line)
    print(line, flush=True)

    load_mesh = mesh if mesh is not None else default_mesh()
    t0 = time.time()
    merger = MeshMerge(c.base_dir, [c.vlm_dir, c.coder_dir], runs[0][2], load_mesh,
                       rules if mesh is not None else on_mesh.resolve_rules(load_mesh, None), require_vision=True)
    log.info("loaded base, VLM and coder on %s in %.1fs", dict(load_mesh.shape), time.time() - t0)
    cfg = merger.cfg
    model = Model(cfg, {}, {}, c.vlm_dir, Processor.from_pretrained(c.vlm_dir, cfg), mesh, rules)  # params per lam
    os.makedirs(c.out_dir, exist_ok=True)
    rows = []
    for lam, _, spec, _ in runs:
        t0 = time.time()
        model.params, report = merger.merge(spec)
        jax.block_until_ready(model.params)
        t1 = time.time()
        s = float(scorer(model, lam, spec))
        model.params = {}
        if not np.isfinite(s):
            raise MergeError(f"lam={lam:g}: the {metric} is {s}; a non-finite score cannot be ranked "
                             "(no checkpoint or sweep.json was written)")
        rows.append({"lam": lam, "score": s, "merge_seconds": t1 - t0, "score_seconds": time.time() - t1,
                     "warnings": report["warnings"], "dir": None})
        log.info("lam=%g %s=%.5g", lam, metric, s)
    merger.close()
    del merger
    best = (max if up else min)(rows, key=lambda r: r["score"])["lam"]
    for (lam, sub, _, ckpt), row in zip(runs, rows):
        if lam == best or c.write_all:
            run_merge(sub, out_dir=ckpt)
            row["dir"] = ckpt
    result = {"rows": rows, "best_lam": best, "higher_is_better": up, "score": c.score if score is None else "custom",
              "metric": metric, "memory_bytes": mem}
    _write_atomic(os.path.join(c.out_dir, "sweep.md"), _table(rows, best, metric).encode())
    _write_atomic(os.path.join(c.out_dir, "sweep.png"), _plot(rows, best, metric))
    _write_atomic(os.path.join(c.out_dir, "sweep.json"), json.dumps(result, indent=2).encode())
    return result
