# Shared settings of the Cloud TPU VM scripts. Override any of them in the environment.
# shellcheck shell=bash
: "${TPU_NAME:=sgalm-tpu}"                  # the TPU VM (pod slice) name
: "${ZONE:=us-central2-b}"                  # a zone that has the accelerator type
: "${ACCELERATOR_TYPE:=v4-32}"              # v4-32 = 4 hosts x 4 chips; v5p-32, v6e-16, v5litepod-16, ...
: "${RUNTIME_VERSION:=tpu-ubuntu2204-base}" # TPU VM image (v5e/v6e: v2-alpha-tpuv5-lite / v2-alpha-tpuv6e)
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${REMOTE_DIR:=sgalm_jax}"                # checkout location on every worker (relative to $HOME)

# Run one shell command on every worker of the slice, in parallel.
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --worker=all --command="$1"
}
