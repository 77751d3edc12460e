"""GAD with LoRA on an 8B student: Llama-3.1-8B-Instruct distilling GPT-5-Chat on LMSYS prompts,
sized for a TPU v5e-8 (8 x 16 GB, mesh.fsdp = 8, the default) or ONE 80 GB GPU (add
``--config.gad.d_grad_accum_steps=256``: one prompt group per discriminator micro-batch). The
settings of configs/gad_qwen3b_lmsys_lora.py (the paper's GAD recipe, rank-64 adapters on every
projection of one frozen bf16 base shared by student, discriminator and the reference) with
shorter sequences (1024-token prompts + 1024-token responses instead of 2048 + 1536) and 32
responses per sampler call, so that activations and the KV cache fit next to the 8B base.

    python -m sgalm_jax.main --config configs/gad_llama8b_lmsys_lora.py:warmup \
        --config.model.path=/models/Llama-3.1-8B-Instruct --config.workdir=runs/gad_llama8b_lora_warmup
    python -m sgalm_jax.main --config configs/gad_llama8b_lmsys_lora.py:gad \
        --config.model.path=/models/Llama-3.1-8B-Instruct \
        --config.gad.warmup_dir=runs/gad_llama8b_lora_warmup --config.workdir=runs/gad_llama8b_lora

Compiled for a TPU v5e-8 (``--compile-only=v5e-8 --config.model.architecture=llama-3.1-8b``,
libtpu 0.0.42.1, GAD stage; GiB per chip, peak = args + outputs - donated + temporaries + resident
state):

| program | args | temp | resid | peak |
|---|---:|---:|---:|---:|
| D step (256 x 9 x 2048) | 1.99 | 12.96 | 0.43 | **15.39** |
| student GRPO step (2048 x 2048) | 2.11 | 2.41 | 0.31 | 4.84 |
| reference log-probs (8 x 2048) | 1.95 | 1.16 | 0.47 | 3.58 |
| D score pass (72 x 2048) | 1.83 | 12.03 | 0.59 | 14.45 |
| engine prefill (8 x 1024 prompt) | 1.95 | 1.58 | 0.47 | 4.13 |
| engine decode, rows started in the loop (32 slots x 2048 cache, 8-prompt stash) | 3.07 | 1.07 | 0.47 | 4.61 |

Every program fits; the largest uses 96% of a chip (the computed estimate below said 15.4 GiB).
The warmup stage (``:warmup``): D step 15.31, student SFT step (256 x 2048) 5.55, engine decode
5.37 GiB.

Memory per device in GiB, COMPUTED (not compiled, not measured) by ``python -m sgalm_jax.tools.memory
--config configs/gad_llama8b_lmsys_lora.py:gad --arch=llama-3.1-8b --devices=N`` (role states
exact for the shapes, dtypes and shardings; activations of the largest micro-batch, 9 rows x 2,048
tokens per device with full remat, and the KV cache of 32 responses are estimates):

| hardware | role states, full | role states, LoRA | activations (est.) | KV cache (est.) | LoRA total |
|---|---|---|---|---|---|
| 1 x 80 GB GPU, with ``--config.gad.d_grad_accum_steps=256`` | 319.3 | 21.8 | 13.4 | 8.0 | 43.2: fits |
| TPU v5e-8 (8 x 16 GB), GAD stage (warmup: states 2.65) | 39.9 | 2.73 | 11.6 | 1.0 | 15.4: fits, with little margin |

Full fine-tuning fits neither (three 8B models, two of them with fp32 weights, gradients and AdamW
moments). With LoRA the bf16 base (14.96 GiB) is shared by the three roles; each adapter set is
167.8M fp32 params with gradients (+ accumulator) and AdamW moments, the reference a copy of the
student's adapters. The v5e-8 total is within 0.6 GiB of a chip's 16 GiB: for margin shorten the
responses (``--config.distill.max_response_tokens=768 --config.data.max_length=1792``).
"""

from sgalm_jax.config import load_config_file


def get_config(stage: str = "warmup"):
    config = load_config_file("gad_qwen3b_lmsys_lora.py", __file__, stage)
    config.model.path = ""  # required: Llama-3.1-8B-Instruct in HF format
    if stage == "gad":
        config.gad.warmup_dir = "runs/gad_llama8b_lora_warmup"
    d = config.distill
    d.max_prompt_tokens = 1024
    d.max_response_tokens = 1024
    config.data.max_length = 2048
    config.gad.rollout_batch_size = 32
    config.mesh.fsdp = -1  # every device: 8 on a v5e-8, 1 on one GPU
    return config
