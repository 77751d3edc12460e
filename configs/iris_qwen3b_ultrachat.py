"""IRIS on Qwen2.5-3B with UltraChat-200k first-turn pairs: a 50k subset, or 26k (the paper's
"26k annotated samples beat SFT on the full 200k" setting): ``--config.selfplay.subset_size=26000``.

**Reconstruction.** The IRIS loss, its adaptive α schedule and every hyper-parameter here are [INF]
(algorithms.md §4; docs/selfplay.md): the loss is the two-tilted-risk Rényi bound of
``sgalm_jax.losses.iris_loss``, α_t = 0.5 + 1.5·tanh(gap_t) from the reference likelihood gap,
β = 0.1 (SPIN's scale; with β = 1 the importance weights of summed log-probs collapse), and the
SPIN-family defaults otherwise (RMSProp 5e-7, batch 64, 2 epochs per iteration, 4 iterations).
Subsets are a prefix of one seeded permutation, so 14k ⊂ 26k ⊂ 50k as in SPIN / T-SPIN.

    python -m sgalm_jax.main --config configs/iris_qwen3b_ultrachat.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct \
        --config.data.data_dir=/data/ultrachat_200k --config.eval.data_dir=/data \
        --config.workdir=runs/iris_qwen3b_ultrachat

Mesh and batch (bf16 compute over fp32 master weights, full remat; 1,024-token rows):

| hardware | mesh | train.grad_accum_steps | micro-batch (pairs) |
|---|---|---|---|
| TPU v4-8 / v5p-8 (4 chips) | fsdp=4 (default -1) | 2 | 32 |
| TPU v5e-16 (16 x 16 GB) | fsdp=16 | 2 | 32 |
| 8 x 80 GB GPU (A100/H100) | fsdp=8 | 1 | 64 |
| 1 x 80 GB GPU | fsdp=1 | 16 | 4 |

IRIS pools its importance weights over each micro-batch, so grad_accum_steps > 1 changes the
estimator (smaller pools), unlike SPIN's per-pair loss; prefer more devices over accumulation.

Compiled for a TPU v5e-8 as set here (``--compile-only=v5e-8``: fsdp=8, grad_accum_steps 2; GiB
per chip, peak): train step (64 pairs x 1,024) 12.07, reference scorer 3.99, sampler prefill (256
prompts x 512, cache 768) 7.65, decode 6.14: so a v5e-8 is enough (75% at most).
"""

from sgalm_jax.algorithms import base_config


def get_config():
    config = base_config()
    config.algorithm = "selfplay"
    config.model.path = ""  # required: Qwen2.5-3B(-Instruct); base vs instruct not recovered
    config.model.architecture = "qwen2.5-3b"  # its shape, for --compile-only without it
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat = "full"
    config.data.task = "ultrachat"  # split train -> train_sft
    config.data.split = "train"
    config.data.data_dir = ""  # '' = hub HuggingFaceH4/ultrachat_200k
    config.data.chat_template = True
    config.data.max_length = 1024
    config.data.min_bucket = 256

    sp = config.selfplay
    sp.loss = "iris"
    sp.beta = 0.1
    sp.first_turn = True
    sp.subset_size = 50000  # 26000 for the 26k setting
    sp.subset_seed = 0
    sp.iterations = 4
    sp.epochs_per_iteration = 2.0
    sp.lr_per_iteration = "5e-7,5e-7,1e-7,1e-7"
    sp.mix_previous = True
    sp.num_samples = 1
    sp.max_prompt_length = 512
    sp.max_new_tokens = 256
    sp.temperature = 1.0
    sp.top_p = 1.0
    sp.alpha_schedule = "adaptive"
    sp.alpha_min = 0.5
    sp.alpha_max = 2.0
    sp.gap_scale = 1.0
    sp.gap = "likelihood"
    sp.generation_batch_size = 256
    sp.ref_batch_size = 32
    sp.logprob_chunk_size = 128
    sp.eval_every = 1

    config.eval.tasks = "gsm8k,arc"  # of IRIS's ten benchmarks, the ones sgalm_jax scores
    config.eval.chat = True
    config.eval.k_shot = 0
    config.eval.batch_size = 64

    config.optimizer.name = "rmsprop"
    config.optimizer.learning_rate = 5e-7
    config.optimizer.weight_decay = 0.0
    config.optimizer.schedule = "linear"
    config.optimizer.warmup_steps = 150  # ~10% of an iteration at 50k (1,562 steps)
    config.optimizer.max_grad_norm = 1.0
    config.train.batch_size = 64
    config.train.grad_accum_steps = 2
    config.train.log_every = 10
    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.tensor = 1
    config.checkpoint.every_steps = 200
    config.checkpoint.keep = 2
    config.checkpoint.export_dtype = "bfloat16"
    config.seed = 42
    return config
