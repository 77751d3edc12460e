"""The ``eval`` algorithm: GSM8K / ARC-Challenge / MBPP (and arithmetic) accuracy of a checkpoint.

    python -m sgalm_jax.main --config configs/eval_gsm8k.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct --config.workdir=runs/eval_qwen3b

``model.path`` is an HF checkpoint directory (``config.json`` + safetensors) or one of our run
directories, whose ``export/`` is then evaluated; ``model.init`` evaluates a random model (tests).
Results go to ``workdir/eval/``: per task ``{name}_summary.json`` and ``{name}_examples.jsonl``
(see :mod:`sgalm_jax.evaluation`), and ``results.json`` with every task's metrics.

:class:`Evaluator` is the model side of :mod:`sgalm_jax.evaluation`: it turns a params pytree into
the ``generate_fn`` / ``loglik_fn`` callables the evaluators take, with a sampler and a scorer
built once, so a training loop (the self-play loop's evaluation hook) evaluates each iteration's
params without recompiling.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np

from sgalm_jax import sharding as sh
from sgalm_jax.algorithms.scoring import SequenceScorer
from sgalm_jax.config import resolve_mesh
from sgalm_jax.errors import ConfigError

log = logging.getLogger(__name__)

# Task name -> (subdirectory of eval.data_dir, default number of demonstrations).
EVAL_TASKS: dict[str, tuple[str | None, int]] = {
    "gsm8k": ("gsm8k", 5),  # lm-eval / Open LLM Leaderboard: 5-shot
    "arc": ("arc_challenge", 0),  # lm-eval arc_challenge default 0-shot (the leaderboard uses 25)
    "mbpp": ("mbpp", 3),  # the MBPP paper's 3-shot prompt, demos from task ids 1-10
    "arithmetic": (None, 0),  # generated offline
}
_ALIASES = {"arc_challenge": "arc", "arc-challenge": "arc", "gsm8k": "gsm8k", "mbpp": "mbpp",
            "arithmetic": "arithmetic", "arc": "arc"}
ARC_MODES = ("loglik", "generate")


# ------------------------------------------------------------------------------------ config
def parse_tasks(spec: str) -> list[str]:
    """``"gsm8k, arc"`` -> ``["gsm8k", "arc"]``; ConfigError naming ``eval.tasks`` if unknown."""
    out = []
    for name in (s.strip().lower() for s in spec.split(",")):
        if not name:
            continue
        if name not in _ALIASES:
            raise ConfigError(f"eval.tasks: unknown task {name!r}; known: {sorted(EVAL_TASKS)}")
        if _ALIASES[name] not in out:
            out.append(_ALIASES[name])
    return out


def validate_eval_section(config: Any) -> None:
    """Checks of the ``eval`` section (used by ``eval`` and by the self-play loop's hook)."""
    e = config.eval
    if not parse_tasks(e.tasks):
        raise ConfigError("eval.tasks: no task given (e.g. 'gsm8k' or 'gsm8k,arc,mbpp')")
    if e.arc_mode not in ARC_MODES:
        raise ConfigError(f"eval.arc_mode: {e.arc_mode!r} is not one of {list(ARC_MODES)}")
    for key in ("max_new_tokens", "batch_size", "num_samples"):
        if e[key] < 1:
            raise ConfigError(f"eval.{key}: must be >= 1, got {e[key]}")
    for key in ("max_examples", "sandbox_workers"):
        if e[key] < 0:
            raise ConfigError(f"eval.{key}: must be >= 0, got {e[key]}")
    if e.k_shot < -1:
        raise ConfigError(f"eval.k_shot: must be >= 0 or -1 (the task's default), got {e.k_shot}")
    if e.temperature < 0:
        raise ConfigError(f"eval.temperature: must be >= 0, got {e.temperature}")
    if not 0 < e.top_p <= 1:
        raise ConfigError(f"eval.top_p: must be in (0, 1], got {e.top_p}")
    if e.num_samples > 1 and e.temperature == 0:
        raise ConfigError("eval.num_samples: several samples per problem need eval.temperature > 0")
    if e.data_dir and not os.path.exists(e.data_dir):
        raise ConfigError(f"eval.data_dir: {e.data_dir!r} does not exist")


def _is_hf_checkpoint(path: str) -> bool:
    # A run directory has a config.json too (the run's config): look for the weights as well.
    return (os.path.isfile(os.path.join(path, "config.json"))
            and any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json")
                    for f in os.listdir(path)))


def resolve_model_path(path: str) -> str:
    """An HF checkpoint directory: ``path`` itself, or ``path/export`` for a run directory."""
    if _is_hf_checkpoint(path):
        return path
    export = os.path.join(path, "export")
    if _is_hf_checkpoint(export):
        return export
    raise ConfigError(f"model.path: {path!r} is neither an HF checkpoint (no config.json) nor a run "
                      "directory with an export/ (finish or export the run first)")


def validate(config: Any) -> None:
    """``eval``-specific checks: model, tokenizer, eval section, mesh."""
    from sgalm_jax.training.model_setup import model_config
    from sgalm_jax.training.tokenizer import BUILTIN_TINY

    if config.model.path:
        resolve_model_path(config.model.path)
    elif not config.model.init:
        raise ConfigError("model.path: no model given; set model.path (an HF checkpoint or a run "
                          "directory) or model.init (a random preset, for tests)")
    else:
        model_config(config.model)
    tok = config.tokenizer.path or (resolve_model_path(config.model.path) if config.model.path
                                    else "")
    if not tok:
        raise ConfigError(f"tokenizer.path: no tokenizer; set tokenizer.path ({BUILTIN_TINY!r} for "
                          "tiny random models)")
    if tok != BUILTIN_TINY and not os.path.isdir(tok):
        raise ConfigError(f"tokenizer.path: {tok!r} is not a directory")
    validate_eval_section(config)
    resolve_mesh(config, jax.device_count())


# ------------------------------------------------------------------------------------ the model side
class Evaluator:
    """Evaluates params of one model graph on the ``eval`` section's tasks.

    Args:
      eval_cfg: the config's ``eval`` section.
      graphdef, model_config: the model (params are passed per call).
      tokenizer: a transformers tokenizer.
      mesh: the device mesh (batches are sharded over its data axes).
      seed: seeds k-shot demo selection and sampling.
      progress: show tqdm bars.
      sampling: the config (or any object with a ``sampling`` section): the sampler's engine and
        placement (see :func:`sgalm_jax.training.run_setup.sampler_options`); ``eval.batch_size``
        bounds the rows decoded at once unless ``sampling.num_slots`` is set.
    """

    # Prompts per generate call when the continuous engine runs: several batches' worth, so that
    # slots freed by short answers are refilled instead of idling until the batch's longest ends.
    CALL_BATCHES = 8

    def __init__(self, eval_cfg: Any, graphdef: Any, model_config: Any, tokenizer: Any, *,
                 mesh: Any = None, seed: int = 0, progress: bool = False, sampling: Any = None):
        from sgalm_jax.sampling import Sampler
        from sgalm_jax.training.run_setup import sampler_options
        from sgalm_jax.training.tokenizer import eos_token_id, pad_token_id

        self.cfg = eval_cfg
        self.tasks = parse_tasks(eval_cfg.tasks)
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.seed = int(seed)
        self.progress = progress
        self.eos = eos_token_id(tokenizer, model_config.eos_token_ids)
        pad = pad_token_id(tokenizer, self.eos)
        self.max_positions = int(model_config.max_position_embeddings)
        rows = int(eval_cfg.batch_size)
        options = sampler_options(sampling if sampling is not None else {}, rows)
        self.sampler = Sampler(graphdef, model_config, min_batch_bucket=rows, pad_token_id=pad,
                               mesh=mesh, **options)
        calls = rows * self.CALL_BATCHES
        self.generate_batch = calls if self.sampler.resolve_engine(calls) == "continuous" else rows
        self.scorer = SequenceScorer(graphdef, mesh=mesh, batch_size=int(eval_cfg.batch_size),
                                     max_length=self.max_positions, pad_id=pad)
        self._calls = 0
        if eval_cfg.chat:
            from sgalm_jax.data.prompts import ensure_chat_template

            ensure_chat_template(tokenizer)

    # ---------------------------------------------------------------- callables
    def _encode(self, text: str) -> list[int]:
        # A chat-rendered prompt carries its own special tokens; plain text gets the tokenizer's.
        return list(self.tokenizer(text, add_special_tokens=not self.cfg.chat)["input_ids"])

    def generate_fn(self, params: Any):
        """``generate_fn(prompts) -> completions`` for :mod:`sgalm_jax.evaluation`."""
        cfg = self.cfg
        budget = max(self.max_positions - int(cfg.max_new_tokens), 1)

        def generate(prompts: list[str]) -> list[str]:
            ids = [self._encode(p)[-budget:] for p in prompts]  # keep the prompt's end
            self._calls += 1
            rng = jax.random.fold_in(jax.random.key(self.seed), self._calls)
            gen = self.sampler.generate(
                params, ids, max_new_tokens=int(cfg.max_new_tokens),
                temperature=float(cfg.temperature),
                top_p=None if cfg.top_p >= 1 else float(cfg.top_p),
                stop_token_ids=(self.eos,), rng=rng)
            return [self.tokenizer.decode(c, skip_special_tokens=True) for c in gen.completions()]

        return generate

    def loglik_fn(self, params: Any):
        """``loglik_fn([(context, continuation)]) -> [(sum log-prob, is_greedy)]``."""

        def loglik(requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
            seqs, masks = [], []
            for ctx, cont in requests:
                c = list(self.tokenizer(cont, add_special_tokens=False)["input_ids"])
                x = self._encode(ctx)[-max(self.max_positions - len(c), 1):]
                seqs.append(x + c)
                masks.append([0.0] * len(x) + [1.0] * len(c))
            res = self.scorer.score(params, seqs, masks)
            return [(float(s), bool(g)) for s, g in zip(res.logprob_sum, res.greedy)]

        return loglik

    # ---------------------------------------------------------------- tasks
    def _source(self, task: str) -> str | None:
        root = self.cfg.data_dir
        sub = EVAL_TASKS[task][0]
        if not root or sub is None:
            return None
        path = os.path.join(root, sub) if os.path.isdir(os.path.join(root, sub)) else root
        if task == "mbpp" and os.path.isdir(path):  # one file holds every split (by task id)
            for name in ("mbpp.jsonl", "mbpp.json"):
                if os.path.isfile(os.path.join(path, name)):
                    return os.path.join(path, name)
        return path

    def _k_shot(self, task: str) -> int:
        return EVAL_TASKS[task][1] if self.cfg.k_shot < 0 else int(self.cfg.k_shot)

    def _builder(self, task_obj: Any, task: str, demo_split: str | None = None):
        from sgalm_jax.data import PromptBuilder, PromptConfig

        pc = PromptConfig(k_shot=self._k_shot(task), seed=self.seed, chat=bool(self.cfg.chat))
        return PromptBuilder.for_task(task_obj, pc, self.tokenizer if self.cfg.chat else None,
                                      demo_split=demo_split)

    def evaluate(self, params: Any, out_dir: str | None = None) -> dict[str, dict[str, Any]]:
        """Run every task; returns ``{result name: metrics}`` (and writes files to ``out_dir``)."""
        from sgalm_jax.data import ArithmeticTask, ARCTask, GSM8KTask, MBPPTask
        from sgalm_jax.evaluation import (
            evaluate_arc_generate,
            evaluate_arc_loglik,
            evaluate_gsm8k,
            evaluate_mbpp,
        )

        cfg = self.cfg
        limit = int(cfg.max_examples) or None
        common = dict(batch_size=int(cfg.batch_size), out_dir=out_dir, progress=self.progress)
        gen_common = dict(common, batch_size=self.generate_batch)
        generate = self.generate_fn(params)
        results: dict[str, dict[str, Any]] = {}
        for task in self.tasks:
            src = self._source(task)
            if task in ("gsm8k", "arithmetic"):
                t = GSM8KTask(src) if task == "gsm8k" else ArithmeticTask(seed=self.seed)
                res = evaluate_gsm8k(t.load(cfg.split, limit=limit), generate, task=t,
                                     prompt_fn=self._builder(t, task).build, name=task,
                                     **gen_common)
            elif task == "arc":
                if cfg.arc_mode == "loglik":
                    t = ARCTask(src, style="cloze")
                    res = evaluate_arc_loglik(
                        t.load(cfg.split, limit=limit), self.loglik_fn(params), task=t,
                        context_fn=self._builder(t, task).build, leading_space=not cfg.chat,
                        name="arc_challenge", **common)
                else:
                    t = ARCTask(src, style="mc")
                    res = evaluate_arc_generate(t.load(cfg.split, limit=limit), generate, task=t,
                                                prompt_fn=self._builder(t, task).build,
                                                name="arc_challenge", **gen_common)
            else:  # mbpp
                t = MBPPTask(src, max_workers=int(cfg.sandbox_workers) or None)
                n = int(cfg.num_samples)
                res = evaluate_mbpp(t.load(cfg.split, limit=limit), generate, task=t,
                                    prompt_fn=self._builder(t, task, demo_split="prompt").build,
                                    num_samples=n, ks=tuple(k for k in (1, 10, 100) if k <= n),
                                    name="mbpp", **gen_common)
            results[res.name] = res.metrics
            log.info("eval %s: %s", res.name, _headline(res.metrics))
        if out_dir is not None and jax.process_index() == 0:
            write_json(os.path.join(out_dir, "results.json"), results)
        return results


def _headline(metrics: Mapping[str, Any]) -> str:
    keys = ("exact_match", "acc", "acc_norm", "pass@1", "pass@10", "steps_valid", "n")
    return ", ".join(f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
                     for k in keys if k in metrics)


def flat_metrics(results: Mapping[str, Mapping[str, Any]], prefix: str = "eval/") -> dict[str, float]:
    """Numeric metrics of :meth:`Evaluator.evaluate` as ``{"eval/gsm8k/exact_match": x}``."""
    out = {}
    for name, metrics in results.items():
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{prefix}{name}/{k}"] = float(v)
    return out


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


# ------------------------------------------------------------------------------------ run
def run(config: Any, workdir: str) -> dict[str, dict[str, Any]]:
    """Load the model and tokenizer, evaluate every task, write ``workdir/eval/``."""
    from sgalm_jax.models import load_pretrained
    from sgalm_jax.training import split_model
    from sgalm_jax.training.model_setup import build_model
    from sgalm_jax.training.tokenizer import BUILTIN_TINY, load_tokenizer

    mesh = sh.make_mesh(resolve_mesh(config, jax.device_count()))
    if config.model.path:
        path = resolve_model_path(config.model.path)
        log.info("evaluating %s", path)
        model = load_pretrained(path, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                                mesh=mesh)
    else:
        path = ""
        model = build_model(config.model, mesh=mesh, seed=config.seed)
    tok_path = config.tokenizer.path or path
    cache = (os.path.join(workdir, "tokenizer")
             if tok_path == BUILTIN_TINY and jax.process_index() == 0 else None)
    tokenizer = load_tokenizer(tok_path, cache_dir=cache)
    mcfg = model.config
    graphdef, params = split_model(model)
    del model
    evaluator = Evaluator(config.eval, graphdef, mcfg, tokenizer, mesh=mesh, seed=config.seed,
                          progress=config.metrics.progress_bar, sampling=config)
    out_dir = os.path.join(workdir, "eval")
    results = evaluator.evaluate(params, out_dir=out_dir)
    if jax.process_index() == 0:
        print(json.dumps({name: {k: v for k, v in m.items() if not isinstance(v, dict)}
                          for name, m in results.items()}, indent=2, default=_json_default))
    log.info("wrote %s", out_dir)
    return results
