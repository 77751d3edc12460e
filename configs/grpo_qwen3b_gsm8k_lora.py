"""LoRA variant of configs/grpo_qwen3b_gsm8k.py (GRPO on GSM8K, Qwen2.5-3B-Instruct, the
Tunix / MaxText tutorial setting; Tunix's own GSM8K GRPO example trains LoRA adapters through qwix
with rank 64 and alpha 64 on the attention and MLP projections, which is what this file does):
the KL reference is the frozen base itself (the adapters switched off: no second model), the
policy is the adapters. AdamW at 3e-5 (10x the full run's; Tunix's example uses 3e-6 with its
rank-64 adapters, so treat the learning rate as a knob).

    python -m sgalm_jax.main --config configs/grpo_qwen3b_gsm8k_lora.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct \
        --config.data.data_dir=/data/gsm8k --config.workdir=runs/grpo_qwen3b_gsm8k_lora

Memory per device in GiB, computed (``python -m sgalm_jax.tools.memory --config
configs/grpo_qwen3b_gsm8k_lora.py --arch=qwen2.5-3b --devices=N``; role states exact,
activations and KV cache estimated):

| hardware | role states, full run | role states, LoRA | activations + KV cache (est.) |
|---|---|---|---|
| 1 x 80 GB GPU | 68.98 | 7.98 | 4.64 + 1.12 |
| TPU v5e-8 (8 x 16 GB, fsdp=8) | 8.63 | 1.00 | 0.58 + 0.14 |

Full: the policy's fp32 weights, gradients and AdamW moments (4 x 11.5) + the frozen fp32
reference (11.5). LoRA: the bf16 base (5.75) is the policy's base and the reference; 119.7M
adapter params x 4 B x 4.

Compiled for v5e-8 (``--compile-only=v5e-8``: every program of the run, the roles built abstract;
GiB per chip, peak = arguments + outputs - donated + temporaries + resident state):

| program | args | temp | resid | peak |
|---|---:|---:|---:|---:|
| GRPO step (32 x 1024) | 0.89 | 1.19 | 0.00 | 2.08 |
| reference log-probs (8 x 1024; the base, adapters off) | 0.72 | 1.31 | 0.17 | 2.20 |
| sampler prefill (8 prompts x 256, 32 rows x 1024 cache) | 0.77 | 1.13 | 0.11 | 2.16 |
| sampler decode (32 rows x 1024 cache) | 0.92 | 0.77 | 0.11 | 1.80 |

The largest program uses 14% of a chip: the bf16 base is 0.72 GiB per chip, the adapters with
their AdamW state 0.17; one update per rollout needs no old log-prob pass.
"""

from sgalm_jax.config import load_config_file


def get_config():
    config = load_config_file("grpo_qwen3b_gsm8k.py", __file__)
    config.lora.enabled = True
    config.lora.rank = 64
    config.lora.alpha = 64.0
    config.lora.dropout = 0.0  # a dropout mask would make the old/new log-prob ratio noisy
    config.lora.base_dtype = "bfloat16"
    config.model.param_dtype = "float32"  # the adapters' master weights
    config.train.compute_dtype = ""  # the base is bf16 already; the adapters are tiny
    config.optimizer.learning_rate = 3e-5
    return config
