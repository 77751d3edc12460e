"""Instruction and chat data: prompt/response pairs, Alpaca-style and chat-message records.

Accepted record layouts (detected per record):

* ``{"prompt": str, "response"|"completion"|"output": str}``
* Alpaca: ``{"instruction": str, "input": str (optional), "output": str}``
* Self-Instruct seed tasks: ``{"instruction": str, "instances": [{"input", "output"}, ...]}``
  (the first instance)
* chat messages (UltraChat, HF chat datasets): ``{"messages": [{"role", "content"}, ...]}``
* ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}``
* prompt-only benchmark questions (Vicuna, MT-Bench): ``{"turns": [str, ...]}``; these have no
  response, so they load only with ``require_response=False``.

Every example carries ``fields["messages"]``, the conversation with the final assistant reply
last (when there is one), so :mod:`sgalm_jax.data.prompts` can render it through any tokenizer's
chat template. Plain-text formatting uses the Alpaca template for instruction records and a
``User:`` / ``Assistant:`` dialogue for message records.
"""

from __future__ import annotations

import os

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from sgalm_jax.data.base import Example, Score, Task
from sgalm_jax.errors import DataError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
             "bot": "assistant", "model": "assistant", "system": "system"}


def _messages_from(record: Mapping[str, Any]) -> tuple[list[dict[str, str]], str, dict[str, str]]:
    """(messages, format, alpaca fields) of a record; raises DataError when no layout fits."""
    if "messages" in record or "conversations" in record:
        key = "messages" if "messages" in record else "conversations"
        raw = record[key]
        if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
            raise DataError(f"field {key!r} must be a non-empty list of turns")
        msgs = []
        for k, turn in enumerate(raw):
            if not isinstance(turn, Mapping):
                raise DataError(f"{key}[{k}] is not an object")
            role = turn.get("role", turn.get("from"))
            content = turn.get("content", turn.get("value"))
            if not isinstance(role, str) or role.lower() not in _ROLE_MAP:
                raise DataError(f"{key}[{k}] has unknown role {role!r}")
            if not isinstance(content, str):
                raise DataError(f"{key}[{k}] has no string content")
            msgs.append({"role": _ROLE_MAP[role.lower()], "content": content})
        return msgs, "dialogue", {}
    if "instruction" in record:
        instr = record["instruction"]
        if not isinstance(instr, str) or not instr.strip():
            raise DataError("field 'instruction' must be a non-empty string")
        inp, out = record.get("input", ""), record.get("output")
        if out is None and isinstance(record.get("instances"), Sequence) and record["instances"]:
            first = record["instances"][0]
            if not isinstance(first, Mapping):
                raise DataError("instances[0] is not an object")
            inp, out = first.get("input", ""), first.get("output")
        if out is None:
            out = record.get("response")
        inp = inp or ""
        if not isinstance(inp, str) or (out is not None and not isinstance(out, str)):
            raise DataError("fields 'input' and 'output' must be strings")
        user = instr.strip() + (f"\n\n{inp.strip()}" if inp.strip() else "")
        msgs = [{"role": "user", "content": user}]
        if out is not None:
            msgs.append({"role": "assistant", "content": out})
        return msgs, "alpaca", {"instruction": instr.strip(), "input": inp.strip()}
    if "prompt" in record:
        prompt = record["prompt"]
        resp = next((record[k] for k in ("response", "completion", "output", "chosen") if k in record), None)
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError("field 'prompt' must be a non-empty string")
        if resp is not None and not isinstance(resp, str):
            raise DataError("the response field must be a string")
        msgs = [{"role": "user", "content": prompt}]
        if resp is not None:
            msgs.append({"role": "assistant", "content": resp})
        return msgs, "dialogue", {}
    if "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, Sequence) or isinstance(turns, str) or not turns or not all(isinstance(t, str) for t in turns):
            raise DataError("field 'turns' must be a non-empty list of strings")
        return [{"role": "user", "content": turns[0]}], "dialogue", {}
    raise DataError(
        "no known layout: expected 'messages', 'conversations', 'instruction'(+'output'), "
        "'prompt'+'response' or 'turns'"
    )


class ChatTask(Task):
    """Instruction / chat data. ``source`` is required (hub name or local file/directory).

    Args:
      require_response: reject records without a final assistant reply (training data); set
        False for prompt-only evaluation sets.
      split_names: mapping from our split names to the hub's (UltraChat: train -> train_sft).
    """

    name: ClassVar[str] = "chat"
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    eval_split: ClassVar[str] = "test"
    stop_sequences: ClassVar[tuple[str, ...]] = ("\nUser:", "<|im_end|>", "</s>")

    def __init__(
        self,
        source: str | os.PathLike | None = None,
        *,
        require_response: bool = True,
        split_names: Mapping[str, str] | None = None,
        **kwargs: Any,
    ):
        super().__init__(source, **kwargs)
        self.require_response = require_response
        self.split_names = dict(split_names or {})

    def hub_split_name(self, split: str) -> str:
        return self.split_names.get(split, split)

    def parse_record(self, record: Mapping[str, Any], *, index: int, split: str) -> Example:
        msgs, fmt, alpaca = _messages_from(record)
        if msgs[-1]["role"] == "assistant":
            answer = msgs[-1]["content"]
            context = msgs[:-1]
        else:
            if self.require_response:
                raise DataError("record has no final assistant response (pass require_response=False for prompt-only data)")
            answer, context = "", msgs
        users = [m for m in context if m["role"] == "user"]
        if not users:
            raise DataError("record has no user turn")
        rid = record.get("id", record.get("prompt_id", record.get("question_id")))
        return Example(
            id=str(rid) if rid is not None else f"{split}-{index}",
            question=users[-1]["content"],
            answer=answer,
            target=answer,
            fields={"messages": msgs, "format": fmt, **alpaca},
        )

    def context_messages(self, example: Example) -> list[dict[str, str]]:
        """The conversation before the reply (what a model is prompted with)."""
        msgs = example.fields["messages"]
        return list(msgs[:-1]) if msgs[-1]["role"] == "assistant" else list(msgs)

    def format_prompt(self, example: Example) -> str:
        if example.fields.get("format") == "alpaca":
            if example.fields.get("input"):
                return ALPACA_PROMPT_WITH_INPUT.format(instruction=example.fields["instruction"], input=example.fields["input"])
            return ALPACA_PROMPT.format(instruction=example.fields["instruction"])
        lines = []
        for m in self.context_messages(example):
            who = {"user": "User", "assistant": "Assistant", "system": "System"}[m["role"]]
            lines.append(f"{who}: {m['content'].strip()}")
        return "\n".join(lines) + "\nAssistant:"

    def format_target(self, example: Example) -> str:
        if example.fields.get("format") == "alpaca":
            return example.answer.strip()
        return " " + example.answer.strip()

    def chat_user(self, example: Example) -> str:
        return example.question

    def score(self, example: Example, output: str) -> Score:
        """Chat data has no automatic correctness; this is a whitespace-normalised exact match."""
        pred = " ".join(output.split())
        return Score(correct=bool(example.answer) and pred == " ".join(example.answer.split()), extracted=pred)


class UltraChatTask(ChatTask):
    """UltraChat 200k (``HuggingFaceH4/ultrachat_200k``): splits train/test map to train_sft/test_sft."""

    name: ClassVar[str] = "ultrachat"
    default_hub: ClassVar[str | None] = "HuggingFaceH4/ultrachat_200k"

    def __init__(self, source: str | os.PathLike | None = None, **kwargs: Any):
        kwargs.setdefault("split_names", {"train": "train_sft", "test": "test_sft"})
        super().__init__(source, **kwargs)


class AlpacaTask(ChatTask):
    """Stanford Alpaca (``tatsu-lab/alpaca``, one ``train`` split of 52k instruction records)."""

    name: ClassVar[str] = "alpaca"
    default_hub: ClassVar[str | None] = "tatsu-lab/alpaca"
    splits: ClassVar[tuple[str, ...]] = ("train",)
    eval_split: ClassVar[str] = "train"
