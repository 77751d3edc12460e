"""Deterministic, resumable batches of tokenized sequences: padding to buckets, or packing.

A :class:`BatchSource` maps a batch *index* to a global batch, as a pure function of (examples,
seed, index): epoch ``e`` visits the examples in a permutation seeded by ``(seed, e)``. Resuming is
therefore just "continue at index N" (the index is stored in checkpoints as the data position),
and every host computes the same global batch and keeps only its own rows.

Each example is a token sequence with a per-token loss mask (1 = the token is a training target,
e.g. a response token). Batches are dicts of numpy arrays ``[B, T]``:

- ``input_ids`` int32, ``attention_mask`` int32 (0 = padding, else the 1-based index of the
  example within its row: always 1 unless packing), ``positions`` int32,
  ``loss_mask`` float32 (over input positions, as :func:`sgalm_jax.losses.shift_targets` expects).

Padding (default): rows are right-padded to the smallest power-of-two bucket (at least
``min_bucket``, at most ``max_length``) that fits the longest row, so a few shapes get compiled.
Packing: examples are concatenated greedily into rows of exactly ``max_length``, positions restart
at 0 for each example, and the attention mask carries segment ids so that packed examples never
attend to each other (the model masks attention across segments).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """A sequence and its loss mask over the same positions."""

    input_ids: np.ndarray  # int32 [L]
    loss_mask: np.ndarray  # float32 [L]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def truncate(prompt: Sequence[int], response: Sequence[int], max_length: int
             ) -> tuple[list[int], list[int]]:
    """Fit ``prompt + response`` into ``max_length``: drop prompt tokens from the left (keeping at
    least half of the budget for it), then response tokens from the right."""
    prompt, response = list(prompt), list(response)
    excess = len(prompt) + len(response) - max_length
    if excess <= 0:
        return prompt, response
    cut = min(excess, max(len(prompt) - max_length // 2, 0))
    prompt = prompt[cut:]
    return prompt, response[: max_length - len(prompt)]


def bucket_length(n: int, min_bucket: int, max_length: int) -> int:
    """The smallest power of two >= n (and >= min_bucket), capped at max_length."""
    b = max(int(min_bucket), 1)
    while b < n:
        b *= 2
    return min(b, int(max_length))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order in which epoch ``epoch`` visits ``n`` examples (seeded by ``(seed, epoch)``)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def host_share(n: int, *, batch_size: int, seed: int, shuffle: bool, packing: bool,
               process_index: int, process_count: int) -> np.ndarray:
    """The example indices a host tokenizes up front, so that the hosts of a multi-host run split
    the tokenization: together they cover each of the ``n`` examples exactly once.

    Padding mode: the examples of this host's rows in epoch 0 (so a one-epoch run never tokenizes
    anything else), plus every ``process_count``-th of the epoch's dropped remainder. Packing,
    whose rows depend on every length: every ``process_count``-th example. One process: all.
    """
    if process_count == 1:
        return np.arange(n)
    if packing:
        return np.arange(process_index, n, process_count)
    order = epoch_order(n, seed, 0, shuffle)
    per = batch_size // process_count
    full = (n // batch_size) * batch_size
    batches = order[:full].reshape(-1, batch_size)
    mine = batches[:, process_index * per:(process_index + 1) * per].reshape(-1)
    return np.concatenate([mine, order[full:][process_index::process_count]])


class LazyExamples:
    """A sequence of :class:`TokenizedExample` tokenized on first use (and kept).

    ``encode_fn(indices) -> examples`` tokenizes a list of example indices in one call;
    ``cache`` holds examples already tokenized (e.g. this host's :func:`host_share`). A
    :class:`BatchSource` over it (with the lengths of every example given separately) only ever
    asks for the rows this host assembles, so each host tokenizes only what it trains on.
    """

    def __init__(self, n: int, encode_fn: Callable[[list[int]], Sequence[TokenizedExample]],
                 cache: dict[int, TokenizedExample] | None = None):
        self.n = int(n)
        self.encode_fn = encode_fn
        self.cache: dict[int, TokenizedExample] = dict(cache or {})

    def __len__(self) -> int:
        return self.n

    def fetch(self, indices: Sequence[int]) -> None:
        """Tokenize those of ``indices`` not seen yet, in one ``encode_fn`` call."""
        missing = [int(i) for i in dict.fromkeys(int(i) for i in indices) if int(i) not in self.cache]
        if missing:
            for i, ex in zip(missing, self.encode_fn(missing)):
                self.cache[i] = ex

    def __getitem__(self, i: int) -> TokenizedExample:
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.fetch([i])
        return self.cache[i]

    @property
    def num_encoded(self) -> int:
        """How many examples this host has tokenized so far."""
        return len(self.cache)


class BatchSource:
    """Global batch ``index`` -> dict of ``[batch_size, T]`` numpy arrays (see module doc).

    ``examples`` is a list of :class:`TokenizedExample`, or a :class:`LazyExamples` together with
    ``lengths`` (every example's length: shapes and packing depend on all of them, the token ids
    only on this host's rows).
    """

    def __init__(self, examples: Sequence[TokenizedExample] | LazyExamples, *, batch_size: int,
                 max_length: int, seed: int = 0, shuffle: bool = True, packing: bool = False,
                 min_bucket: int = 32, pad_id: int = 0, lengths: Sequence[int] | None = None):
        if not len(examples):
            raise ValueError("BatchSource: no examples")
        self.examples: Any = examples if isinstance(examples, LazyExamples) else list(examples)
        self.lengths = np.asarray([len(e) for e in self.examples] if lengths is None else lengths,
                                  np.int64)
        if len(self.lengths) != len(self.examples):
            raise ValueError(f"BatchSource: {len(self.lengths)} lengths for "
                             f"{len(self.examples)} examples")
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.packing = packing
        self.min_bucket = int(min_bucket)
        self.pad_id = int(pad_id)
        self._rows_cache: dict[int, list[list[int]]] = {}
        if not packing and len(self.examples) < self.batch_size:
            raise ValueError(f"BatchSource: {len(self.examples)} examples are fewer than one "
                             f"batch of {self.batch_size}")

    # ------------------------------------------------------------------ epoch layout
    def _order(self, epoch: int) -> np.ndarray:
        return epoch_order(len(self.examples), self.seed, epoch, self.shuffle)

    def _rows(self, epoch: int) -> list[list[int]]:
        """Example indices of each row of ``epoch`` (one per row unless packing)."""
        if epoch not in self._rows_cache:
            order = self._order(epoch)
            if not self.packing:
                rows = [[int(i)] for i in order]
            else:
                rows, current, used = [], [], 0
                for i in order:
                    n = min(int(self.lengths[i]), self.max_length)
                    if current and used + n > self.max_length:
                        rows.append(current)
                        current, used = [], 0
                    current.append(int(i))
                    used += n
                if current:
                    rows.append(current)
            if len(rows) < self.batch_size:
                raise ValueError(f"BatchSource: an epoch has {len(rows)} rows, fewer than one "
                                 f"batch of {self.batch_size}")
            self._rows_cache = {epoch: rows}  # keep one epoch cached
        return self._rows_cache[epoch]

    def batches_in_epoch(self, epoch: int) -> int:
        return len(self._rows(epoch)) // self.batch_size

    def locate(self, index: int) -> tuple[int, int]:
        """(epoch, batch within epoch) of global batch ``index`` (the remainder of each epoch's
        rows is dropped)."""
        if not self.packing:
            per = len(self.examples) // self.batch_size
            return index // per, index % per
        epoch = 0
        while True:
            n = self.batches_in_epoch(epoch)
            if index < n:
                return epoch, index
            index -= n
            epoch += 1

    # ------------------------------------------------------------------ batches
    def batch(self, index: int, *, process_index: int = 0, process_count: int = 1
              ) -> dict[str, np.ndarray]:
        """Global batch ``index``, or only this process's contiguous share of its rows."""
        epoch, b = self.locate(index)
        rows = self._rows(epoch)[b * self.batch_size:(b + 1) * self.batch_size]
        if self.batch_size % process_count:
            raise ValueError(f"batch_size {self.batch_size} not divisible by {process_count} "
                             "processes")
        per = self.batch_size // process_count
        # The padded length depends on the whole global batch so all hosts agree on the shape.
        lengths = [sum(min(int(self.lengths[i]), self.max_length) for i in row) for row in rows]
        width = (self.max_length if self.packing
                 else bucket_length(max(lengths), self.min_bucket, self.max_length))
        mine = rows[process_index * per:(process_index + 1) * per]
        return self._assemble(mine, width)

    def _assemble(self, rows: list[list[int]], width: int) -> dict[str, np.ndarray]:
        if isinstance(self.examples, LazyExamples):  # tokenize this batch's new rows in one call
            self.examples.fetch([i for row in rows for i in row])
        b = len(rows)
        ids = np.full((b, width), self.pad_id, np.int32)
        attn = np.zeros((b, width), np.int32)
        pos = np.zeros((b, width), np.int32)
        loss = np.zeros((b, width), np.float32)
        for r, row in enumerate(rows):
            at = 0
            for segment, i in enumerate(row, start=1):
                ex = self.examples[i]
                n = min(len(ex), width - at)
                ids[r, at:at + n] = ex.input_ids[:n]
                loss[r, at:at + n] = ex.loss_mask[:n]
                attn[r, at:at + n] = segment  # segment ids: packed examples don't see each other
                pos[r, at:at + n] = np.arange(n)
                at += n
        return {"input_ids": ids, "attention_mask": attn, "positions": pos, "loss_mask": loss}
