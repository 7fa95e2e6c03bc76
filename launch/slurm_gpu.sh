#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one task per node, 8 GPUs each; jax.distributed.initialize()
# reads the SLURM environment. Submit from the checkout (set up once with launch/setup_env.sh, then
# `.venv/bin/pip install -U "jax[cuda12]"`):
#
#   sbatch --nodes=2 launch/slurm_gpu.sh --config=configs/viscodex_33b.py:gpu8 \
#     --config.mesh.shape='(1,8,2)' --config.model.init_checkpoint=/ckpt/viscodex-33b-merged \
#     --config.data.train=/data/mcd_tfds --config.workdir=/ckpt/viscodex-33b-sft
#SBATCH --job-name=viscodex-sft
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
srun --kill-on-bad-exit=1 .venv/bin/python launch/train.py "$@" --config.distributed=true
