"""GSM8K (grade-school math word problems) and helpers shared by GSM8K-format tasks.

Records: ``{"question": str, "answer": str}`` where the answer is a worked solution with
``<<expr=result>>`` annotations ending in ``#### <number>``. Hub: ``openai/gsm8k``, config
``main``, splits ``train`` (7473) / ``test`` (1319). Local: a directory with ``train.jsonl`` and
``test.jsonl`` (the upstream files), or explicit ``data_files``.

Prompt format (zero-shot; a k-shot prompt repeats demo = prompt + target, separated by a blank
line)::

    Question: <question>
    Answer: <worked answer ... #### n>
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from sgalm_jax.data.base import Example, Score, Task, require_str, truncate_at_stop
from sgalm_jax.data.math_steps import check_steps, extract_final_answer, numbers_equal
from sgalm_jax.errors import DataError

_QA_RE = re.compile(r"^\s*Question:\s*(?P<q>.*?)\n\s*Answer:\s*(?P<a>.*)$", re.S)


def format_qa(question: str, answer: str) -> str:
    """The canonical text of one GSM8K-format sample (what SGALM's generator writes)."""
    return f"Question: {question.strip()}\nAnswer: {answer.strip()}"


def parse_qa(text: str) -> tuple[str, str] | None:
    """Split a ``Question: ...\\nAnswer: ...`` sample into (question, answer); None if malformed."""
    m = _QA_RE.match(text)
    if not m:
        return None
    q, a = m.group("q").strip(), m.group("a").strip()
    if not q or not a:
        return None
    return q, a


def check_gsm8k_sample(
    question: str | None, answer: str, *, strict: bool = False
) -> tuple[bool, str]:
    """Step-check a GSM8K-style worked answer (real or generated). Returns ``(valid, reason)``.

    Default (lenient, the level every gold GSM8K answer meets): a ``#### n`` line, every
    ``<<expr=result>>`` evaluates to its (possibly rounded) result and matches the visible number.
    ``strict=True`` also requires at least one step and that the final answer equals the last
    computed value (about 92% of gold test answers meet this; the rest finish with reasoning
    that has no annotation).
    """
    return check_steps(
        answer,
        question,
        exact=False,
        require_steps=strict,
        require_final_matches_last=strict,
    )


def check_gsm8k_sample_text(text: str, *, strict: bool = False) -> tuple[bool, str]:
    """:func:`check_gsm8k_sample` on a whole ``Question: ...\\nAnswer: ...`` text."""
    qa = parse_qa(text)
    if qa is None:
        return False, "not of the form 'Question: ...\\nAnswer: ...'"
    return check_gsm8k_sample(qa[0], qa[1], strict=strict)


class GSM8KTask(Task):
    """GSM8K: generate a worked answer; correct when the extracted final number matches exactly."""

    name: ClassVar[str] = "gsm8k"
    default_hub: ClassVar[str | None] = "openai/gsm8k"
    default_hub_config: ClassVar[str | None] = "main"
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    stop_sequences: ClassVar[tuple[str, ...]] = ("\n\nQuestion:", "\nQuestion:", "<|im_end|>", "</s>")
    chat_instruction: ClassVar[str] = (
        "Solve the following math problem step by step. "
        "Write the final answer on its own line as '#### <number>'."
    )

    def parse_record(self, record: Mapping[str, Any], *, index: int, split: str) -> Example:
        question = require_str(record, "question")
        answer = require_str(record, "answer")
        if "####" not in answer:
            raise DataError("answer has no '#### <number>' final line")
        target = extract_final_answer(answer.rsplit("####", 1)[1])
        if target is None:
            raise DataError("the text after '####' is not a number")
        rid = record.get("id")
        return Example(id=str(rid) if rid is not None else f"{split}-{index}", question=question, answer=answer, target=target)

    def format_prompt(self, example: Example) -> str:
        return f"Question: {example.question.strip()}\nAnswer:"

    def format_target(self, example: Example) -> str:
        return " " + example.answer.strip()

    def chat_user(self, example: Example) -> str:
        return f"{self.chat_instruction}\n\n{example.question.strip()}"

    def sample_text(self, example: Example) -> str:
        return format_qa(example.question, example.answer)

    def score(self, example: Example, output: str) -> Score:
        text = truncate_at_stop(output, self.stop_sequences)
        pred = extract_final_answer(text)
        return Score(correct=numbers_equal(pred, example.target), extracted=pred)

    def check_sample(self, text: str, *, strict: bool = False) -> tuple[bool, str]:
        """Step-check a generated ``Question/Answer`` sample (see :func:`check_gsm8k_sample_text`)."""
        return check_gsm8k_sample_text(text, strict=strict)
