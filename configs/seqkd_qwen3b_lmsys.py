"""SeqKD, GAD's baseline: SFT of Qwen2.5-3B-Instruct on GPT-5-Chat's responses to LMSYS-Chat prompts
(the ``sft`` algorithm with ``sft.distill = True``), as the GAD paper's ``seqkd`` branch runs it.

    python -m sgalm_jax.main --config configs/seqkd_qwen3b_lmsys.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct --config.data.data_dir=/data/lmsys_gpt5 \
        --config.workdir=runs/seqkd_qwen3b

The pairs are read and cut exactly as configs/gad_qwen3b_lmsys.py reads them (the distill section:
chat template, prompts to 2048 tokens, responses to 1536 with the end token); the loss is the NLL
of the teacher's response and its end token (token mean). The paper's SeqKD: lr 5e-6 (the best of
{1e-6, 5e-6}), AdamW, weight decay 0.01, constant LR, clip 0.2, no KL, 3 epochs (~2400 steps of
256 prompts: the same budget as warmup + GAD). verl repeats each teacher pair n = 8 times per step,
which only rescales the gradient; here each step takes the 256 pairs once.

Memory (computed with ``benchmarks/gad_memory.py``'s terms, not measured; Qwen2.5-3B): one
learner, fp32 weights + AdamW moments 37.0 GB, step transient (fp32 gradients + bf16 copy)
18.5 GB, activations with full remat ~3.0 GB per row of up to 3,584 tokens (one layer's fp32
attention probabilities and their gradient 1.6 GB, the layers' bf16 inputs 0.5 GB, MLP 0.5 GB,
one logits chunk 0.3 GB). The config's micro-batch is 8 rows (train.grad_accum_steps = 32):
  - one 80 GB GPU: 55.5 GB + 8 rows ~24 GB = ~79 GB: too tight; use
    --config.train.grad_accum_steps=128 (2 rows): ~61 GB, fits;
  - TPU v5e-8 (1 row per chip): 6.9 + ~3.0 = ~9.9 GB of 16, fits;
  - TPU v4-8 (2 rows per chip): 13.9 + ~5.9 = ~19.8 GB of 32, fits.
"""

from sgalm_jax.algorithms import base_config


def get_config():
    config = base_config()
    config.algorithm = "sft"
    config.sft.distill = True
    config.sft.normalize = "token"
    config.sft.logits_chunk_size = 256
    config.model.path = ""  # required: Qwen2.5-3B-Instruct in HF format
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat = "full"
    config.data.task = "lmsys_gpt5_chat"
    config.data.data_dir = ""  # '' = the hub; or a folder with the train/test parquet files
    config.data.split = "train"
    config.data.chat_template = True
    config.data.max_length = 3584
    config.data.min_bucket = 512
    config.data.shuffle = True
    d = config.distill
    d.max_prompt_tokens = 2048
    d.max_response_tokens = 1536
    d.prompt_truncation = "content"
    o = config.optimizer
    o.name = "adamw"
    o.learning_rate = 5e-6
    o.b1, o.b2 = 0.9, 0.999
    o.weight_decay = 0.01
    o.schedule = "constant"
    o.warmup_steps = 0
    o.max_grad_norm = 0.2
    config.train.batch_size = 256  # teacher pairs per step
    config.train.grad_accum_steps = 32
    config.train.num_steps = 2400  # ~3 epochs of 192k pairs
    config.train.compute_dtype = "bfloat16"
    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.tensor = 1
    config.checkpoint.every_steps = 50
    config.checkpoint.keep = 3
    config.checkpoint.export_dtype = "bfloat16"
    return config
