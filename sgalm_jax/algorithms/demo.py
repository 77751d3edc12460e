"""The embedded default job (``python -m sgalm_jax.main``): SGALM end to end on a CPU, offline.

It is the evidence study (:mod:`sgalm_jax.algorithms.evidence`, ``docs/evidence.md``) at one seed
with two of its methods; each phase is a normal run in a subdirectory of the workdir (so an
interrupted demo resumes where it stopped):

1. **Tokenizer**: a byte-level BPE (512 tokens) trained on the arithmetic task's training texts
   and the SGALM prompts (built offline in a second; the task-trained vocabulary makes samples
   ~2x shorter than ``builtin:tiny``'s, which is most of the demo's speed).
2. **Pre-training** (``pretrain/``, the ``sft`` algorithm): a small Qwen2-architecture model,
   randomly initialised, is trained on generator-format sequences (the SGALM generator prompt with
   ``sgalm.num_shots`` real samples followed by one more real sample) of the arithmetic task's
   ``easy`` level, until it writes valid samples at a middling rate. ``train.num_steps`` sets the
   length of this phase (batches of :data:`PRETRAIN_BATCH` records).
3. **SGALM** (``runs/sgalm/seed_N``) from the pre-trained model; every iteration prints D's
   accuracy on held-out real vs held-out generated samples, the mean D on real and generated
   samples, and the validity rate of the generated samples (the task's checker and solver).
   **Baseline** (``runs/sft/seed_N``): plain SFT from the same pre-trained model for the same
   number of optimizer steps, with the same optimizer (``optimizer`` section) and batch size.
4. **Comparison**: the study's table: the pre-trained, SGALM and SFT-continued models each write
   the same samples' prompts at the same seed (validity, well-formedness, diversity, copies), are
   read as SGALM's discriminator on held-out real vs their own samples, and answer the same test
   questions greedily (exact match of the final answer).

``demo_config()`` is the demo's config (``configs/demo.py`` returns it). When the demo runs from
the base config (no ``--config``), every key still at its base default takes the demo's value,
and keys set on the command line win.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from typing import Any

import jax
import ml_collections

from sgalm_jax.algorithms import base_config
from sgalm_jax.config import DEFAULTS, get, save_config, to_dict
from sgalm_jax.training import multihost as mh

log = logging.getLogger(__name__)

# Pre-training (phase 2) optimizer: AdamW with a cosine decay (the SGALM phase and the baseline use
# the config's optimizer section).
PRETRAIN_LR = 3e-3
PRETRAIN_WARMUP = 20
PRETRAIN_RECORDS = 2000
PRETRAIN_BATCH = 2  # small batches, many steps: lower loss per CPU second


def demo_config() -> ml_collections.ConfigDict:
    """The demo's config: a ~0.4M-parameter Qwen2-shaped model and easy arithmetic problems."""
    config = base_config()
    config.algorithm = "demo"
    config.model.init = "tiny-qwen2"
    config.model.hf_config = {"hidden_size": 96, "intermediate_size": 256,
                              "num_hidden_layers": 4, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "vocab_size": 512}
    config.tokenizer.path = ""  # the demo trains its own (phase 1)
    config.data.task = "arithmetic"
    config.data.max_length = 512
    config.sgalm.task_options = {"level": "easy"}  # one + or - up to 20 (docs/evidence.md)
    config.sgalm.num_shots = 2
    config.sgalm.iterations = 3
    config.sgalm.num_samples = 96
    config.sgalm.heldout_size = 32
    config.sgalm.rounds_per_iteration = 10
    config.sgalm.max_new_tokens = 0  # the 99th percentile of real sample lengths + 16
    config.sgalm.temperature = 0.5  # docs/evidence.md: at 1.0 a 0.4M model writes noise
    config.sgalm.sample_batch_size = 48
    config.sgalm.score_batch_size = 32
    config.sgalm.final_samples = 0  # phase 5 evaluates every model the same way
    config.sgalm.length_bucket = 64
    config.optimizer.name = "rmsprop"
    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 10  # torch RMSProp's first steps are ~10x lr without it
    config.optimizer.max_grad_norm = 1.0
    config.train.batch_size = 16
    config.train.num_steps = 800  # pre-training steps (batches of PRETRAIN_BATCH records)
    config.checkpoint.every_steps = 0
    config.metrics.progress_bar = True
    return config


def overlay(demo: ml_collections.ConfigDict, given: ml_collections.ConfigDict
            ) -> ml_collections.ConfigDict:
    """``demo`` with every key of ``given`` that differs from the base default (explicit
    overrides win over the demo's values)."""
    out = ml_collections.ConfigDict(to_dict(demo))
    plain = to_dict(given)
    for key, default in DEFAULTS.items():
        value = get(plain, key)
        if value != default:
            node = out
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return out


def _sub(config: ml_collections.ConfigDict, **changes: Any) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict(to_dict(config))
    for key, value in changes.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return out


# ------------------------------------------------------------------------------------ phases
def build_tokenizer(config: Any, path: str) -> Any:
    """Phase 1: a 512-token byte-level BPE trained on the task's train texts and the prompts."""
    from transformers import AutoTokenizer

    if mh.exists(os.path.join(path, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(path)
    mh.write_once(_train_tokenizer, config, path, name="demo_tokenizer")  # process 0 trains it
    return AutoTokenizer.from_pretrained(path)


def _train_tokenizer(config: Any, path: str) -> None:
    from sgalm_jax.data import SGALMTemplates, get_task
    from sgalm_jax.training.tokenizer import build_tiny_tokenizer

    task = get_task(config.data.task, **to_dict(config.sgalm.task_options))
    t = SGALMTemplates()
    corpus = [task.sample_text(e) for e in task.load("train")]
    corpus += [t.generator.format(examples="", next_index=i) for i in range(1, 10)]
    # Enough copies of the discriminator prompt that " Real" and " Fake" become single tokens.
    corpus += [t.discriminator.format(sample="", exemplars="") + f" {w}"
               for w in (t.real_word, t.fake_word)] * 2000
    tok = build_tiny_tokenizer(vocab_size=512, corpus=corpus)
    tmp = path + ".tmp"
    tok.save_pretrained(tmp)
    os.replace(tmp, path)


def pretrain_records(config: Any, path: str, n: int) -> None:
    """Generator-format SFT records: a k-shot generator prompt of real samples followed by one
    more real sample (the loss covers the whole text, so every sample in it teaches)."""
    if mh.exists(path):
        return
    mh.write_once(_write_pretrain_records, config, path, n, name="demo_records")


def _write_pretrain_records(config: Any, path: str, n: int) -> None:
    from sgalm_jax.data import SGALMTemplates, get_task
    from sgalm_jax.data.prompts import sgalm_generator_prompt

    task = get_task(config.data.task, **to_dict(config.sgalm.task_options))
    texts = [task.sample_text(e) for e in task.load("train")]
    k = int(config.sgalm.num_shots)
    rng = random.Random(f"{config.seed}:pretrain")
    t = SGALMTemplates(num_examples=k)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for _ in range(n):
            picks = rng.sample(range(len(texts)), k + 1)
            text = sgalm_generator_prompt([texts[i] for i in picks[:k]], t) + texts[picks[k]]
            f.write(json.dumps({"prompt": "", "response": text}) + "\n")
    os.replace(path + ".tmp", path)


def _sft_config(config: Any, workdir: str, *, model_path: str, tokenizer: str, data: str,
                steps: int, pretrain: bool) -> ml_collections.ConfigDict:
    c = _sub(config, algorithm="sft", workdir=workdir, **{
        "tokenizer.path": tokenizer, "data.task": "", "data.train_file": data,
        "data.packing": True, "train.num_steps": steps, "checkpoint.every_steps": 0,
        "checkpoint.export": True})
    if pretrain:
        c.optimizer.name = "adamw"
        c.optimizer.learning_rate = PRETRAIN_LR
        c.optimizer.warmup_steps = PRETRAIN_WARMUP
        c.optimizer.schedule = "cosine"
        c.optimizer.end_lr_factor = 0.05
        c.optimizer.weight_decay = 0.0
        c.train.batch_size = PRETRAIN_BATCH
    else:
        c.model.init = ""
        c.model.hf_config = {}
        c.model.path = model_path
    return c


# ------------------------------------------------------------------------------------ run
DEMO_METHODS = ("sgalm", "sft")


def run(config: Any, workdir: str) -> dict[str, Any]:
    """The phases; prints the per-iteration SGALM diagnostics and the study's table at seed 0."""
    from sgalm_jax.algorithms import evidence

    start = time.perf_counter()
    config = overlay(demo_config(), config)
    config.workdir = workdir
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        save_config(config, os.path.join(workdir, "config.json"))
    for noisy in ("sgalm_jax.training.checkpoint", "sgalm_jax.algorithms.sgalm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # The phases compile similar programs (and a rerun the same ones): keep them on disk.
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))

    def phase(msg: str) -> None:
        print(f"\n[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    iterations = int(config.sgalm.iterations)
    updates = 2 * (int(config.sgalm.rounds_per_iteration) or 10)
    study = evidence.Study(workdir, config, iterations=iterations, updates=updates,
                           pretrain_steps=int(config.train.num_steps),
                           evaluate_every_iteration=False, log=lambda m: print(m, flush=True))
    level = dict(config.sgalm.task_options).get("level", "hard")
    phase(f"1-2/4 tokenizer (a 512-token BPE on the arithmetic task's texts, level {level!r}) and "
          f"pre-training a small Qwen2-architecture model with SFT for {config.train.num_steps} "
          "steps (generator-format sequences)")
    study.prepare()
    phase(f"3/4 from the pre-trained model, seed {config.seed}: SGALM ({iterations} iterations of "
          f"{updates} updates: 1 D + 1 G step per round) and, for the same {iterations * updates} "
          "updates, plain SFT; each model is then evaluated the same way")
    study.run_seed(int(config.seed), DEMO_METHODS)
    phase("4/4 comparison: the same prompts, questions and held-out samples for every model")
    rows = [r for r in study.results() if r["seed"] == int(config.seed)
            and r["method"] in ("base",) + DEMO_METHODS]
    summary = evidence.summarize(rows, iteration=iterations)
    print("\n" + evidence.format_table(summary))
    print(f"\n{study.num_samples} samples per model at temperature {config.sgalm.temperature} "
          f"from {config.sgalm.num_shots}-shot prompts.")
    for k, v in evidence.METRIC_DOC.items():
        print(f"  {k}: {v}")
    print("One seed: differences of a few points are noise. docs/evidence.md has every method "
          "(SGALM d_only / g_only, SPIN, IRIS, GAD) over 5 seeds with 95% intervals and plots "
          "(benchmarks/study.py reproduces it).")
    total = time.perf_counter() - start
    print(f"demo finished in {total:.0f}s; runs in {workdir}/(pretrain|runs/<method>/seed_N)")
    out = {"rows": {r["method"]: r for r in rows}, "seconds": round(total, 1),
           "updates": iterations * updates}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "demo_results.json"), "w") as f:
            json.dump(out, f, indent=2)
    return out
