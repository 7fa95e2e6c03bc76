"""Evaluate a checkpoint on any subset of the VisCodex benchmarks (batched JAX sampling, sandboxed scoring).

    python launch/eval.py --checkpoint=/ckpt/viscodex-8b --benchmarks=chartmimic,mmcode \
        --chartmimic_root=/data/ChartMimic/dataset/direct_600 --mmcode_root=/data/MMCode/mmcode_test.jsonl.gz \
        --out_dir=runs/eval/8b

Many prompts of mixed lengths generate faster with continuous batching (``--slots=8``); a model too big
for one device shards over a mesh (``--mesh=1,8,1``, with the blockwise attention).

Writes <out_dir>/summary.{json,md}, report.html and per-item <benchmark>_items.jsonl; generations are
cached, so re-running re-scores without re-generating and an interrupted run resumes. The benchmarks, their
``--<name>_root`` flags and their own flags (``--clip_path``, ``--judge_endpoint``, ...) come from
``viscodex_jax.eval.registry``.

Re-check our scorer against an official evaluator's scores (a folder of items, candidate responses and
``expected.jsonl``, as in shared/benchmarks/<benchmark>/); exits 1 when anything disagrees:

    python launch/eval.py --check_against=/work/shared/benchmarks/mmcode
"""

import os
import sys

from absl import app, flags

from viscodex_jax.eval import registry
from viscodex_jax.eval.check import check_folder, format_report
from viscodex_jax.eval.runner import EvalSettings, evaluate
from viscodex_jax.utils import quiet_third_party

CKPT = flags.DEFINE_string("checkpoint", None, "HF dir or our orbax dir (required unless --check_against).")
BENCH = flags.DEFINE_list("benchmarks", list(registry.names()), "Which benchmarks.")
ROOTS = {name: flags.DEFINE_string(f.name, f.default, f.help) for name, f in registry.root_flags().items()}
OPTIONS = {f.name: getattr(flags, f"DEFINE_{f.kind}")(f.name, f.default, f.help) for f in registry.option_flags()}
OUT = flags.DEFINE_string("out_dir", "runs/eval", "Output directory.")
MAX_NEW = flags.DEFINE_integer("max_new_tokens", 1024, "Generation length.")
BATCH = flags.DEFINE_integer("batch_size", 4, "Prompts per generation batch.")
LIMIT = flags.DEFINE_integer("limit", None, "Only the first N items of each benchmark.")
TEMP = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass.")
TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k (0 = off).")
SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples per item (MMCode pass@k).")
SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
NAME = flags.DEFINE_string("model_name", None, "Name in the reports (default: the checkpoint dir name).")
ON_BAD = flags.DEFINE_enum("on_bad_item", "raise", ["raise", "skip"],
                           "An item the loader cannot read: stop with an error naming it, or count it as failed.")
CHECK = flags.DEFINE_string("check_against", None, "Folder of (item, candidate, expected) triples: print our "
                            "per-metric agreement with the official scores instead of evaluating a checkpoint.")
CHECK_BENCH = flags.DEFINE_string("check_benchmark", None, "Benchmark of --check_against (default: from the "
                                  "folder name, e.g. .../mmcode).")
WORKERS = flags.DEFINE_integer("check_workers", None, "Triples scored at once (default: the benchmark's).")
MESH = flags.DEFINE_string("mesh", None, "data,fsdp,tensor: shard the model over this many devices (e.g. 1,8,1; "
                           "-1 takes the rest; default: one device).")
SLOTS = flags.DEFINE_integer("slots", 0, "Continuous batching with this many slots (0: lockstep batches of "
                             "--batch_size). On a mesh, a multiple of data x fsdp.")
CACHE_LEN = flags.DEFINE_integer("cache_len", None, "With --slots: KV-cache slots per row, prompt plus generated "
                                 "tokens (default: 4096 + --max_new_tokens, rounded up to 256).")


def _mesh_shape(text):
    if not text:
        return None
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or any(x == 0 or x < -1 for x in shape):
        raise app.UsageError(f"--mesh={text!r}: expected three positive integers data,fsdp,tensor (one may be -1)")
    return shape


def main(argv):
    del argv
    quiet_third_party()
    options = {name: flag.value for name, flag in OPTIONS.items()}
    if CHECK.value:
        try:
            report = check_folder(CHECK.value, CHECK_BENCH.value, options, ON_BAD.value, WORKERS.value)
        except (registry.UsageError, NotImplementedError) as e:  # NotImplementedError: no check adapter yet
            raise app.UsageError(str(e)) from e
        print(format_report(report))
        sys.exit(0 if report.ok else 1)
    if not CKPT.value:
        raise app.UsageError("--checkpoint is required (or --check_against)")
    settings = EvalSettings(max_new_tokens=MAX_NEW.value, batch_size=BATCH.value, temperature=TEMP.value,
                            top_p=TOP_P.value, top_k=TOP_K.value, seed=SEED.value, num_samples=SAMPLES.value,
                            limit=LIMIT.value)
    try:
        evaluate(CKPT.value, BENCH.value, {name: flag.value for name, flag in ROOTS.items()}, OUT.value, settings,
                 options, ON_BAD.value, DTYPE.value, NAME.value, _mesh_shape(MESH.value), SLOTS.value,
                 CACHE_LEN.value)
    except registry.UsageError as e:
        raise app.UsageError(str(e)) from e
    with open(os.path.join(OUT.value, "summary.md")) as f:
        print(f.read())


if __name__ == "__main__":
    app.run(main)
