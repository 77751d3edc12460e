"""GAD with LoRA on an 8B student: Llama-3.1-8B-Instruct distilling GPT-5-Chat on LMSYS prompts,
sized for a TPU v5e-8 (8 x 16 GB, mesh.fsdp = 8, the default) or ONE 80 GB GPU (add
``--config.gad.d_grad_accum_steps=256``: one prompt group per discriminator micro-batch). The
settings of configs/gad_qwen3b_lmsys_lora.py (the paper's GAD recipe, rank-64 adapters on every
projection of one frozen bf16 base shared by student, discriminator and the reference) with
shorter sequences (1024-token prompts + 1024-token responses instead of 2048 + 1536) and 32
responses per sampler call, so that activations and the KV cache fit next to the 8B base.

    python -m sgalm_jax.main --config configs/gad_llama8b_lmsys_lora.py:warmup \
        --config.model.path=/models/Llama-3.1-8B-Instruct --config.workdir=runs/gad_llama8b_lora_warmup
    python -m sgalm_jax.main --config configs/gad_llama8b_lmsys_lora.py:gad \
        --config.model.path=/models/Llama-3.1-8B-Instruct \
        --config.gad.warmup_dir=runs/gad_llama8b_lora_warmup --config.workdir=runs/gad_llama8b_lora

MEMORY_TABLE
"""

from sgalm_jax.config import load_config_file


def get_config(stage: str = "warmup"):
    config = load_config_file("gad_qwen3b_lmsys_lora.py", __file__, stage)
    config.model.path = ""  # required: Llama-3.1-8B-Instruct in HF format
    if stage == "gad":
        config.gad.warmup_dir = "runs/gad_llama8b_lora_warmup"
    d = config.distill
    d.max_prompt_tokens = 1024
    d.max_response_tokens = 1024
    config.data.max_length = 2048
    config.gad.rollout_batch_size = 32
    config.mesh.fsdp = -1  # every device: 8 on a v5e-8, 1 on one GPU
    return config
