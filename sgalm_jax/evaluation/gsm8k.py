"""GSM8K evaluation: generate, extract the final number, exact match.

Protocol (the usual one; SGALM's own is unknown): greedy decoding, 0-shot or k-shot prompts in
the ``Question: ...\\nAnswer:`` format (or the chat template), the answer is the number after
``####`` or else the last number in the output; commas, ``$`` and a trailing ``.`` are removed
and the numbers compared exactly (``18.0`` equals ``18``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from sgalm_jax.data.base import Example
from sgalm_jax.data.gsm8k import GSM8KTask
from sgalm_jax.data.math_steps import extract_final_answer, normalize_number, numbers_equal
from sgalm_jax.evaluation.generation import GenerateFn, PromptFn, evaluate_generation
from sgalm_jax.evaluation.results import EvalResult

__all__ = ["evaluate_gsm8k", "extract_final_answer", "gsm8k_exact_match", "normalize_number"]


def gsm8k_exact_match(output: str, gold: str) -> bool:
    """True when the final number extracted from ``output`` equals ``gold`` (a number or a
    GSM8K gold answer ending in ``#### n``)."""
    gold_n = extract_final_answer(gold) if "####" in gold else normalize_number(gold)
    return numbers_equal(extract_final_answer(output), gold_n)


def evaluate_gsm8k(
    examples: Sequence[Example],
    generate_fn: GenerateFn,
    *,
    task: GSM8KTask | None = None,
    prompt_fn: PromptFn | None = None,
    batch_size: int = 32,
    out_dir: str | os.PathLike | None = None,
    name: str = "gsm8k",
    progress: bool = True,
) -> EvalResult:
    """Exact-match accuracy of ``generate_fn`` on GSM8K-format ``examples`` (metric ``exact_match``).

    Works for the built-in arithmetic task too (pass ``task=ArithmeticTask(...)``); the records
    then also say whether each output's worked steps check out (``steps_valid``).
    """
    task = task or GSM8KTask()
    result = evaluate_generation(
        task, examples, generate_fn, prompt_fn=prompt_fn, batch_size=batch_size,
        metric="exact_match", name=name, progress=progress,
    )
    check = getattr(task, "check_sample", None)
    if check is not None:
        valid = []
        for ex, rec in zip(examples, result.records):
            ok, reason = check(f"Question: {ex.question}\nAnswer: {rec['output'].strip()}")
            rec["steps_valid"], rec["steps_reason"] = ok, reason
            valid.append(float(ok))
        result.metrics["steps_valid"] = sum(valid) / len(valid) if valid else 0.0
    if out_dir is not None:
        result.write(out_dir)
    return result
