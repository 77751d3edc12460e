"""GRPO's data: the prompt pool, which prompts a rollout takes, the rollout's training rows, and
its record on disk.

Rows are right-padded ``prompt + completion``; ``loss_mask`` marks the completion's tokens (input
positions, the stop token included), so :func:`~sgalm_jax.losses.shift_targets` aligns them with
the logits exactly as in SFT and self-play.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from sgalm_jax.errors import ConfigError, DataError
from sgalm_jax.training.batching import bucket_length


@dataclasses.dataclass
class PromptPool:
    """Every training prompt: its text, token ids (cut from the left), and what a reward needs."""

    texts: list[str]
    ids: list[np.ndarray]
    examples: list[Any]  # task Examples, or the JSONL records (dicts)
    task: Any  # the Task, or None for JSONL prompts

    def __len__(self) -> int:
        return len(self.texts)


def load_prompt_pool(config: Any, tokenizer: Any, *, vocab_size: int) -> PromptPool:
    """Prompts from ``data.task`` (the task's prompt format, or its chat turn with
    ``data.chat_template``) or ``data.train_file`` (``data.prompt_key`` of each JSONL record)."""
    d = config.data
    limit = d.max_examples or None
    task = None
    if d.task:
        from sgalm_jax.data import get_task

        task = get_task(d.task, **({"source": d.data_dir} if d.data_dir else {}))
        examples: list[Any] = task.load(d.split, limit=limit)
        user = [task.chat_user(e) if d.chat_template else task.format_prompt(e) for e in examples]
    else:
        examples, user = [], []
        from sgalm_jax.data.io import iter_lines

        for lineno, line in iter_lines(d.train_file):  # DataError naming a non-UTF-8 line
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{d.train_file}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(d.prompt_key), str):
                raise DataError(f"{d.train_file}:{lineno}: field {d.prompt_key!r} missing or "
                                "not a string (data.prompt_key)")
            examples.append(rec)
            user.append(rec[d.prompt_key])
            if limit and len(examples) >= limit:
                break
    if not examples:
        raise DataError(f"{d.train_file or d.task}: no prompts")
    if d.chat_template:
        from sgalm_jax.data.prompts import ensure_chat_template, render_chat

        ensure_chat_template(tokenizer)
        system = [{"role": "system", "content": d.system_prompt}] if d.system_prompt else []
        texts = [render_chat(tokenizer, system + [{"role": "user", "content": u}],
                             add_generation_prompt=True) for u in user]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        texts = user
        ids = tokenizer(texts)["input_ids"]  # BOS where the tokenizer adds one
    keep = int(config.grpo.max_prompt_length)
    ids = [np.asarray(p[-keep:], np.int32) for p in ids]  # keep the end of long prompts
    top = max(int(p.max()) for p in ids if p.size)
    if top >= vocab_size:
        raise ConfigError(f"tokenizer.path: token id {top} is outside the model's vocabulary "
                          f"({vocab_size}); the tokenizer does not match the model")
    return PromptPool(texts, ids, examples, task)


def rollout_prompts(num_pool: int, rollout: int, per_rollout: int, *, seed: int,
                    shuffle: bool = True) -> np.ndarray:
    """Pool indices of rollout ``rollout``'s prompts: consecutive slices of a seeded permutation
    per epoch (a pure function of the rollout index, so a resumed run takes the same prompts)."""
    out = np.empty(per_rollout, np.int64)
    for i in range(per_rollout):
        j = rollout * per_rollout + i
        epoch, k = divmod(j, num_pool)
        order = (np.random.default_rng([seed, 29, epoch]).permutation(num_pool) if shuffle
                 else np.arange(num_pool))
        out[i] = order[k]
    return out


@dataclasses.dataclass
class Rollout:
    """One rollout: ``G`` completions of each of its prompts (row ``i`` continues prompt
    ``prompt_index[i]`` of the pool; rows of one prompt are consecutive)."""

    prompt_index: np.ndarray  # [N] pool index
    completion_ids: list[np.ndarray]  # [N] ragged (stop token included)
    finished: np.ndarray  # [N] bool: ended with a stop token
    sampler_logprobs: list[np.ndarray]  # [N] ragged: the sampler's raw-model log-probs
    texts: list[str] = dataclasses.field(default_factory=list)  # decoded completions
    rewards: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # per function
    reward: np.ndarray | None = None  # [N] weighted sum (NaN: not scored)
    advantages: np.ndarray | None = None  # [N]

    def __len__(self) -> int:
        return len(self.completion_ids)


def build_rows(pool: PromptPool, rollout: Rollout, *, pad_id: int, min_bucket: int,
               max_length: int, mask_truncated: bool = False) -> dict[str, np.ndarray]:
    """The rollout's rows, right-padded to one power-of-two length: ``input_ids``,
    ``attention_mask``, ``positions``, ``loss_mask`` (completion tokens; none for a truncated
    completion with ``mask_truncated``), ``advantages`` and ``sampler_logprobs`` (aligned with
    the shifted targets, like the train step's log-probs)."""
    n = len(rollout)
    lens = [len(pool.ids[p]) + len(c) for p, c in zip(rollout.prompt_index,
                                                      rollout.completion_ids)]
    width = bucket_length(max(lens), min_bucket, max_length)
    ids = np.full((n, width), pad_id, np.int32)
    attn = np.zeros((n, width), np.int32)
    loss = np.zeros((n, width), np.float32)
    sampler_lp = np.zeros((n, width), np.float32)
    for i, (p, c) in enumerate(zip(rollout.prompt_index, rollout.completion_ids)):
        prompt = pool.ids[p]
        a, b = len(prompt), len(prompt) + len(c)
        ids[i, :a], ids[i, a:b] = prompt, c
        attn[i, :b] = 1
        if not (mask_truncated and not rollout.finished[i]):
            loss[i, a:b] = 1.0
        # logits position t predicts token t + 1: completion token k sits at input a + k
        sampler_lp[i, a - 1:b - 1] = rollout.sampler_logprobs[i][:len(c)]
    positions = np.maximum(np.cumsum(attn, axis=1) - 1, 0).astype(np.int32)
    adv = np.nan_to_num(np.asarray(rollout.advantages, np.float32))
    return {"input_ids": ids, "attention_mask": attn, "positions": positions, "loss_mask": loss,
            "advantages": adv, "sampler_logprobs": sampler_lp}


def save_rollout(path: str, pool: PromptPool, rollout: Rollout, *, step: int,
                 minibatch: Sequence[int] | None = None) -> None:
    """``workdir/rollouts/step_NNNNNN.jsonl``: one record per completion (atomic write)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(len(rollout)):
            p = int(rollout.prompt_index[i])
            rec = {"step": step, "prompt_index": p, "prompt": pool.texts[p],
                   "prompt_ids": pool.ids[p].tolist(),
                   "completion": rollout.texts[i] if rollout.texts else None,
                   "completion_ids": np.asarray(rollout.completion_ids[i]).tolist(),
                   "finished": bool(rollout.finished[i]),
                   "reward": _num(rollout.reward[i]),
                   "rewards": {k: _num(v[i]) for k, v in rollout.rewards.items()},
                   "advantage": _num(rollout.advantages[i])}
            if minibatch is not None:
                rec["minibatch"] = int(minibatch[i])
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def load_rollout_records(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _num(x: Any) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x
