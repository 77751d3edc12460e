"""LoRA variant of configs/qwen3b_gsm8k_two_models.py (SGALM's 'w/o S' ablation: separate
generator and discriminator): two adapter sets on ONE frozen bf16 base instead of two full models.
The generator and the discriminator each have their own rank-16 adapters (alpha 32, every
projection) and their own RMSProp state; both start as the base (B = 0), as D starts as a copy
of G in the full ablation. The learning rate is 10x the full run's.

    python -m sgalm_jax.main --config configs/qwen3b_gsm8k_two_models_lora.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct \
        --config.data.data_dir=/data/gsm8k --config.workdir=runs/sgalm_qwen3b_two_models_lora

Exports: ``export/`` + ``export_adapter/`` (generator), ``export_discriminator/`` +
``export_discriminator_adapter/`` (merged HF weights and PEFT adapters of each).

Memory per device in GiB, computed (``python -m sgalm_jax.tools.memory --config
configs/qwen3b_gsm8k_two_models_lora.py --arch=qwen2.5-3b --devices=N``; role states exact,
activations and KV cache estimated):

| hardware | role states, two full models (fp32) | role states, LoRA | activations + KV cache (est.) |
|---|---|---|---|
| 1 x 80 GB GPU | 68.98 | 6.42 | 40.16 + 3.38 |
| TPU v5e-8 (8 x 16 GB, fsdp=8) | 8.63 | 0.80 | 5.02 + 0.42 |

The base is held once (5.75 in bf16); each adapter set is 29.9M params with fp32 weights,
gradients and RMSProp state. Two full models keep 2 x (weights + gradients + RMSProp): 69 GiB with
fp32 masters, 34.5 with the bf16 masters configs/qwen3b_gsm8k_two_models.py falls back to.

Compiled for v5e-8 (``--compile-only=v5e-8``: every program of the run, the roles built abstract;
GiB per chip, peak = arguments + outputs - donated + temporaries + resident state, here the other
adapter set and its RMSProp state):

| program | args | temp | resid | peak |
|---|---:|---:|---:|---:|
| D step (64 x 2048) | 0.75 | 8.19 | 0.03 | 8.96 |
| G step (32 x 2048; D's model is an argument) | 1.48 | 4.41 | 0.01 | 5.90 |
| D scorer (64 x 2048) | 0.73 | 3.10 | 0.04 | 3.87 |
| sampler prefill (64 prompts x 2048, cache 2560) | 0.73 | 8.07 | 0.04 | 9.54 |
| sampler decode (64 rows, cache 2560) | 1.44 | 1.88 | 0.04 | 3.36 |

The largest program uses 60% of a chip; the fp32 two-model full run's D step does not fit a v5e
chip (16.33 GiB, docs/benchmarks.md).
"""

from sgalm_jax.config import load_config_file


def get_config():
    config = load_config_file("qwen3b_gsm8k_two_models.py", __file__)
    config.lora.enabled = True
    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.lora.dropout = 0.0
    config.lora.base_dtype = "bfloat16"
    config.model.param_dtype = "float32"  # the adapters' master weights
    config.optimizer.learning_rate = 1e-5
    return config
