"""Config -> merge: the merge config schema, the VisCodex recipe and its output formats (the lam sweep: ``sweep``)."""

from __future__ import annotations

import os
import shutil
from typing import Any

import ml_collections

from viscodex_jax.merge.drivers import merge_checkpoints
from viscodex_jax.merge.spec import MergeError, MergeSpec, finite_number
from viscodex_jax.model.config import load_config



def merge_config() -> ml_collections.ConfigDict:
    """The merge config schema with the VisCodex-8B defaults; ``configs/merge_*.py`` presets set values on it."""
    c = ml_collections.ConfigDict()
    c.base_dir = ""
    c.vlm_dir = ""
    c.coder_dir = ""
    c.out_dir = ""  # HF dir (safetensors + VLM config + tokenizer + merge_report.json)
    c.orbax_dir = ""  # optional: also write our orbax checkpoint
    c.method = "task_arithmetic"
    c.lam = 0.7  # weight of the VLM's task vector, in [0, 1]; the coder gets 1 - lam
    c.scale = 1.0  # final lambda of the generalized pipeline, in (0, 2]
    c.density = 1.0  # ties/dare only
    c.drop_largest = 0.0  # breadcrumbs only: fractions of each task vector's magnitudes dropped
    c.drop_smallest = 0.0
    c.seed = 0
    c.dare_rescale = "inverse_p"
    # The paper does not say whether embeddings/lm_head were merged; by default they are.
    c.merge_embeddings = True
    c.exclude = ""  # comma-separated extra regexes on param paths to copy from the VLM instead
    c.attn_lam = -1.0  # -1: off; in [0, 1]: a different lam for attention (per-group weights)
    # Lifts the ranges above (negative weights, lam > 1, scale > 2); values must still be finite.
    c.allow_unusual_weights = False
    c.out_dtype = "bfloat16"  # bfloat16 | float16 | float32
    c.max_shard_mb = 5000
    c.overwrite = False
    # The lam sweep (launch/sweep.py): comma-separated lams, each merged in memory and scored; the best
    # one's checkpoint is written to <out_dir>/lam_<lam> (every one's with write_all).
    c.sweep_lams = ""
    c.score = "heldout"  # heldout: mean NLL, lower is better | mmcode: MMCode pass@1, higher is better
    c.heldout_jsonl = ""  # {"text": ...} per line for the held-out loss score; built-in snippets if empty
    c.mmcode_root = ""  # MMCode data dir (mmcode_test.jsonl.gz) for score=mmcode
    c.eval_max_new_tokens = 1024  # score=mmcode: generation settings (greedy)
    c.eval_batch_size = 4
    c.eval_limit = 0  # score=mmcode: first N problems only; 0: all
    c.write_all = False
    c.mesh = ""  # data,fsdp,tensor (e.g. 1,8,1; -1 takes the rest): score the merged params sharded; "": one device
    return c


def _unusual(c) -> bool:
    return bool(c.get("allow_unusual_weights", False))


def spec_from_config(c) -> MergeSpec:
    """The MergeSpec a merge config asks for; every number is checked here, before any work.

    ``lam`` is in [0, 1] and ``attn_lam`` is -1 (off) or in [0, 1];
    ``--config.allow_unusual_weights`` lifts the ranges (see MergeSpec), never finiteness.
    """
    unusual = _unusual(c)
    lam = finite_number(c.lam, "--config.lam")
    if not unusual and not 0.0 <= lam <= 1.0:
        raise MergeError(f"--config.lam must be in [0, 1], got {lam:g} (or set --config.allow_unusual_weights)")
    attn_lam = finite_number(c.attn_lam, "--config.attn_lam")
    if attn_lam != -1.0 and not unusual and not 0.0 <= attn_lam <= 1.0:
        raise MergeError(f"--config.attn_lam must be -1 (off) or in [0, 1], got {attn_lam:g} "
                         "(or set --config.allow_unusual_weights)")
    exclude = tuple(p for p in c.exclude.split(",") if p) if c.exclude else ()
    if not c.merge_embeddings:
        exclude += (r"^model/embed_tokens/", r"^lm_head/")
    groups = ()
    if attn_lam != -1.0:
        groups = ((r"/self_attn/", (attn_lam, 1.0 - attn_lam)),)
    try:
        return MergeSpec(method=c.method, weights=(lam, 1.0 - lam), lam=c.scale, density=c.density, seed=c.seed,
                         drop_largest=c.drop_largest, drop_smallest=c.drop_smallest,
                         dare_rescale=c.dare_rescale, exclude=exclude, group_weights=groups, out_dtype=c.out_dtype,
                         allow_unusual_weights=unusual)
    except MergeError as e:  # name the flag; MergeSpec's "lam" is the config's "scale"
        flags = (("lam (the final scale)", "scale"), ("out_dtype", "out_dtype"), ("density", "density"),
                 ("drop_largest", "drop_largest"), ("dare_rescale", "dare_rescale"), ("unknown merge method", "method"))
        flag = next((f for prefix, f in flags if str(e).startswith(prefix)), None)
        if flag is None:
            raise
        raise MergeError(f"--config.{flag}={c[flag]!r}: {e}") from None


def require_dirs(c, *names):
    for n in names:
        if not getattr(c, n):
            raise MergeError(f"--config.{n} is required (a local checkpoint directory)")
        if n.endswith("_dir") and n != "out_dir" and not os.path.isdir(getattr(c, n)):
            raise MergeError(f"--config.{n}={getattr(c, n)!r} is not a directory")


def check_vlm(c) -> None:
    """The recipe copies the vision tower from vlm_dir: it must be a VLM (not the coder, not the base)."""
    cfg = load_config(c.vlm_dir)
    if not cfg.is_multimodal:
        raise MergeError(
            f"--config.vlm_dir={c.vlm_dir!r} holds a {cfg.model_type!r} model with no vision tower; the merge "
            "copies the vision tower from the VLM (were vlm_dir and coder_dir swapped, or the base given as vlm_dir?)"
        )


def check_outputs(c, out_dir: str) -> None:
    """Every output is checked before the first byte is written, so a refusal leaves nothing behind."""
    outs = [("out_dir", out_dir)] + ([("orbax_dir", c.orbax_dir)] if c.orbax_dir else [])
    if len(outs) == 2 and os.path.abspath(outs[0][1]) == os.path.abspath(outs[1][1]):
        raise MergeError(f"--config.out_dir and --config.orbax_dir are the same directory {out_dir!r}")
    for flag, path in outs:
        if os.path.exists(path) and not c.overwrite:
            raise FileExistsError(f"--config.{flag}={path!r} already exists (set --config.overwrite to replace it)")


def run_merge(c, out_dir: str | None = None, spec: MergeSpec | None = None) -> dict[str, Any]:
    """One merge from a config: HF dir (+ optional orbax dir); returns the report.

    Inputs, numbers and all outputs are validated before any work; if the orbax
    conversion fails, the HF output this run wrote is removed too.
    """
    require_dirs(c, "base_dir", "vlm_dir", "coder_dir", "out_dir")
    out_dir = out_dir or c.out_dir
    spec = spec or spec_from_config(c)
    if not finite_number(c.max_shard_mb, "--config.max_shard_mb") > 0:
        raise MergeError(f"--config.max_shard_mb must be > 0, got {c.max_shard_mb}")
    check_outputs(c, out_dir)
    check_vlm(c)
    report = merge_checkpoints(c.base_dir, [c.vlm_dir, c.coder_dir], out_dir, spec,
                               max_shard_bytes=int(c.max_shard_mb * 10**6), overwrite=c.overwrite,
                               require_vision=True)
    if c.orbax_dir:
        from viscodex_jax import checkpoint

        try:
            checkpoint.convert_hf_to_orbax(out_dir, c.orbax_dir, overwrite=c.overwrite)
        except BaseException:
            shutil.rmtree(out_dir, ignore_errors=True)
            raise
    return report
