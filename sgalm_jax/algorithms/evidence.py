"""The evidence study: does each method do what it claims, at CPU scale?

One small pre-trained model (a 0.4M-parameter Qwen2-shaped model trained with SFT for a few CPU
minutes on the arithmetic task's ``easy`` level, where it writes valid samples at a middling rate)
is the common start of every method. Each method then trains it for the same number of updates
per iteration, over ``iterations`` iterations and several seeds, and after every iteration the
model is evaluated the same way (:class:`StudyEvaluator`):

- **validity**: share of ``num_samples`` samples (written from 2-shot generator prompts at
  temperature 1, the same prompts for every model of a seed) that the task's own checker and
  solver accept (every step's arithmetic, operands from the question, the final answer equal to the
  solver's answer to the question);
- **well_formed**, **distinct_2** (unique word bigrams over all bigrams of the samples) and
  **copies** (share of samples that repeat a training sample verbatim);
- **answer_accuracy**: greedy answers to ``num_questions`` test questions that are not training
  problems (exact final answer);
- **d_acc**: the model read as SGALM's discriminator (``z = z_Real - z_Fake`` after the "Real or
  Fake" prompt): balanced accuracy on held-out real samples (validation problems that are not
  training problems) vs its own samples. Only the SGALM variants train this read-out; for the other
  methods it shows what the untrained read-out does.

Methods (:data:`METHODS`): continued SFT, SGALM (``full``, ``d_only``, ``g_only``), SPIN and IRIS
(the self-play loop with generator-format prompts: a 2-shot prompt, the real next sample as the
response), and GAD when its algorithm is present. The study is resumable: every finished
(method, seed, iteration) evaluation is a line of ``results.jsonl``, every run a normal resumable
run directory. ``benchmarks/study.py`` drives it over seeds (intervals, plots); the demo
(:mod:`sgalm_jax.algorithms.demo`) runs it at seed 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import ml_collections
import numpy as np

from sgalm_jax.config import to_dict
from sgalm_jax.training import multihost as mh

log = logging.getLogger(__name__)

# The study's task: the arithmetic task's easy level (one addition or subtraction up to 20).
TASK_OPTIONS: dict[str, Any] = {"level": "easy"}
ANNEAL_LR = 1e-3  # phase 2 of the base model's pre-training (Study.anneal_steps)
METRICS = ("validity", "well_formed", "answer_accuracy", "distinct_2", "copies", "d_acc")
METRIC_DOC = {
    "validity": "share of generated samples the task's checker and solver accept",
    "well_formed": "share of generated samples of the form 'Question: ... Answer: ... #### n'",
    "answer_accuracy": "greedy exact final answer on test questions not in the train split",
    "distinct_2": "unique word bigrams / all word bigrams of the generated samples",
    "copies": "share of generated samples identical to a training sample",
    "d_acc": "the model as SGALM's discriminator: balanced accuracy, held-out real vs its samples",
}


def _sub(config: ml_collections.ConfigDict, **changes: Any) -> ml_collections.ConfigDict:
    """A copy of ``config`` with dotted keys changed."""
    out = ml_collections.ConfigDict(to_dict(config))
    for key, value in changes.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return out


# ------------------------------------------------------------------------------------ methods
@dataclasses.dataclass(frozen=True)
class Method:
    """One method of the study: how to train ``iterations`` iterations from the base model.

    ``run(study, config, workdir, iterations)`` leaves the model after iteration ``t`` (1-based)
    in ``workdir/iterations/iter_{t:03d}`` (an HF export) for every ``t <= iterations`` (only
    for ``t = iterations`` when ``study.evaluate_every_iteration`` is off).
    """

    name: str
    label: str
    run: Callable[["Study", ml_collections.ConfigDict, str, int], None]
    available: Callable[[], bool] = lambda: True


def iteration_dir(workdir: str, t: int) -> str:
    return os.path.join(workdir, "iterations", f"iter_{t:03d}")


def _keep_export(workdir: str, t: int) -> None:
    """Move ``workdir/export`` to the iteration's directory (a rerun finds it there)."""
    dst = iteration_dir(workdir, t)
    if mh.is_main():
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.replace(os.path.join(workdir, "export"), dst)


def _exported_iterations(study: "Study", iterations: int, first: int = 1) -> list[int]:
    """The iterations whose model is evaluated, so exported: every one, or only the last when the
    study evaluates the end alone (the demo). A chain of runs resumed iteration by iteration ends
    where one run straight to the last iteration does (the resume tests), so skipping the
    intermediate runs saves their restarts and compilations without changing the result."""
    if study.evaluate_every_iteration:
        return list(range(first, iterations + 1))
    return [iterations] if iterations >= first else []


def _run_sft(study: "Study", config: ml_collections.ConfigDict, workdir: str,
             iterations: int) -> None:
    """Continued SFT on the pre-training data (generator-format sequences, one per row, unpacked:
    ``train.batch_size`` real samples per update, as many as SGALM's D and G batches hold),
    ``updates`` steps per iteration; iteration t resumes the same run with ``train.num_steps`` raised (a constant
    learning rate after the warmup, so the chain is one run)."""
    from sgalm_jax.algorithms import sft

    for t in _exported_iterations(study, iterations):
        if mh.exists(os.path.join(iteration_dir(workdir, t), "config.json")):
            continue
        c = _sub(config, algorithm="sft", workdir=workdir, **{
            "data.task": "", "data.train_file": study.records, "data.packing": False,
            "train.num_steps": t * study.updates, "checkpoint.export": True})
        sft.validate(c)
        sft.run(c, workdir)
        _keep_export(workdir, t)


def _sgalm_runner(variant: str) -> Callable[..., None]:
    def run(study: "Study", config: ml_collections.ConfigDict, workdir: str,
            iterations: int) -> None:
        """SGALM ``variant``: iteration t resumes the run with ``sgalm.iterations = t`` (its
        checkpoint at the end of iteration t - 1 holds the model and the optimizer state).
        ``rounds_per_iteration`` gives every variant the study's updates per iteration."""
        from sgalm_jax.algorithms import sgalm

        per_round = 2 if variant == "full" else 1
        for t in _exported_iterations(study, iterations):
            if mh.exists(os.path.join(iteration_dir(workdir, t), "config.json")):
                continue
            c = _sub(config, algorithm="sgalm", workdir=workdir, **{
                "sgalm.variant": variant, "sgalm.iterations": t,
                "sgalm.rounds_per_iteration": max(1, study.updates // per_round),
                "checkpoint.export": True})
            sgalm.validate(c)
            sgalm.run(c, workdir)
            _keep_export(workdir, t)
    return run


def _selfplay_runner(loss: str) -> Callable[..., None]:
    def run(study: "Study", config: ml_collections.ConfigDict, workdir: str,
            iterations: int) -> None:
        """SPIN's loop with ``loss`` on generator-format pairs (a 2-shot generator prompt, the
        next real sample): ``study.prompts_per_iteration`` prompts (a seeded subset), one synthetic
        sample each, ``updates`` steps per iteration, previous iterations' samples mixed in."""
        from sgalm_jax.algorithms import selfplay

        if all(mh.exists(os.path.join(iteration_dir(workdir, t), "config.json"))
               for t in range(1, iterations + 1)):
            return
        s = config.sgalm
        c = _sub(config, algorithm="selfplay", workdir=workdir, **{
            "data.task": "", "data.train_file": study.selfplay_records, "data.packing": False,
            "selfplay.loss": loss, "selfplay.iterations": iterations,
            "selfplay.steps_per_iteration": study.updates,
            "selfplay.subset_size": study.prompts_per_iteration,
            "selfplay.subset_seed": int(config.seed),
            "selfplay.max_new_tokens": study.max_new_tokens,
            "selfplay.max_prompt_length": int(config.data.max_length) - study.max_new_tokens,
            "selfplay.temperature": float(s.temperature),
            "selfplay.generation_batch_size": int(s.sample_batch_size),
            "selfplay.ref_batch_size": int(s.score_batch_size),
            "selfplay.eval_every": 0, "selfplay.export_iterations": True,
            "train.batch_size": study.pair_batch_size, "checkpoint.export": False})
        selfplay.validate(c)
        selfplay.run(c, workdir)
        if mh.is_main():  # selfplay numbers iterations from 0: iter_000 is the model after one
            for t in range(1, iterations + 1):
                src = os.path.join(workdir, "iterations", f"iter_{t - 1:03d}")
                if os.path.exists(src):
                    os.replace(src, iteration_dir(workdir, t) + ".tmp")
            for t in range(1, iterations + 1):
                if os.path.exists(iteration_dir(workdir, t) + ".tmp"):
                    os.replace(iteration_dir(workdir, t) + ".tmp", iteration_dir(workdir, t))
    return run


def _gad_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("sgalm_jax.algorithms.gad") is not None


def _run_gad(study: "Study", config: ml_collections.ConfigDict, workdir: str,
             iterations: int) -> None:
    """GAD distilling a stronger teacher: the task's own generator, whose samples are always
    valid, answers the same generator-format prompts as SPIN's (``distill`` records: the 2-shot
    prompt, the teacher's sample). Iteration 1 is GAD's warmup stage (``gad.d_only_steps``
    discriminator-only steps, then ``updates`` steps of SFT on the teacher + a Bradley-Terry D
    step); iterations 2.. are the GAD stage (``updates`` steps each: D scores the student's
    rollouts, D steps, the student takes a GRPO step on D's scores), resumed with
    ``train.num_steps`` raised. One student update per step, as every other method."""
    from sgalm_jax.algorithms import gad

    g = study.gad
    warm_dir = os.path.join(workdir, "warmup")
    common = {"data.task": "", "data.train_file": study.selfplay_records,
              "data.packing": False, "distill.max_response_tokens": study.max_new_tokens,
              "distill.max_prompt_tokens": int(config.data.max_length) - study.max_new_tokens,
              "distill.prompt_truncation": "left", "gad.num_generations": g["num_generations"],
              "gad.temperature": float(config.sgalm.temperature), "gad.eval_examples": 0,
              "gad.save_rollouts": False, "gad.log_samples": 0, "gad.export_best": False,
              "train.batch_size": g["prompts"] * g["num_generations"],
              "checkpoint.export": True}
    if not mh.exists(os.path.join(iteration_dir(workdir, 1), "config.json")):
        c = _sub(config, algorithm="gad", workdir=warm_dir, **common, **{
            "gad.stage": "warmup", "gad.d_only_steps": g["d_only_steps"],
            "train.num_steps": g["d_only_steps"] + study.updates})
        gad.validate(c)
        gad.run(c, warm_dir)
        if mh.is_main():
            os.makedirs(os.path.join(workdir, "iterations"), exist_ok=True)
            shutil.copytree(os.path.join(warm_dir, "export"), iteration_dir(workdir, 1))
    for t in _exported_iterations(study, iterations, first=2):
        if mh.exists(os.path.join(iteration_dir(workdir, t), "config.json")):
            continue
        c = _sub(config, algorithm="gad", workdir=workdir, **common, **{
            "gad.stage": "gad", "gad.warmup_dir": warm_dir, "gad.beta": g["beta"],
            "train.num_steps": (t - 1) * study.updates})
        gad.validate(c)
        gad.run(c, workdir)
        _keep_export(workdir, t)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sft", "SFT continued", _run_sft),
    Method("sgalm", "SGALM full", _sgalm_runner("full")),
    Method("sgalm_d_only", "SGALM d_only", _sgalm_runner("d_only")),
    Method("sgalm_g_only", "SGALM g_only", _sgalm_runner("g_only")),
    Method("spin", "SPIN", _selfplay_runner("spin")),
    Method("iris", "IRIS", _selfplay_runner("iris")),
    Method("gad", "GAD (teacher)", _run_gad, available=_gad_available),
)}


def register_method(method: Method) -> None:
    """Add (or replace) a method of the study."""
    METHODS[method.name] = method


# ------------------------------------------------------------------------------------ evaluation
class StudyEvaluator:
    """Evaluates any model of the study's architecture the same way (see the module docstring).

    The prompts, the held-out reals and the questions depend only on ``seed``; one sampler and one
    discriminator scorer serve every model (the models share a graph, so nothing recompiles).
    """

    def __init__(self, config: Any, tokenizer: Any, model_path: str, *, seed: int,
                 num_samples: int, num_questions: int, num_heldout: int):
        from sgalm_jax import sharding as sh
        from sgalm_jax.algorithms.sgalm_data import SGALMData
        from sgalm_jax.data.prompts import sgalm_generator_prompt
        from sgalm_jax.models import ModelConfig
        from sgalm_jax.training.tokenizer import eos_token_id, pad_token_id

        self.config, self.tokenizer, self.seed = config, tokenizer, int(seed)
        self.mesh = sh.make_mesh(dict(config.mesh))
        self.mcfg = ModelConfig.from_hf(model_path)
        self.eos = eos_token_id(tokenizer, self.mcfg.eos_token_ids)
        self.pad = pad_token_id(tokenizer, self.eos)
        self.data = SGALMData(config, tokenizer, eos_id=self.eos)
        self.num_samples = int(num_samples)
        self.sampler = self.scorer = None
        # Questions never trained on (a small task's test split repeats training problems).
        seen = {e.question for e in self.data.task.load("train")}
        self.questions = [e for e in self.data.task.load("test")
                          if e.question not in seen][:num_questions]
        held = [e for e in self.data.task.load("validation")
                if e.question not in seen][:num_heldout]
        self.heldout_ids = [self.data.d_ids(self.data.task.sample_text(e)) for e in held]
        rng = random.Random(f"{seed}:questions")
        self.prompts = []
        for q in self.questions:
            demos = [self.data.real_texts[i]
                     for i in rng.sample(range(len(self.data.pool)), self.data.num_shots)]
            self.prompts.append(self.data.encode(sgalm_generator_prompt(
                demos, self.data.templates, prefix=self.data.task.format_prompt(q))))

    def _tools(self, graphdef: Any) -> None:
        if self.sampler is not None:
            return
        from sgalm_jax.algorithms.sgalm import DScorer
        from sgalm_jax.sampling import Sampler

        s = self.config.sgalm
        self.sampler = Sampler(graphdef, self.mcfg, pad_token_id=self.pad, mesh=self.mesh,
                               min_batch_bucket=int(s.sample_batch_size))
        self.scorer = DScorer(graphdef, self.data.labels, self.mesh,
                              batch_size=int(s.score_batch_size), bucket=int(s.length_bucket),
                              pad_id=self.pad)

    def __call__(self, model_path: str) -> dict[str, float]:
        from sgalm_jax.algorithms import diagnostics as diag
        from sgalm_jax.algorithms.sgalm import balanced_accuracy
        from sgalm_jax.models import load_pretrained
        from sgalm_jax.training import split_model

        graphdef, params = split_model(load_pretrained(model_path, mesh=self.mesh))
        self._tools(graphdef)
        s, data = self.config.sgalm, self.data
        max_new = int(s.max_new_tokens) or data.p99_length + 16
        samples = data.generate(self.sampler, params, self.num_samples,
                                rng_seed=(self.seed, 99), max_new_tokens=max_new,
                                temperature=float(s.temperature), top_p=1.0, top_k=0,
                                batch_size=int(s.sample_batch_size))
        out = {"validity": float(np.mean([bool(x.valid) for x in samples])),
               "well_formed": float(np.mean([x.well_formed for x in samples]))}
        out.update(diag.diversity([x.text for x in samples], data.real_texts))
        z_fake = self.scorer(params, [data.d_ids(x.text) for x in samples])
        z_real = self.scorer(params, self.heldout_ids)
        out["d_acc"] = balanced_accuracy(z_real, z_fake)
        gen = self.sampler.generate(params, self.prompts, max_new_tokens=max_new,
                                    temperature=0.0, stop_token_ids=(self.eos,),
                                    rng=jax.random.key(0))
        correct = []
        for q, comp in zip(self.questions, gen.completions()):
            text = self.tokenizer.decode(comp, skip_special_tokens=True)
            text = text.split(data.templates.generator_stop)[0]
            correct.append(data.task.score(q, text).correct)
        out["answer_accuracy"] = float(np.mean(correct))
        out["example"] = samples[0].text
        return out


# ------------------------------------------------------------------------------------ the study
@dataclasses.dataclass
class Study:
    """The study's settings and its directory ``root`` (resumable: see the module docstring).

    ``config`` is the demo's config (model shape, optimizer, SGALM sampling settings) with the
    study's task; ``pretrain_steps`` the base model's SFT steps; ``updates`` the optimizer steps
    of every method per iteration.
    """

    root: str
    config: ml_collections.ConfigDict
    iterations: int = 3
    updates: int = 20
    pretrain_steps: int = 800
    anneal_steps: int = 0
    pretrain_records: int = 2000
    num_samples: int = 96
    num_questions: int = 64
    num_heldout: int = 64
    prompts_per_iteration: int = 96
    pair_batch_size: int = 8
    evaluate_every_iteration: bool = True
    gad: dict[str, Any] = dataclasses.field(default_factory=lambda: {
        "num_generations": 4, "prompts": 4, "d_only_steps": 10, "beta": 1e-3})
    log: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.root = os.path.abspath(self.root)
        self.tokenizer_dir = os.path.join(self.root, "tokenizer")
        self.records = os.path.join(self.root, "data", "pretrain.jsonl")
        self.selfplay_records = os.path.join(self.root, "data", "selfplay.jsonl")
        self.base_dir = os.path.join(self.root, "pretrain")
        self.base_model = os.path.join(self.base_dir, "export")
        self.results_path = os.path.join(self.root, "results.jsonl")
        self.max_new_tokens = 0
        self._evaluators: dict[int, StudyEvaluator] = {}
        self._tokenizer = None

    # ---------------------------------------------------------------- preparation
    def prepare(self) -> None:
        """Tokenizer, pre-training records, generator-format pairs, the pre-trained base model."""
        from sgalm_jax.algorithms import demo, sft

        c = self.config
        if mh.is_main():
            os.makedirs(self.root, exist_ok=True)
        self._tokenizer = demo.build_tokenizer(c, self.tokenizer_dir)
        demo.pretrain_records(c, self.records, self.pretrain_records)
        if not mh.exists(self.selfplay_records):
            mh.write_once(_write_selfplay_records, c, self.selfplay_records,
                          name="study_selfplay_records")
        first = os.path.join(self.base_dir, "phase1") if self.anneal_steps else self.base_dir
        if not mh.exists(os.path.join(first, "export", "config.json")):
            self.log(f"pre-training the base model: SFT for {self.pretrain_steps} steps")
            pre = demo._sft_config(c, first, model_path="", tokenizer=self.tokenizer_dir,
                                   data=self.records, steps=self.pretrain_steps, pretrain=True)
            sft.validate(pre)
            sft.run(pre, first)
        if self.anneal_steps and not mh.exists(os.path.join(self.base_model, "config.json")):
            self.log(f"pre-training, phase 2: {self.anneal_steps} more steps at "
                     f"{ANNEAL_LR} (cosine)")
            pre = demo._sft_config(c, self.base_dir, model_path=os.path.join(first, "export"),
                                   tokenizer=self.tokenizer_dir, data=self.records,
                                   steps=self.anneal_steps, pretrain=False)
            pre.optimizer = ml_collections.ConfigDict(to_dict(
                demo._sft_config(c, first, model_path="", tokenizer=self.tokenizer_dir,
                                 data=self.records, steps=1, pretrain=True).optimizer))
            pre.optimizer.learning_rate = ANNEAL_LR
            pre.optimizer.warmup_steps = 10
            pre.train.batch_size = demo.PRETRAIN_BATCH
            sft.validate(pre)
            sft.run(pre, self.base_dir)
        self.max_new_tokens = int(c.sgalm.max_new_tokens) or (
            self.evaluator(int(c.seed)).data.p99_length + 16)

    def method_config(self, seed: int) -> ml_collections.ConfigDict:
        """The config every method starts from: the base model, the study's tokenizer, ``seed``."""
        return _sub(self.config, seed=int(seed), **{
            "model.init": "", "model.hf_config": {}, "model.path": self.base_model,
            "tokenizer.path": self.tokenizer_dir, "checkpoint.every_steps": 0,
            "metrics.progress_bar": False})

    def evaluator(self, seed: int) -> StudyEvaluator:
        if seed not in self._evaluators:
            cfg = self.method_config(seed)
            cfg.data.task = "arithmetic"
            self._evaluators[seed] = StudyEvaluator(
                cfg, self._tokenizer, self.base_model, seed=seed, num_samples=self.num_samples,
                num_questions=self.num_questions, num_heldout=self.num_heldout)
        return self._evaluators[seed]

    # ---------------------------------------------------------------- results
    def results(self) -> list[dict[str, Any]]:
        """Every finished evaluation (one dict per method, seed and iteration)."""
        if not os.path.exists(self.results_path):
            return []
        with open(self.results_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def _done(self) -> set[tuple[str, int, int]]:
        return {(r["method"], r["seed"], r["iteration"]) for r in self.results()}

    def _record(self, row: dict[str, Any]) -> None:
        if mh.is_main():
            with open(self.results_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def _evaluate(self, method: str, seed: int, t: int, path: str, seconds: float,
                  cpu: float) -> dict[str, Any]:
        t0, c0 = time.perf_counter(), time.process_time()
        m = self.evaluator(seed)(path)
        row = {"method": method, "seed": int(seed), "iteration": int(t), **m,
               "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu, 1),
               "eval_seconds": round(time.perf_counter() - t0, 1),
               "eval_cpu_seconds": round(time.process_time() - c0, 1)}
        self._record(row)
        return row

    # ---------------------------------------------------------------- running
    def run_seed(self, seed: int, methods: Sequence[str]) -> None:
        """The base model's evaluation and every method at ``seed`` (skipping what is done)."""
        done = self._done()
        if ("base", seed, 0) not in done:
            row = self._evaluate("base", seed, 0, self.base_model, 0.0, 0.0)
            self.log(f"seed {seed} base: " + format_row(row))
        for name in methods:
            method = METHODS[name]
            wanted = (range(1, self.iterations + 1) if self.evaluate_every_iteration
                      else [self.iterations])
            if all((name, seed, t) in done for t in wanted):
                continue
            workdir = os.path.join(self.root, "runs", name, f"seed_{seed}")
            t0, c0 = time.perf_counter(), time.process_time()
            method.run(self, self.method_config(seed), workdir, self.iterations)
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
            for t in wanted:
                if (name, seed, t) not in done:
                    row = self._evaluate(name, seed, t, iteration_dir(workdir, t), secs, cpu)
                    secs = cpu = 0.0  # the training time is counted once, on the first row
                    self.log(f"seed {seed} {method.label} iteration {t}: " + format_row(row))


def _write_selfplay_records(config: Any, path: str) -> None:
    """Generator-format pairs: a k-shot generator prompt of real samples, the next real sample."""
    from sgalm_jax.data import SGALMTemplates, get_task
    from sgalm_jax.data.prompts import sgalm_generator_prompt

    task = get_task(config.data.task, **to_dict(config.sgalm.task_options))
    texts = [task.sample_text(e) for e in task.load("train")]
    k = int(config.sgalm.num_shots)
    rng = random.Random(f"{config.seed}:selfplay")
    t = SGALMTemplates(num_examples=k)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for i in range(len(texts)):
            demos = rng.sample([j for j in range(len(texts)) if j != i], k) if len(texts) > k + 1 \
                else [texts[0]] * k
            prompt = sgalm_generator_prompt([texts[j] for j in demos], t)
            f.write(json.dumps({"prompt": prompt, "response": texts[i]}) + "\n")
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------------ statistics
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_ci(values: Iterable[float]) -> tuple[float, float, int]:
    """``(mean, half-width of the 95% t-interval, n)`` over seeds; half-width nan for n < 2."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    if n == 1:
        return float(v[0]), float("nan"), 1
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return float(v.mean()), float(t * v.std(ddof=1) / math.sqrt(n)), n


def summarize(rows: Sequence[dict[str, Any]], iteration: int | None = None
              ) -> dict[str, dict[str, tuple[float, float, int]]]:
    """Per method: each metric's (mean, 95% half-width, seeds) at ``iteration`` (default: each
    method's last evaluated iteration; the base model at 0)."""
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        it = 0 if m == "base" else (iteration if iteration is not None
                                    else max(r["iteration"] for r in mine))
        at = [r for r in mine if r["iteration"] == it]
        if at:
            out[m] = {k: mean_ci(r.get(k) for r in at) for k in METRICS}
    return out


def label(method: str) -> str:
    return "pre-trained" if method == "base" else (
        METHODS[method].label if method in METHODS else method)


def format_table(summary: dict[str, dict[str, tuple[float, float, int]]]) -> str:
    """The study's table: one row per method, ``mean ± 95% half-width`` (just the mean with one
    seed) and the number of seeds."""
    lines = [f"{'model':<15}" + "".join(f"{c:>17}" for c in METRICS) + f"{'seeds':>7}"]
    for m, stats in summary.items():
        cells = []
        for c in METRICS:
            mean, half, _ = stats[c]
            cells.append(f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}")
        n = max(s[2] for s in stats.values())
        lines.append(f"{label(m):<15}" + "".join(f"{x:>17}" for x in cells) + f"{n:>7}")
    return "\n".join(lines)


def format_row(row: dict[str, Any]) -> str:
    return ", ".join(f"{k} {row[k]:.3f}" for k in METRICS if k in row) + (
        f" (train {row.get('train_seconds', 0):.0f}s, eval {row.get('eval_seconds', 0):.0f}s)")


def study_config(seed: int = 0) -> ml_collections.ConfigDict:
    """The demo's config on the study's task (the arithmetic task's ``easy`` level)."""
    from sgalm_jax.algorithms.demo import demo_config

    c = demo_config()
    c.seed = int(seed)
    c.sgalm.task_options = dict(TASK_OPTIONS)
    c.metrics.progress_bar = False
    return c
