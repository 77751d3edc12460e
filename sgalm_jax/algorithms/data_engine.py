"""The synthetic-data engine: SGALM (or Self-Instruct) samples at k x |train|, SFT of a smaller
student on them, evaluation, one results table.

    python -m sgalm_jax.main --config configs/sgalm_data_engine.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct \
        --config.data_engine.generator_path=runs/sgalm_qwen3b_gsm8k/export \
        --config.data_engine.student_path=/models/Qwen2.5-0.5B \
        --config.workdir=runs/data_engine_gsm8k

For each method in ``data_engine.methods``:

* ``sgalm``: the generator (``data_engine.generator_path``: an SGALM run's export; '' = the base
  ``model.path``, i.e. without SGALM training) writes whole samples from SGALM's k-shot generator
  prompt (``sgalm.num_shots`` random real samples, ``sgalm.temperature`` ...).
* ``self_instruct``: the base model (``data_engine.self_instruct_path``, '' = ``model.path``)
  writes samples from prompts of ``self_instruct_seeds`` real + ``self_instruct_generated`` earlier
  generated samples (Self-Instruct's 6 + 2), and a sample is kept only if its question's ROUGE-L F1
  with every kept question (the real ones included) is at most ``rouge_threshold`` (0.7).

``max(k) x |train|`` samples are generated once (``workdir/synthetic/<method>.jsonl``, reused on a
rerun); malformed samples and samples whose word n-grams overlap the test split by more than
``dedupe_threshold`` are dropped; the first ``k x |train|`` kept samples form scale k (so the
scales are nested). The student (``student_path`` / ``student_init``) is trained with the ``sft``
algorithm on real + synthetic records (``mix_real``; the ``optimizer`` / ``train`` / ``data``
sections are the student's) for ``epochs`` passes, then evaluated with the ``eval`` algorithm (the
``eval`` section). A row with the real data alone (k = 0) is the baseline.
Results: ``workdir/results.md`` and ``results.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from sgalm_jax.algorithms import diagnostics as diag
from sgalm_jax.algorithms.sgalm_data import (
    Sample,
    SGALMData,
    load_samples,
    save_samples,
    trim_completion,
)
from sgalm_jax.algorithms import sgalm as _sgalm  # noqa: F401 (its section: sgalm.* keys used here)
from sgalm_jax.config import register_section, to_dict
from sgalm_jax.errors import ConfigError
from sgalm_jax.evaluation.rouge import RougeFilter
from sgalm_jax.training import multihost as mh

log = logging.getLogger(__name__)

# This algorithm's config section (``--describe`` lists it; see sgalm_jax.config).
register_section("data_engine", {
    "generator_path": ("", "HF model that writes SGALM's synthetic samples (e.g. an SGALM "
                           "run's export); '' = model.path (no SGALM training)"),
    "self_instruct_path": ("", "HF model of the Self-Instruct baseline; '' = model.path"),
    "methods": ("sgalm,self_instruct", "comma-separated pipelines: sgalm (4-shot SGALM "
                                       "prompt) and/or self_instruct (baseline)"),
    "scales": ("1,2,4", "synthetic set sizes as multiples k of the real train set"),
    "dedupe_ngram": (13, "n of the word n-grams compared with the test split"),
    "dedupe_threshold": (0.5, "drop a sample when more than this fraction of its n-grams "
                              "occur in the test split"),
    "rouge_threshold": (0.7, "Self-Instruct: drop a sample whose question has ROUGE-L F1 "
                             "above this with any earlier one (seeds included)"),
    "self_instruct_seeds": (6, "Self-Instruct: real samples per prompt"),
    "self_instruct_generated": (2, "Self-Instruct: earlier generated samples per prompt"),
    "mix_real": (True, "SFT the student on real + synthetic samples (False: synthetic "
                       "only)"),
    "baseline_real_only": (True, "also SFT the student on the real samples alone (the k=0 "
                                 "row)"),
    "student_path": ("", "HF checkpoint of the smaller student model"),
    "student_init": ("", "instead of student_path: a random-init preset (tests, demos)"),
    "epochs": (1.0, "student SFT passes over its data (sets train.num_steps); the "
                    "students are then evaluated with the eval section"),
}, owner=__name__)

METHODS = ("sgalm", "self_instruct")


def _sub(config: Any, **changes: Any) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict(to_dict(config))
    for key, value in changes.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return out


def parse_scales(spec: str) -> list[int]:
    try:
        scales = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"data_engine.scales: {spec!r} is not a comma-separated list of "
                          "integers") from None
    if not scales or scales[0] < 1:
        raise ConfigError(f"data_engine.scales: {spec!r} needs positive integers")
    return scales


def parse_methods(spec: str) -> list[str]:
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"data_engine.methods: {spec!r}; known: {list(METHODS)}")
    return methods


def validate(config: Any) -> None:
    from sgalm_jax.algorithms.eval import validate_eval_section
    from sgalm_jax.data import list_tasks
    from sgalm_jax.training.model_setup import model_config

    de = config.data_engine
    parse_scales(de.scales)
    parse_methods(de.methods)
    if not config.model.path and not config.model.init:
        raise ConfigError("model.path: the data engine needs a base model (model.path)")
    if config.model.path or config.model.init:
        model_config(config.model)
    for key in ("generator_path", "self_instruct_path", "student_path"):
        path = de[key]
        if path and not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"data_engine.{key}: no config.json in {path!r}")
    if bool(de.student_path) == bool(de.student_init):
        raise ConfigError("data_engine.student_path: set exactly one of student_path and "
                          "student_init")
    if not config.data.task or config.data.task.replace("-", "_").lower() not in list_tasks():
        raise ConfigError(f"data.task: the data engine needs a task; known: {list_tasks()}")
    if de.epochs <= 0 or not 0 <= de.dedupe_threshold <= 1 or de.dedupe_ngram < 1:
        raise ConfigError("data_engine.epochs: must be > 0 (and dedupe_threshold in [0, 1], "
                          "dedupe_ngram >= 1)")
    if de.self_instruct_seeds < 1 or de.self_instruct_generated < 0:
        raise ConfigError("data_engine.self_instruct_seeds: must be >= 1 (generated >= 0)")
    validate_eval_section(config)


# ------------------------------------------------------------------------------------ generation
class Generator:
    """A model (path or random init) with its sampler and tokenizer, over the task's real data."""

    def __init__(self, config: Any, path: str):
        from sgalm_jax import sharding as sh
        from sgalm_jax.config import resolve_mesh
        from sgalm_jax.models import load_pretrained
        from sgalm_jax.sampling import Sampler
        from sgalm_jax.training import split_model
        from sgalm_jax.training.model_setup import build_model
        from sgalm_jax.training.run_setup import sampler_options
        from sgalm_jax.training.tokenizer import (
            BUILTIN_TINY,
            eos_token_id,
            load_tokenizer,
            pad_token_id,
        )

        self.config = config
        mesh = sh.make_mesh(resolve_mesh(config, jax.device_count()))
        if path:
            model = load_pretrained(path, mesh=mesh, dtype=config.model.dtype,
                                    param_dtype=config.model.param_dtype)
        else:
            model = build_model(config.model, mesh=mesh, seed=config.seed)
        tok = path if path and os.path.exists(os.path.join(path, "tokenizer_config.json")) \
            else (config.tokenizer.path or config.model.path)
        self.tokenizer = load_tokenizer(tok or BUILTIN_TINY)
        eos = eos_token_id(self.tokenizer, model.config.eos_token_ids)
        self.graphdef, self.params = split_model(model)
        self.sampler = Sampler(self.graphdef, model.config, pad_token_id=pad_token_id(
            self.tokenizer, eos), mesh=mesh,
            min_batch_bucket=int(config.sgalm.sample_batch_size),
            **sampler_options(config, int(config.sgalm.sample_batch_size)))
        self.data = SGALMData(_sub(config, **{"sgalm.heldout_size": 0,
                                              "sgalm.sample_format": "full"}),
                              self.tokenizer, eos_id=eos)

    def generate(self, n: int, seed: tuple[int, ...], num_shots: int | None = None
                 ) -> list[Sample]:
        s = self.config.sgalm
        data = self.data
        saved = data.num_shots
        if num_shots is not None:
            data.num_shots = num_shots
        try:
            return data.generate(self.sampler, self.params, n, rng_seed=seed,
                                 max_new_tokens=int(s.max_new_tokens) or data.p99_length + 16,
                                 temperature=float(s.temperature), top_p=float(s.top_p),
                                 top_k=int(s.top_k), batch_size=int(s.sample_batch_size),
                                 progress=self.config.metrics.progress_bar)
        finally:
            data.num_shots = saved


def generate_sgalm(gen: Generator, n: int, seed: int) -> list[Sample]:
    """``n`` samples from SGALM's k-shot generator prompt."""
    return gen.generate(n, (seed, 11))


def generate_self_instruct(gen: Generator, n: int, seed: int, *, seeds_per_prompt: int,
                           generated_per_prompt: int, threshold: float,
                           max_rounds: int = 0) -> list[Sample]:
    """Self-Instruct-style bootstrapping of ``n`` samples: prompts of real + earlier generated
    samples, and the ROUGE-L novelty filter on the questions (seeds included)."""
    from sgalm_jax.data.prompts import sgalm_generator_prompt

    data = gen.data
    task = data.task
    questions = [diag.split_sample(task, t) for t in data.real_texts]
    filt = RougeFilter(threshold, seeds=[q[0] for q in questions if q])
    kept: list[Sample] = []
    rng = random.Random(f"{seed}:self_instruct")
    batch = int(gen.config.sgalm.sample_batch_size)
    max_rounds = max_rounds or 10 * math.ceil(n / batch) + 10
    s = gen.config.sgalm
    max_new = int(s.max_new_tokens) or data.p99_length + 16
    for r in range(max_rounds):
        if len(kept) >= n:
            break
        prompts = []
        for _ in range(batch):
            k_gen = min(generated_per_prompt, len(kept))
            demos = [data.real_texts[i] for i in rng.sample(range(len(data.real_texts)),
                                                            seeds_per_prompt)]
            demos += [kept[i].text for i in rng.sample(range(len(kept)), k_gen)]
            rng.shuffle(demos)
            prompts.append(sgalm_generator_prompt(demos, data.templates))
        ids = [data.encode(p)[-max(data.max_length - 1, 1):] for p in prompts]
        out = gen.sampler.generate(gen.params, ids, max_new_tokens=max_new,
                                   temperature=float(s.temperature),
                                   top_p=None if s.top_p >= 1 else float(s.top_p),
                                   top_k=int(s.top_k) or None, stop_token_ids=(data.eos_id,),
                                   rng=jax.random.fold_in(jax.random.key(seed), r))
        for prompt, comp in zip(prompts, out.completions()):
            if comp and comp[-1] == data.eos_id:
                comp = comp[:-1]
            ids_kept, text, cut = trim_completion(gen.tokenizer, comp, data.stop_strings)
            text = text.strip()
            pair = diag.split_sample(task, text)
            if pair is None or not filt.add_if_novel(pair[0]):
                continue
            kept.append(Sample(index=len(kept), prompt=prompt, completion_ids=ids_kept,
                               text=text, stopped=cut))
            if len(kept) >= n:
                break
        log.info("self-instruct round %d: %d / %d samples kept", r, len(kept), n)
    if len(kept) < n:
        log.warning("self-instruct: only %d novel samples of the %d asked for after %d rounds",
                    len(kept), n, max_rounds)
    data.check(kept)
    return kept


def filter_samples(task: Any, samples: list[Sample], test_index: diag.NgramIndex,
                   threshold: float) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """SFT pairs of the samples that are well-formed and do not overlap the test split."""
    pairs, counts = [], {"generated": len(samples), "malformed": 0, "test_overlap": 0}
    for s in samples:
        pair = diag.split_sample(task, s.text)
        if pair is None:
            counts["malformed"] += 1
        elif test_index.overlap(s.text) > threshold:
            counts["test_overlap"] += 1
        else:
            pairs.append(pair)
    counts["kept"] = len(pairs)
    return pairs, counts


def write_records(path: str, pairs: list[tuple[str, str]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for p, r in pairs:
            f.write(json.dumps({"prompt": p, "response": r}) + "\n")
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------------ students
def student_config(config: Any, workdir: str, records: str, steps: int
                   ) -> ml_collections.ConfigDict:
    """The ``sft`` config of the student: ``data_engine.student_path`` / ``student_init`` as the
    model, ``records`` as the training file, the config's own optimizer / train / data sections."""
    de = config.data_engine
    tok = config.tokenizer.path if not de.student_path else (config.tokenizer.path
                                                              or de.student_path)
    if de.student_path and os.path.exists(os.path.join(de.student_path, "tokenizer_config.json")):
        tok = de.student_path
    model = {"model.path": de.student_path, "model.init": de.student_init}
    if de.student_init:
        model["model.hf_config"] = to_dict(config.model.hf_config)
    else:
        model["model.hf_config"] = {}
    return _sub(config, algorithm="sft", workdir=workdir, **model, **{
        "tokenizer.path": tok, "data.task": "", "data.train_file": records,
        "train.num_steps": steps, "checkpoint.export": True})


def programs(config: Any, mesh: Any) -> list[Any]:
    """The programs of a data-engine run, at their largest shapes, with abstract arguments
    (``--compile-only``): the generator's sampler programs (``sgalm.sample_batch_size`` rows
    decoded at once, k-shot prompts of up to ``data.max_length`` tokens, ``sgalm.max_new_tokens``
    new ones; the generator has ``model``'s shape) and the student's SFT step (its shape from
    ``data_engine.student_path``'s config.json or ``student_init``, e.g. ``qwen2.5-0.5b``). The
    students' evaluation decodes with the student's sampler, smaller than the generator's."""
    from flax import nnx

    from sgalm_jax import sharding as sh
    from sgalm_jax.algorithms import sft
    from sgalm_jax.models import CausalLM
    from sgalm_jax.sampling import Sampler
    from sgalm_jax.training.aot import Program, abstract_tree
    from sgalm_jax.training.model_setup import model_config
    from sgalm_jax.training.run_setup import sampler_options
    from sgalm_jax.training.state import split_model

    s = config.sgalm
    mcfg = model_config(config.model)
    graphdef, params = split_model(nnx.eval_shape(lambda: CausalLM(mcfg, rngs=nnx.Rngs(0))))
    params = abstract_tree(params, sh.state_shardings(params, mesh))
    rows = int(s.sample_batch_size)
    sampler = Sampler(graphdef, mcfg, pad_token_id=0, mesh=mesh, min_batch_bucket=rows,
                      **sampler_options(config, rows))  # as the run builds it
    out = [Program(f"generator {name}", fn, args) for name, fn, args in sampler.abstract_programs(
        params, rows=rows, prompt_tokens=max(int(config.data.max_length) - 1, 1),
        max_new_tokens=int(s.max_new_tokens) or int(config.data.max_length),
        temperature=float(s.temperature), top_k=int(s.top_k) or None,
        top_p=None if s.top_p >= 1 else float(s.top_p))]
    student = student_config(config, "", "", int(config.train.num_steps))
    return out + [dataclasses.replace(p, name=f"student {p.name}")
                  for p in sft.programs(student, mesh)]


def train_and_evaluate(config: Any, workdir: str, records: str, n_records: int
                       ) -> dict[str, Any]:
    """SFT the student on ``records`` (JSONL), then run the ``eval`` algorithm on its export."""
    from sgalm_jax.algorithms import eval as eval_algo
    from sgalm_jax.algorithms import sft

    steps = max(1, math.ceil(config.data_engine.epochs * n_records / config.train.batch_size))
    sft_cfg = student_config(config, workdir, records, steps)
    sft.validate(sft_cfg)
    export = os.path.join(workdir, "export")
    if not mh.exists(os.path.join(export, "config.json")):
        sft.run(sft_cfg, workdir)
    eval_cfg = _sub(sft_cfg, algorithm="eval", **{"model.path": export, "model.init": "",
                                                  "model.hf_config": {},
                                                  "tokenizer.path": ""})  # export/ has it
    eval_algo.validate(eval_cfg)
    results = eval_algo.run(eval_cfg, workdir)
    return {"steps": steps, "records": n_records, "eval": results}


def _headline(results: dict[str, Any]) -> str:
    parts = []
    for name, m in results.items():
        for k in ("exact_match", "acc_norm", "acc", "pass@1"):
            if k in m:
                parts.append(f"{name} {k} {m[k]:.4f}")
                break
    return ", ".join(parts)


# ------------------------------------------------------------------------------------ run
def run(config: Any, workdir: str) -> dict[str, Any]:
    """Generate, filter, write, train the students, evaluate; returns the results table rows."""
    de = config.data_engine
    scales, methods = parse_scales(de.scales), parse_methods(de.methods)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    synth_dir = os.path.join(workdir, "synthetic")
    real_pairs: list[tuple[str, str]] | None = None
    test_index = None
    task = None
    for method in methods:
        path = os.path.join(synth_dir, f"{method}.jsonl")
        gen = None
        if mh.exists(path):  # process 0's view: every process takes the same branch
            samples = load_samples(path)
            log.info("%s: reusing %d samples from %s", method, len(samples), path)
        else:
            model_path = (de.generator_path if method == "sgalm" else de.self_instruct_path) \
                or config.model.path
            gen = Generator(config, model_path)
            n = max(scales) * (len(gen.data.pool))
            log.info("%s: generating %d samples (%d x %d real) with %s", method, n, max(scales),
                     len(gen.data.pool), model_path or config.model.init)
            if method == "sgalm":
                samples = generate_sgalm(gen, n, config.seed)
            else:
                samples = generate_self_instruct(
                    gen, n, config.seed, seeds_per_prompt=int(de.self_instruct_seeds),
                    generated_per_prompt=int(de.self_instruct_generated),
                    threshold=float(de.rouge_threshold))
            save_samples(path, samples)
        if real_pairs is None:
            if gen is None:
                gen_data = SGALMData(_sub(config, **{"sgalm.heldout_size": 0}),
                                     _any_tokenizer(config), eos_id=0)
            else:
                gen_data = gen.data
            task = gen_data.task
            real_pairs = [task.format_sample(e) for e in gen_data.pool]
            test = task.load(task.eval_split)
            test_index = diag.NgramIndex([task.sample_text(e) for e in test],
                                         n=int(de.dedupe_ngram))
        del gen
        pairs, counts = filter_samples(task, samples, test_index, float(de.dedupe_threshold))
        valid = [s.valid for s in samples if s.valid is not None]
        log.info("%s: %s", method, counts)
        for k in scales:
            want = k * len(real_pairs)
            chosen = pairs[:want]
            if len(chosen) < want:
                log.warning("%s k=%d: only %d usable samples of %d", method, k, len(chosen), want)
            data = (real_pairs + chosen) if de.mix_real else chosen
            rec_path = os.path.join(synth_dir, f"{method}_k{k}.jsonl")
            mh.write_once(write_records, rec_path, data, name=f"records_{method}_{k}")
            res = train_and_evaluate(config, os.path.join(workdir, "students", f"{method}_k{k}"),
                                     rec_path, len(data))
            rows.append({"method": method, "k": k, "synthetic": len(chosen), **counts,
                         "validity": float(np.mean(valid)) if valid else None, **res})
            log.info("%s k=%d: %s", method, k, _headline(res["eval"]))
    if de.baseline_real_only and real_pairs is not None:
        rec_path = os.path.join(synth_dir, "real_only.jsonl")
        mh.write_once(write_records, rec_path, real_pairs, name="records_real_only")
        res = train_and_evaluate(config, os.path.join(workdir, "students", "real_only"), rec_path,
                                 len(real_pairs))
        rows.insert(0, {"method": "real only", "k": 0, "synthetic": 0, **res})
    table = results_table(rows)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(rows, f, indent=2, default=str)
    if jax.process_index() == 0:
        print(table)
    log.info("data engine finished in %.0fs", time.perf_counter() - start)
    return {"rows": rows, "table": table}


def _any_tokenizer(config: Any) -> Any:
    from sgalm_jax.training.tokenizer import BUILTIN_TINY, load_tokenizer

    path = (config.data_engine.generator_path or config.tokenizer.path or config.model.path
            or BUILTIN_TINY)
    return load_tokenizer(path)


def results_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: method, k, synthetic samples used, filter counts, validity, metrics."""
    metric_names: list[str] = []
    for r in rows:
        for name, m in r.get("eval", {}).items():
            for k in ("exact_match", "acc", "acc_norm", "pass@1"):
                if k in m and f"{name}/{k}" not in metric_names:
                    metric_names.append(f"{name}/{k}")
    head = ["method", "k", "synthetic", "generated", "malformed", "test overlap", "validity",
            "student steps"] + metric_names
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["k"]), str(r["synthetic"]), str(r.get("generated", "")),
                 str(r.get("malformed", "")), str(r.get("test_overlap", "")),
                 "" if r.get("validity") is None else f"{r['validity']:.3f}", str(r["steps"])]
        for mn in metric_names:
            name, k = mn.split("/")
            v = r.get("eval", {}).get(name, {}).get(k)
            cells.append("" if v is None else f"{v:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
