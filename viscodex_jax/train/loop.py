"""The SFT loop: data -> sharded steps -> metrics -> orbax checkpoints (state + data iterator), resumable.

A run restarted with the same command resumes from the latest checkpoint,
data iterator included, so it sees exactly the batches it would have seen.
SIGTERM (TPU preemption) saves before exiting. A non-finite loss or gradient
stops the run naming the step, unless ``train.skip_nonfinite`` is set, and even
then once more than ``train.max_skipped_fraction`` of the steps were skipped.
Parameters are checked for NaN/Inf before every save and before the export,
so neither a checkpoint nor an exported model is ever non-finite.

Resuming checks that the workdir was made from the same init checkpoint and
model shape (``guards.check_identity``); a saved step that cannot be read
(truncated by a crash, a full disk) is moved to ``checkpoints_unreadable/``
and the newest intact step is restored instead, with a warning naming both.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from viscodex_jax import checkpoint as ckpt_io
from viscodex_jax.model.config import ConfigError
from viscodex_jax.sharding import make_mesh
from viscodex_jax.train.config import validate_config
from viscodex_jax.train.guards import (NonFiniteError, ResumeError, check_finite, check_identity,
                                       check_state_shapes, run_identity)
from viscodex_jax.train.metrics import MetricWriter, peak_flops_per_device, train_flops
from viscodex_jax.train.step import (OptimConfig, batch_shardings, init_state, make_optimizer, make_schedule,
                                     make_train_step, state_shardings, trainable_keys)

log = logging.getLogger(__name__)


__all__ = ["ConfigError", "DataExhaustedError", "NonFiniteError", "ResumeError", "read_metrics", "run_training"]


class DataExhaustedError(RuntimeError):
    """The data ran out before ``train.steps`` (finite ``data.num_epochs``)."""


class _Preemption:
    def __init__(self):
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting")
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


def _rules(c) -> tuple:
    return tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in c.mesh.rules)


def _stack(batches: list[dict[str, Any]]) -> dict[str, Any]:
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def to_global(local: dict[str, Any], shardings: dict[str, Any]) -> dict[str, Any]:
    """Each process holds its rows of the global batch; assemble the global arrays."""
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), local, shardings)


def _batches(c, tokenizer, model_cfg) -> tuple[Any, Iterator, Any]:
    from viscodex_jax.data.image_processor import ImageProcessorConfig
    from viscodex_jax.data.mcd import SkipStats
    from viscodex_jax.data.pipeline import PipelineConfig, make_dataset

    n_proc = jax.process_count()
    if c.data.batch_size % n_proc:
        raise ConfigError(f"--config.data.batch_size={c.data.batch_size} must divide over {n_proc} processes")
    pc = PipelineConfig(batch_size=c.data.batch_size // n_proc, max_len=c.data.max_len,
                        patches_per_row=c.data.patches_per_row or None, seed=c.data.seed,
                        num_epochs=c.data.num_epochs or None, on_error=c.data.on_error,
                        worker_count=c.data.worker_count, drop_remainder=True,
                        max_image_pixels=c.data.max_image_pixels or None)
    stats = SkipStats()  # this process's skips (grain worker processes count and log their own)
    # The checkpoint's own image settings (max_pixels...), as at inference time.
    image_cfg = (ImageProcessorConfig.from_pretrained(c.model.init_checkpoint)
                 if os.path.isfile(os.path.join(c.model.init_checkpoint, "preprocessor_config.json")) else None)
    ds = make_dataset(c.data.train, tokenizer, model_cfg, pc, image_cfg, stats=stats)
    return ds, iter(ds), stats


def run_training(c) -> dict[str, Any]:
    """Runs (or resumes) the training described by config ``c``; returns the last metrics."""
    validate_config(c)
    if c.distributed:
        jax.distributed.initialize()
    workdir = os.path.abspath(c.workdir)
    os.makedirs(workdir, exist_ok=True)
    runtime = dict(dtype=c.model.dtype, attention_impl=c.model.attention_impl, remat_policy=c.model.remat_policy)
    # A NaN in the init checkpoint would only show as a non-finite first step: refuse it by name.
    model_cfg, params, raw = ckpt_io.load_params(c.model.init_checkpoint, param_dtype=jnp.dtype(c.model.param_dtype),
                                                 check_finite=True, **runtime)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(c.model.init_checkpoint)
    try:
        mesh = make_mesh(tuple(c.mesh.shape))
    except ValueError as e:
        raise ConfigError(f"--config.mesh.shape={tuple(c.mesh.shape)}: {e}") from None
    if c.data.max_len > model_cfg.text.max_position_embeddings:
        raise ConfigError(f"--config.data.max_len={c.data.max_len}: longer than the model's max_position_embeddings="
                          f"{model_cfg.text.max_position_embeddings} ({c.model.init_checkpoint}/config.json)")
    if model_cfg.vision is not None:
        unit = model_cfg.vision.spatial_merge_size**2
        if c.data.patches_per_row <= 0 or c.data.patches_per_row % unit:
            raise ConfigError(f"--config.data.patches_per_row={c.data.patches_per_row}: expected a positive multiple "
                              f"of {unit} (spatial_merge_size**2) for this vision model")
    rules = _rules(c)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if c.data.batch_size % shards:
        raise ConfigError(f"--config.data.batch_size={c.data.batch_size} must be a multiple of the mesh's data x fsdp "
                         f"size {shards} (--config.mesh.shape={tuple(c.mesh.shape)} on {jax.device_count()} devices)")
    try:
        keys = trainable_keys(params, c.train.trainable if isinstance(c.train.trainable, str)
                              else tuple(c.train.trainable))
    except ValueError as e:
        raise ConfigError(f"--config.train.trainable={c.train.trainable!r}: {e}") from None
    ocfg = OptimConfig(**{k: c.optim[k] for k in c.optim.keys()})
    try:
        optimizer = make_optimizer(ocfg, keys)
    except ValueError as e:  # an lr_scale pattern that matches no trainable param
        raise ConfigError(str(e)) from None
    abstract = jax.eval_shape(lambda: init_state(params, optimizer, keys))
    ssh = state_shardings(model_cfg, abstract, mesh, rules)

    ds, it, skip_stats = _batches(c, tokenizer, model_cfg)
    accum = c.train.accum_steps

    def next_local():
        try:
            return next(it) if accum == 1 else _stack([next(it) for _ in range(accum)])
        except StopIteration:
            raise DataExhaustedError(
                f"--config.data.train={c.data.train}: the data ran out before --config.train.steps="
                f"{c.train.steps} (--config.data.num_epochs={c.data.num_epochs}; 0 repeats forever)") from None

    def manager():
        return ocp.CheckpointManager(
            os.path.join(workdir, "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=c.checkpoint.keep, create=True,
                                                 enable_async_checkpointing=c.checkpoint.async_save),
            # handlers named up front so item_metadata can read a step before restoring it
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
        )

    mngr = manager()
    check_identity(workdir, run_identity(c, model_cfg, params), resuming=bool(mngr.all_steps()))
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, ssh)
    start, restored = _restore_newest_intact(mngr, target, workdir)
    if restored is not None and start != mngr.latest_step():
        mngr.close()
        mngr = manager()  # forget the steps moved aside
    if start is not None:
        state = restored["state"]
        it.set_state(restored["data"])
        log.info("resumed from step %d in %s", start, workdir)
    else:
        start = 0
        state = jax.device_put(init_state(params, optimizer, keys), ssh)
    del params

    step_fn = make_train_step(model_cfg, optimizer, keys, accum, c.train.skip_nonfinite, c.train.vocab_chunk,
                              mesh=mesh, rules=rules)
    first = next_local()
    bsh = batch_shardings(first, mesh, rules, accum=accum > 1)
    jitted = jax.jit(step_fn, in_shardings=(ssh, bsh), out_shardings=(ssh, None), donate_argnums=0)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    lr_at = make_schedule(ocfg)
    peak = peak_flops_per_device(c.train.peak_tflops)
    preempt = _Preemption()
    metrics: dict[str, Any] = {}
    skipped = steps_run = 0
    bar = tqdm.tqdm(total=c.train.steps, initial=start, desc="train", unit="step",
                    disable=jax.process_index() != 0, dynamic_ncols=True)
    local = first
    try:
        for step in range(start, c.train.steps):
            t0 = time.time()
            state, m = jitted(state, to_global(local, bsh))
            m = jax.device_get(m)
            dt = time.time() - t0
            steps_run += 1
            diverged = None
            if not bool(m["finite"]):
                if not c.train.skip_nonfinite:
                    raise NonFiniteError(
                        f"step {step}: non-finite loss {float(m['loss'])} or grad norm {float(m['grad_norm'])}; "
                        f"the last good checkpoint is step {mngr.latest_step()} in {workdir}/checkpoints "
                        "(set --config.train.skip_nonfinite=true to skip such steps)")
                skipped += 1
                log.warning("step %d: non-finite loss, update skipped (%d so far)", step, skipped)
                if skipped > max(1.0, c.train.max_skipped_fraction * steps_run):
                    diverged = NonFiniteError(
                        f"step {step}: {skipped} of the {steps_run} steps run so far had a non-finite loss or "
                        f"gradient, more than --config.train.max_skipped_fraction={c.train.max_skipped_fraction}: "
                        f"the run is diverging (--config.optim.lr={c.optim.lr}). Nothing was exported; the last "
                        f"good checkpoint is step {mngr.latest_step()} in {workdir}/checkpoints")
            tokens = int(m["tokens"])
            flops = train_flops(model_cfg, local, accum)
            metrics = {"step": step + 1, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                       "lr": float(lr_at(step)), "tokens_per_s": tokens / dt,
                       "model_tflops_per_s": flops / dt / 1e12, "skipped": skipped,
                       "records_skipped": skip_stats.total}
            if peak:
                metrics["mfu"] = flops / dt / (peak * jax.device_count())
            writer.write(step + 1, metrics)
            if diverged is not None:
                raise diverged
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            bar.update(1)
            done = step + 1 == c.train.steps
            if (step + 1) % c.checkpoint.save_every == 0 or done or preempt.requested:
                check_finite(state["params"], f"step {step + 1}: not saving the checkpoint")
                mngr.save(step + 1, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            data=ocp.args.JsonSave(it.get_state())),
                          force=True)
            if preempt.requested:
                mngr.wait_until_finished()
                log.warning("saved step %d after SIGTERM; exiting", step + 1)
                raise SystemExit(143)
            if not done:
                local = next_local()
    finally:
        bar.close()
        preempt.restore()
        mngr.wait_until_finished()
        writer.close()
    if c.export_hf and jax.process_index() == 0:
        params = jax.device_get(state["params"])
        check_finite(params, f"not exporting to --config.export_hf={c.export_hf}")
        ckpt_io.save_hf(params, model_cfg, raw, c.export_hf, side_files_from=c.model.init_checkpoint,
                        dtype=jnp.dtype(c.export_dtype) if c.export_dtype else None, overwrite=c.overwrite)
    return metrics


def _restore_newest_intact(mngr, target, workdir: str) -> tuple[int | None, Any]:
    """(step, restored items) of the newest step that restores; (None, None) for a fresh workdir.

    A step whose files cannot be read is moved to ``checkpoints_unreadable/``
    (kept for inspection, out of the manager's way so the run can save that
    step number again). A step that reads but does not match the model is a
    ResumeError, not something to fall back from.
    """
    failures: list[tuple[int, str]] = []
    for step in sorted(mngr.all_steps(), reverse=True):
        where = os.path.join(workdir, "checkpoints", str(step))
        try:
            saved = mngr.item_metadata(step)["state"]
            if saved is None:
                raise FileNotFoundError("no train-state metadata")
        except Exception as e:  # noqa: BLE001 - any unreadable metadata means this step is damaged
            saved, err = None, e
        if saved is not None:
            check_state_shapes(saved["params"], target["params"], where)
            try:
                restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                      data=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - truncated/corrupt files surface as many error types
                err = e
            else:
                for bad, why in failures:
                    log.warning("checkpoint step %d in %s/checkpoints could not be restored (%s); resumed from "
                                "step %d instead", bad, workdir, why, step)
                _move_aside(workdir, [b for b, _ in failures])
                return step, restored
        why = _reason(err)
        log.warning("checkpoint step %d in %s cannot be restored (%s); trying the previous step", step, where, why)
        failures.append((step, why))
    if failures:
        raise ResumeError(f"{workdir}/checkpoints: no saved step can be restored: "
                          + "; ".join(f"step {s}: {w}" for s, w in failures)
                          + ". Move the checkpoints away to start from --config.model.init_checkpoint again.")
    return None, None


def _reason(err: BaseException) -> str:
    """One line for a failed restore: the TensorStore status when there is one (OUT_OF_RANGE, DATA_LOSS...)."""
    text = " ".join(str(e) for e in (err, err.__cause__, err.__context__) if e is not None)
    m = re.search(r"\b(OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|INVALID_ARGUMENT|FAILED_PRECONDITION|UNKNOWN)\b[^\n]{0,160}", text)
    first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
    return f"{type(err).__name__}: {m.group(0) if m else first}"


def _move_aside(workdir: str, steps: list[int]) -> None:
    if not steps:
        return
    if jax.process_index() == 0:
        dest = os.path.join(workdir, "checkpoints_unreadable")
        os.makedirs(dest, exist_ok=True)
        for step in steps:
            target = os.path.join(dest, f"{step}-{int(time.time())}")
            shutil.move(os.path.join(workdir, "checkpoints", str(step)), target)
            log.warning("moved unreadable checkpoint step %d to %s", step, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("viscodex_jax: unreadable checkpoints moved")


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The per-step metrics a run logged (the latest value per step when a run resumed)."""
    path = os.path.join(workdir, "metrics.jsonl")
    by_step: dict[int, dict[str, Any]] = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    by_step[r["step"]] = r
    return [by_step[k] for k in sorted(by_step)]
