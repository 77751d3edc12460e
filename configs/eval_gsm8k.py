"""Evaluate a checkpoint on GSM8K (test, 1,319 problems): greedy, 5-shot, exact match.

    python -m sgalm_jax.main --config configs/eval_gsm8k.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct --config.workdir=runs/eval_qwen3b_gsm8k

``model.path`` may also be a run directory (its ``export/`` is evaluated). Offline data:
``--config.eval.data_dir=../shared/data`` (a directory with ``gsm8k/test.jsonl``). Instruct models:
``--config.eval.chat=true --config.eval.k_shot=0`` (the chat template and a "write #### <n>" turn).
Results: ``workdir/eval/gsm8k_summary.json``, ``gsm8k_examples.jsonl``, ``results.json``.

Mesh: evaluation shards the batch over every device (``mesh.fsdp=-1``). A 3B model in bf16 fits
one 80 GB GPU or any TPU v4/v5 chip; use ``eval.batch_size`` 64 there, 16-32 on smaller devices.
"""

from sgalm_jax.algorithms import base_config


def get_config():
    config = base_config()
    config.algorithm = "eval"
    config.model.path = ""  # required: an HF checkpoint or a run directory
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "bfloat16"
    config.eval.tasks = "gsm8k"
    config.eval.split = "test"
    config.eval.k_shot = 5  # lm-eval / Open LLM Leaderboard protocol
    config.eval.max_new_tokens = 512
    config.eval.temperature = 0.0
    config.eval.batch_size = 32
    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.tensor = 1
    return config
