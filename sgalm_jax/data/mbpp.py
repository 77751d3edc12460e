"""MBPP (Mostly Basic Python Problems): write a function from a description and three asserts.

Hub: ``google-research-datasets/mbpp``, config ``full`` (974 problems: ``prompt`` task_ids 1-10,
``test`` 11-510, ``validation`` 511-600, ``train`` 601-974) or ``sanitized`` (427 hand-checked
problems over the same id ranges: 7 / 257 / 43 / 120). Local: the upstream ``mbpp.jsonl``
(full) or ``sanitized-mbpp.json`` as one file; the split is chosen by task_id range.

Full records: ``text, code, task_id, test_setup_code, test_list, challenge_test_list``.
Sanitized records: ``prompt, code, task_id, test_imports, test_list``.

Prompt (as in the MBPP paper and lm-evaluation-harness ``mbpp``)::

    You are an expert Python programmer, and here is your task: <text> Your code should pass
    these tests:

    <assert 1>
    <assert 2>
    <assert 3>
    [BEGIN]

and the target is ``<code>\\n[DONE]``. A completion is judged by running its code in the sandbox of
:mod:`sgalm_jax.evaluation.sandbox`; each assert's call of the function is evaluated there and
compared with the expected value outside the sandbox (:mod:`sgalm_jax.evaluation.verdict`).
"""

from __future__ import annotations

import os

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from sgalm_jax.data.base import Example, Score, Task, require_str
from sgalm_jax.errors import DataError

SPLIT_RANGES: dict[str, tuple[int, int]] = {
    "prompt": (1, 10),
    "test": (11, 510),
    "validation": (511, 600),
    "train": (601, 974),
}
_FENCE_RE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.S)


def extract_code(output: str) -> str:
    """The code in a completion: cut at ``[DONE]``; the first fenced block if there is one."""
    text = output.split("[DONE]", 1)[0]
    if "```" in text:
        m = _FENCE_RE.search(text)
        if m:
            return m.group(1).strip("\n")
    text = text.strip("\n")
    if text.lstrip().startswith("[BEGIN]"):
        text = text.lstrip()[len("[BEGIN]"):].lstrip("\n")
    return text


def _norm_code(s: str) -> str:
    return s.replace("\r\n", "\n").replace("\r", "\n")


class MBPPTask(Task):
    """MBPP, full (``sanitized=False``) or sanitized. Scoring runs the asserts in a sandbox.

    Args:
      sanitized: use the sanitized subset (hub config ``sanitized``; local ``sanitized-mbpp.json``).
      include_challenge_tests: also run ``challenge_test_list`` (full MBPP only; off in the
        standard protocol).
      sandbox_config: a :class:`sgalm_jax.evaluation.sandbox.SandboxConfig` (timeouts, limits).
      max_workers: parallel sandbox processes when scoring a batch.
    """

    name: ClassVar[str] = "mbpp"
    default_hub: ClassVar[str | None] = "google-research-datasets/mbpp"
    default_hub_config: ClassVar[str | None] = "full"
    splits: ClassVar[tuple[str, ...]] = ("prompt", "train", "validation", "test")
    stop_sequences: ClassVar[tuple[str, ...]] = ("[DONE]", "<|im_end|>", "</s>")

    def __init__(
        self,
        source: str | os.PathLike | None = None,
        *,
        sanitized: bool = False,
        include_challenge_tests: bool = False,
        sandbox_config: Any = None,
        max_workers: int | None = None,
        **kwargs: Any,
    ):
        if sanitized and "hub_config" not in kwargs:
            kwargs["hub_config"] = "sanitized"
        super().__init__(source, **kwargs)
        self.sanitized = sanitized
        self.include_challenge_tests = include_challenge_tests
        self.sandbox_config = sandbox_config
        self.max_workers = max_workers
        self._sandbox = None

    def parse_record(self, record: Mapping[str, Any], *, index: int, split: str) -> Example:
        if "task_id" not in record:
            raise DataError("missing field 'task_id'")
        try:
            task_id = int(record["task_id"])
        except (TypeError, ValueError):
            raise DataError(f"task_id {record['task_id']!r} is not an integer") from None
        text = require_str(record, "text" if "text" in record else "prompt")
        code = _norm_code(require_str(record, "code"))
        tests = record.get("test_list")
        if not isinstance(tests, Sequence) or isinstance(tests, str) or not tests or not all(isinstance(t, str) for t in tests):
            raise DataError("field 'test_list' must be a non-empty list of strings")
        imports = record.get("test_imports") or []
        if not isinstance(imports, Sequence) or isinstance(imports, str):
            raise DataError("field 'test_imports' must be a list of strings")
        setup = record.get("test_setup_code") or ""
        challenge = record.get("challenge_test_list") or []
        return Example(
            id=str(task_id),
            question=text.strip(),
            answer=code,
            target=[_norm_code(t) for t in tests],
            fields={
                "task_id": task_id,
                "test_imports": [_norm_code(x) for x in imports],
                "test_setup_code": _norm_code(str(setup)),
                "challenge_test_list": [_norm_code(t) for t in challenge],
            },
        )

    def select(self, example: Example, split: str) -> bool:
        if split not in SPLIT_RANGES:
            return True
        lo, hi = SPLIT_RANGES[split]
        return lo <= example.fields["task_id"] <= hi

    # ------------------------------------------------------------------------------- formatting
    def _task_text(self, example: Example) -> str:
        tests = "\n".join(example.target)
        return (
            f"You are an expert Python programmer, and here is your task: {example.question} "
            f"Your code should pass these tests:\n\n{tests}\n"
        )

    def format_prompt(self, example: Example) -> str:
        return self._task_text(example) + "[BEGIN]\n"

    def format_target(self, example: Example) -> str:
        return example.answer.strip("\n") + "\n[DONE]"

    def chat_user(self, example: Example) -> str:
        return self._task_text(example) + "Write the Python code in a single ```python code block."

    def chat_assistant(self, example: Example) -> str:
        return "```python\n" + example.answer.strip("\n") + "\n```"

    def same_question(self, a: Example, b: Example) -> bool:
        return a.id == b.id or super().same_question(a, b)

    # --------------------------------------------------------------------------------- checking
    def build_program(self, example: Example, completion: str) -> tuple[str, str]:
        """``(program, tests)`` to execute: imports + extracted code; setup code + asserts."""
        code = extract_code(completion)
        program = "\n".join([*example.fields.get("test_imports", []), code]) + "\n"
        tests = list(example.target)
        if self.include_challenge_tests:
            tests += list(example.fields.get("challenge_test_list", []))
        setup = example.fields.get("test_setup_code", "")
        test_src = (setup + "\n" if setup else "") + "\n".join(tests) + "\n"
        return program, test_src

    def sandbox(self) -> Any:
        """The task's :class:`~sgalm_jax.evaluation.sandbox.Sandbox` (created on first use)."""
        if self._sandbox is None:
            # Imported lazily: executing code is evaluation machinery, a layer above data/.
            from sgalm_jax.evaluation.sandbox import Sandbox, SandboxConfig

            self._sandbox = Sandbox(self.sandbox_config or SandboxConfig(), max_workers=self.max_workers)
        return self._sandbox

    def names_under_test(self, example: Example) -> frozenset[str]:
        """The names the *reference* solution defines (the asserts' program side): a candidate
        that redefines ``set`` or ``sorted`` cannot move them out of the judge's hands."""
        from sgalm_jax.evaluation.verdict import defined_names

        imports = "\n".join(example.fields.get("test_imports", []))
        return defined_names(example.answer) - defined_names(imports)

    def score_batch(self, examples: Sequence[Example], outputs: Sequence[str], *, progress: bool = False) -> list[Score]:
        jobs = [(*self.build_program(e, o), self.names_under_test(e)) for e, o in zip(examples, outputs, strict=True)]
        results = self.sandbox().run_many(jobs, progress=progress)
        return [
            Score(
                correct=r.passed,
                extracted=extract_code(o),
                details={"status": r.status, "reason": r.reason, "duration_s": round(r.duration_s, 3),
                         "isolation": r.isolation},
            )
            for o, r in zip(outputs, results)
        ]

    def score(self, example: Example, output: str) -> Score:
        return self.score_batch([example], [output])[0]
