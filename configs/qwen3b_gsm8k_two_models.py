"""Ablation of configs/qwen3b_gsm8k.py: sgalm.variant = 'two_models' (everything else the same).

Separate generator and discriminator params, each with its own RMSProp state (the paper's
'w/o S'); the same D and G steps as the full run (460 + 460 per iteration), at twice the
weight memory. On one 80 GB GPU this needs bf16 master weights (set below): 2 x (6.2 GB
weights + 6.2 GB RMSProp state + 6.2 GB gradients) = 37 GB + activations + KV cache
~50 GB. Compiled for a TPU v5e-8 (``--compile-only=v5e-8``; GiB per chip, peak): with the bf16
weights set here every program fits (D step 11.44, G step 8.52, sampler prefill 12.12, decode
5.45); with fp32 master weights (``--config.model.param_dtype=float32``) the D step needs 16.33 GiB
(the other role's 2.88 GiB of fp32 state stays resident) and does not fit: keep bf16 there, or use
a slice with more memory per chip (v4-8, v5p-8; not compiled).

    python -m sgalm_jax.main --config configs/qwen3b_gsm8k_two_models.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct --config.workdir=runs/sgalm_qwen3b_gsm8k_two_models
"""

from sgalm_jax.config import load_config_file


def get_config():
    config = load_config_file("qwen3b_gsm8k.py", __file__)
    config.sgalm.variant = "two_models"
    config.model.param_dtype = "bfloat16"  # one 80 GB GPU; use float32 on TPU v4-8
    return config
