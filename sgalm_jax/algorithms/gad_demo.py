"""The GAD demo on a CPU (``python -m sgalm_jax.main --config configs/gad_demo.py``): a small
student distilled from an exact teacher by SeqKD and by GAD for the same number of updates.

The task is the built-in arithmetic word problems (offline, one or two steps, small numbers:
``distill.task_options``); the **teacher** is the task's own solver, whose worked solutions are
the responses (exact: the checker accepts every one, which the demo verifies rather than assumes).
Phases, each a normal run of its algorithm in a subdirectory of the workdir (an interrupted demo
resumes where it stopped):

1. **tokenizer**: a 512-token byte-level BPE trained on the task's training texts;
2. **student** (``student/``, ``sft`` with ``sft.distill``): a ~0.4M-parameter Qwen2-shaped model,
   randomly initialised, SFT'd briefly (``gad_demo.pretrain_steps``) on the teacher's pairs: it
   learns the format, and some of the arithmetic: the "before" row;
3. **SeqKD** (``seqkd/``): SFT of that student on the teacher's responses for N updates;
4. **GAD warmup** (``gad_warmup/``): ``gad_demo.warmup_steps`` steps, the discriminator (the
   student's body with a fresh head) alone for ``gad.d_only_steps``, then SFT + BT steps;
5. **GAD** (``gad/``): ``train.num_steps`` GAD steps from the warmup's checkpoint: GRPO on the
   discriminator's scores, BT steps of the discriminator, k3 KL to the warmup's student;
6. **comparison**: the task checker's accuracy of greedy answers to ``gad.eval_examples`` held-out
   test problems (and ROUGE-L against the teacher, response length) for the student before
   distillation, after SeqKD and after GAD, with the teacher as the ceiling.

N, the student's updates, is the same for SeqKD and GAD: ``warmup_steps - d_only_steps`` SFT
updates of the warmup plus ``train.num_steps`` GRPO updates of the GAD stage. Both use the same
optimizer settings and the same prompts per step.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from sgalm_jax.algorithms import base_config
from sgalm_jax.config import register_section, save_config, to_dict

log = logging.getLogger(__name__)

register_section("gad_demo", {
    "pretrain_steps": (150, "SFT steps that make the student (the 'before' model)"),
    "pretrain_lr": (3e-3, "peak learning rate of the student's pre-training (cosine decay)"),
    "gad_lr": (6e-5, "learning rate of both roles in the GAD stage (the paper's Qwen-teacher "
                     "runs: warmup 5e-6, GAD 1e-6; here optimizer.learning_rate / 5)"),
    "warmup_steps": (40, "steps of the GAD warmup stage (the first gad.d_only_steps train only "
                         "the discriminator)"),
}, owner=__name__)


def demo_config() -> ml_collections.ConfigDict:
    """The demo's config: a ~0.4M-parameter Qwen2-shaped student, easy arithmetic problems."""
    config = base_config()
    config.algorithm = "gad_demo"
    config.model.init = "tiny-qwen2"
    config.model.hf_config = {"hidden_size": 96, "intermediate_size": 256,
                              "num_hidden_layers": 4, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "vocab_size": 512}
    config.data.task = "arithmetic"
    config.data.max_length = 128
    config.data.min_bucket = 128
    d = config.distill
    d.task_options = {"min_steps": 1, "max_steps": 1, "max_value": 50}
    d.max_prompt_tokens = 80
    d.max_response_tokens = 48
    d.prompt_truncation = "left"
    g = config.gad
    g.d_only_steps = 10
    g.num_generations = 8
    g.temperature = 0.8
    g.beta = 1e-3
    g.clip_eps = 0.2
    g.loss_type = "dapo"
    g.logprob_chunk_size = 128
    g.eval_examples = 200  # the whole test split
    g.eval_split = "test"
    g.log_samples = 0
    g.save_rollouts = True
    o = config.optimizer
    o.name = "adamw"
    o.learning_rate = 3e-4
    o.weight_decay = 0.01
    o.schedule = "constant"
    o.max_grad_norm = 0.2
    config.train.batch_size = 64  # 8 prompts x 8 responses per GAD step
    config.train.num_steps = 60  # GAD-stage steps
    config.checkpoint.every_steps = 30
    config.metrics.progress_bar = False
    return config


def _sub(config: Any, **changes: Any) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict(to_dict(config))
    for key, value in changes.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return out


def build_tokenizer(config: Any, path: str) -> Any:
    """Phase 1: a 512-token byte-level BPE trained on the task's training texts."""
    from transformers import AutoTokenizer

    from sgalm_jax.algorithms.distill_data import distill_task
    from sgalm_jax.training.tokenizer import build_tiny_tokenizer

    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        task = distill_task(config)
        corpus = [task.format_prompt(e) + task.format_target(e) for e in task.load("train")]
        tmp = path + ".tmp"
        build_tiny_tokenizer(vocab_size=512, corpus=corpus).save_pretrained(tmp)
        os.replace(tmp, path)
    return AutoTokenizer.from_pretrained(path)


def evaluate(config: Any, model_path: str, tokenizer: Any, out_dir: str) -> dict[str, float]:
    """Greedy answers of the model at ``model_path`` to the held-out problems, through GAD's own
    checkpoint evaluation (the task checker, ROUGE-L against the teacher, length)."""
    from sgalm_jax import sharding as sh
    from sgalm_jax.algorithms.distill_data import make_encoder
    from sgalm_jax.algorithms.gad_eval import CheckpointEval
    from sgalm_jax.models import load_pretrained
    from sgalm_jax.sampling import Sampler
    from sgalm_jax.training import split_model
    from sgalm_jax.training.tokenizer import eos_token_id, pad_token_id

    mesh = sh.make_mesh({"data": 1, "fsdp": -1, "tensor": 1} if jax.device_count() > 1
                        else {"data": 1, "fsdp": 1, "tensor": 1})
    model = load_pretrained(model_path, mesh=mesh)
    graphdef, params = split_model(model)
    eos = eos_token_id(tokenizer, model.config.eos_token_ids)
    encoder = make_encoder(config, tokenizer, end_token_id=eos,
                           stop_token_ids=model.config.eos_token_ids)
    sampler = Sampler(graphdef, model.config, pad_token_id=pad_token_id(tokenizer, eos),
                      mesh=mesh, min_batch_bucket=int(config.gad.eval_examples))
    ev = CheckpointEval(config, out_dir, tokenizer, encoder, sampler, mesh)
    return ev(params, 0)


def teacher_ceiling(config: Any, tokenizer: Any) -> dict[str, float]:
    """The checker's accuracy of the teacher's own responses to the same held-out problems."""
    from sgalm_jax.algorithms.distill_data import load_distill_pool, make_encoder

    enc = make_encoder(config, tokenizer, end_token_id=int(tokenizer.eos_token_id))
    pool = load_distill_pool(config, tokenizer, enc, split=config.gad.eval_split,
                             limit=int(config.gad.eval_examples), vocab_size=10**9)
    ok = [pool.task.score(e, t).correct for e, t in zip(pool.examples, pool.teacher_texts)]
    return {"accuracy": float(np.mean(ok)), "rouge_l": 1.0,
            "response_tokens": float(np.mean([len(t) for t in pool.teacher_ids]))}


def run(config: Any, workdir: str) -> dict[str, Any]:
    """The six phases; prints the comparison table and writes ``gad_demo_results.json``."""
    from sgalm_jax.algorithms import gad, sft

    start = time.perf_counter()
    config = ml_collections.ConfigDict(to_dict(config))
    config.workdir = workdir
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        save_config(config, os.path.join(workdir, "config.json"))
    for noisy in ("sgalm_jax.training.checkpoint", "sgalm_jax.algorithms.gad",
                  "sgalm_jax.algorithms.distill_data", "sgalm_jax.training.roles"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))

    def phase(msg: str) -> None:
        print(f"\n[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    def done(d: str) -> bool:
        return os.path.exists(os.path.join(d, "export", "config.json"))

    dm, g = config.gad_demo, config.gad
    tok_dir = os.path.join(workdir, "tokenizer")
    phase("1/6 tokenizer: a 512-token BPE trained on the arithmetic task's texts")
    tokenizer = build_tokenizer(config, tok_dir)

    stu_dir = os.path.join(workdir, "student")
    phase(f"2/6 the student: SFT of a random ~0.4M-parameter model for {dm.pretrain_steps} steps")
    stu_cfg = _sub(config, algorithm="sft", workdir=stu_dir, **{
        "sft.distill": True, "tokenizer.path": tok_dir, "train.batch_size": 16,
        "train.num_steps": int(dm.pretrain_steps), "checkpoint.every_steps": 0,
        "optimizer.learning_rate": float(dm.pretrain_lr), "optimizer.schedule": "cosine",
        "optimizer.warmup_steps": 20, "optimizer.end_lr_factor": 0.05,
        "optimizer.max_grad_norm": 1.0})
    sft.validate(stu_cfg)
    if not done(stu_dir):
        sft.run(stu_cfg, stu_dir)
    student = os.path.join(stu_dir, "export")
    start_model = {"model.init": "", "model.hf_config": {}, "model.path": student,
                   "tokenizer.path": tok_dir}

    updates = int(dm.warmup_steps) - int(g.d_only_steps) + int(config.train.num_steps)
    prompts = gad.prompts_per_step(config)
    kd_dir = os.path.join(workdir, "seqkd")
    phase(f"3/6 SeqKD: SFT on the teacher's responses, {updates} updates of {prompts} pairs")
    kd_cfg = _sub(config, algorithm="sft", workdir=kd_dir, **start_model, **{
        "sft.distill": True, "train.batch_size": prompts, "train.num_steps": updates,
        "checkpoint.every_steps": 0})
    sft.validate(kd_cfg)
    if not done(kd_dir):
        sft.run(kd_cfg, kd_dir)

    wu_dir = os.path.join(workdir, "gad_warmup")
    phase(f"4/6 GAD warmup: {dm.warmup_steps} steps ({g.d_only_steps} discriminator-only)")
    wu_cfg = _sub(config, algorithm="gad", workdir=wu_dir, **start_model, **{
        "gad.stage": "warmup", "train.num_steps": int(dm.warmup_steps),
        "checkpoint.every_steps": 0, "gad.eval_examples": 0})
    gad.validate(wu_cfg)
    if not done(wu_dir):
        gad.run(wu_cfg, wu_dir)

    gad_dir = os.path.join(workdir, "gad")
    phase(f"5/6 GAD: {config.train.num_steps} steps from the warmup's checkpoint")
    gad_cfg = _sub(config, algorithm="gad", workdir=gad_dir, **start_model, **{
        "gad.stage": "gad", "gad.warmup_dir": wu_dir,
        "optimizer.learning_rate": float(dm.gad_lr)})
    gad.validate(gad_cfg)
    if not done(gad_dir):
        gad.run(gad_cfg, gad_dir)

    phase(f"6/6 comparison: greedy answers to {g.eval_examples} held-out problems")
    rows = {"before (student)": evaluate(gad_cfg, student, tokenizer,
                                         os.path.join(workdir, "eval_student")),
            f"SeqKD ({updates} updates)": evaluate(gad_cfg, os.path.join(kd_dir, "export"),
                                                   tokenizer, os.path.join(workdir, "eval_seqkd")),
            f"GAD warmup only ({updates - int(config.train.num_steps)})": evaluate(
                gad_cfg, os.path.join(wu_dir, "export"), tokenizer,
                os.path.join(workdir, "eval_gad_warmup")),
            f"GAD ({updates} updates)": evaluate(gad_cfg, os.path.join(gad_dir, "export"),
                                                 tokenizer, os.path.join(workdir, "eval_gad")),
            "teacher (the solver)": teacher_ceiling(gad_cfg, tokenizer)}
    history = [json.loads(x) for x in open(os.path.join(gad_dir, "metrics.jsonl"))
               if "eval/accuracy" in x]
    print(f"\n{'model':<28}{'accuracy':>10}{'ROUGE-L':>10}{'resp. tokens':>14}")
    for name, r in rows.items():
        print(f"{name:<28}{r['accuracy']:>10.3f}{r['rouge_l']:>10.3f}"
              f"{r['response_tokens']:>14.1f}")
    print("GAD checkpoints (accuracy): " + ", ".join(
        f"step {h['step']}: {h['eval/accuracy']:.3f}" for h in history))
    total = time.perf_counter() - start
    print(f"demo finished in {total:.0f}s; runs in {workdir}/(student|seqkd|gad_warmup|gad)")
    summary = {"rows": rows, "gad_checkpoints": history, "updates": updates,
               "seconds": round(total, 1)}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "gad_demo_results.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
