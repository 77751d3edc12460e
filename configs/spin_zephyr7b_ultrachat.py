"""SPIN's original setting, for the record: zephyr-7b-sft-full on 50k UltraChat-200k first-turn
pairs, 4 iterations (uclaml/SPIN; algorithms.md §1.2-1.3).

β = 0.1 (the paper uses 5.0 at iteration 3: ``--config.selfplay.beta=5.0`` when resuming into it),
RMSProp, learning rate 5e-7, 5e-7, 1e-7, 1e-7, linear decay with 10% warm-up, global batch 64,
max length 1024 / prompt 512, synthetic responses of at most 256 tokens at temperature 1 (the vLLM
path), 2 epochs per iteration (the paper; the code's launch scripts run 6), previous iteration's
pairs mixed in from iteration 1. One deliberate departure: generation uses the same chat-template
prompt as training (SPIN generates from a ``### Instruction:`` format; issues #9, #33).

The checkpoint: ``alignment-handbook/zephyr-7b-sft-full`` at revision ``ac6e600e``
(``model_type: mistral``: Llama's tensors plus a 4,096-token sliding window, both supported by
``sgalm_jax.models`` and checked against transformers' ``MistralForCausalLM`` in tests).

    python -m sgalm_jax.main --config configs/spin_zephyr7b_ultrachat.py \
        --config.model.path=/models/zephyr-7b-sft-full \
        --config.data.data_dir=/data/ultrachat_200k --config.workdir=runs/spin_zephyr7b

Mesh and batch (bf16 compute over fp32 master weights and RMSProp state: ~85 GB of states, so
shard over at least 4 devices; full remat):

| hardware | mesh | train.grad_accum_steps | micro-batch (pairs) |
|---|---|---|---|
| 8 x 80 GB GPU (SPIN's 8 x A100) | fsdp=8 | 1 | 64 |
| TPU v4-16 / v5p-16 (8 chips) | fsdp=8 | 1 | 64 |
| TPU v5e-32 (32 x 16 GB) | fsdp=32 | 2 | 32 |
| 4 x 80 GB GPU | fsdp=4 | 2 | 32 |

Compiled for the v5e-32 row (``--compile-only=v5e-32 --config.train.grad_accum_steps=2``; GiB per
chip, peak): train step (64 pairs x 1,024) 6.89, reference scorer 2.11, sampler prefill (256
prompts x 512, cache 768) 3.77, decode 4.03 (43% at most: a v5e-16 may do; not compiled).
"""

from sgalm_jax.algorithms import base_config


def get_config():
    config = base_config()
    config.algorithm = "selfplay"
    config.model.path = ""  # required (see above)
    config.model.architecture = "mistral-7b"  # its shape, for --compile-only without it
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat = "full"
    config.data.task = "ultrachat"
    config.data.split = "train"
    config.data.data_dir = ""
    config.data.chat_template = True
    config.data.max_length = 1024
    config.data.min_bucket = 256

    sp = config.selfplay
    sp.loss = "spin"
    sp.beta = 0.1
    sp.first_turn = True
    sp.subset_size = 50000
    sp.subset_seed = 42
    sp.iterations = 4
    sp.epochs_per_iteration = 2.0
    sp.lr_per_iteration = "5e-7,5e-7,1e-7,1e-7"
    sp.mix_previous = True
    sp.num_samples = 1
    sp.max_prompt_length = 512
    sp.max_new_tokens = 256
    sp.temperature = 1.0
    sp.top_p = 1.0
    sp.generation_batch_size = 256
    sp.ref_batch_size = 32
    sp.logprob_chunk_size = 128
    sp.eval_every = 1
    sp.export_iterations = True  # SPIN released every iteration

    config.eval.tasks = "gsm8k,arc"  # SPIN's table is the Open LLM Leaderboard (lm-eval 0.4.0)
    config.eval.chat = False
    config.eval.k_shot = -1

    config.optimizer.name = "rmsprop"
    config.optimizer.learning_rate = 5e-7
    config.optimizer.weight_decay = 0.0
    config.optimizer.schedule = "linear"
    config.optimizer.warmup_steps = 156  # 10% of iteration 0 (1,562 steps)
    config.optimizer.max_grad_norm = 1.0
    config.train.batch_size = 64
    config.train.grad_accum_steps = 1
    config.train.log_every = 10
    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.tensor = 1
    config.checkpoint.every_steps = 200
    config.checkpoint.keep = 2
    config.checkpoint.export_dtype = "bfloat16"
    config.seed = 42
    return config
