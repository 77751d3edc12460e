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
Memory, compiled for a TPU v5e-8 (``--compile-only=v5e-8
--config.data_engine.student_init=qwen2.5-0.5b``, libtpu 0.0.42.1; GiB per chip, peak = args +
outputs - donated + temporaries):

| program | args | temp | peak |
|---|---:|---:|---:|
| generator engine prefill (64 prompts x 2048) | 1.44 | 7.99 | 10.00 |
| generator engine decode, rows started in the loop (64 slots x 2560 cache, 64-prompt stash) | 2.71 | 3.01 | 5.72 |
| student SFT step (64 x 1536, 4 micro-batches, logits 256 positions at a time) | 0.69 | 9.16 | 9.85 |

Every program fits (the largest uses 62% of a chip). As first written (128 slots, the student's
step in one micro-batch with whole-sequence logits), two did not: the student's SFT step needed
34.25 GiB of temporaries (26.08 with chunked logits alone), and the engine's former insert
program at 128 slots 16.85 GiB (its scatter into the slot-sharded cache gathered the cache:
docs/benchmarks.md). Hence ``sampling.num_slots = 64``, ``train.grad_accum_steps = 4`` and
``sft.logits_chunk_size = 256`` below (the same updates: accumulation and chunking do not change
the math). Rows now start inside the engine's decode, so 128 slots compile too (decode 9.28 GiB;
the 128-prompt prefill chunk 15.31, 96% of a chip: add ``sampling.prefill_chunk=64`` with it).
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
    config.sampling.num_slots = 64  # rows decoded at once (see the docstring for 128)

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
    config.train.grad_accum_steps = 4  # 16 rows per micro-batch (one whole batch: 34 GiB per chip)
    config.sft.logits_chunk_size = 256
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
