"""Self-play (SPIN loss) on a tiny random Qwen2-shaped model and the offline arithmetic task.

No download; a minute or two on a CPU. Used by the tests (with smaller overrides):

    python -m sgalm_jax.main --config configs/selfplay_tiny.py --config.workdir=/tmp/selfplay_tiny

Other losses: ``--config.selfplay.loss=iris --config.selfplay.alpha_schedule=adaptive``,
``--config.selfplay.loss=space``, ``--config.selfplay.loss=spif``.
"""

from sgalm_jax.algorithms import base_config


def get_config():
    config = base_config()
    config.algorithm = "selfplay"
    config.model.init = "tiny-qwen2"  # random init: vocab 512, hidden 64, 2 layers
    config.tokenizer.path = "builtin:tiny"
    config.data.task = "arithmetic"  # GSM8K-format problems generated offline
    config.data.max_examples = 32
    config.data.max_length = 256
    config.data.min_bucket = 64
    config.selfplay.loss = "spin"
    config.selfplay.iterations = 2
    config.selfplay.epochs_per_iteration = 2.0
    config.selfplay.mix_previous = True
    config.selfplay.num_samples = 1
    config.selfplay.max_prompt_length = 128
    config.selfplay.max_new_tokens = 64
    config.selfplay.temperature = 1.0
    config.selfplay.generation_batch_size = 16
    config.selfplay.ref_batch_size = 16
    config.selfplay.logprob_chunk_size = 64
    config.selfplay.eval_every = 1
    config.eval.tasks = "arithmetic"  # offline; use gsm8k,arc,mbpp with eval.data_dir for real data
    config.eval.max_examples = 8
    config.eval.max_new_tokens = 32
    config.eval.batch_size = 8
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    config.train.batch_size = 8
    config.train.log_every = 1
    config.checkpoint.every_steps = 4
    config.checkpoint.keep = 2
    return config
