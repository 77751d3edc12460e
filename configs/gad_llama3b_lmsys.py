"""GAD (arXiv 2511.10643) with Llama-3.2-3B-Instruct as student on LMSYS-Chat prompts with
GPT-5-Chat teacher responses, in the paper's setting (its Llama-3.2-3B row of Table 2: before 44.0, SeqKD 47.6, GAD 48.1 on
LMSYS, GPT-4o judge). Two stages, one file:

    # 1. warmup: ~1 epoch (800 steps): D alone for 10 steps, then SFT of the student on the
    #    teacher's responses beside Bradley-Terry steps of D against fresh rollouts
    python -m sgalm_jax.main --config configs/gad_qwen3b_lmsys.py:warmup \
        --config.model.path=/models/Llama-3.2-3B-Instruct --config.data.data_dir=/data/lmsys_gpt5 \
        --config.workdir=runs/gad_llama3b_warmup
    # 2. GAD: 2 epochs (1600 steps) from the warmup's last checkpoint (student and D), GRPO on D's
    #    scores with a k3 KL (1e-3) to the warmup's student
    python -m sgalm_jax.main --config configs/gad_qwen3b_lmsys.py:gad \
        --config.model.path=/models/Llama-3.2-3B-Instruct --config.data.data_dir=/data/lmsys_gpt5 \
        --config.gad.warmup_dir=runs/gad_llama3b_warmup --config.workdir=runs/gad_llama3b

Data: ``ytz20/LMSYS-Chat-GPT-5-Chat-Response`` (train ~192k rows, test 479) from the hub (leave
``data.data_dir`` empty) or its parquet/JSONL export in a folder with train/test files; ``content``
(chat messages or a string) is the prompt, rendered with the student's chat template,
``teacher_response`` the teacher's. Prompts are cut to 2048 tokens (inside the last user turn;
verl cuts from the right), responses to 1536 (the end token included).

The paper's settings kept: 256 prompts x 8 responses per step (temperature 0.8); one optimizer step
per role per step (one PPO mini-batch, so the ratio is 1 and clipping inert); token-mean loss;
clip 0.2; k3 KL 1e-3 to the stage's start model; AdamW lr 1e-6 for both roles, weight decay 0.01,
constant LR, no warmup, gradient clipping 0.2; D = the instruct model's body with a fresh scalar
head, 10 D-only steps; checkpoints every 50 steps, each evaluated (ROUGE-L against the teacher on
100 test prompts; add a judge to pick checkpoints as the paper does, e.g.
``--config.gad.judge='{"backend": "openai", "base_url": "https://api.openai.com/v1",
"model": "gpt-4o"}'``, see docs/gad.md).

Memory (computed by ``benchmarks/gad_memory.py``, not measured; Llama-3.2-3B: 3,212,749,824
params, 28 layers, 8 KV heads of 128, 24 heads, vocab 128,256). Per device, every role
FSDP-sharded over the devices, the micro-batches as in configs/gad_qwen3b_lmsys.py:
  state: student 38.6 GB + discriminator 38.6 GB + reference 12.9 GB = 90.0 GB in all (warmup
  stage: 77.1 GB); one role's step: 19.3 GB in all; activations of D's micro-batch with full remat:
  ~31 GB per device at 9 rows x 3,584 tokens (24 heads of attention probabilities); rollout KV
  cache 26.3 GB per 64 responses (8 KV heads: 3x Qwen's per token).
  - one 80 GB GPU: does NOT fit (the state alone is 90.0 GB);
  - TPU v5e-8 (16 GB per chip): does NOT fit (11.2 GB state + 2.4 GB step + ~31 GB activations);
  - TPU v4-8 (32 GB per chip): does NOT fit (22.5 + 4.8 + ~62 GB);
  - 8 x 80 GB GPUs: ~45 GB per GPU, fits.
Llama 3's chat template and its <|eot_id|> end token come from the checkpoint's tokenizer; the
teacher's responses end in the same token as the student's rollouts (the DistillEncoder).
"""

from sgalm_jax.algorithms import base_config


def get_config(stage: str = "warmup"):
    config = base_config()
    config.algorithm = "gad"
    config.model.path = ""  # required: Llama-3.2-3B-Instruct in HF format
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"  # lr 1e-6 updates vanish in bf16 weights
    config.model.remat = "full"
    config.data.task = "lmsys_gpt5_chat"
    config.data.data_dir = ""  # '' = the hub; or a folder with the train/test parquet files
    config.data.split = "train"
    config.data.chat_template = True
    config.data.max_length = 3584  # 2048 prompt + 1536 response
    config.data.min_bucket = 512
    d = config.distill
    d.max_prompt_tokens = 2048
    d.max_response_tokens = 1536
    d.prompt_truncation = "content"

    g = config.gad
    g.stage = stage
    g.warmup_dir = "runs/gad_llama3b_warmup" if stage == "gad" else ""
    g.d_only_steps = 10
    g.num_generations = 8
    g.temperature = 0.8
    g.beta = 1e-3
    g.kl_estimator = "k3"
    g.clip_eps = 0.2
    g.loss_type = "dapo"  # verl's token-mean
    g.scale_rewards = "group"
    g.adv_eps = 1e-6
    g.num_minibatches = 1
    g.num_iterations = 1
    g.d_grad_accum_steps = 32  # 8 prompt groups (72 rows) per D micro-batch
    g.rollout_batch_size = 64
    g.logprob_chunk_size = 256
    g.eval_examples = 100
    g.eval_split = "test"
    g.eval_metric = "auto"  # judge_score when gad.judge is set, else rouge_l

    o = config.optimizer
    o.name = "adamw"
    o.learning_rate = 1e-6
    o.b1, o.b2 = 0.9, 0.999
    o.weight_decay = 0.01
    o.schedule = "constant"
    o.warmup_steps = 0
    o.max_grad_norm = 0.2
    config.train.batch_size = 2048  # 256 prompts x 8 responses
    config.train.grad_accum_steps = 256  # 8 responses per student micro-batch
    config.train.num_steps = 800 if stage == "warmup" else 1600
    config.train.compute_dtype = "bfloat16"
    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.tensor = 1
    config.checkpoint.every_steps = 50
    config.checkpoint.keep = 3
    config.checkpoint.export_dtype = "bfloat16"
    return config
