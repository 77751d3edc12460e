#!/usr/bin/env bash
# Create a Cloud TPU VM pod slice. Usage: [TPU_NAME=... ZONE=... ACCELERATOR_TYPE=...] launch/tpu/create.sh [--spot]
# Extra arguments go to `gcloud compute tpus tpu-vm create` (e.g. --spot, --reserved, --network=...).
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
. "$(dirname "$0")/common.sh"

gcloud compute tpus tpu-vm create "$TPU_NAME" \
  --zone="$ZONE" --project="$PROJECT" \
  --accelerator-type="$ACCELERATOR_TYPE" \
  --version="$RUNTIME_VERSION" "$@"
gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
  --format="value(state,acceleratorType,networkEndpoints.len())"
