"""Distillation data: prompts with a black-box teacher's response (GAD, SeqKD).

Two record layouts, detected per record (or fixed with ``prompt_key`` / ``response_key``):

* **LMSYS-Chat-GPT-5-Chat-Response** (``ytz20/LMSYS-Chat-GPT-5-Chat-Response``, GAD's training
  set, also as the parquet files ``gad/tools/export_lmsys_parquet.py`` writes):
  ``{"content": [{"role", "content"}, ...] | str, "teacher_response": str, ...}``;
* **plain prompt/response**: ``{"prompt": str | messages, "response": str}`` (also ``completion``,
  ``output``), e.g. the Self-Instruct text-davinci-003 predictions.

A chat-message prompt must end with a user turn; a message list that ends with an assistant turn
and has no response field supplies its last turn as the teacher response. Every example carries
``fields["messages"]`` (the conversation with the teacher's reply last), as :class:`ChatTask`
examples do, so prompts render through any tokenizer's chat template; token-level truncation and the
end-of-response rule live in :mod:`sgalm_jax.data.distill_tokens`.

A malformed record raises :class:`~sgalm_jax.errors.DataError` naming its file and line (or is
counted with ``skip_malformed=True``), as for every task. Open-ended chat has no correctness
checker: :meth:`score` is :class:`ChatTask`'s exact match; the health metric (ROUGE-L against the
teacher) and the judge protocol are in :mod:`sgalm_jax.evaluation.rouge` and
:mod:`sgalm_jax.evaluation.judge`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from sgalm_jax.data.base import Example
from sgalm_jax.data.chat import ChatTask
from sgalm_jax.errors import DataError

PROMPT_KEYS = ("content", "prompt", "messages", "conversations")
RESPONSE_KEYS = ("teacher_response", "response", "completion", "output")
ID_KEYS = ("id", "conversation_id", "question_id", "prompt_id")
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "bot": "assistant", "model": "assistant", "system": "system"}


def as_messages(value: Any, key: str) -> list[dict[str, str]]:
    """A prompt field as chat messages: a string is one user turn; a list must hold
    ``{"role", "content"}`` (or ShareGPT ``{"from", "value"}``) objects with string content."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"field {key!r} is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, Mapping) or not isinstance(value, Sequence) or not value:
        raise DataError(f"field {key!r} must be a string or a non-empty list of chat messages, "
                        f"got {type(value).__name__}")
    msgs = []
    for k, turn in enumerate(value):
        if not isinstance(turn, Mapping):
            raise DataError(f"{key}[{k}] is not an object ({type(turn).__name__})")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or role.lower() not in _ROLES:
            raise DataError(f"{key}[{k}] has unknown role {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{key}[{k}] has no string content")
        msgs.append({"role": _ROLES[role.lower()], "content": content})
    return msgs


class DistillationTask(ChatTask):
    """Prompts with teacher responses from local JSONL / JSON / parquet or the hub.

    Args:
      source, data_files, hub_config, skip_malformed, hub_kwargs: as for every task.
      prompt_key: the prompt field (a string or a chat-message list); default: the first of
        ``content``, ``prompt``, ``messages``, ``conversations`` present.
      response_key: the teacher-response field; default: the first of ``teacher_response``,
        ``response``, ``completion``, ``output`` present.
      require_response: reject records without a teacher response (False: prompt-only evaluation
        sets, e.g. Vicuna questions).
    """

    name: ClassVar[str] = "distill"

    def __init__(self, source: str | os.PathLike | None = None, *, prompt_key: str | None = None,
                 response_key: str | None = None, require_response: bool = True, **kwargs: Any):
        super().__init__(source, require_response=require_response, **kwargs)
        self.prompt_key = prompt_key
        self.response_key = response_key

    def _pick(self, record: Mapping[str, Any], key: str | None, candidates: Sequence[str],
              what: str) -> str | None:
        if key is not None:
            if key not in record:
                raise DataError(f"missing {what} field {key!r}")
            return key
        return next((k for k in candidates if k in record), None)

    def parse_record(self, record: Mapping[str, Any], *, index: int, split: str) -> Example:
        pkey = self._pick(record, self.prompt_key, PROMPT_KEYS, "prompt")
        if pkey is None:
            raise DataError(f"no prompt field (expected one of {list(PROMPT_KEYS)}, or set "
                            f"prompt_key); has {sorted(record)}")
        msgs = as_messages(record[pkey], pkey)
        rkey = self._pick(record, self.response_key, RESPONSE_KEYS, "response")
        response = None
        if rkey is not None:
            response = record[rkey]
            if response is not None and not isinstance(response, str):
                raise DataError(f"field {rkey!r} must be a string, got {type(response).__name__}")
        elif msgs[-1]["role"] == "assistant":
            response, msgs = msgs[-1]["content"], msgs[:-1]
        if response is not None and not response.strip():
            raise DataError(f"the teacher response {rkey or pkey!r} is empty")
        if response is None and self.require_response:
            raise DataError(f"no teacher response (expected one of {list(RESPONSE_KEYS)}, or set "
                            "response_key; require_response=False for prompt-only data)")
        if not msgs or msgs[-1]["role"] != "user":
            raise DataError(f"the prompt {pkey!r} must end with a user turn")
        if not msgs[-1]["content"].strip():
            raise DataError(f"the last user turn of {pkey!r} is empty")
        rid = next((record[k] for k in ID_KEYS if record.get(k) is not None), None)
        answer = response or ""
        return Example(
            id=str(rid) if rid is not None else f"{split}-{index}",
            question=msgs[-1]["content"],
            answer=answer,
            target=answer,
            fields={"messages": msgs + ([{"role": "assistant", "content": answer}]
                                        if response is not None else []),
                    "format": "dialogue"},
        )


class LMSYSGPT5ChatTask(DistillationTask):
    """GAD's training data: LMSYS-Chat-1M-Clean prompts with GPT-5-Chat responses
    (``ytz20/LMSYS-Chat-GPT-5-Chat-Response``: train ~192k rows, test 479)."""

    name: ClassVar[str] = "lmsys_gpt5_chat"
    default_hub: ClassVar[str | None] = "ytz20/LMSYS-Chat-GPT-5-Chat-Response"
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
