#!/usr/bin/env bash
# Copy this checkout to every worker of the slice and install it with JAX for TPU.
# Usage: launch/tpu/setup.sh            (run from the repository root)
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
. "$(dirname "$0")/common.sh"

cd "$(dirname "$0")/../.."
archive=$(mktemp /tmp/sgalm_jax.XXXXXX.tar.gz)
trap 'rm -f "$archive"' EXIT
git ls-files -z | tar --null -czf "$archive" -T -   # tracked files only: no venv, no runs

gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":/tmp/sgalm_jax.tar.gz \
  --zone="$ZONE" --project="$PROJECT" --worker=all
on_all_workers "set -e
  mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/sgalm_jax.tar.gz -C ~/$REMOTE_DIR
  cd ~/$REMOTE_DIR
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q --upgrade pip
  pip install -q -e '.[tpu]'
  python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
