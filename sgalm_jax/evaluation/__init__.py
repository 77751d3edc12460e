"""Evaluation: GSM8K exact match, ARC-Challenge acc/acc_norm, MBPP pass@k in a sandbox, the GAD /
MiniLLM LLM-as-a-judge protocol (:mod:`~sgalm_jax.evaluation.judge`) and ROUGE-L.

All evaluators reach the model through callables (see :mod:`sgalm_jax.evaluation.generation`):
``generate_fn(list[str]) -> list[str]`` and ``loglik_fn(list[(context, continuation)]) ->
list[(sum_logprob, is_greedy)]``.
"""

from sgalm_jax.evaluation.arc import choose, evaluate_arc_generate, evaluate_arc_loglik
from sgalm_jax.evaluation.generation import GenerateFn, LoglikFn, evaluate_generation, generate_all, pass_at_k
from sgalm_jax.evaluation.gsm8k import evaluate_gsm8k, gsm8k_exact_match
from sgalm_jax.evaluation.judge import Judge, JudgeItem, build_judge, parse_scores
from sgalm_jax.evaluation.judge_backends import ChatRequest, LocalChatBackend, OpenAIChatBackend
from sgalm_jax.evaluation.mbpp import evaluate_mbpp
from sgalm_jax.evaluation.results import EvalResult, write_results
from sgalm_jax.evaluation.rouge import RougeScore, mean_rouge_l, rouge_l
from sgalm_jax.evaluation.sandbox import Sandbox, SandboxConfig, SandboxResult, SandboxUnavailable, run_program

__all__ = [
    "ChatRequest", "EvalResult", "GenerateFn", "Judge", "JudgeItem", "LocalChatBackend", "LoglikFn",
    "OpenAIChatBackend", "RougeScore", "Sandbox", "SandboxConfig", "SandboxResult", "SandboxUnavailable",
    "build_judge", "choose", "evaluate_arc_generate", "evaluate_arc_loglik", "evaluate_generation",
    "evaluate_gsm8k", "evaluate_mbpp", "generate_all", "gsm8k_exact_match", "mean_rouge_l",
    "parse_scores", "pass_at_k", "rouge_l", "run_program", "write_results",
]
