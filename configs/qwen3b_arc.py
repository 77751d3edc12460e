"""SGALM on ARC-Challenge with Qwen2.5-3B-Instruct (same recipe as configs/qwen3b_gsm8k.py).

    python -m sgalm_jax.main --config configs/qwen3b_arc.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct \
        --config.data.data_dir=/data/arc_challenge --config.workdir=runs/sgalm_qwen3b_arc

A sample is a question with its lettered choices and the answer letter (the task's ``mc`` style).
ARC has no checker for generated samples, so only well-formedness is reported (not validity).
Samples are short (~100 tokens), so sequences fit in 768 tokens and the batch doubles to 128.
Compiled for a TPU v5e-8 (``--compile-only=v5e-8``, largest shapes; GiB per chip, peak): D step
(128 x 1024) 13.46, G step (64 x 1024) 9.58, D scorer 4.90, sampler prefill (128 prompts x 1024,
cache 1280) 8.23, decode 5.86: all fit 16 GiB (84% at most).

Schedule: the hub train split has 1,119 questions (the offline copy 1,056): 1,055 real samples
after 64 held out, N = 1,055 generated per iteration of which 991 train D, ceil(991 / 64) = 16
rounds of 1 D step (64 real + 64 generated) and 1 G step: 32 updates per iteration, 128 in all.
"""

from sgalm_jax.config import load_config_file


def get_config():
    config = load_config_file("qwen3b_gsm8k.py", __file__)
    config.data.task = "arc_challenge"
    config.data.max_length = 768  # ARC samples are ~100 tokens
    s = config.sgalm
    s.max_new_tokens = 256
    s.sample_batch_size = 128
    s.score_batch_size = 128
    s.length_bucket = 128
    s.final_samples = 256
    config.optimizer.warmup_steps = 13  # 10% of the 128 updates
    config.train.batch_size = 128
    config.train.log_every = 1
    config.checkpoint.every_steps = 50
    config.eval.tasks = "arc"
    return config
