"""Token ids of distillation pairs, with one end-of-response rule for teacher and student.

GAD's discriminator reads its score at the last valid token of prompt + response. If teacher and
student responses ended differently (the student's rollout ends in the chat end-of-turn token, the
teacher's text, tokenised alone, does not), that last token would give the discriminator a trivial
shortcut (gad_spin_grpo.md §1.2). :class:`DistillEncoder` applies one rule to both:

* a response is its content tokens followed by ``end_token_id`` (the tokenizer's EOS, e.g. Qwen's
  ``<|im_end|>``), at most ``max_response_tokens`` tokens in all;
* a response whose content does not fit is cut to ``max_response_tokens`` content tokens *without*
  the end token, exactly what the sampler returns for a student rollout that hits
  ``max_new_tokens = max_response_tokens`` (use :attr:`DistillEncoder.sampler_kwargs`);
* a student rollout that stopped on any stop token (the model config's EOS ids, the tokenizer's EOS)
  has that token replaced by ``end_token_id`` and nothing after it, so a student ending in
  ``<|endoftext|>`` and a teacher ending in ``<|im_end|>`` still end identically.

So an identical text gets identical ids, whether it came from the teacher or from a student (tested
with the real Qwen2.5 tokenizer). The replacement changes only what the discriminator reads; the
policy-gradient update uses the tokens the student actually sampled.

Prompts are rendered through the tokenizer's chat template with the generation prompt (as
:meth:`sgalm_jax.sampling.Sampler.generate_text` does) and capped at ``max_prompt_tokens``:

* ``prompt_truncation="content"`` (default): the last user turn's content is cut from the right so
  that the template around it (system turn, earlier turns, the assistant header) stays whole; when
  even an empty last turn does not fit, the prompt keeps its last ``max_prompt_tokens`` tokens;
* ``"right"``: keep the first ``max_prompt_tokens`` tokens (verl's ``truncation='right'``, which can
  cut off the assistant header); ``"left"``: keep the last ones; ``"error"``: raise DataError.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sgalm_jax.data.base import Example
from sgalm_jax.data.distill import as_messages
from sgalm_jax.data.prompts import render_chat
from sgalm_jax.errors import ConfigError, DataError
from sgalm_jax.training.batching import TokenizedExample
from sgalm_jax.training.tokenizer import eos_token_id

TRUNCATION_MODES = ("content", "right", "left", "error")
_SENTINEL = "\ue000\ue001sgalm-truncate\ue001\ue000"


@dataclasses.dataclass(frozen=True)
class EncodedPair:
    """Prompt and response token ids of one (prompt, response) pair.

    ``response_truncated``: the response was cut at ``max_response_tokens`` and has no end token.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    prompt_truncated: bool = False
    response_truncated: bool = False

    @property
    def input_ids(self) -> list[int]:
        """Prompt then response: what the discriminator scores (at its last token)."""
        return self.prompt_ids + self.response_ids

    def tokenized(self) -> TokenizedExample:
        """As a :class:`~sgalm_jax.training.batching.TokenizedExample` whose loss mask covers the
        response (SFT on teacher responses: GAD's generator warmup, SeqKD)."""
        mask = np.concatenate([np.zeros(len(self.prompt_ids), np.float32),
                               np.ones(len(self.response_ids), np.float32)])
        return TokenizedExample(np.asarray(self.input_ids, np.int32), mask)


def _plain_dialogue(msgs: Sequence[Mapping[str, str]]) -> str:
    """``User: ...`` / ``Assistant: ...`` lines ending in ``Assistant:`` (ChatTask's plain format)."""
    who = {"user": "User", "assistant": "Assistant", "system": "System"}
    lines = [f"{who[m['role']]}: {m['content'].strip()}" for m in msgs]
    return "\n".join(lines) + "\nAssistant:"


class DistillEncoder:
    """Builds ``(prompt_ids, response_ids)`` for teacher responses and student rollouts alike.

    Args:
      tokenizer: a transformers tokenizer (with a chat template when ``chat_template``).
      end_token_id: the id every complete response ends with; default: the tokenizer's EOS
        (else ChatML's ``<|im_end|>`` ...; see :func:`sgalm_jax.training.tokenizer.eos_token_id`).
      stop_token_ids: further ids the sampler stops on (pass the model config's
        ``eos_token_ids``); a student rollout ending in any of them ends in ``end_token_id`` here.
      max_prompt_tokens: prompt cap (GAD: 2048).
      max_response_tokens: response cap including the end token (GAD: 1536); also the sampler's
        ``max_new_tokens`` (:attr:`sampler_kwargs`).
      chat_template: render prompts with the tokenizer's chat template (else a plain
        ``User:``/``Assistant:`` dialogue, or a string prompt as is, with the tokenizer's special
        tokens such as BOS).
      prompt_truncation: ``content`` | ``right`` | ``left`` | ``error`` (module docstring).
      strip_teacher: strip surrounding whitespace from teacher responses (a student's rollout puts
        its end token straight after the content).
    """

    def __init__(self, tokenizer: Any, *, end_token_id: int | None = None,
                 stop_token_ids: Sequence[int] = (), max_prompt_tokens: int = 2048,
                 max_response_tokens: int = 1536, chat_template: bool = True,
                 prompt_truncation: str = "content", strip_teacher: bool = True):
        if prompt_truncation not in TRUNCATION_MODES:
            raise ConfigError(f"prompt_truncation {prompt_truncation!r} is not one of "
                              f"{TRUNCATION_MODES}")
        if max_prompt_tokens < 1 or max_response_tokens < 1:
            raise ConfigError(f"max_prompt_tokens={max_prompt_tokens} and max_response_tokens="
                              f"{max_response_tokens} must be >= 1")
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("the tokenizer has no chat template; set one or use "
                              "chat_template=False")
        self.tokenizer = tokenizer
        self.end_token_id = int(end_token_id if end_token_id is not None
                                else eos_token_id(tokenizer))
        stops = {self.end_token_id, *(int(s) for s in stop_token_ids)}
        if getattr(tokenizer, "eos_token_id", None) is not None:
            stops.add(int(tokenizer.eos_token_id))
        self.stop_token_ids = tuple(sorted(stops))
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.max_response_tokens = int(max_response_tokens)
        self.chat_template = bool(chat_template)
        self.prompt_truncation = prompt_truncation
        self.strip_teacher = strip_teacher

    @property
    def sampler_kwargs(self) -> dict[str, Any]:
        """``max_new_tokens`` and ``stop_token_ids`` for :meth:`Sampler.generate`, so that student
        rollouts follow the same length and end rule as the teacher responses."""
        return {"max_new_tokens": self.max_response_tokens, "stop_token_ids": self.stop_token_ids}

    # ------------------------------------------------------------------------------ pieces
    def _encode(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def prompt_ids(self, prompt: str | Sequence[Mapping[str, str]]) -> tuple[list[int], bool]:
        """``(ids, truncated)`` of a prompt: a string (one user turn in chat mode) or messages."""
        if self.chat_template:
            msgs = as_messages(prompt, "prompt")
            ids = self._encode(render_chat(self.tokenizer, msgs, add_generation_prompt=True))
        else:
            text = prompt if isinstance(prompt, str) else _plain_dialogue(as_messages(prompt,
                                                                                      "prompt"))
            msgs = None
            ids = self._encode(text, special=True)
        limit = self.max_prompt_tokens
        if len(ids) <= limit:
            return ids, False
        mode = self.prompt_truncation
        if mode == "error":
            raise DataError(f"the prompt has {len(ids)} tokens, more than max_prompt_tokens="
                            f"{limit}")
        if mode == "right" or (mode == "content" and msgs is None):
            return ids[:limit], True
        if mode == "content":
            cut = self._cut_last_turn(msgs, limit)
            if cut is not None:
                return cut, True
        return ids[-limit:], True

    def _cut_last_turn(self, msgs: list[dict[str, str]], limit: int) -> list[int] | None:
        """The rendered prompt with the last user turn's content cut to fit ``limit``, or None when
        the rest of the prompt alone leaves no room for it."""
        masked = [dict(m) for m in msgs]
        content = masked[-1]["content"]
        masked[-1]["content"] = _SENTINEL
        rendered = render_chat(self.tokenizer, masked, add_generation_prompt=True)
        if rendered.count(_SENTINEL) != 1:
            return None  # the template transforms the content; fall back to keeping the end
        prefix, suffix = rendered.split(_SENTINEL)
        head, tail = self._encode(prefix), self._encode(suffix)
        budget = limit - len(head) - len(tail)
        if budget < 1:
            return None
        return head + self._encode(content)[:budget] + tail

    def teacher_response_ids(self, text: str) -> tuple[list[int], bool]:
        """``(ids, truncated)`` of a teacher response text (content + end, or the cut content)."""
        if self.strip_teacher:
            text = text.strip()
        content = self._encode(text)
        return self._finish(content)

    def student_response_ids(self, completion: Sequence[int]) -> tuple[list[int], bool]:
        """``(ids, truncated)`` of a sampled completion (``Generation.completions()[i]``): cut at its
        first stop token, which becomes ``end_token_id``; uncut past ``max_response_tokens``."""
        ids = [int(t) for t in completion]
        stop = set(self.stop_token_ids)
        for k, t in enumerate(ids):
            if t in stop:
                return self._finish(ids[:k])
        return ids[: self.max_response_tokens], True

    def _finish(self, content: list[int]) -> tuple[list[int], bool]:
        if len(content) + 1 <= self.max_response_tokens:
            return content + [self.end_token_id], False
        return content[: self.max_response_tokens], True

    # ------------------------------------------------------------------------------ pairs
    def prompt_of(self, example: Example) -> list[dict[str, str]]:
        """The conversation an example prompts with (its messages without the teacher's reply)."""
        msgs = example.fields.get("messages")
        if not msgs:
            return [{"role": "user", "content": example.question}]
        return [dict(m) for m in (msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs)]

    def encode_teacher(self, example: Example) -> EncodedPair:
        """Prompt and teacher-response ids of a :class:`~sgalm_jax.data.distill.DistillationTask`
        example (``example.answer`` is the teacher's response)."""
        prompt, p_cut = self.prompt_ids(self.prompt_of(example))
        response, r_cut = self.teacher_response_ids(example.answer)
        return EncodedPair(prompt, response, p_cut, r_cut)

    def encode_student(self, prompt_ids: Sequence[int], completion: Sequence[int]) -> EncodedPair:
        """A student rollout of ``prompt_ids`` (as returned by the sampler) as a pair."""
        response, r_cut = self.student_response_ids(completion)
        return EncodedPair(list(prompt_ids), response, False, r_cut)

    def encode_many(self, examples: Sequence[Example]) -> list[EncodedPair]:
        """:meth:`encode_teacher` of every example, tokenizing in batched calls (equal results)."""
        if not examples:
            return []
        convs = [self.prompt_of(e) for e in examples]
        if self.chat_template:
            texts = [render_chat(self.tokenizer, as_messages(c, "prompt"),
                                 add_generation_prompt=True) for c in convs]
        else:
            texts = [_plain_dialogue(as_messages(c, "prompt")) for c in convs]
        prompts = self.tokenizer(texts, add_special_tokens=not self.chat_template)["input_ids"]
        answers = [e.answer.strip() if self.strip_teacher else e.answer for e in examples]
        contents = self.tokenizer(answers, add_special_tokens=False)["input_ids"]
        out = []
        for conv, p, c in zip(convs, prompts, contents):
            p, p_cut = (list(p), False) if len(p) <= self.max_prompt_tokens else self.prompt_ids(conv)
            r, r_cut = self._finish(list(c))
            out.append(EncodedPair(p, r, p_cut, r_cut))
        return out
