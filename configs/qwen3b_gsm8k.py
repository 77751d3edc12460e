"""SGALM on GSM8K with Qwen2.5-3B-Instruct: 4-shot generation, 4 iterations, RMSProp (the paper's
setting; the hyperparameters the paper does not state are ours, see docs/sgalm.md).

    python -m sgalm_jax.main --config configs/qwen3b_gsm8k.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct \
        --config.data.data_dir=/data/gsm8k \
        --config.workdir=runs/sgalm_qwen3b_gsm8k

Hardware: a TPU v5e-8 (8 x 16 GB), a TPU v4-8 (4 chips x 32 GB) or one 80 GB GPU (A100/H100);
FSDP over every device (mesh.fsdp = -1). Compiled for v5e-8 (``--compile-only=v5e-8``, at the
largest shapes the config allows: D rows of 2,048 tokens, prompts of 2,047 tokens plus 512 new ones;
GiB per chip, peak = arguments + outputs - donated + temporaries + resident state):

| program | args | temp | peak |
|---|---:|---:|---:|
| D step (64 x 2048) | 2.88 | 10.58 | 13.46 |
| G step (32 x 2048) | 2.88 | 6.48 | 9.36 |
| D scorer (64 x 2048) | 1.44 | 2.03 | 4.90 |
| engine prefill (64 prompts x 2048) | 1.44 | 7.99 | 11.44 |
| engine decode, rows started in the loop (64 slots x 2560 cache, 64-prompt stash) | 2.71 | 3.01 | 7.16 |

(The continuous engine's programs, which the run samples with; with ``sampling.engine=static`` the
static sampler's prefill needs 12.77 and its decode 5.86.)

Every program fits (the largest uses 84% of a chip). fp32 master weights 1.44 GiB + RMSProp state
1.44 GiB per chip; splash attention, scanned layers with full remat, activations sharded over the
batch. (The figure this docstring gave before compiling, ~8 GB per chip, left out the temporaries.)

Schedule: 7,409 real samples after 64 held out; N = 7,409 generated per iteration, of which
7,345 train D (64 held out); one pass = ceil(7345 / 32) = 230 rounds of 1 D step (32 real + 32
generated) and 1 G step (32 generated): 460 updates per iteration, 1,840 in all.
"""

from sgalm_jax.algorithms import base_config


def get_config():
    config = base_config()
    config.algorithm = "sgalm"
    config.model.path = ""  # required: Qwen2.5-3B-Instruct in HF format
    config.model.architecture = "qwen2.5-3b"  # its shape, for --compile-only without it
    config.model.dtype = "bfloat16"  # compute
    config.model.param_dtype = "float32"  # master weights
    config.model.remat = "full"
    config.data.task = "gsm8k"
    config.data.split = "train"
    config.data.data_dir = ""  # '' = the hub (openai/gsm8k); or a directory with train/test.jsonl
    config.data.max_length = 1536  # 4 demos + the generated sample (GSM8K: ~200 tokens each)

    s = config.sgalm
    s.variant = "full"
    s.sample_format = "full"
    s.iterations = 4
    s.num_samples = 0  # = |real pool| per iteration
    s.num_shots = 4
    s.d_steps = 1
    s.g_steps = 1
    s.rounds_per_iteration = 0  # one pass over the generated samples
    s.heldout_size = 64
    s.max_new_tokens = 512
    s.temperature = 1.0
    s.top_p = 1.0
    s.sample_batch_size = 64
    s.score_batch_size = 64
    s.reward = "log_d"
    s.generator_loss = "score_function"
    s.advantage = "standardize"
    s.reward_params = "current"
    s.anchor_weight = 0.0
    s.length_bucket = 256
    s.logprob_chunk_size = 256
    s.final_samples = 512

    config.optimizer.name = "rmsprop"  # torch-style: decay 0.99, eps 1e-8 outside the sqrt
    config.optimizer.learning_rate = 1e-6
    config.optimizer.rmsprop_decay = 0.99
    config.optimizer.eps = 1e-8
    config.optimizer.schedule = "linear"
    config.optimizer.warmup_steps = 184  # 10% of the 1840 updates
    config.optimizer.end_lr_factor = 0.0
    config.optimizer.max_grad_norm = 1.0
    config.train.batch_size = 64  # D step: 32 real + 32 generated; G step: 32 generated
    config.train.grad_accum_steps = 1
    config.train.log_every = 5
    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.tensor = 1
    config.checkpoint.every_steps = 100
    config.checkpoint.keep = 2
    config.checkpoint.export_dtype = "bfloat16"
    config.eval.tasks = "gsm8k"  # python -m sgalm_jax.main --config configs/eval_*.py on export/
    return config
