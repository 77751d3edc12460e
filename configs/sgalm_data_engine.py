"""The synthetic-data engine on GSM8K: SGALM vs Self-Instruct samples at 1x / 2x / 4x the train set,
each used (with the real set) to SFT a smaller student, Qwen2.5-0.5B, evaluated on GSM8K test.

    # 1. SGALM (configs/qwen3b_gsm8k.py) -> runs/sgalm_qwen3b_gsm8k/export
    # 2. the engine:
    python -m sgalm_jax.main --config configs/sgalm_data_engine.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct \
        --config.data_engine.generator_path=runs/sgalm_qwen3b_gsm8k/export \
        --config.data_engine.student_path=/models/Qwen2.5-0.5B \
        --config.data.data_dir=/data/gsm8k --config.eval.data_dir=/data \
        --config.workdir=runs/data_engine_gsm8k

Generation: 4 x 7,473 = 29,892 samples per method with the 3B model (SGALM: its 4-shot prompt;
Self-Instruct: 6 real + 2 generated demos, ROUGE-L <= 0.7 on the questions), then the students:
k = 1, 2, 4 for each method plus the real-only row: 7 SFT runs of the 0.5B student (2 epochs,
batch 64, AdamW 1e-5: 234 / 468 / 701 / 1,168 steps for k = 0 / 1 / 2 / 4), each evaluated on the
1,319 GSM8K test problems (eval section: the same plain 'Question: ... Answer:' prompt as the
students' SFT records, 0-shot, greedy, exact match).
Memory: generation: the 3B model's fp32 weights (12.4 GB) + the sampler's bf16 KV cache (128 rows
x 2048 positions, 9.4 GB);
student SFT of 0.5B in fp32 with AdamW: ~8 GB + activations: fits one 80 GB GPU or a v4-8 easily.
"""

from sgalm_jax.algorithms import base_config


def get_config():
    config = base_config()
    config.algorithm = "data_engine"
    config.model.path = ""  # the base model (Self-Instruct's generator, and SGALM's if no run)
    config.model.architecture = "qwen2.5-3b"  # its shape, for --compile-only without it
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"  # also the student's master weights
    config.data.task = "gsm8k"
    config.data.split = "train"
    config.data.max_length = 1536

    s = config.sgalm  # generation settings (as in configs/qwen3b_gsm8k.py)
    s.num_shots = 4
    s.temperature = 1.0
    s.top_p = 1.0
    s.max_new_tokens = 512
    s.sample_batch_size = 128

    de = config.data_engine
    de.generator_path = ""  # an SGALM run's export/ ('' = the base model: no SGALM training)
    de.self_instruct_path = ""  # '' = model.path
    de.methods = "sgalm,self_instruct"
    de.scales = "1,2,4"
    de.dedupe_ngram = 13
    de.dedupe_threshold = 0.5
    de.rouge_threshold = 0.7
    de.self_instruct_seeds = 6
    de.self_instruct_generated = 2
    de.mix_real = True
    de.baseline_real_only = True
    de.student_path = ""  # required: e.g. Qwen2.5-0.5B in HF format
    de.epochs = 2.0

    # The student's SFT (the sft algorithm's sections).
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-5
    config.optimizer.warmup_steps = 20
    config.optimizer.schedule = "cosine"
    config.optimizer.end_lr_factor = 0.1
    config.train.batch_size = 64
    config.data.chat_template = False
    config.data.min_bucket = 256
    config.checkpoint.every_steps = 200
    config.checkpoint.export_dtype = "bfloat16"
    config.mesh.fsdp = -1

    # The students' evaluation (the eval algorithm's section).
    config.eval.tasks = "gsm8k"
    config.eval.k_shot = 0
    config.eval.max_new_tokens = 512
    config.eval.batch_size = 64
    return config
