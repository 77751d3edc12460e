"""MBPP evaluation: pass@1 (greedy) and unbiased pass@k (sampling) with sandboxed execution.

Each completion's code (cut at ``[DONE]``; the first fenced block if any) is run in
:mod:`sgalm_jax.evaluation.sandbox`; each assert's call of the function is evaluated there and the
assert itself is decided outside the sandbox. A problem counts as solved by a sample when every
assert passes. The summary records which isolation was in force (``sandbox_isolation``:
``bwrap`` or ``guarded``). ``generate_fn`` receives each prompt ``num_samples``
times in a row.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from sgalm_jax.data.base import Example
from sgalm_jax.data.mbpp import MBPPTask, extract_code
from sgalm_jax.evaluation.generation import GenerateFn, PromptFn, evaluate_generation, pass_at_k
from sgalm_jax.evaluation.results import EvalResult

__all__ = ["evaluate_mbpp", "extract_code", "pass_at_k"]


def evaluate_mbpp(
    examples: Sequence[Example],
    generate_fn: GenerateFn,
    *,
    task: MBPPTask | None = None,
    prompt_fn: PromptFn | None = None,
    num_samples: int = 1,
    ks: Sequence[int] = (1,),
    batch_size: int = 32,
    out_dir: str | os.PathLike | None = None,
    name: str = "mbpp",
    progress: bool = True,
) -> EvalResult:
    """pass@1 (metric ``pass@1``, the first sample) and pass@k for ``ks`` (``num_samples >= k``)."""
    task = task or MBPPTask()
    ks = tuple(k for k in ks if k <= num_samples) or (1,)
    result = evaluate_generation(
        task, examples, generate_fn, prompt_fn=prompt_fn, batch_size=batch_size,
        num_samples=num_samples, ks=ks, metric="pass@1" if num_samples == 1 else "first_sample_pass",
        name=name, progress=progress,
    )
    statuses: dict[str, int] = {}
    for rec in result.records:
        st = rec.get("details", {}).get("status", "?")
        statuses[st] = statuses.get(st, 0) + 1
    result.metrics["sandbox_status"] = statuses
    sandbox = task.sandbox()
    # Which isolation was in force: "bwrap" (the jail) or "guarded" (the weaker fallback).
    result.metrics["sandbox_isolation"] = sandbox.isolation
    result.metrics["sandbox_isolation_detail"] = sorted({rec.get("details", {}).get("isolation", "") for rec in result.records} - {""})
    if out_dir is not None:
        result.write(out_dir)
    return result
