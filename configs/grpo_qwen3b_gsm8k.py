"""GRPO on GSM8K with Qwen2.5-3B-Instruct, in the setting of the Tunix and MaxText GSM8K GRPO
examples (google/tunix ``examples/rl/grpo/gsm8k``; MaxText ``src/MaxText/configs/rl.yml``, which
runs GRPO through Tunix): 4 completions per prompt, 8 prompts per step, one update per rollout
(num_iterations 1), clip epsilon 0.2, k3 KL to the start model with beta 0.08, token-mean loss,
sampling at temperature 0.9 with top-k 50, prompts up to 256 tokens and completions up to 768,
AdamW lr 3e-6 (b1 0.9, b2 0.99, weight decay 0.1) with 10% warmup and cosine decay to 0,
gradient clipping 0.1, one epoch of the 7,473 training problems.

    python -m sgalm_jax.main --config configs/grpo_qwen3b_gsm8k.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct \
        --config.data.data_dir=/data/gsm8k --config.workdir=runs/grpo_qwen3b_gsm8k

What is ours, not theirs: the reward is the GSM8K checker's exact match of the final number
(``grpo.reward = correct``: 1 or 0) and the prompt is the task's chat turn asking for a final
``#### <number>`` line, where the tutorials reward an XML <reasoning>/<answer> format with partial
credit; the policy's log-probs use logits / temperature (as TRL and verl). Evaluate the export with
``configs/eval_gsm8k.py``.

Memory, computed for Qwen2.5-3B (3,085,938,688 params; vocab 151,936; 36 layers; 2 KV heads of
128; 36,864 bytes of bf16 KV cache per token), whole job:
  policy fp32 master weights 12.3 GB + AdamW moments 24.7 GB + fp32 gradients 12.3 GB
  + frozen reference (fp32, the start model) 12.3 GB + bf16 compute copy 6.2 GB   = 67.9 GB
  + sampler KV cache: 32 rows x 1,024 positions x 36,864 B                          =  1.2 GB
  + activations with full remat, micro-batch of 8 rows x 1,024 tokens: layer inputs
    8 x 1,024 x 2,048 x 2 B x 36 = 1.2 GB, one 256-token fp32 logits chunk 8 x 256 x 151,936
    x 4 B = 1.2 GB (and its gradient)                                              ~  3.7 GB
  = about 73 GB: one 80 GB GPU (A100/H100) with mesh.fsdp = 1, tight. With FSDP over every
  device the states divide by the device count: TPU v4-8 (4 chips x 32 GB) 17.0 GB of state +
  ~1.3 GB per chip; TPU v5e-8 (8 chips x 16 GB) 8.5 GB of state + ~0.7 GB per chip.
(computed; the GPU figure stays computed: no GPU compiler here.)

Compiled for v5e-8 (``--compile-only=v5e-8``; GiB per chip, peak = arguments + outputs - donated +
temporaries + resident state, here the frozen fp32 reference or the policy's state):

| program | args | temp | resid | peak |
|---|---:|---:|---:|---:|
| GRPO step (32 x 1024) | 4.31 | 6.52 | 1.44 | 12.27 |
| reference log-probs (8 x 1024) | 1.44 | 2.29 | 4.31 | 8.04 |
| sampler prefill (8 prompts x 256, 32 rows x 1024 cache) | 1.44 | 1.25 | 4.31 | 7.14 |
| sampler decode (32 rows x 1024 cache) | 1.58 | 1.41 | 4.31 | 7.30 |

Every program fits; the train step uses 77% of a chip. With LoRA
(configs/grpo_qwen3b_gsm8k_lora.py) the largest program needs 2.2 GiB.
"""

from sgalm_jax.algorithms import base_config


def get_config():
    config = base_config()
    config.algorithm = "grpo"
    config.model.path = ""  # required: Qwen2.5-3B-Instruct in HF format
    config.model.architecture = "qwen2.5-3b"  # its shape, for --compile-only without it
    config.model.dtype = "bfloat16"  # compute
    config.model.param_dtype = "float32"  # master weights
    config.model.remat = "full"
    config.data.task = "gsm8k"
    config.data.split = "train"
    config.data.data_dir = ""  # '' = the hub (openai/gsm8k); or a directory with train/test.jsonl
    config.data.chat_template = True  # the instruct model's chat turn
    config.data.max_length = 1024  # 256 prompt + 768 completion
    config.data.min_bucket = 256

    g = config.grpo
    g.reward = "correct"
    g.num_generations = 4
    g.num_minibatches = 1  # 32 completions = 8 prompts x 4 per rollout, one optimizer step
    g.num_iterations = 1
    g.loss_type = "dapo"  # token mean over the step (Tunix: sum / number of completion tokens)
    g.clip_eps = 0.2
    g.beta = 0.08
    g.kl_estimator = "k3"
    g.scale_rewards = "group"
    g.temperature = 0.9
    g.top_k = 50
    g.top_p = 1.0
    g.max_prompt_length = 256
    g.max_new_tokens = 768
    g.logprob_chunk_size = 256
    g.log_samples = 2

    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 3e-6
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.99
    config.optimizer.weight_decay = 0.1
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 93  # 10% of the 934 steps
    config.optimizer.end_lr_factor = 0.0
    config.optimizer.max_grad_norm = 0.1
    config.train.batch_size = 32  # completions per optimizer step
    config.train.grad_accum_steps = 4  # micro-batches of 8 completions
    config.train.num_steps = 934  # one epoch: 7,473 problems / 8 prompts per step
    config.train.compute_dtype = "bfloat16"
    config.train.log_every = 1
    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.tensor = 1
    config.checkpoint.every_steps = 50
    config.checkpoint.keep = 2
    config.checkpoint.export_dtype = "bfloat16"
    config.eval.tasks = "gsm8k"
    config.eval.chat = True
    return config
