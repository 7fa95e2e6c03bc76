#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: copies this checkout to every worker, sets it up with TPU jax,
# and starts the same command on all workers (jax.distributed.initialize() finds the slice itself).
#
#   TPU_NAME=viscodex-v5p-128 ZONE=us-east5-a bash launch/tpu_pod.sh \
#     --config=configs/viscodex_8b.py:tpu --config.model.init_checkpoint=/mnt/ckpt/viscodex-8b-merged \
#     --config.data.train=/mnt/data/mcd_tfds --config.workdir=gs://bucket/viscodex-8b-sft
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_ARGS=${PROJECT:+--project=$PROJECT}
DEST=${DEST:-viscodex_jax}
git archive --format=tar.gz -o /tmp/viscodex_jax.tgz HEAD
gcloud compute tpus tpu-vm scp /tmp/viscodex_jax.tgz "$TPU_NAME":/tmp/ --zone "$ZONE" --worker=all $PROJECT_ARGS
ARGS=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all $PROJECT_ARGS --command "
  set -e; mkdir -p ~/$DEST && tar -xzf /tmp/viscodex_jax.tgz -C ~/$DEST && cd ~/$DEST &&
  bash launch/setup_env.sh && .venv/bin/pip install -q -U 'jax[tpu]' &&
  .venv/bin/python launch/train.py $ARGS --config.distributed=true"
