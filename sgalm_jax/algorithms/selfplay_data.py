"""Data of the self-play loop: prompts and real responses, per-iteration synthetic data, pair batches.

* :func:`load_prompt_set` reads (prompt, real response) records (``data.train_file`` or
  ``data.task``; chat records reduced to their first turn when ``selfplay.first_turn``), renders
  prompts plainly or through the chat template, and tokenizes them the way training sees them.
  Generation uses exactly the same prompt tokens (SPIN's code generates from a different
  ``### Instruction:`` format than it trains on; we do not).
* :class:`IterationData` is one iteration's synthetic responses plus the reference log-probs of
  everything the iteration trains on, written once to ``selfplay/iter_NNN/data.npz`` and reloaded
  on resume.
* :class:`PairBatches` turns (prompt, real, K synthetic) rows into deterministic, resumable
  batches: ``input_ids`` ``[B, 1+K, T]`` (slot 0 the real response, slots 1..K the synthetic ones),
  ``attention_mask``, ``loss_mask`` (response tokens) and ``ref_logprobs`` ``[B, 1+K]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Sequence

import numpy as np

from sgalm_jax.errors import ConfigError, DataError
from sgalm_jax.training.batching import bucket_length

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ records
@dataclasses.dataclass
class PromptSet:
    """Tokenized prompts and real responses (ids end with eos unless truncated)."""

    prompts: list[np.ndarray]
    real: list[np.ndarray]
    prompt_texts: list[str]
    real_texts: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def fingerprint(self) -> str:
        """A hash of every token (resume refuses data generated for other prompts)."""
        h = hashlib.sha1()
        for p, r in zip(self.prompts, self.real):
            h.update(np.asarray(p, np.int32).tobytes())
            h.update(b"|")
            h.update(np.asarray(r, np.int32).tobytes())
            h.update(b"#")
        return h.hexdigest()


def _first_turn(messages: Sequence[dict[str, str]]) -> tuple[list[dict[str, str]], str] | None:
    """(system turns + first user turn, first assistant reply after it), or None."""
    for i, m in enumerate(messages):
        if m["role"] == "user":
            for later in messages[i + 1:]:
                if later["role"] == "assistant":
                    context = [dict(x) for x in messages[:i] if x["role"] == "system"]
                    return context + [dict(m)], later["content"]
            return None
    return None


def load_records(config: Any) -> list[tuple[Any, str]]:
    """``(prompt, real response)`` pairs; the prompt is a string, or a list of chat messages when
    ``data.chat_template`` is on."""
    d, sp = config.data, config.selfplay
    if d.train_file:
        from sgalm_jax.algorithms.sft import load_records as sft_records

        pairs = sft_records(config)
        if d.chat_template:
            return [([{"role": "user", "content": p}], r) for p, r in pairs]
        return list(pairs)

    from sgalm_jax.data import ChatTask, get_task
    from sgalm_jax.data.prompts import task_chat_messages

    task = get_task(d.task, **({"source": d.data_dir} if d.data_dir else {}))
    examples = task.load(d.split, limit=d.max_examples or None)
    out: list[tuple[Any, str]] = []
    skipped = 0
    for ex in examples:
        if isinstance(task, ChatTask) and sp.first_turn:
            ft = _first_turn(ex.fields["messages"])
            if ft is None:
                skipped += 1
                continue
            context, reply = ft
            user = context[-1]["content"]
            ex = dataclasses.replace(ex, question=user, answer=reply, target=reply,
                                     fields={**ex.fields, "messages": context + [
                                         {"role": "assistant", "content": reply}]})
        if d.chat_template:
            out.append((task_chat_messages(task, ex), task.chat_assistant(ex)))
        else:
            out.append(task.format_sample(ex))
    if skipped:
        log.warning("%d chat records have no first user/assistant exchange; skipped", skipped)
    if not out:
        raise DataError(f"{d.task}: no training records")
    return out


def load_prompt_set(config: Any, tokenizer: Any, *, eos_id: int, vocab_size: int) -> PromptSet:
    """Records -> (optional seeded subset) -> tokenized, truncated :class:`PromptSet`."""
    d, sp = config.data, config.selfplay
    records = load_records(config)
    if sp.subset_size:
        if sp.subset_size > len(records):
            raise ConfigError(f"selfplay.subset_size: {sp.subset_size} is more than the "
                              f"{len(records)} records loaded")
        # A prefix of one seeded permutation: with the same seed, smaller subsets are nested in
        # larger ones (SPIN / T-SPIN's 14k ⊂ 26k ⊂ 50k).
        order = np.random.default_rng(sp.subset_seed).permutation(len(records))
        keep = np.sort(order[:sp.subset_size])
        records = [records[i] for i in keep]

    if d.chat_template:
        from sgalm_jax.data.prompts import ensure_chat_template, render_chat

        ensure_chat_template(tokenizer)
        texts = []
        for messages, _ in records:
            system = ([{"role": "system", "content": d.system_prompt}]
                      if d.system_prompt and not any(m["role"] == "system" for m in messages)
                      else [])
            texts.append(render_chat(tokenizer, system + list(messages),
                                     add_generation_prompt=True))
        prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        texts = [p for p, _ in records]
        prompt_ids = tokenizer(texts)["input_ids"]  # BOS where the tokenizer adds one
    responses = [r for _, r in records]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    prompts, real = [], []
    for p, r in zip(prompt_ids, response_ids):
        p = np.asarray(p[-sp.max_prompt_length:], np.int32)  # keep the end of long prompts
        r = np.asarray((list(r) + [eos_id])[: d.max_length - len(p)], np.int32)
        prompts.append(p)
        real.append(r)
    top = max(max(int(p.max()) for p in prompts), max(int(r.max()) for r in real if r.size))
    if top >= vocab_size:
        raise ConfigError(f"tokenizer.path: token id {top} is outside the model's vocabulary "
                          f"({vocab_size}); the tokenizer does not match the model")
    return PromptSet(prompts, real, texts, responses)


# ------------------------------------------------------------------------------------ iteration data
def to_ragged(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def from_ragged(rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(rows) + 1, np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    flat = (np.concatenate([np.asarray(r, np.int32) for r in rows]) if rows
            else np.zeros(0, np.int32))
    return flat.astype(np.int32), offsets


@dataclasses.dataclass
class IterationData:
    """One iteration's synthetic responses and its reference log-probs (under θ_t).

    syn: ``N * K`` token arrays, row ``i * K + k`` is sample k of prompt i.
    ref_real [N], ref_syn [N, K]: summed log-probs under θ_t; ``*_ntok`` their token counts.
    ref_prev_syn [N, K] (or None): the previous iteration's synthetic responses under θ_t (for
    SPIN's data mixing, or the log-ratio gap).
    meta: the iteration's statistics (gap, alpha, lengths, timings), JSON.
    """

    iteration: int
    num_samples: int
    syn: list[np.ndarray]
    ref_real: np.ndarray
    ref_syn: np.ndarray
    real_ntok: np.ndarray
    syn_ntok: np.ndarray
    ref_prev_syn: np.ndarray | None = None
    prev_syn_ntok: np.ndarray | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def save(self, path: str) -> None:
        flat, offsets = from_ragged(self.syn)
        arrays = dict(syn_flat=flat, syn_offsets=offsets, ref_real=self.ref_real,
                      ref_syn=self.ref_syn, real_ntok=self.real_ntok, syn_ntok=self.syn_ntok,
                      meta=np.asarray(json.dumps(self.meta)),
                      header=np.asarray([self.iteration, self.num_samples], np.int64))
        if self.ref_prev_syn is not None:
            arrays.update(ref_prev_syn=self.ref_prev_syn, prev_syn_ntok=self.prev_syn_ntok)
        atomic_savez(path, **arrays)

    @classmethod
    def load(cls, path: str) -> "IterationData":
        with np.load(path) as z:
            it, k = (int(x) for x in z["header"])
            prev = "ref_prev_syn" in z.files
            return cls(iteration=it, num_samples=k,
                       syn=to_ragged(z["syn_flat"], z["syn_offsets"]),
                       ref_real=z["ref_real"], ref_syn=z["ref_syn"], real_ntok=z["real_ntok"],
                       syn_ntok=z["syn_ntok"],
                       ref_prev_syn=z["ref_prev_syn"] if prev else None,
                       prev_syn_ntok=z["prev_syn_ntok"] if prev else None,
                       meta=json.loads(str(z["meta"])))


def atomic_savez(path: str, **arrays: Any) -> None:
    """``np.savez`` to a temporary name, then rename: a killed run never leaves half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def synthetic_rows(tokens: np.ndarray, lengths: np.ndarray, finished: np.ndarray,
                   prompt_lengths: Sequence[int], *, num_samples: int, eos_id: int,
                   max_length: int) -> list[np.ndarray]:
    """Generated rows -> synthetic response ids: the stop token kept; an unfinished response gets
    eos appended (SPIN re-tokenises its generations with eos appended, like the real ones); cut
    to ``max_length`` minus the prompt."""
    out = []
    for r in range(tokens.shape[0]):
        ids = list(tokens[r, :int(lengths[r])])
        if not bool(finished[r]):
            ids.append(eos_id)
        budget = max_length - int(prompt_lengths[r // num_samples])
        out.append(np.asarray(ids[:max(budget, 1)], np.int32))
    return out


# ------------------------------------------------------------------------------------ batches
class PairBatches:
    """Deterministic batches of (prompt, real response, K synthetic responses) rows.

    Args:
      prompts, real: the prompt set's token arrays ([N] each).
      sources: one entry per synthetic data source (the iteration's own responses; with SPIN's
        mixing also the previous iteration's): ``(syn rows [N*K], ref_syn [N, K])``. Rows are
        (prompt i, source s); each epoch visits all of them in a permutation seeded by
        ``(seed, iteration, epoch)``; the remainder of an epoch is dropped.
      ref_real: [N] reference log-probs of the real responses.
      batch_size: rows per global batch.
    """

    def __init__(self, prompts: Sequence[np.ndarray], real: Sequence[np.ndarray],
                 sources: Sequence[tuple[Sequence[np.ndarray], np.ndarray]], ref_real: np.ndarray,
                 *, num_samples: int, batch_size: int, max_length: int, min_bucket: int,
                 seed: int, iteration: int, pad_id: int, shuffle: bool = True):
        self.prompts, self.real = list(prompts), list(real)
        self.sources = [(list(rows), np.asarray(ref, np.float32)) for rows, ref in sources]
        self.ref_real = np.asarray(ref_real, np.float32)
        self.k = int(num_samples)
        self.batch_size = int(batch_size)
        self.max_length, self.min_bucket = int(max_length), int(min_bucket)
        self.seed, self.iteration, self.pad_id, self.shuffle = int(seed), int(iteration), int(pad_id), shuffle
        self.num_rows = len(self.prompts) * len(self.sources)
        if self.num_rows < self.batch_size:
            raise ConfigError(f"train.batch_size: {self.batch_size} pairs per step, but the "
                              f"iteration has only {self.num_rows}")
        self.per_epoch = self.num_rows // self.batch_size
        self._cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            order = (np.random.default_rng([self.seed, self.iteration, epoch]).permutation(
                self.num_rows) if self.shuffle else np.arange(self.num_rows))
            self._cache = (epoch, order)
        return self._cache[1]

    def rows(self, index: int) -> np.ndarray:
        epoch, b = divmod(int(index), self.per_epoch)
        return self._order(epoch)[b * self.batch_size:(b + 1) * self.batch_size]

    def batch(self, index: int, *, process_index: int = 0, process_count: int = 1
              ) -> dict[str, np.ndarray]:
        """Global batch ``index`` (or this process's contiguous share of its rows)."""
        n = len(self.prompts)
        rows = self.rows(index)
        seqs: list[list[tuple[np.ndarray, np.ndarray]]] = []
        refs = np.zeros((len(rows), 1 + self.k), np.float32)
        for j, row in enumerate(rows):
            s, i = divmod(int(row), n)
            syn_rows, ref_syn = self.sources[s]
            entry = [(self.prompts[i], self.real[i])]
            entry += [(self.prompts[i], syn_rows[i * self.k + k]) for k in range(self.k)]
            seqs.append(entry)
            refs[j, 0] = self.ref_real[i]
            refs[j, 1:] = ref_syn[i]
        longest = max(len(p) + len(r) for entry in seqs for p, r in entry)
        width = bucket_length(longest, self.min_bucket, self.max_length)
        per = len(rows) // process_count
        mine = slice(process_index * per, (process_index + 1) * per)
        seqs, refs = seqs[mine], refs[mine]
        shape = (len(seqs), 1 + self.k, width)
        ids = np.full(shape, self.pad_id, np.int32)
        attn = np.zeros(shape, np.int32)
        loss = np.zeros(shape, np.float32)
        for j, entry in enumerate(seqs):
            for s, (p, r) in enumerate(entry):
                lp, lr = len(p), min(len(r), width - len(p))
                ids[j, s, :lp] = p
                ids[j, s, lp:lp + lr] = r[:lr]
                attn[j, s, :lp + lr] = 1
                loss[j, s, lp:lp + lr] = 1.0
        return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss,
                "ref_logprobs": refs}
