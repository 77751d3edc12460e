"""SeqKD (SFT on the teacher's responses), GAD's baseline, with the tiny GAD setting.

    python -m sgalm_jax.main --config configs/seqkd_tiny.py --config.workdir=/tmp/seqkd_tiny

The ``sft`` algorithm with ``sft.distill = True``: the pairs are read and cut exactly as
``configs/gad_tiny.py`` reads them (the distill section), and the loss covers the teacher's
response and its end token.
"""

from sgalm_jax.algorithms import base_config


def get_config():
    config = base_config()
    config.algorithm = "sft"
    config.sft.distill = True
    config.model.init = "tiny-qwen2"
    config.tokenizer.path = "builtin:tiny"
    config.data.task = "arithmetic"
    config.data.max_examples = 64
    config.data.max_length = 128
    config.data.min_bucket = 128
    d = config.distill
    d.max_prompt_tokens = 96
    d.max_response_tokens = 32
    d.prompt_truncation = "left"
    o = config.optimizer
    o.name = "adamw"
    o.learning_rate = 1e-3
    o.weight_decay = 0.01
    o.schedule = "constant"
    o.max_grad_norm = 0.2
    config.train.batch_size = 2  # the teacher pairs of a GAD step's 2 prompts
    config.train.num_steps = 4
    config.checkpoint.every_steps = 2
    config.metrics.progress_bar = False
    return config
