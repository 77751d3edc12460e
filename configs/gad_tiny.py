"""GAD on a tiny random Qwen2-shaped model and the offline arithmetic task (tests; seconds on CPU).

    # warmup stage, then the GAD stage from its last checkpoint
    python -m sgalm_jax.main --config configs/gad_tiny.py --config.workdir=/tmp/gad_tiny_warmup
    python -m sgalm_jax.main --config configs/gad_tiny.py --config.workdir=/tmp/gad_tiny \\
        --config.gad.stage=gad --config.gad.warmup_dir=/tmp/gad_tiny_warmup

The teacher's responses are the arithmetic task's worked solutions (its own solver wrote them); the
student and the discriminator start from the same random ``tiny-qwen2`` weights (the
discriminator with a fresh scalar head). The model is random, so nothing is learned that matters:
the point is that the whole loop runs (rollouts, the discriminator's scoring and Bradley-Terry
steps, SFT or GRPO steps of the student, checkpoints, evaluation, resume, both exports).
"""

from sgalm_jax.algorithms import base_config


def get_config():
    config = base_config()
    config.algorithm = "gad"
    config.model.init = "tiny-qwen2"  # vocab 512, hidden 64, 2 layers
    config.tokenizer.path = "builtin:tiny"
    config.data.task = "arithmetic"  # prompts + worked solutions (the teacher)
    config.data.max_examples = 64
    config.data.max_length = 128
    config.data.min_bucket = 128  # one padded length for every batch: one compile each
    d = config.distill
    d.max_prompt_tokens = 96
    d.max_response_tokens = 32
    d.prompt_truncation = "left"  # keep the question's end and "Answer:"
    g = config.gad
    g.stage = "warmup"
    g.d_only_steps = 1
    g.num_generations = 4
    g.temperature = 0.8
    g.beta = 1e-3
    g.clip_eps = 0.2
    g.loss_type = "dapo"
    g.logprob_chunk_size = 64
    g.eval_examples = 8
    g.eval_split = "test"
    g.log_samples = 0
    # The paper's optimizer (both roles): AdamW, weight decay 0.01, constant LR, clip 0.2; a
    # larger LR than its 1e-6 so that a few tiny steps move something.
    o = config.optimizer
    o.name = "adamw"
    o.learning_rate = 1e-3
    o.weight_decay = 0.01
    o.schedule = "constant"
    o.max_grad_norm = 0.2
    config.train.batch_size = 8  # responses per step: 2 prompts x 4
    config.train.num_steps = 4
    config.checkpoint.every_steps = 2
    config.checkpoint.keep = 2
    config.metrics.progress_bar = False
    return config
