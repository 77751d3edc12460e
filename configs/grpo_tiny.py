"""GRPO on a tiny random Qwen2-shaped model and the offline arithmetic task (tests; seconds on CPU).

    python -m sgalm_jax.main --config configs/grpo_tiny.py --config.workdir=/tmp/grpo_tiny

The model is random, so its answers are noise and the task's checker (``grpo.reward = correct``)
scores them 0: with a zero-spread group the advantage and the policy gradient are 0 (only the KL
term moves anything). The point is that the whole loop runs: sampling, rewards, the old and
reference log-prob passes, two mini-batches per rollout, the KL to the frozen start model,
checkpoints, resume and export. For a reward a random model can climb, name your own function,
e.g. ``--config.grpo.reward=tests.algorithms.grpo_rewards:low_token_fraction`` (the tests do).
"""

from sgalm_jax.algorithms import base_config


def get_config():
    config = base_config()
    config.algorithm = "grpo"
    config.model.init = "tiny-qwen2"  # vocab 512, hidden 64, 2 layers
    config.tokenizer.path = "builtin:tiny"
    config.data.task = "arithmetic"  # GSM8K-format problems generated offline
    config.data.max_examples = 64
    config.data.max_length = 256
    config.data.min_bucket = 128  # one padded length for every rollout: one compile
    g = config.grpo
    g.reward = "correct"
    g.num_generations = 4
    g.num_minibatches = 2  # rollout = 8 x 2 = 16 completions of 4 prompts; 2 updates each
    g.num_iterations = 1
    g.loss_type = "dapo"
    g.clip_eps = 0.2
    g.beta = 0.04
    g.temperature = 1.0
    g.max_new_tokens = 32
    g.max_prompt_length = 128
    g.logprob_chunk_size = 64
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.max_grad_norm = 1.0
    config.train.batch_size = 8  # completions per optimizer step
    config.train.num_steps = 8  # 4 rollouts
    config.checkpoint.every_steps = 4
    config.checkpoint.keep = 2
    config.metrics.progress_bar = False
    return config
