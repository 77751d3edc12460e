"""SGALM on a tiny random Qwen2-shaped model and the offline arithmetic task (tests; seconds on CPU).

    python -m sgalm_jax.main --config configs/sgalm_tiny.py --config.workdir=/tmp/sgalm_tiny

The model is random, so its samples are noise and D separates them at once; the point is that the
whole loop (sampling, D and G steps, diagnostics, checkpoints, resume, export) runs.
"""

from sgalm_jax.algorithms import base_config


def get_config():
    config = base_config()
    config.algorithm = "sgalm"
    config.model.init = "tiny-qwen2"  # vocab 512, hidden 64, 2 layers
    config.tokenizer.path = "builtin:tiny"
    config.data.task = "arithmetic"
    config.data.max_examples = 64
    config.data.max_length = 256
    config.sgalm.task_options = {"min_steps": 1, "max_steps": 1, "max_value": 30}
    config.sgalm.iterations = 2
    config.sgalm.num_samples = 16
    config.sgalm.num_shots = 1
    config.sgalm.heldout_size = 8
    config.sgalm.max_new_tokens = 32
    config.sgalm.rounds_per_iteration = 2
    config.sgalm.sample_batch_size = 16
    config.sgalm.score_batch_size = 16
    config.sgalm.length_bucket = 64
    config.sgalm.final_samples = 8
    config.optimizer.name = "rmsprop"
    config.optimizer.learning_rate = 1e-3
    config.train.batch_size = 8
    config.checkpoint.every_steps = 2
    config.checkpoint.keep = 2
    config.metrics.progress_bar = False
    return config
