"""Teacher-forced scoring of token sequences under a params pytree (no gradient).

:class:`SequenceScorer` is what the self-play loop uses for its once-per-iteration reference
log-probs (ℓ_{θ_t} of every real and synthetic response) and what the evaluation CLI uses for
log-likelihood multiple choice (ARC). It takes ragged sequences with a per-token loss mask
(1 = score this token), sorts them by length, packs them into fixed-size batches padded to
power-of-two lengths (so only a few programs are compiled), shards each batch over the mesh's
``(data, fsdp)`` axes and returns, per sequence, the summed log-prob of the masked tokens, their
count, and whether greedy decoding would reproduce every one of them.

The vocabulary projection runs in chunks along the sequence (``chunk_size`` positions at a time)
so no ``[B, T, vocab]`` array is ever materialised: with a 152k vocabulary that array is 0.6 GB
per 1k-token row in fp32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sgalm_jax import sharding as sh
from sgalm_jax.losses.common import shift_targets, token_logprobs
from sgalm_jax.models.config import resolve_dtype
from sgalm_jax.training.batching import bucket_length

__all__ = ["ScoreResult", "SequenceScorer", "chunked_scores"]


@dataclasses.dataclass
class ScoreResult:
    """Per-sequence results of :meth:`SequenceScorer.score` (numpy, in the input order)."""

    logprob_sum: np.ndarray  # float32 [N]: summed log-prob of the masked tokens
    num_tokens: np.ndarray  # float32 [N]: number of masked tokens
    greedy: np.ndarray  # bool [N]: argmax reproduces every masked token


def _argmax(x: jax.Array) -> jax.Array:
    top = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1)


def chunked_scores(model: Any, hidden: jax.Array, targets: jax.Array, mask: jax.Array,
                   chunk_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum log-prob [B], token count [B], greedy match [B]) from final hidden states [B, T, H].

    ``targets`` / ``mask`` are aligned with ``hidden`` (see :func:`sgalm_jax.losses.shift_targets`).
    The head is applied to ``chunk_size`` positions at a time inside a ``lax.scan``.
    """
    b, t, h = hidden.shape
    c = max(1, min(int(chunk_size), t)) if chunk_size else t
    n = -(-t // c)
    pad = n * c - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    hs = hidden.reshape(b, n, c, h).swapaxes(0, 1)
    ts = targets.reshape(b, n, c).swapaxes(0, 1)

    def body(carry, xs):
        hc, tc = xs
        logits = model.logits_from_hidden(hc)  # [B, c, V] float32
        return carry, (token_logprobs(logits, tc), _argmax(logits) == tc)

    _, (lp, hit) = jax.lax.scan(body, None, (hs, ts))
    lp = lp.swapaxes(0, 1).reshape(b, n * c)
    hit = hit.swapaxes(0, 1).reshape(b, n * c)
    m = mask.astype(jnp.float32)
    total = jnp.sum(jnp.where(m > 0, lp, 0.0) * m, axis=-1)
    greedy = jnp.all(jnp.where(m > 0, hit, True), axis=-1)
    return total, jnp.sum(m, axis=-1), greedy


def _score_batch(graphdef, chunk_size, compute_dtype, params, ids, attn, loss_mask):
    if compute_dtype is not None:  # the numerics of a train step with train.compute_dtype
        params = jax.tree.map(
            lambda x: x.astype(compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
            params)
    model = nnx.merge(graphdef, params)
    positions = jnp.maximum(jnp.cumsum(attn, axis=-1) - 1, 0).astype(jnp.int32)
    hidden, _ = model.model(ids, attn, positions)
    targets, mask = shift_targets(ids, loss_mask)
    return chunked_scores(model, hidden, targets, mask, chunk_size)


class SequenceScorer:
    """Batched, bucketed, sharded sum of log-probs of masked tokens (see the module docstring).

    Args:
      graphdef: the model's ``GraphDef``; params are passed to :meth:`score`.
      mesh: the device mesh batches are sharded over (None: one device).
      batch_size: sequences per forward (rounded up to a multiple of the data-parallel size).
      min_bucket: shortest padded length; lengths pad to the next power of two.
      max_length: the longest padded length (sequences must not be longer).
      pad_id: filler token id.
      chunk_size: positions per head projection (0 = all at once).
      compute_dtype: cast floating params to this dtype first (what ``make_train_step`` does with
        ``train.compute_dtype``), so reference log-probs have the train step's numerics.

    ``calls`` counts :meth:`score` calls and ``forwards`` the batches run, so a training loop can
    show how often it scored (the self-play loop: once per iteration).
    """

    def __init__(self, graphdef: Any, *, mesh: Mesh | None = None, batch_size: int = 64,
                 min_bucket: int = 32, max_length: int = 4096, pad_id: int = 0,
                 chunk_size: int = 256, compute_dtype: Any = None):
        self.mesh = mesh
        dp = sh.data_parallel_size(mesh) if mesh is not None else 1
        self.batch_size = -(-max(int(batch_size), 1) // dp) * dp
        self.min_bucket = int(min_bucket)
        self.max_length = int(max_length)
        self.pad_id = int(pad_id)
        self.calls = 0
        self.forwards = 0
        dtype = resolve_dtype(compute_dtype) if compute_dtype else None
        self._fn = jax.jit(functools.partial(_score_batch, graphdef, int(chunk_size), dtype))

    @property
    def num_compilations(self) -> int:
        return self._fn._cache_size()

    def score(self, params: Any, sequences: Sequence[Sequence[int]],
              loss_masks: Sequence[Sequence[float]]) -> ScoreResult:
        """Score ``sequences[i]`` (token ids) at the positions where ``loss_masks[i]`` is 1."""
        self.calls += 1
        n = len(sequences)
        out = ScoreResult(np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, bool))
        if n == 0:
            return out
        lengths = np.asarray([len(s) for s in sequences])
        if lengths.min() < 1:
            raise ValueError("SequenceScorer: empty sequence")
        if lengths.max() > self.max_length:
            raise ValueError(f"SequenceScorer: a sequence of {lengths.max()} tokens is longer than "
                             f"max_length={self.max_length}")
        order = np.argsort(-lengths, kind="stable")  # similar lengths share a bucket
        sharding = (NamedSharding(self.mesh, P(sh.BATCH_AXES, None)) if self.mesh is not None
                    else None)
        bs = self.batch_size
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            width = bucket_length(int(lengths[idx].max()), self.min_bucket, self.max_length)
            ids = np.full((bs, width), self.pad_id, np.int32)
            attn = np.zeros((bs, width), np.int32)
            mask = np.zeros((bs, width), np.float32)
            attn[:, 0] = 1  # dummy rows hold one real token (no all-masked attention rows)
            for r, i in enumerate(idx):
                seq = np.asarray(sequences[i], np.int32)
                ids[r, :len(seq)] = seq
                attn[r, :len(seq)] = 1
                mask[r, :len(seq)] = np.asarray(loss_masks[i], np.float32)
            arrays = (ids, attn, mask)
            if sharding is not None:
                arrays = tuple(jax.device_put(a, sharding) for a in arrays)
            total, count, greedy = sh.to_host(self._fn(params, *arrays))  # all hosts' rows
            self.forwards += 1
            k = len(idx)
            out.logprob_sum[idx] = total[:k]
            out.num_tokens[idx] = count[:k]
            out.greedy[idx] = greedy[:k]
        return out
