"""Model-agnostic evaluation loops: generation-scored tasks, and the pass@k estimator.

The model is reached only through callables, so this module does not depend on the model or
sampler code:

* ``generate_fn(prompts: list[str]) -> list[str]``: one completion (the text after the prompt)
  per prompt, in order. Greedy for accuracy / pass@1; sampling for pass@k (each prompt is then
  passed ``num_samples`` times, consecutively).
* ``loglik_fn(requests: list[tuple[str, str]]) -> list[tuple[float, bool]]``: for each
  ``(context, continuation)`` the summed log-probability of the continuation's tokens given the
  context, and whether greedy decoding would produce exactly that continuation (see
  :mod:`sgalm_jax.evaluation.arc`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sgalm_jax.data.base import Example, Task, truncate_at_stop
from sgalm_jax.errors import SgalmError
from sgalm_jax.evaluation.results import EvalResult, mean, progress_bar

GenerateFn = Callable[[list[str]], list[str]]
LoglikFn = Callable[[list[tuple[str, str]]], list[tuple[float, bool]]]
PromptFn = Callable[[Example], str]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)``.

    ``n`` samples of which ``c`` passed; computed as a stable product. Requires ``k <= n``.
    """
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def generate_all(
    prompts: Sequence[str],
    generate_fn: GenerateFn,
    *,
    batch_size: int = 32,
    num_samples: int = 1,
    progress: bool = True,
    desc: str = "generate",
) -> list[list[str]]:
    """Call ``generate_fn`` in batches; returns ``num_samples`` completions per prompt."""
    if batch_size < 1 or num_samples < 1:
        raise SgalmError("batch_size and num_samples must be >= 1")
    out: list[list[str]] = []
    bar = progress_bar(len(prompts), desc, progress)
    per_call = max(1, batch_size // num_samples)
    for i in range(0, len(prompts), per_call):
        chunk = list(prompts[i : i + per_call])
        req = [p for p in chunk for _ in range(num_samples)]
        got = generate_fn(req)
        if not isinstance(got, (list, tuple)) or len(got) != len(req):
            raise SgalmError(f"generate_fn returned {len(got) if hasattr(got, '__len__') else type(got).__name__} completions for {len(req)} prompts")
        for j in range(len(chunk)):
            out.append([str(x) for x in got[j * num_samples : (j + 1) * num_samples]])
        bar.update(len(chunk))
    bar.close()
    return out


def evaluate_generation(
    task: Task,
    examples: Sequence[Example],
    generate_fn: GenerateFn,
    *,
    prompt_fn: PromptFn | None = None,
    batch_size: int = 32,
    num_samples: int = 1,
    ks: Sequence[int] = (1,),
    stop_sequences: Sequence[str] = (),
    metric: str = "accuracy",
    name: str | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    extra_metrics: dict[str, Any] | None = None,
) -> EvalResult:
    """Generate an answer per example, score it with the task, and summarise.

    Args:
      task: decides correctness (``task.score_batch``) and the stop strings outputs are cut at.
      examples: the evaluated split.
      generate_fn: see the module docstring.
      prompt_fn: example -> prompt (default: the task's zero-shot prompt; pass
        ``PromptBuilder(...).build`` for k-shot / chat prompts).
      num_samples, ks: with ``num_samples > 1`` also report unbiased ``pass@k`` for each k.
      metric: the name of the main metric (mean correctness of the first sample).
      out_dir: when given, write the summary JSON and per-example JSONL there.

    Returns an :class:`EvalResult`; its metrics include ``metric``, ``n`` and (``num_samples > 1``)
    ``pass@k``.
    """
    name = name or task.name
    prompt_fn = prompt_fn or task.format_prompt
    prompts = [prompt_fn(e) for e in examples]
    samples = generate_all(prompts, generate_fn, batch_size=batch_size, num_samples=num_samples, progress=progress, desc=f"{name}: generate")
    stops = tuple(task.stop_sequences) + tuple(stop_sequences)
    flat_ex = [e for e in examples for _ in range(num_samples)]
    flat_out = [truncate_at_stop(o, stops) for outs in samples for o in outs]
    scores = task.score_batch(flat_ex, flat_out, progress=progress)
    records = []
    per_example_correct: list[list[bool]] = []
    for i, (ex, prompt, outs) in enumerate(zip(examples, prompts, samples)):
        sc = scores[i * num_samples : (i + 1) * num_samples]
        per_example_correct.append([s.correct for s in sc])
        rec: dict[str, Any] = {
            "id": ex.id,
            "prompt": prompt,
            "output": flat_out[i * num_samples],
            "extracted": sc[0].extracted,
            "correct": bool(sc[0].correct),
            "target": ex.target,
        }
        if sc[0].details:
            rec["details"] = dict(sc[0].details)
        if num_samples > 1:
            rec["outputs"] = flat_out[i * num_samples : (i + 1) * num_samples]
            rec["num_correct"] = int(sum(s.correct for s in sc))
        records.append(rec)
    metrics: dict[str, Any] = {
        "task": task.name,
        "n": len(examples),
        metric: mean([float(c[0]) for c in per_example_correct]),
        "num_samples": num_samples,
    }
    if num_samples > 1:
        metrics["mean_sample_accuracy"] = mean([mean([float(x) for x in c]) for c in per_example_correct])
        for k in ks:
            metrics[f"pass@{k}"] = mean([pass_at_k(num_samples, sum(c), k) for c in per_example_correct])
    if extra_metrics:
        metrics.update(extra_metrics)
    result = EvalResult(name=name, metrics=metrics, records=records)
    if out_dir is not None:
        result.write(out_dir)
    return result
