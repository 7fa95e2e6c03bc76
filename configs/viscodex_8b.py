"""VisCodex-8B SFT: the merged Qwen2.5-VL-7B-sized model on MCD, vision tower and merger frozen.

Paper-adjacent settings (the paper publishes none; the authors' earlier configs used lr 1e-5 for
full fine-tuning, cosine, warmup ratio 0.1, 1 epoch, bf16, cutoff 4096).

    python launch/train.py --config=configs/viscodex_8b.py:gpu8 \
        --config.model.init_checkpoint=/ckpt/viscodex-8b-merged --config.data.train=/data/mcd_tfds \
        --config.workdir=/ckpt/viscodex-8b-sft

Presets (after the colon): gpu8 = one 8xH100 host (FSDP over 8); tpu = a v5p/v6e pod slice
(data x FSDP over all chips, set --config.distributed=true, launched with launch/tpu_pod.sh).
Memory (bf16 params, fp32 Adam moments on the 7.6B LLM): ~15 GB params + ~61 GB moments + grads,
sharded over the FSDP axis: ~12 GB per H100 plus activations (remat "dots" at 4096 tokens/row).
"""

from viscodex_jax.train.config import base_config

STEPS = 598_000 // 128  # one epoch of MCD at 128 rows of 4096 packed tokens


def get_config(preset: str = "gpu8"):
    c = base_config()
    c.model.param_dtype = "bfloat16"
    c.model.dtype = "bfloat16"
    c.model.attention_impl = "cudnn" if preset == "gpu8" else "xla"
    c.model.remat_policy = "dots"
    c.data.max_len = 4096
    c.data.patches_per_row = 16384
    c.data.worker_count = 8
    c.train.steps = STEPS
    c.train.vocab_chunk = 16384
    c.optim.lr = 1e-5
    c.optim.warmup_steps = STEPS // 10
    c.optim.total_steps = STEPS
    c.optim.weight_decay = 0.0
    c.checkpoint.save_every = 250
    if preset == "gpu8":
        c.mesh.shape = (1, 8, 1)
        c.data.batch_size = 16
        c.train.accum_steps = 8  # 128 rows per optimizer step
    elif preset == "tpu":
        c.distributed = True
        c.mesh.shape = (-1, 16, 1)  # data x fsdp over the slice (e.g. v5p-128: 4 x 16)
        c.data.batch_size = 128
    else:
        raise ValueError(f"preset {preset!r}: use gpu8 or tpu")
    return c
