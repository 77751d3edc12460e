"""LoRA variant of configs/qwen3b_gsm8k.py (SGALM on GSM8K, Qwen2.5-3B-Instruct, one model as
generator and discriminator): rank-16 adapters (alpha 32) on every projection of every layer, the
base frozen in bfloat16, the adapters' fp32 master weights and RMSProp state the only trained
state. Everything else (data, schedule, prompts) is the full run's; the learning rate is 10x the
full fine-tuning one (the usual LoRA rule of thumb, not tuned here).

    python -m sgalm_jax.main --config configs/qwen3b_gsm8k_lora.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct \
        --config.data.data_dir=/data/gsm8k --config.workdir=runs/sgalm_qwen3b_gsm8k_lora

Outputs: ``export/`` (merged HF weights) and ``export_adapter/`` (PEFT: adapter_config.json +
adapter_model.safetensors, for ``peft.PeftModel.from_pretrained(base, ...)``).

Memory per device in GiB, computed (``python -m sgalm_jax.tools.memory --config
configs/qwen3b_gsm8k_lora.py --arch=qwen2.5-3b --devices=N``; role states exact for the shapes,
dtypes and shardings; activations (one 64-row x 1536-token D micro-batch, full remat) and the
sampler's KV cache estimated):

| hardware | role states, full run (fp32) | role states, LoRA | activations + KV cache (est.) |
|---|---|---|---|
| 1 x 80 GB GPU | 34.49 | 6.08 | 40.16 + 3.38 |
| TPU v5e-8 (8 x 16 GB, fsdp=8) | 4.31 | 0.76 | 5.02 + 0.42 |

LoRA: the bf16 base (5.75) + 29.9M adapter params x 4 B x 3 (weights, gradients, RMSProp); the
full run: fp32 weights, gradients and RMSProp state (3 x 11.5).

Compiled for v5e-8 (``--compile-only=v5e-8``: every program of the run, the roles built abstract;
GiB per chip, peak = arguments + outputs - donated + temporaries + resident state):

| program | args | temp | resid | peak | full run (configs/qwen3b_gsm8k.py) |
|---|---:|---:|---:|---:|---:|
| D step (64 x 2048) | 0.75 | 8.19 | 0.00 | 8.93 | 13.46 |
| G step (32 x 2048) | 0.75 | 4.41 | 0.00 | 5.16 | 9.36 |
| D scorer (64 x 2048) | 0.73 | 3.10 | 0.01 | 3.84 | 4.90 |
| sampler prefill (64 prompts x 2048, cache 2560) | 0.73 | 8.07 | 0.01 | 9.52 | 12.77 |
| sampler decode (64 rows, cache 2560) | 1.44 | 1.88 | 0.01 | 3.33 | 5.86 |

The largest program uses 59% of a chip. The computed table above underestimates the D step
(0.76 + 5.02 estimated against 8.93 compiled): XLA's temporaries exceed the activation formula.
"""

from sgalm_jax.config import load_config_file


def get_config():
    config = load_config_file("qwen3b_gsm8k.py", __file__)
    config.lora.enabled = True
    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.lora.dropout = 0.0
    config.lora.base_dtype = "bfloat16"
    config.model.param_dtype = "float32"  # the adapters' master weights
    config.optimizer.learning_rate = 1e-5
    return config
