#!/usr/bin/env bash
# Stop a running job on every worker (SIGTERM: each saves a checkpoint and exits), or delete the VM.
# Usage: launch/tpu/stop.sh            # preempt the job (resume later with the same run.sh command)
#        launch/tpu/stop.sh --delete   # delete the TPU VM
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
. "$(dirname "$0")/common.sh"

if [[ "${1:-}" == "--delete" ]]; then
  gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --quiet
else
  on_all_workers "pkill -TERM -f 'python -m sgalm_jax.main' || true"
fi
