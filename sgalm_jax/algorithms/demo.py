"""The embedded default job (``python -m sgalm_jax.main``): SGALM end to end on a CPU, offline.

Five phases, each a normal run of its algorithm in a subdirectory of the workdir (so an interrupted
demo resumes where it stopped):

1. **Tokenizer**: a byte-level BPE (512 tokens) trained on the arithmetic task's training texts
   and the SGALM prompts (built offline in a second; the task-trained vocabulary makes samples
   ~2x shorter than ``builtin:tiny``'s, which is most of the demo's speed).
2. **Pre-training** (``pretrain/``, the ``sft`` algorithm): a small Qwen2-architecture model,
   randomly initialised, is trained on generator-format sequences (the SGALM generator prompt with
   ``sgalm.num_shots`` real samples followed by one more real sample), until it writes mostly
   well-formed samples. ``train.num_steps`` sets the length of this phase.
3. **SGALM** (``sgalm/``, the ``sgalm`` algorithm) from the pre-trained model; every iteration
   prints D's accuracy on held-out real vs held-out generated samples, the mean D on real and
   generated samples, and the validity rate of the generated samples (the arithmetic checker).
4. **Baseline** (``sft_continue/``): plain SFT from the same pre-trained model for the same number
   of optimizer steps, with the same optimizer (``optimizer`` section) and batch size.
5. **Comparison**: the pre-trained, SGALM and SFT-continued models each write the same number of
   samples from the same prompts and seed (validity, well-formedness, diversity) and answer the same
   held-out test questions greedily (exact match of the final answer).

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
import numpy as np

from sgalm_jax.algorithms import base_config
from sgalm_jax.config import DEFAULTS, get, save_config, to_dict
from sgalm_jax.training import multihost as mh

log = logging.getLogger(__name__)

# Pre-training (phase 2) optimizer: AdamW with a cosine decay (the SGALM phase and the baseline use
# the config's optimizer section).
PRETRAIN_LR = 3e-3
PRETRAIN_WARMUP = 20
PRETRAIN_RECORDS = 2000


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
    config.sgalm.task_options = {"min_steps": 1, "max_steps": 1, "max_value": 99}
    config.sgalm.num_shots = 2
    config.sgalm.iterations = 3
    config.sgalm.num_samples = 96
    config.sgalm.heldout_size = 32
    config.sgalm.rounds_per_iteration = 10
    config.sgalm.max_new_tokens = 0  # the 99th percentile of real sample lengths + 16
    config.sgalm.temperature = 1.0
    config.sgalm.sample_batch_size = 48
    config.sgalm.score_batch_size = 32
    config.sgalm.final_samples = 0  # phase 5 evaluates every model the same way
    config.sgalm.length_bucket = 64
    config.optimizer.name = "rmsprop"
    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 10  # torch RMSProp's first steps are ~10x lr without it
    config.optimizer.max_grad_norm = 1.0
    config.train.batch_size = 16
    config.train.num_steps = 200  # phase 2 (pre-training) steps
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
        c.train.batch_size = 8
    else:
        c.model.init = ""
        c.model.hf_config = {}
        c.model.path = model_path
    return c


class Evaluator:
    """Phase 5: the same prompts and seed for every model (one sampler: the models share a graph).

    :meth:`__call__` gives the validity / well-formedness / diversity of ``num_samples`` generated
    samples and the greedy answer accuracy on ``num_questions`` test questions.
    """

    def __init__(self, config: Any, tokenizer: Any, model_path: str, *, num_samples: int,
                 num_questions: int):
        from sgalm_jax import sharding as sh
        from sgalm_jax.algorithms.sgalm_data import SGALMData
        from sgalm_jax.data.prompts import sgalm_generator_prompt
        from sgalm_jax.models import ModelConfig
        from sgalm_jax.sampling import Sampler
        from sgalm_jax.training.tokenizer import eos_token_id, pad_token_id

        self.config, self.tokenizer = config, tokenizer
        self.mesh = sh.make_mesh(dict(config.mesh))
        mcfg = ModelConfig.from_hf(model_path)
        self.eos = eos_token_id(tokenizer, mcfg.eos_token_ids)
        self.data = SGALMData(config, tokenizer, eos_id=self.eos)
        self.num_samples = num_samples
        self.sampler = None
        self._sampler_args = (Sampler, mcfg, pad_token_id(tokenizer, self.eos))
        self.questions = self.data.task.load("test", limit=num_questions)
        rng = random.Random(f"{config.seed}:questions")
        self.prompts = []
        for q in self.questions:
            demos = [self.data.real_texts[i]
                     for i in rng.sample(range(len(self.data.pool)), self.data.num_shots)]
            self.prompts.append(self.data.encode(sgalm_generator_prompt(
                demos, self.data.templates, prefix=self.data.task.format_prompt(q))))

    def __call__(self, model_path: str) -> dict[str, float]:
        from sgalm_jax.algorithms import diagnostics as diag
        from sgalm_jax.models import load_pretrained
        from sgalm_jax.training import split_model

        graphdef, params = split_model(load_pretrained(model_path, mesh=self.mesh))
        if self.sampler is None:
            cls, mcfg, pad = self._sampler_args
            self.sampler = cls(graphdef, mcfg, pad_token_id=pad, mesh=self.mesh,
                               min_batch_bucket=int(self.config.sgalm.sample_batch_size))
        s, data = self.config.sgalm, self.data
        max_new = int(s.max_new_tokens) or data.p99_length + 16
        samples = data.generate(self.sampler, params, self.num_samples,
                                rng_seed=(self.config.seed, 99), max_new_tokens=max_new,
                                temperature=float(s.temperature), top_p=1.0, top_k=0,
                                batch_size=int(s.sample_batch_size))
        out = {"validity": float(np.mean([bool(x.valid) for x in samples])),
               "well_formed": float(np.mean([x.well_formed for x in samples]))}
        out.update(diag.diversity([x.text for x in samples], data.real_texts))
        gen = self.sampler.generate(params, self.prompts, max_new_tokens=max_new,
                                    temperature=0.0, stop_token_ids=(self.eos,),
                                    rng=jax.random.key(0))
        correct = []
        for q, comp in zip(self.questions, gen.completions()):
            text = self.tokenizer.decode(comp, skip_special_tokens=True)
            text = text.split(data.templates.generator_stop)[0]
            correct.append(data.task.score(q, text).correct)
        out["answer_accuracy"] = float(np.mean(correct))
        return out


# ------------------------------------------------------------------------------------ run
def run(config: Any, workdir: str) -> dict[str, Any]:
    """The five phases; prints the per-iteration SGALM diagnostics and the final comparison."""
    from sgalm_jax.algorithms import sft, sgalm

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

    tok_dir = os.path.join(workdir, "tokenizer")
    phase("1/5 tokenizer: a 512-token BPE trained on the arithmetic task's texts")
    tokenizer = build_tokenizer(config, tok_dir)
    records = os.path.join(workdir, "data", "pretrain.jsonl")
    pretrain_records(config, records, PRETRAIN_RECORDS)

    phase(f"2/5 pre-training a small Qwen2-architecture model with SFT for "
          f"{config.train.num_steps} steps (generator-format sequences)")
    pre_dir = os.path.join(workdir, "pretrain")
    pre_cfg = _sft_config(config, pre_dir, model_path="", tokenizer=tok_dir, data=records,
                          steps=int(config.train.num_steps), pretrain=True)
    sft.validate(pre_cfg)
    if not mh.exists(os.path.join(pre_dir, "export", "config.json")):
        sft.run(pre_cfg, pre_dir)
    pre_model = os.path.join(pre_dir, "export")

    phase("3/5 SGALM iterations from the pre-trained model")
    sg_dir = os.path.join(workdir, "sgalm")
    sg_cfg = _sub(config, algorithm="sgalm", workdir=sg_dir, **{
        "model.init": "", "model.hf_config": {}, "model.path": pre_model,
        "tokenizer.path": tok_dir})
    sgalm.validate(sg_cfg)
    steps_d, steps_g = sgalm.active_steps(sg_cfg)
    rounds = int(sg_cfg.sgalm.rounds_per_iteration) or sgalm.SGALM(sg_cfg, sg_dir).rounds
    num_updates = int(sg_cfg.sgalm.iterations) * rounds * (steps_d + steps_g)
    if not mh.exists(os.path.join(sg_dir, "export", "config.json")):
        sgalm.run(sg_cfg, sg_dir)

    phase(f"4/5 baseline: plain SFT from the same pre-trained model for the same {num_updates} "
          "optimizer steps")
    ft_dir = os.path.join(workdir, "sft_continue")
    ft_cfg = _sft_config(config, ft_dir, model_path=pre_model, tokenizer=tok_dir, data=records,
                         steps=num_updates, pretrain=False)
    sft.validate(ft_cfg)
    if not mh.exists(os.path.join(ft_dir, "export", "config.json")):
        sft.run(ft_cfg, ft_dir)

    phase("5/5 comparison: the same prompts and seed for every model")
    n_samples, n_questions = 96, 64
    evaluate = Evaluator(sg_cfg, tokenizer, pre_model, num_samples=n_samples,
                         num_questions=n_questions)
    rows = {name: evaluate(path) for name, path in (
        ("pre-trained", pre_model), ("SGALM", os.path.join(sg_dir, "export")),
        ("SFT continued", os.path.join(ft_dir, "export")))}
    cols = ("validity", "well_formed", "answer_accuracy", "distinct_2", "copies")
    print(f"\n{'model':<15}" + "".join(f"{c:>17}" for c in cols))
    for name, r in rows.items():
        print(f"{name:<15}" + "".join(f"{r[c]:>17.3f}" for c in cols))
    print(f"\nvalidity: share of {n_samples} generated samples whose every step checks out; "
          f"answer_accuracy: {n_questions} test questions, greedy; copies: samples identical to a "
          "training sample.")
    total = time.perf_counter() - start
    print(f"demo finished in {total:.0f}s; runs in {workdir}/(pretrain|sgalm|sft_continue)")
    summary = {"rows": rows, "seconds": round(total, 1), "sgalm_updates": num_updates}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "demo_results.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
