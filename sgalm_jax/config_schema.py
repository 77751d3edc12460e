"""The base config's schema: every shared key with its default and a one-line description, the
model presets and the allowed choices. :mod:`sgalm_jax.config` builds, extends (algorithm
sections) and validates configs from it.
"""

from __future__ import annotations

from typing import Any

FREE_FORM = "(free-form)"

# Model architectures that need no download: random initialisation from one of these HF configs.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-qwen2": dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, tie_word_embeddings=True),
    "tiny-qwen3": dict(model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True),
    "tiny-llama": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, tie_word_embeddings=False),
    # Shapes of public checkpoints, for benchmarks and compile checks without the weights.
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536,
                         intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                         tie_word_embeddings=True),
    "qwen2.5-3b": dict(model_type="qwen2", vocab_size=151936, hidden_size=2048,
                       intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                       tie_word_embeddings=True),
    # Mistral-7B-v0.1, the base of zephyr-7b-beta (configs/spin_zephyr7b_ultrachat.py).
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=32768, rope_theta=10000.0,
                       sliding_window=4096, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6,
                       tie_word_embeddings=False),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}),
}

OPTIMIZERS = ("adamw", "rmsprop", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16", "fp32", "bf16")
REMAT = ("none", "full", "dots", "dots_no_batch")
ATTENTION = ("auto", "xla", "splash", "cudnn")
SFT_NORMALIZE = ("token", "sequence", "sequence_sum", "sum")
DISTRIBUTED_MODES = ("auto", "on", "off")
SAMPLING_ENGINES = ("auto", "static", "continuous")
SAMPLING_PLACEMENTS = ("global", "host_local")
NONFINITE = ("error", "skip")
ON_CORRUPT = ("error", "previous")

# key: (default, description). Nested dicts are sections.
_SCHEMA: dict[str, Any] = {
    "algorithm": ("demo", "which algorithm to run: a name in sgalm_jax.algorithms' registry "
                          "(demo, sft, ...)"),
    "workdir": ("", "run directory (config.json, metrics, checkpoints, export); '' = "
                    "runs/<algorithm>; rerunning with the same workdir resumes"),
    "seed": (0, "seed of parameter init, data order and the training RNG"),
    "model": {
        "path": ("", "HF checkpoint directory (config.json + safetensors) to fine-tune"),
        "init": ("", "instead of model.path: random init from a preset name (tiny-qwen2, "
                     "tiny-qwen3, tiny-llama, qwen2.5-1.5b, ...) or an HF config.json path"),
        "hf_config": ({}, f"{FREE_FORM} HF config fields overriding model.init's architecture, "
                          "e.g. {'hidden_size': 128}"),
        "dtype": ("float32", "compute dtype of activations and matmuls (float32 or bfloat16)"),
        "param_dtype": ("float32", "storage dtype of the trained (master) weights"),
        "remat": ("none", "activation rematerialisation per layer: none, full, dots, "
                          "dots_no_batch"),
        "scan_layers": (True, "run the decoder layers as one lax.scan over stacked weights "
                              "(compile time independent of depth); false = an unrolled loop "
                              "over the same weights"),
        "attention": ("auto", "self-attention kernel: auto (TPU splash, GPU cuDNN, CPU XLA), "
                              "xla, splash, cudnn"),
        "architecture": ("", "the preset architecture (qwen2.5-3b, mistral-7b, ...) that "
                             "model.path holds: --compile-only compiles with it when neither "
                             "model.path nor model.init is given; ignored otherwise"),
    },
    "tokenizer": {
        "path": ("", "tokenizer directory; '' = model.path; 'builtin:tiny' = a small byte-level "
                     "BPE built offline (for tests and the demo)"),
    },
    "mesh": {
        "data": (1, "devices along the pure data-parallel axis (-1 = the remaining devices)"),
        "fsdp": (-1, "devices along the FSDP axis: batch and weights sharded (-1 = the "
                     "remaining devices)"),
        "tensor": (1, "devices along the tensor-parallel axis: heads and MLP columns "
                      "(-1 = the remaining devices)"),
    },
    "distributed": {
        "mode": ("auto", "multi-host JAX: auto (initialise when launched on several hosts), "
                         "on, off"),
        "coordinator_address": ("", "host:port of process 0; '' = $JAX_COORDINATOR_ADDRESS, or "
                                    "detected (TPU VM, SLURM, Open MPI)"),
        "num_processes": (-1, "number of processes; -1 = $JAX_NUM_PROCESSES, or detected"),
        "process_id": (-1, "this process's index; -1 = $JAX_PROCESS_ID, or detected"),
        "coordinator_bind_address": ("", "host:port process 0's coordinator listens on; '' = "
                                         "$JAX_COORDINATOR_BIND_ADDRESS, else loopback for a "
                                         "loopback coordinator_address, else every interface"),
        "local_device_ids": ("", "comma-separated ids of the devices this process drives; '' = "
                                 "$JAX_LOCAL_DEVICE_IDS, or all (SLURM: one GPU per task)"),
        "initialization_timeout": (300, "seconds to wait for every process to join"),
    },
    "optimizer": {
        "name": ("adamw", "adamw, rmsprop (torch-style: sqrt(v) + eps, no momentum by "
                          "default) or sgd"),
        "learning_rate": (1e-5, "peak learning rate"),
        "schedule": ("constant", "shape after warmup: constant, linear (to end_lr_factor) or "
                                 "cosine (to end_lr_factor)"),
        "warmup_steps": (0, "linear warmup from 0 over this many optimizer steps"),
        "decay_steps": (0, "length of the decay after warmup; 0 = train.num_steps - "
                           "warmup_steps"),
        "end_lr_factor": (0.0, "final learning rate as a fraction of the peak (linear, cosine)"),
        "weight_decay": (0.0, "AdamW: decoupled weight decay; rmsprop/sgd: L2 added to the "
                              "gradient (as torch)"),
        "b1": (0.9, "AdamW beta1"),
        "b2": (0.999, "AdamW beta2"),
        "eps": (1e-8, "AdamW / RMSProp epsilon (RMSProp: added to sqrt(v), as torch)"),
        "rmsprop_decay": (0.99, "RMSProp smoothing constant (torch's alpha)"),
        "momentum": (0.0, "SGD / RMSProp momentum (0 = none)"),
        "max_grad_norm": (1.0, "clip gradients to this global norm; 0 = no clipping"),
        "freeze": ("", "regex over param paths ('model/embed_tokens/embedding'); matching "
                       "params are not trained"),
    },
    "train": {
        "num_steps": (100, "optimizer steps to run (the run ends there; resume continues to "
                           "it)"),
        "batch_size": (8, "global batch: sequences per optimizer step, over all devices and "
                          "micro-batches"),
        "grad_accum_steps": (1, "micro-batches per optimizer step (gradients averaged "
                                "in-step)"),
        "log_every": (1, "write metrics every this many steps"),
        "compute_dtype": ("", "cast params to this dtype for the forward/backward (e.g. "
                              "bfloat16 over float32 master weights); '' = no cast"),
        "nonfinite": ("error", "a NaN/inf loss or gradient norm: error (stop, naming the step; "
                               "nothing of it is saved or exported) or skip (keep the previous "
                               "params for that step)"),
        "max_skipped_steps": (10, "with train.nonfinite='skip': stop with an error after this "
                                  "many consecutive skipped steps"),
    },
    "checkpoint": {
        "every_steps": (100, "save a checkpoint every this many steps (0 = only at the end "
                             "and on preemption)"),
        "keep": (2, "keep the last this many checkpoints"),
        "async_save": (True, "write checkpoints in the background while training continues"),
        "resume": (True, "resume from the latest complete checkpoint in workdir/checkpoints"),
        "export": (True, "at the end, write the model in HF format to workdir/export"),
        "export_dtype": ("", "dtype of the exported weights; '' = model.param_dtype"),
        "checksums": (True, "write a SHA-256 manifest into each checkpoint and verify it before "
                            "restoring"),
        "on_corrupt": ("error", "a checkpoint whose checksums do not match at resume: error "
                                "(stop, naming it) or previous (move it to <step>.corrupt and "
                                "resume from the previous complete one)"),
    },
    "metrics": {
        "tensorboard": (True, "write TensorBoard event files to the workdir"),
        "progress_bar": (True, "show a tqdm progress bar with loss, tokens/s and step time"),
        "peak_tflops": (0.0, "peak TFLOP/s per device for the MFU estimate; 0 = from the "
                             "device kind (TPU v4/v5e/v5p/v6e, A100, H100, H200)"),
    },
    "data": {
        "train_file": ("", "JSONL file of training records (prompt/response fields)"),
        "task": ("", "instead of train_file: a task name from sgalm_jax.data's registry "
                     "(e.g. gsm8k, arithmetic)"),
        "split": ("train", "split of data.task to train on"),
        "data_dir": ("", "directory data.task reads its files from; '' = the task's default"),
        "prompt_key": ("prompt", "record field holding the prompt"),
        "response_key": ("response", "record field holding the target response"),
        "max_examples": (0, "use at most this many records; 0 = all"),
        "chat_template": (False, "wrap prompts in the tokenizer's chat template (user turn, "
                                 "then the assistant response)"),
        "system_prompt": ("", "system message put before the prompt when chat_template is on"),
        "max_length": (512, "tokens per sequence; longer examples are truncated (response "
                            "end first kept)"),
        "packing": (False, "pack several examples per row of max_length (positions restart "
                           "per example) instead of padding to buckets"),
        "min_bucket": (32, "shortest padded length; batches pad to the next power of two "
                           "up to max_length"),
        "shuffle": (True, "shuffle the records each epoch (seeded)"),
    },
    "sft": {
        "normalize": ("token", "loss normalisation: token, sequence, sequence_sum or sum"),
        "logits_chunk_size": (0, "compute the loss from hidden states this many positions at a "
                                 "time, never materialising [B, T, vocab] logits; 0 = full logits"),
        "distill": (False, "train on distillation pairs (SeqKD): prompts and teacher responses "
                           "read and cut as GAD reads them (the distill section), the loss on "
                           "the response and its end token"),
    },
    # --- the sampler every algorithm generates with (sampling.py, sampling_engine.py) -----------
    "sampling": {
        "engine": ("auto", "static (each batch decodes until its longest row ends), continuous "
                           "(a fixed number of slots, each refilled with the next waiting row when "
                           "its row ends) or auto (continuous when a call has more rows than "
                           "sampling.num_slots, else static)"),
        "num_slots": (0, "rows decoded at once (continuous: slots, static: batch rows); 0 = the "
                         "algorithm's own size: sgalm.sample_batch_size, eval.batch_size, GRPO "
                         "train.batch_size, self-play 2 x train.batch_size"),
        "prefill_chunk": (0, "continuous: prompts per prefill; 0 = enough to fill every slot"),
        "refill_min": (0, "continuous: once the prefilled prompts have all started, go back to the "
                          "host for the next prefill when this many slots are idle; 0 = "
                          "num_slots / 32 (at least 1)"),
        "min_slots": (0, "continuous: once no row waits, move the live rows to programs with half "
                         "the slots, down to this many; 0 = num_slots / 4"),
        "placement": ("global", "global (sample on the training mesh) or host_local (each host "
                                "samples its share of the prompts on its own copy of the params, "
                                "laid out on sampling.local_mesh; rows gathered in order)"),
        "local_mesh": ({}, f"{FREE_FORM} host_local: the per-host sampling mesh, e.g. "
                           "{'data': 2, 'tensor': 4}; {} = data over the host's devices (the "
                           "params replicated on each)"),
    },
    "eval": {
        "tasks": ("gsm8k", "comma-separated tasks: gsm8k, arc (ARC-Challenge), mbpp, "
                           "arithmetic"),
        "split": ("test", "split to evaluate"),
        "data_dir": ("", "directory holding one subdirectory per task (gsm8k/, arc_challenge/, "
                         "mbpp/, as ../shared/data), or one task's files; '' = the hub"),
        "max_examples": (0, "evaluate the first this many examples of each task; 0 = all"),
        "k_shot": (-1, "demonstrations per prompt (from the task's train split; MBPP: its "
                       "prompt split); -1 = per task: GSM8K 5, ARC 0, MBPP 3, arithmetic 0"),
        "chat": (False, "render prompts with the tokenizer's chat template (instruct models)"),
        "arc_mode": ("loglik", "ARC scoring: loglik (lm-eval acc / acc_norm) or generate (the "
                               "model writes the letter)"),
        "max_new_tokens": (512, "longest generated answer in tokens"),
        "temperature": (0.0, "sampling temperature (0 = greedy, the accuracy / pass@1 protocol)"),
        "top_p": (1.0, "nucleus sampling when temperature > 0 (1 = off)"),
        "num_samples": (1, "MBPP samples per problem: pass@k for k in 1, 10, 100 up to it "
                           "(needs temperature > 0 when > 1)"),
        "batch_size": (32, "prompts per generation call (and log-likelihood requests per "
                           "forward)"),
        "sandbox_workers": (0, "parallel MBPP sandbox processes; 0 = min(8, 2 x CPUs)"),
    },
}
