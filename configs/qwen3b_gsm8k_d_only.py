"""Ablation of configs/qwen3b_gsm8k.py: sgalm.variant = 'd_only' (everything else the same).

Only the discriminator objective is trained (no G steps): D learns to tell real from
generated GSM8K samples and the model changes only through that. 920 updates
(the D steps of the full run; same rounds and batches).

    python -m sgalm_jax.main --config configs/qwen3b_gsm8k_d_only.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct --config.workdir=runs/sgalm_qwen3b_gsm8k_d_only
"""

from sgalm_jax.config import load_config_file


def get_config():
    config = load_config_file("qwen3b_gsm8k.py", __file__)
    config.sgalm.variant = "d_only"
    return config
