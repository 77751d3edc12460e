"""SFT baseline: Qwen2.5-3B-Instruct on GSM8K's train split (7,473 worked solutions), chat format.

Set the checkpoint and data locations on the command line, e.g. on a TPU v5p-8 / v4-8 or one
80 GB GPU (bf16 compute over fp32 master weights, FSDP over every device):

    python -m sgalm_jax.main --config configs/sft_qwen3b_gsm8k.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct \
        --config.data.data_dir=/data/gsm8k \
        --config.workdir=runs/sft_qwen3b_gsm8k

3 epochs at batch 64: 7473 // 64 = 116 steps per epoch.

Compiled for a TPU v5e-8 (``--compile-only=v5e-8``; GiB per chip): the train step (64 x 512) takes
4.31 (fp32 weights + AdamW state) + 5.24 temporaries = 9.55 GiB peak of 16.
"""

from sgalm_jax.algorithms import base_config


def get_config():
    config = base_config()
    config.algorithm = "sft"
    config.model.path = ""  # required: an HF directory of Qwen2.5-3B(-Instruct)
    config.model.architecture = "qwen2.5-3b"  # its shape, for --compile-only without it
    config.model.dtype = "bfloat16"  # compute
    config.model.param_dtype = "float32"  # master weights
    config.model.remat = "full"
    config.data.task = "gsm8k"
    config.data.split = "train"
    config.data.data_dir = ""  # '' = the task's default source (hub openai/gsm8k)
    config.data.chat_template = True
    config.data.max_length = 512
    config.data.min_bucket = 256
    config.sft.logits_chunk_size = 128  # vocab 151,936: never hold [B, 512, vocab] fp32 logits
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-5
    config.optimizer.weight_decay = 0.0
    config.optimizer.warmup_steps = 10
    config.optimizer.schedule = "cosine"
    config.optimizer.end_lr_factor = 0.1
    config.optimizer.max_grad_norm = 1.0
    config.train.batch_size = 64
    config.train.grad_accum_steps = 1
    config.train.num_steps = 348  # 3 epochs
    config.train.log_every = 5
    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.tensor = 1
    config.checkpoint.every_steps = 100
    config.checkpoint.keep = 2
    config.checkpoint.export_dtype = "bfloat16"
    return config
