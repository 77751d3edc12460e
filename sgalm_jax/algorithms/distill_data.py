"""Distillation pairs for training: prompts with a teacher's response, as token ids (GAD, SeqKD).

Where the pairs come from (the run's ``data`` section):

* ``data.task = "distill"`` or ``"lmsys_gpt5_chat"`` (:mod:`sgalm_jax.data.distill`): local
  JSONL / JSON / parquet under ``data.data_dir`` (a file or a folder with split files) or the hub
  (``ytz20/LMSYS-Chat-GPT-5-Chat-Response``); the LMSYS-Chat-GPT-5-Chat-Response layout
  (``content`` as chat messages or a string, ``teacher_response``) or prompt/response records;
* ``data.train_file``: one such file, read the same way;
* any other task (e.g. the built-in ``arithmetic`` task): its prompt (``format_prompt``, or the
  chat turn with ``data.chat_template``) and its gold answer as the teacher response, e.g. the
  worked solutions the arithmetic task's own solver writes (the CPU demo's teacher).

Every pair goes through one :class:`~sgalm_jax.data.distill_tokens.DistillEncoder`, so teacher
responses and student rollouts end the same way (the end token after the content, or a cut at
``distill.max_response_tokens`` without it). The ``distill`` config section declared here holds the
field names and length caps; GAD and SFT (``sft.distill = True``, the SeqKD baseline) read it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from sgalm_jax.algorithms.grpo_data import PromptPool
from sgalm_jax.config import FREE_FORM, register_section, to_dict
from sgalm_jax.data.distill_tokens import TRUNCATION_MODES, DistillEncoder, EncodedPair
from sgalm_jax.errors import ConfigError, DataError
from sgalm_jax.training.batching import TokenizedExample, bucket_length

log = logging.getLogger(__name__)

DISTILL_TASKS = ("distill", "lmsys_gpt5_chat")

register_section("distill", {
    "prompt_key": ("", "distillation records: the prompt field (a string or chat messages); "
                       "'' = detect (content, prompt, messages, conversations)"),
    "teacher_key": ("", "distillation records: the teacher-response field; '' = detect "
                        "(teacher_response, response, completion, output)"),
    "max_prompt_tokens": (2048, "prompts are cut to this many tokens (GAD: 2048)"),
    "max_response_tokens": (1536, "responses are cut to this many tokens, the end token "
                                  "included; also the student's max_new_tokens (GAD: 1536)"),
    "prompt_truncation": ("content", "how a long prompt is cut: content (the last user turn's "
                                     "text, keeping the template whole), right, left or error"),
    "task_options": ({}, f"{FREE_FORM} keyword arguments of data.task's constructor for tasks "
                         "with gold answers, e.g. {'min_steps': 1, 'max_steps': 1, "
                         "'max_value': 20} for arithmetic"),
    "skip_malformed": (False, "skip (and count) malformed records instead of stopping at the "
                              "first with a DataError naming its file and line"),
}, owner=__name__)


def validate_distill(config: Any) -> None:
    """Checks of the ``distill`` section and of the data source; ConfigError naming the key."""
    d = config.distill
    for key in ("max_prompt_tokens", "max_response_tokens"):
        if d[key] < 1:
            raise ConfigError(f"distill.{key}: must be >= 1, got {d[key]}")
    if d.prompt_truncation not in TRUNCATION_MODES:
        raise ConfigError(f"distill.prompt_truncation: {d.prompt_truncation!r} is not one of "
                          f"{list(TRUNCATION_MODES)}")
    total = d.max_prompt_tokens + d.max_response_tokens
    if total > config.data.max_length:
        raise ConfigError(f"data.max_length: {config.data.max_length} is shorter than "
                          f"distill.max_prompt_tokens + distill.max_response_tokens = {total}")
    if config.data.packing:
        raise ConfigError("data.packing: not supported with distillation pairs")


@dataclasses.dataclass
class DistillPool(PromptPool):
    """A :class:`PromptPool` (prompt ids, texts, examples, task) whose prompts carry the teacher's
    response ids (end-normalised), for the discriminator and for SFT on the teacher."""

    teacher_ids: list[np.ndarray] = dataclasses.field(default_factory=list)
    teacher_texts: list[str] = dataclasses.field(default_factory=list)

    def pair(self, i: int) -> EncodedPair:
        return EncodedPair(self.ids[i].tolist(), self.teacher_ids[i].tolist())

    def sft_example(self, i: int) -> TokenizedExample:
        """Prompt + teacher response, the loss on the response (the end token included)."""
        return self.pair(i).tokenized()


def make_encoder(config: Any, tokenizer: Any, *, end_token_id: int,
                 stop_token_ids: tuple[int, ...] = ()) -> DistillEncoder:
    """The run's :class:`DistillEncoder` (``distill`` section, ``data.chat_template``)."""
    d = config.distill
    if config.data.chat_template:
        from sgalm_jax.data.prompts import ensure_chat_template

        ensure_chat_template(tokenizer)
    return DistillEncoder(tokenizer, end_token_id=end_token_id, stop_token_ids=stop_token_ids,
                          max_prompt_tokens=int(d.max_prompt_tokens),
                          max_response_tokens=int(d.max_response_tokens),
                          chat_template=bool(config.data.chat_template),
                          prompt_truncation=d.prompt_truncation)


def distill_task(config: Any, source: str = "") -> Any:
    """The task the pairs come from (``data.task``, or a distillation file)."""
    from sgalm_jax.data import get_task

    d, dd = config.data, config.distill
    keys = dict(prompt_key=dd.prompt_key or None, response_key=dd.teacher_key or None,
                skip_malformed=bool(dd.skip_malformed))
    if source or d.train_file:
        return get_task("distill", source=source or d.train_file, **keys)
    name = d.task.strip().lower().replace("-", "_")
    kwargs: dict[str, Any] = {"source": d.data_dir} if d.data_dir else {}
    if name in DISTILL_TASKS:
        kwargs.update(keys)
    else:
        kwargs.update(to_dict(dd.task_options))
    try:
        return get_task(d.task, **kwargs)
    except TypeError as e:  # an option the task's constructor does not take
        raise ConfigError(f"distill.task_options: {e}") from None


def _system(config: Any) -> list[dict[str, str]]:
    sp = config.data.system_prompt
    return [{"role": "system", "content": sp}] if sp and config.data.chat_template else []


def load_distill_pool(config: Any, tokenizer: Any, encoder: DistillEncoder, *, split: str,
                      limit: int | None, vocab_size: int, source: str = "") -> DistillPool:
    """Every pair of ``split`` (at most ``limit``) as token ids; DataError naming the source when
    there are none, ConfigError when the tokenizer's ids do not fit the model."""
    from sgalm_jax.data.distill import DistillationTask

    task = distill_task(config, source)
    examples = task.load(split, limit=limit)
    where = source or config.data.train_file or config.data.data_dir or config.data.task
    if not examples:
        raise DataError(f"{where}: no examples in split {split!r}")
    system = _system(config)
    if isinstance(task, DistillationTask):
        if system:
            pairs = [EncodedPair(encoder.prompt_ids(system + encoder.prompt_of(e))[0],
                                 encoder.teacher_response_ids(e.answer)[0]) for e in examples]
        else:
            pairs = encoder.encode_many(examples)
        teacher_texts = [e.answer for e in examples]
    else:  # a task with gold answers: its prompt format, its answer as the teacher's response
        chat = bool(config.data.chat_template)
        pairs, teacher_texts = [], []
        for e in examples:
            prompt = system + [{"role": "user", "content": task.chat_user(e)}] if chat \
                else task.format_prompt(e)
            text = task.chat_assistant(e) if chat else task.format_target(e)
            pairs.append(EncodedPair(encoder.prompt_ids(prompt)[0],
                                     encoder.teacher_response_ids(text)[0]))
            teacher_texts.append(text.strip())
    ids = [np.asarray(p.prompt_ids, np.int32) for p in pairs]
    teacher = [np.asarray(p.response_ids, np.int32) for p in pairs]
    top = max(max(int(a.max(initial=0)), int(b.max(initial=0))) for a, b in zip(ids, teacher))
    if top >= vocab_size:
        raise ConfigError(f"tokenizer.path: token id {top} is outside the model's vocabulary "
                          f"({vocab_size}); the tokenizer does not match the model")
    texts = tokenizer.batch_decode([p.tolist() for p in ids], skip_special_tokens=False)
    cut = sum(len(t) >= encoder.max_response_tokens and t[-1] != encoder.end_token_id
              for t in teacher)
    log.info("%s (%s): %d pairs; mean prompt %.0f and teacher response %.0f tokens; %d "
             "responses cut at distill.max_response_tokens", where, split, len(pairs),
             np.mean([len(i) for i in ids]), np.mean([len(t) for t in teacher]), cut)
    return DistillPool(texts=texts, ids=ids, examples=examples, task=task, teacher_ids=teacher,
                       teacher_texts=teacher_texts)


def pad_rows(seqs: list[np.ndarray], loss_starts: list[int] | None, *, pad_id: int,
             min_bucket: int, max_length: int) -> dict[str, np.ndarray]:
    """Right-padded rows of ``seqs`` (one power-of-two width): ``input_ids``, ``attention_mask``,
    ``positions`` and, with ``loss_starts``, a ``loss_mask`` from that index to the row's end."""
    width = bucket_length(max(len(s) for s in seqs), min_bucket, max_length)
    n = len(seqs)
    ids = np.full((n, width), pad_id, np.int32)
    attn = np.zeros((n, width), np.int32)
    for i, s in enumerate(seqs):
        if len(s) > width:
            raise DataError(f"a sequence of {len(s)} tokens is longer than data.max_length="
                            f"{max_length}")
        ids[i, :len(s)] = s
        attn[i, :len(s)] = 1
    out = {"input_ids": ids, "attention_mask": attn,
           "positions": np.maximum(np.cumsum(attn, axis=1) - 1, 0).astype(np.int32)}
    if loss_starts is not None:
        loss = np.zeros((n, width), np.float32)
        for i, (s, a) in enumerate(zip(seqs, loss_starts)):
            loss[i, a:len(s)] = 1.0
        out["loss_mask"] = loss
    return out


__all__ = ["DISTILL_TASKS", "DistillPool", "distill_task", "load_distill_pool", "make_encoder",
           "pad_rows", "validate_distill"]
