"""SFT of a tiny random Qwen2-shaped model on the offline arithmetic task: no download, a minute on CPU.

    python -m sgalm_jax.main --config configs/sft_tiny.py --config.workdir=/tmp/sft_tiny
"""

from sgalm_jax.algorithms import base_config


def get_config():
    config = base_config()
    config.algorithm = "sft"
    config.workdir = ""  # runs/sft unless set
    config.model.init = "tiny-qwen2"  # random init, vocab 512, hidden 64, 2 layers
    config.tokenizer.path = "builtin:tiny"  # byte-level BPE built offline (512 tokens)
    config.data.task = "arithmetic"  # procedurally generated GSM8K-style problems
    config.data.max_examples = 256
    config.data.max_length = 256
    config.data.min_bucket = 64
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 5
    config.optimizer.schedule = "cosine"
    config.optimizer.end_lr_factor = 0.1
    config.train.num_steps = 40
    config.train.batch_size = 8
    config.train.log_every = 1
    config.checkpoint.every_steps = 20
    config.checkpoint.keep = 2
    return config
