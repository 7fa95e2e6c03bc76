"""The SFT loop: data -> sharded steps -> metrics -> orbax checkpoints (state + data iterator), resumable.

A run restarted with the same command resumes from the latest checkpoint,
data iterator included, so it sees exactly the batches it would have seen.
SIGTERM (TPU preemption) saves before exiting. A non-finite loss or gradient
stops the run naming the step, unless ``train.skip_nonfinite`` is set; the
bad state is never saved, so the last checkpoint stays good.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from viscodex_jax import checkpoint as ckpt_io
from viscodex_jax.sharding import make_mesh
from viscodex_jax.train.metrics import MetricWriter, peak_flops_per_device, train_flops
from viscodex_jax.train.step import (OptimConfig, batch_shardings, init_state, make_optimizer, make_schedule,
                                     make_train_step, state_shardings, trainable_keys)

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    pass


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


def _to_global(local: dict[str, Any], shardings: dict[str, Any]) -> dict[str, Any]:
    """Each process holds its rows of the global batch; assemble the global arrays."""
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), local, shardings)


def _batches(c, tokenizer, model_cfg) -> tuple[Any, Iterator]:
    from viscodex_jax.data.pipeline import PipelineConfig, make_dataset

    n_proc = jax.process_count()
    if c.data.batch_size % n_proc:
        raise ValueError(f"--config.data.batch_size={c.data.batch_size} must divide over {n_proc} processes")
    pc = PipelineConfig(batch_size=c.data.batch_size // n_proc, max_len=c.data.max_len,
                        patches_per_row=c.data.patches_per_row or None, seed=c.data.seed,
                        num_epochs=c.data.num_epochs or None, on_error=c.data.on_error,
                        worker_count=c.data.worker_count, drop_remainder=True)
    ds = make_dataset(c.data.train, tokenizer, model_cfg, pc)
    return ds, iter(ds)


def run_training(c) -> dict[str, Any]:
    """Runs (or resumes) the training described by config ``c``; returns the last metrics."""
    if c.distributed:
        jax.distributed.initialize()
    workdir = os.path.abspath(c.workdir)
    os.makedirs(workdir, exist_ok=True)
    runtime = dict(dtype=c.model.dtype, attention_impl=c.model.attention_impl, remat_policy=c.model.remat_policy)
    model_cfg, params, raw = ckpt_io.load_params(c.model.init_checkpoint, param_dtype=jnp.dtype(c.model.param_dtype),
                                                 **runtime)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(c.model.init_checkpoint)
    mesh = make_mesh(tuple(c.mesh.shape))
    rules = _rules(c)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if c.data.batch_size % shards:
        raise ValueError(f"--config.data.batch_size={c.data.batch_size} must be a multiple of the mesh's data x fsdp "
                         f"size {shards} (--config.mesh.shape={tuple(c.mesh.shape)} on {jax.device_count()} devices)")
    keys = trainable_keys(params, c.train.trainable if isinstance(c.train.trainable, str) else tuple(c.train.trainable))
    ocfg = OptimConfig(**{k: c.optim[k] for k in c.optim.keys()})
    optimizer = make_optimizer(ocfg, keys)
    abstract = jax.eval_shape(lambda: init_state(params, optimizer, keys))
    ssh = state_shardings(model_cfg, abstract, mesh, rules)

    ds, it = _batches(c, tokenizer, model_cfg)
    accum = c.train.accum_steps
    next_local = (lambda: next(it)) if accum == 1 else (lambda: _stack([next(it) for _ in range(accum)]))

    mngr = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=c.checkpoint.keep, create=True,
                                             enable_async_checkpointing=c.checkpoint.async_save),
        item_names=("state", "data"),
    )
    start = mngr.latest_step()
    if start is not None:
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, ssh)
        restored = mngr.restore(start, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                               data=ocp.args.JsonRestore()))
        state = restored["state"]
        it.set_state(restored["data"])
        log.info("resumed from step %d in %s", start, workdir)
    else:
        start = 0
        state = jax.device_put(init_state(params, optimizer, keys), ssh)
    del params

    step_fn = make_train_step(model_cfg, optimizer, keys, accum, c.train.skip_nonfinite, c.train.vocab_chunk)
    first = next_local()
    bsh = batch_shardings(first, mesh, rules, accum=accum > 1)
    jitted = jax.jit(step_fn, in_shardings=(ssh, bsh), out_shardings=(ssh, None), donate_argnums=0)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    lr_at = make_schedule(ocfg)
    peak = peak_flops_per_device(c.train.peak_tflops)
    preempt = _Preemption()
    metrics: dict[str, Any] = {}
    skipped = 0
    bar = tqdm.tqdm(total=c.train.steps, initial=start, desc="train", unit="step",
                    disable=jax.process_index() != 0, dynamic_ncols=True)
    local = first
    try:
        for step in range(start, c.train.steps):
            t0 = time.time()
            state, m = jitted(state, _to_global(local, bsh))
            m = jax.device_get(m)
            dt = time.time() - t0
            if not bool(m["finite"]):
                if not c.train.skip_nonfinite:
                    raise NonFiniteError(
                        f"step {step}: non-finite loss {float(m['loss'])} or grad norm {float(m['grad_norm'])}; "
                        f"the last good checkpoint is step {mngr.latest_step()} in {workdir}/checkpoints "
                        "(set --config.train.skip_nonfinite=true to skip such steps)")
                skipped += 1
                log.warning("step %d: non-finite loss, update skipped (%d so far)", step, skipped)
            tokens = int(m["tokens"])
            flops = train_flops(model_cfg, local, accum)
            metrics = {"step": step + 1, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                       "lr": float(lr_at(step)), "tokens_per_s": tokens / dt,
                       "model_tflops_per_s": flops / dt / 1e12, "skipped": skipped}
            if peak:
                metrics["mfu"] = flops / dt / (peak * jax.device_count())
            writer.write(step + 1, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            bar.update(1)
            done = step + 1 == c.train.steps
            if (step + 1) % c.checkpoint.save_every == 0 or done or preempt.requested:
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
        ckpt_io.save_hf(params, model_cfg, raw, c.export_hf, side_files_from=c.model.init_checkpoint,
                        dtype=jnp.dtype(c.export_dtype) if c.export_dtype else None, overwrite=True)
    return metrics


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
