"""Evaluation: GSM8K exact match, ARC-Challenge acc/acc_norm, MBPP pass@k in a sandbox.

All evaluators reach the model through callables (see :mod:`sgalm_jax.evaluation.generation`):
``generate_fn(list[str]) -> list[str]`` and ``loglik_fn(list[(context, continuation)]) ->
list[(sum_logprob, is_greedy)]``.
"""

from sgalm_jax.evaluation.arc import choose, evaluate_arc_generate, evaluate_arc_loglik
from sgalm_jax.evaluation.generation import GenerateFn, LoglikFn, evaluate_generation, generate_all, pass_at_k
from sgalm_jax.evaluation.gsm8k import evaluate_gsm8k, gsm8k_exact_match
from sgalm_jax.evaluation.mbpp import evaluate_mbpp
from sgalm_jax.evaluation.results import EvalResult, write_results
from sgalm_jax.evaluation.sandbox import Sandbox, SandboxConfig, SandboxResult, SandboxUnavailable, run_program

__all__ = [
    "EvalResult", "GenerateFn", "LoglikFn", "Sandbox", "SandboxConfig", "SandboxResult", "SandboxUnavailable", "choose",
    "evaluate_arc_generate", "evaluate_arc_loglik", "evaluate_generation", "evaluate_gsm8k",
    "evaluate_mbpp", "generate_all", "gsm8k_exact_match", "pass_at_k", "run_program", "write_results",
]
