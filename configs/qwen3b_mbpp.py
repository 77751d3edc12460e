"""SGALM on MBPP with Qwen2.5-3B-Instruct (same recipe as configs/qwen3b_gsm8k.py).

    python -m sgalm_jax.main --config configs/qwen3b_mbpp.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct \
        --config.data.data_dir=/data/mbpp/mbpp.jsonl --config.workdir=runs/sgalm_qwen3b_mbpp

A sample is the MBPP prompt (description + 3 asserts) with its code. The validity of generated
samples is "the sample's code passes the sample's own asserts", run in the sandbox (each
iteration runs ~350 programs in parallel subprocesses: seconds).
Samples are ~250 Qwen tokens, so 4 demos + a new sample need ~1,500 tokens: max_length 2048 and a
batch of 32. Compiled for a TPU v5e-8 (``--compile-only=v5e-8``, largest shapes; GiB per chip,
peak): D step (32 x 2048) 9.46, G step (16 x 2048) 7.72, D scorer 4.24, sampler prefill (64 prompts
x 2048, cache 2560) 12.77, decode 5.86: all fit 16 GiB (80% at most).

Schedule: the train split (task ids 601-974) has 374 problems: 342 real samples after 32 held out;
N = 342 generated per iteration, 310 train D: ceil(310 / 16) = 20 rounds x 2 updates = 40 updates
per iteration, 160 in all.
"""

from sgalm_jax.config import load_config_file


def get_config():
    config = load_config_file("qwen3b_gsm8k.py", __file__)
    config.data.task = "mbpp"
    config.data.max_length = 2048
    s = config.sgalm
    s.heldout_size = 32
    s.score_batch_size = 32
    s.final_samples = 256
    config.optimizer.warmup_steps = 16  # 10%
    config.train.batch_size = 32
    config.train.log_every = 1
    config.checkpoint.every_steps = 40
    config.eval.tasks = "mbpp"
    return config
