"""Evaluation of GAD checkpoints: the stopping criterion, since GAD's reward is no progress signal.

The GAD authors pick the checkpoint whose judge score plateaus or peaks (the discriminator's score
oscillates around 0 by design; microsoft/LMOps#353). At every checkpoint of a GAD run the student
answers ``gad.eval_examples`` held-out prompts greedily (up to ``distill.max_response_tokens``,
stopping at the end token), and the answers get:

* ``rouge_l``: ROUGE-L F against the teacher's response (always; the paper's health metric, which
  does not predict quality);
* ``accuracy``: the task's checker (built-in tasks with gold answers, e.g. ``arithmetic``,
  ``gsm8k``; not distillation data);
* ``judge_score``: the GAD / MiniLLM judge protocol (:mod:`sgalm_jax.evaluation.judge`) when
  ``gad.judge`` is set: ``100 * student / (student + judge's own reference)``, about 50 at parity;
* ``response_tokens`` (mean) and ``truncated`` (share cut at the cap): the length drift that
  signals reward hacking.

The selection metric (``gad.eval_metric``) decides the best checkpoint (its student is exported to
``workdir/best`` when ``gad.export_best``) and, with ``gad.early_stop_patience``, when the run
stops. Each evaluation is written to ``workdir/eval/step_NNNNNN.json`` (metrics and the first
answers) and logged as ``eval/*`` metrics at its step; the history travels in the checkpoints'
metadata, so a resumed run keeps its best and its patience.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

from sgalm_jax.errors import ConfigError

log = logging.getLogger(__name__)

EVAL_METRICS = ("judge_score", "accuracy", "rouge_l")


class CheckpointEval:
    """Greedy answers of the student on held-out prompts, scored; tracks the best checkpoint."""

    def __init__(self, config: Any, workdir: str, tokenizer: Any, encoder: Any, sampler: Any,
                 mesh: Any, *, num_samples_saved: int = 8):
        from sgalm_jax.algorithms.distill_data import load_distill_pool
        from sgalm_jax.data.distill import DistillationTask

        g = config.gad
        self.config, self.workdir = config, workdir
        self.tokenizer, self.encoder, self.sampler = tokenizer, encoder, sampler
        vocab = int(sampler.config.vocab_size)
        self.pool = load_distill_pool(config, tokenizer, encoder, split=g.eval_split,
                                      limit=int(g.eval_examples), vocab_size=vocab,
                                      source=g.eval_file)
        self.has_checker = not isinstance(self.pool.task, DistillationTask)
        self.judge = None
        if g.judge:
            from sgalm_jax.evaluation.judge import build_judge

            self.judge = build_judge(dict(g.judge), run_dir=workdir, mesh=mesh)
        metric = g.eval_metric
        if metric == "auto":
            metric = ("judge_score" if self.judge is not None
                      else "accuracy" if self.has_checker else "rouge_l")
        if metric == "accuracy" and not self.has_checker:
            raise ConfigError("gad.eval_metric: 'accuracy' needs a task with a checker")
        self.metric = metric
        self.patience = int(g.early_stop_patience)
        self.num_saved = num_samples_saved
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.improved = False

    def restore(self, history: list[dict[str, Any]]) -> None:
        """Take the evaluations of a resumed run (from its checkpoint's metadata)."""
        self.history = []
        self.best = None
        for h in history:
            self._track(h)

    def _track(self, result: dict[str, Any]) -> None:
        self.history.append(result)
        value = result.get(self.metric)
        self.improved = value is not None and np.isfinite(value) and (
            self.best is None or value > self.best[self.metric])
        if self.improved:
            self.best = {"step": result["step"], self.metric: value}

    def should_stop(self) -> bool:
        """True after ``gad.early_stop_patience`` evaluations without a better metric."""
        if not self.patience or self.best is None:
            return False
        since = sum(1 for h in self.history if h["step"] > self.best["step"])
        return since >= self.patience

    def answers(self, params: Any) -> tuple[list[str], list[int], list[bool]]:
        """Greedy answers (text cut at the first stop token), their lengths and whether cut."""
        kw = self.encoder.sampler_kwargs
        gen = self.sampler.generate(params, self.pool.ids, temperature=0.0,
                                    rng=jax.random.key(0), **kw)
        stops = set(kw["stop_token_ids"])
        texts, lengths = [], []
        for comp in gen.completions():
            cut = next((k for k, t in enumerate(comp) if t in stops), len(comp))
            texts.append(self.tokenizer.decode(comp[:cut], skip_special_tokens=True).strip())
            lengths.append(len(comp))
        return texts, lengths, [not bool(f) for f in gen.finished]

    def __call__(self, params: Any, step: int) -> dict[str, Any]:
        """Evaluate the student ``params`` of checkpoint ``step``; returns the metrics."""
        from sgalm_jax.evaluation.rouge import rouge_l

        texts, lengths, cut = self.answers(params)
        rouge = [rouge_l(t, r).fmeasure for t, r in zip(texts, self.pool.teacher_texts)]
        result: dict[str, Any] = {"step": int(step), "rouge_l": float(np.mean(rouge)),
                                  "response_tokens": float(np.mean(lengths)),
                                  "truncated": float(np.mean(cut)), "n": len(texts)}
        correct = None
        if self.has_checker:
            correct = [bool(self.pool.task.score(e, t).correct)
                       for e, t in zip(self.pool.examples, texts)]
            result["accuracy"] = float(np.mean(correct))
        if self.judge is not None:
            res = self.judge.evaluate(self._judge_items(texts), name=f"judge_step_{step:06d}",
                                      out_dir=os.path.join(self.workdir, "eval"))
            result["judge_score"] = float(res.metrics["judge_score"])
        self._track(result)
        if self.best is not None:
            result["best_step"] = self.best["step"]
        log.info("eval of step %d: %s", step, {k: round(v, 4) if isinstance(v, float) else v
                                               for k, v in result.items()})
        if jax.process_index() == 0:
            self._write(step, result, texts, rouge, correct)
        return result

    def _judge_items(self, texts: list[str]) -> list[Any]:
        from sgalm_jax.evaluation.judge import JudgeItem

        items = []
        for e, text, teacher in zip(self.pool.examples, texts, self.pool.teacher_texts):
            if self.has_checker:
                items.append(JudgeItem(id=e.id, prompt=self.pool.task.chat_user(e), answer=text,
                                       teacher=teacher))
            else:
                items.append(JudgeItem.from_example(e, text))
        return items

    def _write(self, step: int, result: dict[str, Any], texts: list[str], rouge: list[float],
               correct: list[bool] | None) -> None:
        from sgalm_jax.fileio import atomic_write_json

        samples = []
        for i in range(min(self.num_saved, len(texts))):
            rec = {"id": self.pool.examples[i].id, "prompt": self.pool.texts[i],
                   "answer": texts[i], "teacher": self.pool.teacher_texts[i],
                   "rouge_l": rouge[i]}
            if correct is not None:
                rec["correct"] = correct[i]
            samples.append(rec)
        path = os.path.join(self.workdir, "eval", f"step_{step:06d}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_json(path, {"metric": self.metric, **result, "samples": samples}, indent=2)

    def export_best(self, model: Any, tokenizer: Any) -> str:
        """Write ``model`` (the best checkpoint's student) to ``workdir/best`` in HF format. Every
        process calls it (the export gathers the sharded weights); process 0 writes."""
        from sgalm_jax.fileio import atomic_write_json
        from sgalm_jax.models import save_pretrained

        path = os.path.join(self.workdir, "best")
        save_pretrained(model, path, tokenizer=tokenizer,
                        dtype=self.config.checkpoint.export_dtype or None)
        if jax.process_index() == 0:
            atomic_write_json(os.path.join(path, "gad_eval.json"),
                              {"metric": self.metric, **self.best}, indent=2)
        log.info("step %d is the best so far (%s %.4f): its student is in %s", self.best["step"],
                 self.metric, self.best[self.metric], path)
        return path


__all__ = ["EVAL_METRICS", "CheckpointEval"]
