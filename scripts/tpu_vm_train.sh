#!/usr/bin/env bash
# Run flax-gpt on every worker of a Cloud TPU VM (single host or pod slice). JAX finds the other
# workers by itself (jax.distributed.initialize() auto-detects Cloud TPU), so every worker runs the
# same command.
#   REPO=<git url> TPU_NAME=my-v4-32 ZONE=us-central2-b scripts/tpu_vm_train.sh configs/distilgpt2_arxiv.yaml [overrides...]
# Put train.run_dir and data.shards_dir on storage every worker sees (e.g. a gs:// bucket mounted
# with gcsfuse, or an NFS/Filestore path) so checkpoints from all hosts land in one place.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
: "${REPO:?set REPO to the git URL of your flax_gpt clone}"
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d flax_gpt ] || git clone $REPO flax_gpt
  cd flax_gpt && python3 -m pip install -q -e '.[tpu]'
  flax-gpt train$args --distributed
"
