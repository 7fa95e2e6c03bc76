"""Does a training config fit a TPU slice? Compile its step (and the sampler's) for the slice on this CPU host.

    .venv-tpu/bin/python launch/compile_check.py --config=configs/viscodex_8b.py:v5p-8 \
        --model_config=qwen2.5-vl-7b --json_out=runs/compile_check/8b_v5p-8.json
    .venv-tpu/bin/python launch/compile_check.py --config=configs/viscodex_8b.py:v5p-8 \
        --model_config=viscodex-8b --topology=v5p:2x2x1 --rows_per_chip=6 --programs=train \
        --config.model.remat_policy=full
    .venv-tpu/bin/python launch/compile_check.py --config=configs/viscodex_8b.py:v5p-8 \
        --model_config=viscodex-8b --programs=sweep_merge --merge_method=ties --merge_density=0.5

Nothing is allocated and no TPU is needed: every input is an abstract array
with its sharding on a mesh of the slice's devices as libtpu describes them,
and XLA:TPU reports per-chip argument / output / alias / temporary bytes.
Prints one table per topology; a program XLA cannot fit is reported, not
raised. Needs libtpu: .venv-tpu (made by launch/setup_env.sh) has it.
"""

import os

# Never touch a local accelerator (nor libtpu's machine-wide lock): this only compiles.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import json  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from viscodex_jax.aot import (PROGRAMS, CheckError, LibtpuMissingError, Settings, TopologyError, builtin_names,
                              compile_check, render)  # noqa: E402
from viscodex_jax.utils import quiet_third_party  # noqa: E402
from viscodex_jax.model.config import ConfigError  # noqa: E402

CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training config (with --config.* overrides).")
TOPOLOGY = flags.DEFINE_list("topology", [], "TPU slices: v5p:2x2x1, v5e:2x4, v6e:4x4 or v5p-8, v6e-8 "
                             "(comma-separated: one table each); default: the preset's --config.topology.")
PROGRAMS_FLAG = flags.DEFINE_list("programs", list(PROGRAMS), f"Programs to compile: {', '.join(PROGRAMS)} "
                                  "(slots: the continuous-batching decode step; sweep_merge: the lam sweep's "
                                  "on-device merge of base, VLM and coder).")
MODEL = flags.DEFINE_string("model_config", "", "Built-in shape (" + ", ".join(builtin_names()) + "), a config.json "
                            "or a checkpoint dir; default: --config.model.init_checkpoint.")
ROWS = flags.DEFINE_integer("rows_per_chip", 0, "Train rows of data.max_len tokens per chip (global batch = this x "
                            "chips); 0 keeps --config.data.batch_size.")
PROMPT = flags.DEFINE_integer("prompt_len", Settings.prompt_len, "Prefill prompt tokens per row.")
CACHE = flags.DEFINE_integer("cache_len", Settings.cache_len, "KV-cache length per row (prefill and decode).")
DECODE_ROWS = flags.DEFINE_integer("decode_rows", 0, "Sampler rows (slots), global; 0: one per batch shard.")
PATCHES = flags.DEFINE_integer("prefill_patches", -1, "Image patches in the prefill prompt; -1: "
                               "--config.data.patches_per_row, 0: text only.")
SAMPLER_ATTENTION = flags.DEFINE_string("sampler_attention", Settings.sampler_attention,
                                         "attention_impl of prefill / decode (the sampler's default; '' = the "
                                         "training config's).")
CACHE_DTYPE = flags.DEFINE_string("cache_dtype", Settings.cache_dtype, "KV-cache dtype (the sampler's default).")
FLOPS = flags.DEFINE_boolean("flops", True, "Count the train step's matmul FLOPs (one more trace).")
MERGE_METHOD = flags.DEFINE_string("merge_method", Settings.merge_method, "sweep_merge: the merge method "
                                   "(task_arithmetic, ties, dare_ties, ...).")
MERGE_DENSITY = flags.DEFINE_float("merge_density", Settings.merge_density, "sweep_merge: ties/dare density.")
MERGE_IN_DTYPE = flags.DEFINE_string("merge_in_dtype", Settings.merge_in_dtype, "sweep_merge: the stored dtype of "
                                     "the three input checkpoints.")
JSON_OUT = flags.DEFINE_string("json_out", "", "Write the reports here as JSON.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    quiet_third_party()
    c = CONFIG.value
    model = MODEL.value or c.model.init_checkpoint
    if not model:
        raise app.UsageError("--model_config is required when --config.model.init_checkpoint is empty")
    topologies = TOPOLOGY.value or ([c.topology] if c.get("topology") else [])
    if not topologies:
        raise app.UsageError("--topology is required: the config names no TPU slice (config.topology)")
    try:
        s = Settings(programs=tuple(PROGRAMS_FLAG.value), rows_per_chip=ROWS.value, prompt_len=PROMPT.value,
                     cache_len=CACHE.value, decode_rows=DECODE_ROWS.value, prefill_patches=PATCHES.value,
                     cache_dtype=CACHE_DTYPE.value, sampler_attention=SAMPLER_ATTENTION.value,
                     count_flops=FLOPS.value, merge_method=MERGE_METHOD.value, merge_density=MERGE_DENSITY.value,
                     merge_in_dtype=MERGE_IN_DTYPE.value)
        reports = []
        for topo in topologies:
            reports.append(compile_check(c, model, topo, s))
            print(render(reports[-1]) + "\n", flush=True)
    except (ConfigError, TopologyError, CheckError, LibtpuMissingError) as e:  # bad flags / no libtpu: say which
        raise app.UsageError(str(e)) from None
    if JSON_OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(JSON_OUT.value)), exist_ok=True)
        with open(JSON_OUT.value, "w") as f:
            json.dump({"config": c.to_dict(), "reports": reports}, f, indent=1, default=str)
    broken = [f"{rep['topology']} {r['program']}" for rep in reports for r in rep["results"]
              if r["error_kind"] not in (None, "out_of_memory")]
    if broken:  # "does not fit" is an answer; a program that does not build is a failure
        raise SystemExit(f"could not compile: {', '.join(broken)} (errors above)")


if __name__ == "__main__":
    app.run(main)
