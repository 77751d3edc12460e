"""LoRA variant of configs/spin_qwen3b_gsm8k.py (SPIN on GSM8K, Qwen2.5-3B): every iteration
trains rank-16 adapters (alpha 32, every projection) on the frozen bf16 base; θ_t is base +
adapters_t, and the next iteration continues from those adapters with a fresh RMSProp state (as
the full run continues from θ_t). The reference of iteration t is the policy as the iteration
starts (a view, scored once: no copy either way). Learning rates 10x the full run's.

    python -m sgalm_jax.main --config configs/spin_qwen3b_gsm8k_lora.py \
        --config.model.path=runs/sft_qwen3b_gsm8k/export \
        --config.data.data_dir=/data/gsm8k --config.eval.data_dir=/data \
        --config.workdir=runs/spin_qwen3b_gsm8k_lora

Exports per iteration: ``iterations/iter_NNN`` (merged) and ``iterations/iter_NNN_adapter``
(PEFT); at the end ``export`` and ``export_adapter``.

Memory per device in GiB, computed (``python -m sgalm_jax.tools.memory --config
configs/spin_qwen3b_gsm8k_lora.py --arch=qwen2.5-3b --devices=N``; role states exact,
activations (64 pairs per micro-batch) and KV cache estimated):

| hardware | role states, full run (fp32) | role states, LoRA | activations + KV cache (est.) |
|---|---|---|---|
| 1 x 80 GB GPU | 34.49 | 6.08 | 35.14 + 4.50 (grad_accum 8: ~4.4 + 4.50) |
| TPU v5e-8 (8 x 16 GB, fsdp=8) | 4.31 | 0.76 | 4.39 + 0.56 |

Compiled for v5e-8 (``--compile-only=v5e-8``: every program of the run, the roles built abstract;
GiB per chip, peak = arguments + outputs - donated + temporaries + resident state):

| program | args | temp | resid | peak |
|---|---:|---:|---:|---:|
| train step (64 prompts x 2 rows x 512) | 0.75 | 5.97 | 0.00 | 6.72 |
| reference scorer (64 x 512) | 0.73 | 2.15 | 0.01 | 2.89 |
| sampler prefill (256 prompts x 256, cache 512) | 0.73 | 2.62 | 0.01 | 3.93 |
| sampler decode (256 rows, cache 512) | 1.30 | 1.72 | 0.01 | 3.03 |

The largest program uses 42% of a chip.
"""

from sgalm_jax.config import load_config_file


def get_config():
    config = load_config_file("spin_qwen3b_gsm8k.py", __file__)
    config.lora.enabled = True
    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.lora.dropout = 0.0
    config.lora.base_dtype = "bfloat16"
    config.model.param_dtype = "float32"  # the adapters' master weights
    config.selfplay.lr_per_iteration = "5e-6,5e-6,1e-6"
    config.optimizer.learning_rate = 5e-6
    return config
