"""compile_check: does a training config's step (and the sampler's prefill / decode) fit a TPU slice?

Compiles ahead of time for the slice's devices as libtpu describes them (no
chip needed, nothing allocated) and reads XLA's per-chip memory analysis:
argument, output, alias (donated inputs reused as outputs) and temporary
bytes. Peak per chip = argument + output - alias + temporaries (code size
aside); "fits" compares it with the chip's HBM. XLA itself refuses a program
(RESOURCE_EXHAUSTED, reported as "does not fit" with the bytes it names) when
the temporaries alone exceed HBM, so a program that compiles can still not fit.

Rows per chip: the global batch of a step is ``rows_per_chip x chips`` rows
of ``data.max_len`` tokens (with tensor parallelism several chips hold the
same rows; the count is still per chip, so slices compare at equal work per
chip).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Sequence

import numpy as np

from viscodex_jax.aot import flops as flops_lib
from viscodex_jax.aot import programs
from viscodex_jax.aot.shapes import model_config
from viscodex_jax.aot.topologies import GIB, Slice, parse_slice, slice_devices
from viscodex_jax.model.config import ModelConfig
from viscodex_jax.sampling.loop import DecodeSettings
from viscodex_jax.sharding import make_mesh

PROGRAMS = ("train", "prefill", "decode", "slots", "sweep_merge")
HEADROOM = 0.10  # "fits with headroom": peak within 90% of HBM (fragmentation, runtime buffers)
_ARCH_FIELDS = ("model_type", "text", "vision", "image_token_id", "video_token_id", "vision_start_token_id",
                "vision_end_token_id")


class CheckError(ValueError):
    """Settings that cannot describe a program on the slice (the message names the flag)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    programs: tuple[str, ...] = PROGRAMS
    rows_per_chip: int = 0  # 0: the config's data.batch_size is the global batch
    prompt_len: int = 2048  # prefill prompt tokens per row
    cache_len: int = 4096  # KV-cache slots per row (prefill writes, decode reads)
    decode_rows: int = 0  # global sampler rows; 0: one per batch shard
    prefill_patches: int = -1  # image patches in the prefill prompt; -1: data.patches_per_row; 0: text only
    cache_dtype: str = DecodeSettings.cache_dtype
    # The sampler's attention: api.load / launch/generate.py run ModelConfig's default unless told otherwise.
    sampler_attention: str = ModelConfig.__dataclass_fields__["attention_impl"].default
    count_flops: bool = True  # trace the train step once more to count its matmuls
    # sweep_merge: the merge method (and its density) of the lam sweep, and the stored dtype of its three inputs
    merge_method: str = "task_arithmetic"
    merge_density: float = 1.0
    merge_in_dtype: str = "bfloat16"

    def __post_init__(self):
        bad = set(self.programs) - set(PROGRAMS)
        if bad or not self.programs:
            raise CheckError(f"--programs={','.join(self.programs)}: choose from {','.join(PROGRAMS)}")
        if self.cache_len < self.prompt_len:
            raise CheckError(f"--cache_len={self.cache_len} must be >= --prompt_len={self.prompt_len}")
        if self.rows_per_chip < 0 or self.decode_rows < 0:
            raise CheckError("--rows_per_chip and --decode_rows must be >= 0")
        if "sweep_merge" in self.programs:
            self.merge_spec()

    def merge_spec(self):
        """The sweep's MergeSpec (VisCodex weights; the lam does not change the program)."""
        from viscodex_jax.merge.spec import MergeError, MergeSpec

        try:
            return MergeSpec(method=self.merge_method, density=self.merge_density)
        except MergeError as e:
            raise CheckError(f"--merge_method={self.merge_method} --merge_density={self.merge_density}: {e}") from None


def runtime_settings(c) -> dict[str, Any]:
    """The ModelConfig run-time fields the training config sets (dtype, attention_impl, remat_policy, ...)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)} - set(_ARCH_FIELDS)
    return {k: c.model[k] for k in c.model.keys() if k in names}


def slice_mesh(c, devices: Sequence[Any], sl: Slice):
    """The config's (data, fsdp, tensor) mesh over all of the slice's chips."""
    shape = [int(s) for s in c.mesh.shape]
    known = int(np.prod([s for s in shape if s != -1]))
    if shape.count(-1) > 1 or (-1 in shape and sl.chips % known) or (-1 not in shape and known != sl.chips):
        raise CheckError(f"--config.mesh.shape={tuple(shape)} does not tile the {sl.chips} chips of {sl.name}; "
                         f"e.g. --config.mesh.shape='(1,-1,1)' for FSDP over all of them")
    return make_mesh(tuple(shape), devices)


_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _bytes(num: str, unit: str) -> int:
    return int(float(num) * _UNITS[unit])


def parse_oom(message: str) -> dict[str, Any]:
    """XLA's RESOURCE_EXHAUSTED text -> the sizes it names (its G are GiB)."""
    out: dict[str, Any] = {}
    m = re.search(r"HLO temporaries \(" + _SIZE + r"\) exceeds available HBM \(" + _SIZE + r"\)", message)
    if m:
        out["temp_bytes"] = _bytes(*m.group(1, 2))
        out["xla_hbm_bytes"] = _bytes(*m.group(3, 4))
    m = re.search(r"Used " + _SIZE + r" of " + _SIZE + " hbm", message)
    if m:
        out["xla_used_bytes"] = _bytes(*m.group(1, 2))
        out["xla_hbm_bytes"] = _bytes(*m.group(3, 4))
    return out


def _memory(compiled) -> dict[str, int]:
    ma = compiled.memory_analysis()
    mem = {"argument_bytes": int(ma.argument_size_in_bytes), "output_bytes": int(ma.output_size_in_bytes),
           "alias_bytes": int(ma.alias_size_in_bytes), "temp_bytes": int(ma.temp_size_in_bytes),
           "code_bytes": int(ma.generated_code_size_in_bytes)}
    mem["peak_bytes"] = mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"] + mem["temp_bytes"]
    return mem


def compile_program(name: str, jitted, args: tuple, sl: Slice) -> dict[str, Any]:
    """Lowers and compiles; memory per chip, fit against the chip's HBM, compile seconds, XLA's FLOPs.

    A program that cannot be built is a result too, not a crash (the other programs still get their
    row): ``error_kind`` "out_of_memory" is XLA's RESOURCE_EXHAUSTED verdict (with the sizes it names),
    anything else is the exception's type, e.g. a kernel that does not lower for this mesh.
    """
    r: dict[str, Any] = {"program": name}
    t0 = time.perf_counter()
    stage = "lower"
    try:
        lowered = jitted.lower(*args)
        r["lower_s"] = time.perf_counter() - t0
        stage = "compile"
        t0 = time.perf_counter()
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - reported per program (see the docstring)
        text = str(e).strip()
        oom = "RESOURCE_EXHAUSTED" in text
        r.update(compiled=False, fits=False if oom else None, fits_headroom=False if oom else None,
                 compile_s=time.perf_counter() - t0, error_kind="out_of_memory" if oom else type(e).__name__,
                 error=f"{stage}: {text.splitlines()[0][:2000] if text else type(e).__name__}",
                 **(parse_oom(text) if oom else {}))
        return r
    r.update(compiled=True, compile_s=time.perf_counter() - t0, error=None, error_kind=None, **_memory(compiled))
    r["fits"] = r["peak_bytes"] <= sl.hbm_bytes
    r["fits_headroom"] = r["peak_bytes"] <= (1 - HEADROOM) * sl.hbm_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and "flops" in cost:
        r["xla_flops_per_chip"] = float(cost["flops"])
    return r


def compile_check(c, model_spec: str, topology: str, s: Settings = Settings()) -> dict[str, Any]:
    """Compiles the requested programs of config ``c`` for ``model_spec`` on ``topology``; returns the report."""
    sl = parse_slice(topology)
    cfg = model_config(model_spec, **runtime_settings(c))
    devices = slice_devices(sl)
    mesh = slice_mesh(c, devices, sl)
    rules = programs.rules_of(c)
    shards = programs.batch_shards(mesh, rules)
    rows = s.rows_per_chip * sl.chips if s.rows_per_chip else int(c.data.batch_size)
    if rows % shards:
        raise CheckError(f"{rows} global rows do not split over the mesh's {shards} batch shards "
                         f"(mesh {dict(mesh.shape)}): set --rows_per_chip or --config.data.batch_size")
    decode_rows = s.decode_rows or shards
    patches = c.data.patches_per_row if s.prefill_patches < 0 else s.prefill_patches
    report: dict[str, Any] = {
        "model": model_spec, "topology": sl.name, "libtpu_topology": sl.topology, "chip": sl.generation,
        "chips": sl.chips, "hbm_bytes": sl.hbm_bytes, "mesh": dict(mesh.shape),
        "remat_policy": cfg.remat_policy, "attention_impl": cfg.attention_impl,
        "sampler_attention": s.sampler_attention or cfg.attention_impl, "dtype": cfg.dtype,
        "param_dtype": str(c.model.param_dtype), "settings": dataclasses.asdict(s), "results": [],
    }
    sampler_cfg = cfg.replace(attention_impl=s.sampler_attention) if s.sampler_attention else cfg
    for name in s.programs:
        if name == "train":
            setup = programs.train_setup(c, cfg)
            jitted, args, fn = programs.train_program(c, cfg, mesh, rules, rows, setup)
            r = compile_program(name, jitted, args, sl)
            tokens = rows * int(c.data.max_len) * int(c.train.accum_steps)
            r.update(rows=rows, rows_per_chip=rows / sl.chips, seq_len=int(c.data.max_len),
                     tokens=tokens, accum_steps=int(c.train.accum_steps))
            if s.count_flops and r["error_kind"] in (None, "out_of_memory"):
                try:
                    r["flops"] = _train_flops(cfg, setup, fn, args, tokens, c, c.data.patches_per_row, sl.chips,
                                              r.get("xla_flops_per_chip"))
                except Exception as e:  # noqa: BLE001 - the memory verdict stands without the FLOP count
                    r["flops_error"] = f"{type(e).__name__}: {str(e).strip()[:500]}"
        elif name == "prefill":
            jitted, args, _ = programs.prefill_program(sampler_cfg, mesh, rules, c.model.param_dtype, decode_rows,
                                                       s.prompt_len, s.cache_len, patches, s.cache_dtype)
            r = compile_program(name, jitted, args, sl)
            r.update(rows=decode_rows, rows_per_chip=decode_rows / sl.chips, seq_len=s.prompt_len,
                     tokens=decode_rows * s.prompt_len, cache_len=s.cache_len, patches=patches)
        elif name == "slots":
            jitted, args, _ = programs.slots_program(sampler_cfg, mesh, rules, c.model.param_dtype, decode_rows,
                                                     s.cache_len, s.cache_dtype)
            r = compile_program(name, jitted, args, sl)
            r.update(rows=decode_rows, rows_per_chip=decode_rows / sl.chips, seq_len=1, tokens=decode_rows,
                     cache_len=s.cache_len)
        elif name == "sweep_merge":
            spec = s.merge_spec()
            jitted, args, _ = programs.sweep_merge_program(cfg, mesh, rules, s.merge_in_dtype, spec)
            r = compile_program(name, jitted, args, sl)
            r.update(rows=0, rows_per_chip=0, seq_len=0, tokens=0, models=3, merge_method=spec.method,
                     merge_density=spec.density, merge_in_dtype=s.merge_in_dtype, merge_out_dtype=spec.out_dtype)
        else:
            jitted, args, _ = programs.decode_program(sampler_cfg, mesh, rules, c.model.param_dtype, decode_rows,
                                                      s.cache_len, s.cache_dtype)
            r = compile_program(name, jitted, args, sl)
            r.update(rows=decode_rows, rows_per_chip=decode_rows / sl.chips, seq_len=1, tokens=decode_rows,
                     cache_len=s.cache_len)
        report["results"].append(r)
    return report


def _train_flops(cfg, setup, fn, args, tokens, c, patches_per_row, chips, xla_per_chip) -> dict[str, Any]:
    counts = flops_lib.param_counts(cfg, setup.abstract_params, setup.keys)
    seq = int(c.data.max_len)
    per_token = flops_lib.formula_per_token(cfg, counts, seq, (patches_per_row or 0) / seq if cfg.vision else 0.0)
    program, notes = flops_lib.jaxpr_matmul_flops(fn, *args)
    out = {**counts, "per_token": per_token, "program_matmul_per_token": program / tokens,
           "program_over_formula_dense": program / tokens / per_token["formula_dense"], "notes": notes}
    if xla_per_chip is not None:
        out["xla_per_token_loops_once"] = xla_per_chip * chips / tokens
    return out


# ----------------------------------------------------------------------------------------------- report


def gib(n: int | None) -> str:
    return "—" if n is None else f"{n / GIB:.2f}"


def flop(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def render(report: dict[str, Any]) -> str:
    """A Markdown table of the report (one line per program)."""
    hbm = report["hbm_bytes"]
    lines = [
        f"{report['model']} on {report['topology']} ({report['chips']} x {report['chip']}, "
        f"{hbm / GIB:.2f} GiB HBM per chip), mesh {report['mesh']}, remat {report['remat_policy']}, "
        f"attention {report['attention_impl']} (sampler: {report['sampler_attention']}), compute {report['dtype']}, "
        f"params {report['param_dtype']}",
        "",
        "| program | rows/chip | tokens/row | args GiB | out GiB | alias GiB | temp GiB | peak GiB | HBM GiB "
        "| fits | fits 90% | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in report["results"]:
        if r["compiled"]:
            fits, head = ("yes" if r["fits"] else "**no**"), ("yes" if r["fits_headroom"] else "no")
        elif r["error_kind"] == "out_of_memory":
            fits, head = "**does not fit** (XLA)", "no"
        else:
            fits, head = f"**error** ({r['error_kind']})", "—"
        lines.append(
            f"| {r['program']} | {r['rows_per_chip']:g} | {r['seq_len']} | {gib(r.get('argument_bytes'))} | "
            f"{gib(r.get('output_bytes'))} | {gib(r.get('alias_bytes'))} | {gib(r.get('temp_bytes'))} | "
            f"{gib(r.get('peak_bytes'))} | {hbm / GIB:.2f} | {fits} | {head} | {r['compile_s']:.1f} |")
    for r in report["results"]:
        if not r["compiled"]:
            lines += ["", f"{r['program']}: {r['error']}"]
        if r["program"] == "sweep_merge":
            lines += ["", f"sweep_merge ({r['merge_method']}, density {r['merge_density']:g}): args = base + VLM + "
                      f"coder in {r['merge_in_dtype']}, out = the merged tensors in {r['merge_out_dtype']}, temp = "
                      "the merge's temporaries, per chip"]
        f = r.get("flops")
        if f:
            p = f["per_token"]
            lines += ["", f"{r['program']} FLOPs per token: 6N_total {flop(p['6n_total'])}, "
                      f"6N_trainable {flop(p['6n_trainable'])}, 6N_matmul {flop(p['6n_matmul'])}; attention "
                      f"12LTd {flop(p['attention_dense_12LTd'])} (causal 6LTd {flop(p['attention_causal_6LTd'])}); "
                      f"vision forward {flop(p['vision_forward_2Nv'])}; formula (6N_matmul + 12LTd + vision) "
                      f"{flop(p['formula_dense'])}; program matmuls {flop(f['program_matmul_per_token'])} "
                      f"({f['program_over_formula_dense']:.2f}x the formula: remat recompute shows here)"
                      + (f"; XLA cost_analysis {flop(f['xla_per_token_loops_once'])} (loop bodies counted once)"
                         if "xla_per_token_loops_once" in f else "")]
    return "\n".join(lines)
