"""SPIN baseline of SGALM's table: Qwen2.5-3B on GSM8K's train split (7,473 prompts), 3 iterations.

Iteration t: one response per training question from the frozen θ_t (temperature 1, top-p 1, at
most 256 tokens, as SPIN's vLLM path), reference log-probs of real and synthetic answers computed
once, then 2 epochs of SPIN's loss (β = 0.1, logistic) from θ_t with RMSProp at 5e-7 (5e-7, 5e-7,
1e-7: the paper's decay across iterations), linear decay after 25 warm-up steps (~10% of an
iteration), global batch 64 pairs. From iteration 1 on, the previous iteration's synthetic answers
are mixed in (SPIN's protocol: 2 x 7,473 rows). After every iteration the model is evaluated on
GSM8K, ARC-Challenge and MBPP (chat prompts, greedy), written to ``workdir/eval/iter_NNN/``.

θ_0 is the model SPIN starts from: an SFT model (e.g. ``runs/sft_qwen3b_gsm8k/export`` from
``configs/sft_qwen3b_gsm8k.py``) or Qwen2.5-3B-Instruct::

    python -m sgalm_jax.main --config configs/spin_qwen3b_gsm8k.py \
        --config.model.path=runs/sft_qwen3b_gsm8k/export \
        --config.data.data_dir=/data/gsm8k --config.eval.data_dir=/data \
        --config.workdir=runs/spin_qwen3b_gsm8k

Mesh and batch (bf16 compute over fp32 master weights, full remat; states ~37 GB in all):

| hardware | mesh | train.grad_accum_steps | micro-batch (pairs) |
|---|---|---|---|
| TPU v4-8 / v5p-8 (4 chips) | fsdp=4 (default -1) | 1 | 64 |
| TPU v5e-8 (8 x 16 GB) | fsdp=8 | 2 | 32 |
| 8 x 80 GB GPU (A100/H100) | fsdp=8 | 1 | 64 |
| 1 x 80 GB GPU | fsdp=1 | 8 | 8 |

(``--config.train.grad_accum_steps=8`` on one GPU.) Generation: 256 prompts per chunk.

Compiled for the v5e-8 row (``--compile-only=v5e-8 --config.train.grad_accum_steps=2``; GiB per
chip, peak): train step (64 pairs x 512) 10.88, reference scorer 5.07, sampler prefill (256 prompts
x 256, cache 512) 6.07, decode 5.49: all fit 16 GiB (68% at most).
"""

from sgalm_jax.algorithms import base_config


def get_config():
    config = base_config()
    config.algorithm = "selfplay"
    config.model.path = ""  # required: θ_0 (an HF checkpoint directory)
    config.model.architecture = "qwen2.5-3b"  # its shape, for --compile-only without it
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat = "full"
    config.data.task = "gsm8k"
    config.data.split = "train"
    config.data.data_dir = ""  # '' = hub openai/gsm8k
    config.data.chat_template = True
    config.data.max_length = 512
    config.data.min_bucket = 256

    sp = config.selfplay
    sp.loss = "spin"
    sp.beta = 0.1
    sp.loss_kwargs = {"loss_type": "sigmoid"}
    sp.iterations = 3
    sp.epochs_per_iteration = 2.0
    sp.lr_per_iteration = "5e-7,5e-7,1e-7"
    sp.mix_previous = True
    sp.num_samples = 1
    sp.max_prompt_length = 256
    sp.max_new_tokens = 256
    sp.temperature = 1.0
    sp.top_p = 1.0
    sp.generation_batch_size = 256
    sp.ref_batch_size = 64
    sp.logprob_chunk_size = 128
    sp.eval_every = 1
    sp.eval_at_start = True

    config.eval.tasks = "gsm8k,arc,mbpp"
    config.eval.chat = True
    config.eval.k_shot = 0
    config.eval.max_new_tokens = 512
    config.eval.batch_size = 64

    config.optimizer.name = "rmsprop"  # torch RMSprop(alpha=0.99, eps=1e-8), as SPIN
    config.optimizer.learning_rate = 5e-7
    config.optimizer.rmsprop_decay = 0.99
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.0
    config.optimizer.schedule = "linear"
    config.optimizer.warmup_steps = 25
    config.optimizer.end_lr_factor = 0.0
    config.optimizer.max_grad_norm = 1.0
    config.train.batch_size = 64  # pairs (real + synthetic) per step
    config.train.grad_accum_steps = 1
    config.train.log_every = 5
    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.tensor = 1
    config.checkpoint.every_steps = 100
    config.checkpoint.keep = 2
    config.checkpoint.export_dtype = "bfloat16"
    config.seed = 42
    return config
