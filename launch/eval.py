"""Evaluate a checkpoint on any subset of the VisCodex benchmarks (batched JAX sampling, sandboxed scoring).

    python launch/eval.py --checkpoint=/ckpt/viscodex-8b --benchmarks=chartmimic,mmcode \
        --chartmimic_root=/data/ChartMimic/dataset/direct_600 --mmcode_root=/data/MMCode --out_dir=runs/eval/8b

Writes <out_dir>/summary.{json,md}, report.html and per-item <benchmark>_items.jsonl; generations are
cached, so re-running re-scores without re-generating and an interrupted run resumes.
"""

from absl import app, flags

from viscodex_jax.eval.runner import EvalSettings, make_benchmark, model_generate_fn, run_eval
from viscodex_jax.logs import quiet_third_party

CKPT = flags.DEFINE_string("checkpoint", None, "HF dir or our orbax dir.", required=True)
BENCH = flags.DEFINE_list("benchmarks", ["chartmimic", "design2code", "mmcode", "infibench_v"], "Which benchmarks.")
ROOTS = {name: flags.DEFINE_string(f"{name}_root", None, f"Data root of {name} (its published layout).")
         for name in ("chartmimic", "design2code", "mmcode", "infibench_v")}
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
JUDGE = flags.DEFINE_string("judge_endpoint", None, "OpenAI-compatible endpoint for LLM judges (off by default).")
JUDGE_MODEL = flags.DEFINE_string("judge_model", "gpt-4o", "Judge model name.")
CLIP = flags.DEFINE_string("clip_path", None, "Local CLIP checkpoint for Design2Code's high-level score.")
NAME = flags.DEFINE_string("model_name", None, "Name in the reports (default: the checkpoint dir name).")


def main(argv):
    del argv
    quiet_third_party()
    roots = {}
    for name in BENCH.value:
        if name not in ROOTS:
            raise app.UsageError(f"--benchmarks: unknown {name!r}")
        if not ROOTS[name].value:
            raise app.UsageError(f"--{name}_root is required when --benchmarks includes {name}")
        roots[name] = ROOTS[name].value
    kw = {}
    if JUDGE.value:
        from viscodex_jax.eval.judge import Judge

        kw["infibench_v"] = {"judge": Judge(JUDGE.value, JUDGE_MODEL.value)}
    if CLIP.value:
        kw["design2code"] = {"clip_path": CLIP.value}
    benches = {n: make_benchmark(n, **kw.get(n, {})) for n in roots}
    settings = EvalSettings(max_new_tokens=MAX_NEW.value, batch_size=BATCH.value, temperature=TEMP.value,
                            top_p=TOP_P.value, top_k=TOP_K.value, seed=SEED.value, num_samples=SAMPLES.value,
                            limit=LIMIT.value)
    summary = run_eval(CKPT.value, roots, OUT.value, settings, benchmarks=benches, model_name=NAME.value,
                       generate_fn=None if not roots else _lazy(CKPT.value, settings, DTYPE.value))
    print(open(f"{OUT.value}/summary.md").read())
    del summary


def _lazy(ckpt, settings, dtype):
    """Loads the model only if something actually needs generating."""
    state = {}

    def fn(items, sample):
        if "f" not in state:
            state["f"] = model_generate_fn(ckpt, settings, dtype)
        return state["f"](items, sample)

    return fn


if __name__ == "__main__":
    app.run(main)
