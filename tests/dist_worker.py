"""One process of a (possibly multi-process) train step; prints the loss and grad norm as JSON.

argv: <hf checkpoint> <num_processes> <process_id> <port> <local_devices>
"""

import json
import os
import sys

ckpt, nproc, pid, port, ndev = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"

import jax  # noqa: E402
import numpy as np  # noqa: E402

if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)

from viscodex_jax.checkpoint import load_hf_params  # noqa: E402
from viscodex_jax.sharding import DEFAULT_RULES, make_mesh  # noqa: E402
from viscodex_jax.train.loop import to_global  # noqa: E402
from viscodex_jax.train.step import (OptimConfig, batch_shardings, init_state, make_optimizer,  # noqa: E402
                                     make_train_step, state_shardings, trainable_keys)

cfg, params = load_hf_params(ckpt)
rng = np.random.default_rng(0)
B, T = 8, 24
ids = rng.integers(0, 300, (B, T)).astype(np.int32)
batch = {"input_ids": ids, "labels": ids.copy(), "segment_ids": np.ones_like(ids),
         "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}
rows = slice(pid * B // nproc, (pid + 1) * B // nproc)
local = {k: v[rows] for k, v in batch.items()}
mesh = make_mesh((-1, 2, 1))
keys = trainable_keys(params, "llm")
opt = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=1), keys)
abstract = jax.eval_shape(lambda: init_state(params, opt, keys))
ssh = state_shardings(cfg, abstract, mesh, DEFAULT_RULES)
bsh = batch_shardings(local, mesh, DEFAULT_RULES)
state = jax.jit(lambda: init_state(params, opt, keys), out_shardings=ssh)()
step = jax.jit(make_train_step(cfg, opt, keys, vocab_chunk=128), in_shardings=(ssh, bsh), out_shardings=(ssh, None))
out = []
for _ in range(2):
    state, m = step(state, to_global(local, bsh))
    out.append({"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"])})
print("RESULT " + json.dumps({"devices": jax.device_count(), "processes": jax.process_count(), "steps": out}))
