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
from typing import Sequence

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


class BatchSource:
    """Global batch ``index`` -> dict of ``[batch_size, T]`` numpy arrays (see module doc)."""

    def __init__(self, examples: Sequence[TokenizedExample], *, batch_size: int, max_length: int,
                 seed: int = 0, shuffle: bool = True, packing: bool = False, min_bucket: int = 32,
                 pad_id: int = 0):
        if not examples:
            raise ValueError("BatchSource: no examples")
        self.examples = list(examples)
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
        n = len(self.examples)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _rows(self, epoch: int) -> list[list[int]]:
        """Example indices of each row of ``epoch`` (one per row unless packing)."""
        if epoch not in self._rows_cache:
            order = self._order(epoch)
            if not self.packing:
                rows = [[int(i)] for i in order]
            else:
                rows, current, used = [], [], 0
                for i in order:
                    n = min(len(self.examples[i]), self.max_length)
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
        lengths = [sum(min(len(self.examples[i]), self.max_length) for i in row) for row in rows]
        width = (self.max_length if self.packing
                 else bucket_length(max(lengths), self.min_bucket, self.max_length))
        mine = rows[process_index * per:(process_index + 1) * per]
        return self._assemble(mine, width)

    def _assemble(self, rows: list[list[int]], width: int) -> dict[str, np.ndarray]:
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
