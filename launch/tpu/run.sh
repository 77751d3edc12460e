#!/usr/bin/env bash
# Run the same training command on every worker of the slice (what multi-host JAX needs).
# Usage: launch/tpu/run.sh --config configs/sft_qwen3b_gsm8k.py --config.model.path=... --config.workdir=...
#
# Every process calls jax.distributed.initialize() (config distributed.mode=auto detects the TPU
# slice), builds the global mesh over all chips, and reads its own share of each batch. The
# workdir must be storage every worker sees (a gcsfuse mount or Filestore/NFS path); process 0
# writes config.json, metrics and the export, all processes write their checkpoint shards.
# Logs of each worker go to /tmp/sgalm_jax.log on that worker (also streamed here).
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
. "$(dirname "$0")/common.sh"

args=$(printf ' %q' "$@")
on_all_workers "cd ~/$REMOTE_DIR && . .venv/bin/activate && \
  python -m sgalm_jax.main$args 2>&1 | tee /tmp/sgalm_jax.log"
