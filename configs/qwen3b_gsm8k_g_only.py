"""Ablation of configs/qwen3b_gsm8k.py: sgalm.variant = 'g_only' (everything else the same).

Only the generator objective is trained (no D steps); its reward is D frozen at each
iteration's start (the snapshot's logit, computed once per iteration). 920 updates.

    python -m sgalm_jax.main --config configs/qwen3b_gsm8k_g_only.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct --config.workdir=runs/sgalm_qwen3b_gsm8k_g_only
"""

from sgalm_jax.config import load_config_file


def get_config():
    config = load_config_file("qwen3b_gsm8k.py", __file__)
    config.sgalm.variant = "g_only"
    return config
