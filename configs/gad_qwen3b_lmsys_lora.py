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

MEMORY_TABLE
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
