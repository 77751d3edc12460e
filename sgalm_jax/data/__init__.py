"""Tasks (GSM8K, ARC-Challenge, MBPP, instruction/chat data, distillation data with teacher
responses, a built-in arithmetic task) and prompts.

Typical use::

    from sgalm_jax.data import get_task, PromptBuilder, PromptConfig
    task = get_task("gsm8k", source="path/to/gsm8k_dir")      # or the hub default
    test = task.load("test")
    prompts = PromptBuilder.for_task(task, PromptConfig(k_shot=4, seed=0)).build_many(test)
"""

from sgalm_jax.data.arc import ARCTask
from sgalm_jax.data.arithmetic import ArithmeticTask, check_arithmetic_sample, generate_problem
from sgalm_jax.data.base import Example, LoadReport, Score, Task, get_task, list_tasks, register_task, truncate_at_stop
from sgalm_jax.data.chat import AlpacaTask, ChatTask, UltraChatTask
from sgalm_jax.data.distill import DistillationTask, LMSYSGPT5ChatTask
from sgalm_jax.data.gsm8k import GSM8KTask, check_gsm8k_sample, check_gsm8k_sample_text, format_qa, parse_qa
from sgalm_jax.data.math_steps import check_steps, extract_final_answer, normalize_number, numbers_equal
from sgalm_jax.data.mbpp import MBPPTask, extract_code
from sgalm_jax.data.prompts import (
    CHATML_TEMPLATE,
    PromptBuilder,
    PromptConfig,
    SGALMTemplates,
    ensure_chat_template,
    real_fake_token_ids,
    render_chat,
    sample_demo_texts,
    select_demos,
    sgalm_discriminator_prompt,
    sgalm_generator_prompt,
)


def _mbpp_sanitized(**kwargs):
    return MBPPTask(sanitized=True, **kwargs)


for _name, _factory in [
    ("gsm8k", GSM8KTask),
    ("arithmetic", ArithmeticTask),
    ("arc_challenge", ARCTask),
    ("arc", ARCTask),
    ("mbpp", MBPPTask),
    ("mbpp_sanitized", _mbpp_sanitized),
    ("chat", ChatTask),
    ("instruction", ChatTask),
    ("ultrachat", UltraChatTask),
    ("alpaca", AlpacaTask),
    ("distill", DistillationTask),
    ("lmsys_gpt5_chat", LMSYSGPT5ChatTask),
]:
    register_task(_name, _factory, overwrite=True)

__all__ = [
    "ARCTask", "AlpacaTask", "ArithmeticTask", "CHATML_TEMPLATE", "ChatTask", "DistillationTask",
    "Example", "GSM8KTask", "LMSYSGPT5ChatTask",
    "LoadReport", "MBPPTask", "PromptBuilder", "PromptConfig", "SGALMTemplates", "Score", "Task",
    "UltraChatTask", "check_arithmetic_sample", "check_gsm8k_sample", "check_gsm8k_sample_text",
    "check_steps", "ensure_chat_template", "extract_code", "extract_final_answer", "format_qa",
    "generate_problem", "get_task", "list_tasks", "normalize_number", "numbers_equal", "parse_qa",
    "real_fake_token_ids", "register_task", "render_chat", "sample_demo_texts", "select_demos",
    "sgalm_discriminator_prompt", "sgalm_generator_prompt", "truncate_at_stop",
]
