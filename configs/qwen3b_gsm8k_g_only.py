"""Ablation of configs/qwen3b_gsm8k.py: sgalm.variant = 'g_only' (everything else the same).

Only the generator objective is trained (no D steps); its reward is D frozen at each
iteration's start (the snapshot's logit, computed once per iteration). 920 updates.

    python -m sgalm_jax.main --config configs/qwen3b_gsm8k_g_only.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct --config.workdir=runs/sgalm_qwen3b_gsm8k_g_only
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "qwen3b_gsm8k", os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3b_gsm8k.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
    config = _base.get_config()
    config.sgalm.variant = "g_only"
    return config
