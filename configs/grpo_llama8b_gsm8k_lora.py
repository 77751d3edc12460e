"""GRPO with LoRA on an 8B model: Llama-3.1-8B-Instruct on GSM8K, sized for ONE 80 GB GPU
(A100/H100, mesh.fsdp = 1) or a TPU v5e-8 (8 x 16 GB, mesh.fsdp = 8; the default mesh.fsdp = -1
takes every device). The settings of configs/grpo_qwen3b_gsm8k_lora.py (the Tunix / MaxText GSM8K
GRPO tutorial: 8 prompts x 4 completions per step, one update per rollout, k3 KL 0.08 to the start
model, clip 0.2, temperature 0.9, top-k 50, 256 + 768 tokens, AdamW with cosine decay) with rank-64
adapters (alpha 64) on every projection of a frozen bf16 base; the KL reference is that base.

    python -m sgalm_jax.main --config configs/grpo_llama8b_gsm8k_lora.py \
        --config.model.path=/models/Llama-3.1-8B-Instruct \
        --config.data.data_dir=/data/gsm8k --config.workdir=runs/grpo_llama8b_gsm8k_lora

Memory per device in GiB, computed (``python -m sgalm_jax.tools.memory --config
configs/grpo_llama8b_gsm8k_lora.py --arch=llama-3.1-8b --devices=N``; role states exact for the
shapes, dtypes and shardings; activations (8-row x 1024-token micro-batches, full remat) and the
sampler's KV cache (32 rows x 1024 positions) estimated):

| hardware | role states, full fine-tuning | role states, LoRA | activations + KV cache (est.) | LoRA total |
|---|---|---|---|---|
| 1 x 80 GB GPU | 179.5 | 18.1 | 6.0 + 4.0 | 28.1 |
| TPU v5e-8 (8 x 16 GB) | 22.4 | 2.26 | 0.75 + 0.50 | 3.5 |

Full fine-tuning fits neither (fp32 policy weights 29.9, gradients with the fp32 accumulator of
the 4 micro-batches 59.8, AdamW moments 59.8, the fp32 reference 29.9); with LoRA the bf16 base
(14.96) is shared by the policy and the reference, and the 167.8M adapter params cost 4 B each
for weights, twice for gradients + accumulator, twice for AdamW.

Compiled for v5e-8 (``--compile-only=v5e-8``: every program of the run, the roles built abstract;
GiB per chip, peak = arguments + outputs - donated + temporaries + resident state):

| program | args | temp | resid | peak |
|---|---:|---:|---:|---:|
| GRPO step (32 x 1024) | 2.10 | 1.87 | 0.00 | 3.97 |
| reference log-probs (8 x 1024; the base) | 1.87 | 1.11 | 0.23 | 3.21 |
| sampler prefill (8 prompts x 256, 32 rows x 1024 cache) | 1.95 | 1.41 | 0.16 | 4.01 |
| sampler decode (32 rows x 1024 cache) | 2.45 | 2.07 | 0.16 | 4.67 |

The largest program uses 29% of a chip (the GPU rows above stay computed: no GPU compiler here).
"""

from sgalm_jax.config import load_config_file


def get_config():
    config = load_config_file("grpo_qwen3b_gsm8k_lora.py", __file__)
    config.model.path = ""  # required: Llama-3.1-8B-Instruct in HF format
    config.model.architecture = "llama-3.1-8b"  # its shape, for --compile-only without it
    config.mesh.fsdp = -1  # 1 on one GPU, 8 on a v5e-8
    return config
