"""Evaluate a checkpoint on ARC-Challenge (test, 1,172 questions) by log-likelihood: acc, acc_norm.

    python -m sgalm_jax.main --config configs/eval_arc.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct --config.workdir=runs/eval_qwen3b_arc

As lm-evaluation-harness ``arc_challenge``: context ``Question: ...\\nAnswer:``, each choice scored as
the continuation ``" " + choice``; ``acc_norm`` divides by the choice's length in characters. The
Open LLM Leaderboard uses 25 demonstrations (``--config.eval.k_shot=25``). Generation mode (the model
writes the letter): ``--config.eval.arc_mode=generate``. ``model.path`` may be a run directory.
Offline data: ``--config.eval.data_dir=../shared/data``.

Mesh: the batch is sharded over every device; 3B in bf16 fits one 80 GB GPU or a TPU chip.
"""

from sgalm_jax.config import load_config_file


def get_config():
    config = load_config_file("eval_gsm8k.py", __file__)
    config.eval.tasks = "arc"
    config.eval.arc_mode = "loglik"
    config.eval.k_shot = 0
    config.eval.max_new_tokens = 8  # generation mode only
    config.eval.batch_size = 32  # (context, choice) requests per forward in loglik mode
    return config
