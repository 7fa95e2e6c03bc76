"""The training config schema with defaults; ``configs/*.py`` start from it and override."""

from __future__ import annotations

import ml_collections

from viscodex_jax.sharding import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/train"
    c.distributed = False  # jax.distributed.initialize() (multi-host: TPU pods, SLURM)
    c.export_hf = ""  # write the final params as a HF checkpoint here
    c.export_dtype = "bfloat16"

    c.model = ml_collections.ConfigDict()
    c.model.init_checkpoint = ""  # HF dir or our orbax dir (the merged model)
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"  # compute dtype
    c.model.attention_impl = "xla"
    c.model.remat_policy = "none"  # none | full | dots | dots_no_batch

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # MCD json/jsonl, or a prepared TFDS dir
    c.data.max_len = 4096
    c.data.batch_size = 8  # global rows per step (per micro-step with accumulation)
    c.data.patches_per_row = 4096
    c.data.seed = 0
    c.data.num_epochs = 0  # 0: repeat forever (the step count decides)
    c.data.on_error = "skip"  # or "raise"
    c.data.worker_count = 0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.accum_steps = 1
    c.train.trainable = "llm"  # llm (paper: vision tower + merger frozen) | llm+merger | all
    c.train.skip_nonfinite = False
    c.train.vocab_chunk = 8192
    c.train.peak_tflops = 0.0  # per device, for MFU; 0: known devices only

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 100
    c.optim.total_steps = 1000
    c.optim.end_lr_ratio = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    c.mesh.rules = [list(r) for r in DEFAULT_RULES]

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.save_every = 500
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    return c
