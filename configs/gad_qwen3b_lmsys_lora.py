"""GAD with LoRA: configs/gad_qwen3b_lmsys.py (Qwen2.5-3B-Instruct student, GPT-5-Chat teacher on
LMSYS prompts, warmup then GAD) with the student and the discriminator as rank-64 adapter sets on
ONE frozen bf16 base (the discriminator's scalar head trained beside its adapters); the KL
reference of the GAD stage is the warmup's student adapters on that base (a snapshot of the
adapters only). Checkpoints hold the adapters, the head and their AdamW moments; exports: the
merged student (HF causal LM) and discriminator (HF *ForSequenceClassification), and each adapter
set in PEFT's format (export_adapter: CAUSAL_LM; export_discriminator_adapter: SEQ_CLS with the
head in modules_to_save).

    python -m sgalm_jax.main --config configs/gad_qwen3b_lmsys_lora.py:warmup \
        --config.model.path=/models/Qwen2.5-3B-Instruct --config.workdir=runs/gad_qwen3b_lora_warmup
    python -m sgalm_jax.main --config configs/gad_qwen3b_lmsys_lora.py:gad \
        --config.model.path=/models/Qwen2.5-3B-Instruct \
        --config.gad.warmup_dir=runs/gad_qwen3b_lora_warmup --config.workdir=runs/gad_qwen3b_lora

The paper's settings otherwise (256 prompts x 8 responses, temperature 0.8, k3 KL 1e-3, clip 0.2,
AdamW, constant LR, clip-norm 0.2, 10 D-only steps) except the learning rate: 1e-5 for adapters
(LoRA usually needs ~10x the full fine-tuning LR; the paper's 1e-6 is for full weights; untuned).

Memory per device in GiB, COMPUTED (not compiled, not measured) by ``python -m sgalm_jax.tools.memory
--config configs/gad_qwen3b_lmsys_lora.py:gad --arch=qwen2.5-3b --devices=N`` (GAD stage; role
states exact for the shapes, dtypes and shardings; activations of the largest micro-batch, D's
prompt groups of 9 rows x 3,584 tokens with full remat, and the sampler's KV cache of one
generation batch are estimates):

| hardware | role states, full | role states, LoRA | activations (est.) | KV cache (est.) | LoRA total |
|---|---|---|---|---|---|
| 1 x 80 GB GPU, with ``--config.gad.d_grad_accum_steps=256`` | 126.5 | 10.65 | 16.4 | 7.9 | 34.9: fits |
| TPU v5e-8 (8 x 16 GB) | 15.8 | 1.33 | 14.4 | 1.0 | 16.7: does NOT fit |

COMPILED for v5e-8 (``python -m sgalm_jax.main --config configs/gad_qwen3b_lmsys_lora.py:gad
--config.model.architecture=qwen2.5-3b --compile-only=v5e-8``, libtpu 0.0.42.1; GiB per chip,
peak = args + outputs - donated + temporaries + resident), confirming the computed verdict:

| program | args | temp | resid | peak |
|---|---:|---:|---:|---:|
| D step (256 x 9 x 3584) | 0.90 | 15.60 | 0.22 | **16.72: does NOT fit** |
| student GRPO step (2048 x 3584) | 0.90 | 1.96 | 0.22 | 3.09 |
| reference log-probs (8 x 3584) | 0.77 | 1.36 | 0.33 | 2.47 |
| D score pass (72 x 3584) | 0.78 | 12.20 | 0.33 | 13.31 |
| sampler prefill (8 x 2048 prompt, 64 rows x 3584 cache) | 0.77 | 1.46 | 0.33 | 3.55 |
| sampler decode (64 rows x 3584 cache) | 1.76 | 2.19 | 0.33 | 4.29 |

With the shorter sequences below (``--config.distill.max_prompt_tokens=1024
--config.distill.max_response_tokens=1024 --config.data.max_length=2048
--config.gad.rollout_batch_size=32``) every program fits a v5e-8 chip (compiled): D step
(256 x 9 x 2048) **10.19**, D score pass 9.04, student GRPO step 2.63, reference log-probs 2.46,
sampler prefill 2.83, decode 3.43 (sampler rows as compile-only lists them: 8 x 1024 prompts, 64
rows x 2048 cache).

With LoRA the bf16 base (5.75 on one device) is held once for student, discriminator and
reference; each adapter set is 119.7M params (fp32, + gradients with the fp32 accumulator, + AdamW
moments), the reference a copy of the student's adapters. On a v5e-8 the paper's sequence lengths
leave D's micro-batch activations (9 rows of 3,584 tokens per chip, dominated by one layer's fp32
attention probabilities) too large: use the shorter sequences of configs/gad_llama8b_lmsys_lora.py
(``--config.distill.max_prompt_tokens=1024 --config.distill.max_response_tokens=1024
--config.data.max_length=2048 --config.gad.rollout_batch_size=32``), or 8 x 80 GB GPUs.
"""

from sgalm_jax.config import load_config_file


def get_config(stage: str = "warmup"):
    config = load_config_file("gad_qwen3b_lmsys.py", __file__, stage)
    if stage == "gad":
        config.gad.warmup_dir = "runs/gad_qwen3b_lora_warmup"
    config.lora.enabled = True
    config.lora.rank = 64
    config.lora.alpha = 64.0
    config.lora.dropout = 0.0  # a dropout mask would make the old/new log-prob ratio noisy
    config.lora.base_dtype = "bfloat16"
    config.model.param_dtype = "float32"  # the adapters' (and D's head's) master weights
    config.optimizer.learning_rate = 1e-5
    config.gad.d_learning_rate = 1e-5
    return config
