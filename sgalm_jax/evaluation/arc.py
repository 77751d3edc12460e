"""ARC-Challenge evaluation: log-likelihood multiple choice (acc, acc_norm) or generated letter.

Log-likelihood mode follows lm-evaluation-harness ``arc_challenge``: the context is
``Question: <q>\\nAnswer:`` (after any k-shot demos, each ``Question: ...\\nAnswer: <gold text>``),
each choice is scored as the continuation ``" " + choice text``, and

* ``acc``: the choice with the highest summed log-probability is right;
* ``acc_norm``: the same after dividing each log-probability by the choice's length in
  characters (lm-eval: ``completion_len = len(choice)``, the choice text without the leading
  space). Ties go to the first choice (``np.argmax``).

With an ``mc``-style task the choices are listed in the prompt and the scored continuations are
the labels (``" A"``...), so acc_norm equals acc. Generation mode asks the model to write the
letter and extracts it from the output (metric ``acc``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from sgalm_jax.data.arc import ARCTask
from sgalm_jax.data.base import Example
from sgalm_jax.errors import SgalmError
from sgalm_jax.evaluation.generation import GenerateFn, LoglikFn, PromptFn, evaluate_generation
from sgalm_jax.evaluation.results import EvalResult, mean, progress_bar


def choose(logliks: Sequence[float], choice_lengths: Sequence[int]) -> tuple[int, int]:
    """(argmax of log-likelihoods, argmax of length-normalised log-likelihoods)."""
    ll = np.asarray(logliks, dtype=np.float64)
    lens = np.maximum(np.asarray(choice_lengths, dtype=np.float64), 1.0)
    return int(np.argmax(ll)), int(np.argmax(ll / lens))


def evaluate_arc_loglik(
    examples: Sequence[Example],
    loglik_fn: LoglikFn,
    *,
    task: ARCTask | None = None,
    context_fn: PromptFn | None = None,
    leading_space: bool = True,
    batch_size: int = 64,
    out_dir: str | os.PathLike | None = None,
    name: str = "arc_challenge_loglik",
    progress: bool = True,
) -> EvalResult:
    """acc and acc_norm of ``loglik_fn`` on ARC ``examples``.

    Args:
      loglik_fn: ``list[(context, continuation)] -> list[(sum_logprob, is_greedy)]``.
      task: an :class:`ARCTask` (default ``style="cloze"``, the lm-eval setup).
      context_fn: example -> context (default the task's zero-shot prompt; pass
        ``PromptBuilder(...).build`` for k-shot or chat prompts).
      leading_space: prefix continuations with a space (set False after a chat template's
        assistant header).
      batch_size: requests per ``loglik_fn`` call (an example's choices are never split).
    """
    task = task or ARCTask(style="cloze")
    context_fn = context_fn or task.format_prompt
    per_ex: list[list[tuple[str, str]]] = []
    contexts = []
    for ex in examples:
        ctx = context_fn(ex)
        contexts.append(ctx)
        per_ex.append(task.loglik_requests(ex, ctx, leading_space=leading_space))
    results: list[list[tuple[float, bool]]] = []
    bar = progress_bar(len(examples), f"{name}: score", progress)
    i = 0
    while i < len(per_ex):
        j, n = i, 0
        while j < len(per_ex) and (n == 0 or n + len(per_ex[j]) <= batch_size):
            n += len(per_ex[j])
            j += 1
        reqs = [r for rs in per_ex[i:j] for r in rs]
        got = loglik_fn(reqs)
        if len(got) != len(reqs):
            raise SgalmError(f"loglik_fn returned {len(got)} results for {len(reqs)} requests")
        k = 0
        for rs in per_ex[i:j]:
            results.append([(float(a), bool(b)) for a, b in got[k : k + len(rs)]])
            k += len(rs)
        bar.update(j - i)
        i = j
    bar.close()
    records: list[dict[str, Any]] = []
    accs, accs_norm, greedy = [], [], []
    for ex, ctx, res in zip(examples, contexts, results):
        items = ex.fields["choices"] if task.style == "cloze" else task.display_labels(ex)
        lls = [r[0] for r in res]
        pred, pred_norm = choose(lls, [len(c) for c in items])
        gold = int(ex.target)
        accs.append(float(pred == gold))
        accs_norm.append(float(pred_norm == gold))
        greedy.append(float(res[gold][1]))
        records.append({
            "id": ex.id,
            "prompt": ctx,
            "output": items[pred],
            "extracted": task.display_labels(ex)[pred],
            "correct": pred == gold,
            "correct_norm": pred_norm == gold,
            "pred": pred,
            "pred_norm": pred_norm,
            "gold": gold,
            "choices": list(ex.fields["choices"]),
            "loglikelihoods": lls,
        })
    metrics = {
        "task": task.name,
        "mode": "loglik",
        "style": task.style,
        "n": len(examples),
        "acc": mean(accs),
        "acc_norm": mean(accs_norm),
        "gold_is_greedy": mean(greedy),
    }
    result = EvalResult(name=name, metrics=metrics, records=records)
    if out_dir is not None:
        result.write(out_dir)
    return result


def evaluate_arc_generate(
    examples: Sequence[Example],
    generate_fn: GenerateFn,
    *,
    task: ARCTask | None = None,
    prompt_fn: PromptFn | None = None,
    batch_size: int = 32,
    out_dir: str | os.PathLike | None = None,
    name: str = "arc_challenge_generate",
    progress: bool = True,
) -> EvalResult:
    """Accuracy (metric ``acc``) when the model writes the answer letter (``mc``-style prompts)."""
    task = task or ARCTask(style="mc")
    if task.style != "mc":
        raise SgalmError("ARC generation mode needs an ARCTask with style='mc' (the choices listed in the prompt)")
    return evaluate_generation(
        task, examples, generate_fn, prompt_fn=prompt_fn, batch_size=batch_size, metric="acc",
        name=name, out_dir=out_dir, progress=progress, extra_metrics={"mode": "generate"},
    )
