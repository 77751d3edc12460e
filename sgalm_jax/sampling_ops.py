"""Token selection for the samplers: temperature, top-k, top-p, greedy, and the log-probs the
samplers return (``log_softmax`` of the raw logits at the chosen token).

Pure functions of logits [B, V] (and a PRNG key); the static sampler (:mod:`sgalm_jax.sampling`)
and the continuous engine (:mod:`sgalm_jax.sampling_engine`) call them inside their decode loops.
The order of the warpers matches transformers' (temperature, then top-k, then top-p).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sgalm_jax.errors import ConfigError

__all__ = ["scale_temperature", "top_k_filter", "top_p_filter", "token_logprobs", "sample_tokens"]


def scale_temperature(logits: jax.Array, temperature: float | jax.Array) -> jax.Array:
    """``logits / temperature`` in float32 (temperature > 0)."""
    return logits.astype(jnp.float32) / temperature


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep the ``k`` largest logits of the last axis (and any tied with the k-th); others -> -inf."""
    if k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def _top_p_keep_sorted(sorted_logits: jax.Array, p: float | jax.Array) -> jax.Array:
    """For logits sorted in descending order: mask of the smallest prefix with probability >= p."""
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative probability
    return mass_before < p  # the first token is always kept


def top_p_filter(logits: jax.Array, p: float | jax.Array) -> jax.Array:
    """Nucleus filter: keep the most probable tokens whose total probability first reaches ``p``.

    Same set as transformers' ``TopPLogitsWarper`` (ties with the last kept logit are kept).
    Tokens outside the nucleus get -inf.
    """
    sorted_logits = -jnp.sort(-logits, axis=-1)
    keep = _top_p_keep_sorted(sorted_logits, p)
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """``log_softmax(logits)[..., token]`` in float32 (the model's own log-prob of ``tokens``)."""
    logits = logits.astype(jnp.float32)
    chosen = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return chosen - jax.nn.logsumexp(logits, axis=-1)


def _argmax(x: jax.Array) -> jax.Array:
    """First index of the maximum over the last axis, as int32.

    Same result as ``jnp.argmax`` (for finite inputs), written as two plain reductions (max, then
    the smallest index attaining it), which XLA vectorises; ``jnp.argmax``'s variadic reduce was
    2-3x slower on CPU over a vocabulary-sized axis.
    """
    top = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1)


def _greedy(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Argmax tokens and their log-softmax, sharing one max over the vocabulary."""
    logits = logits.astype(jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    tokens = jnp.min(jnp.where(logits == top, iota, logits.shape[-1]), axis=-1)
    lse = jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))
    return tokens, -lse  # the chosen logit is the max: log p = top - (top + lse)


@dataclasses.dataclass(frozen=True)
class _Mode:
    """The static (compile-time) part of the sampling settings; temperature and top_p are traced."""

    greedy: bool
    top_k: int | None
    top_p: bool


def _make_mode(temperature: float, top_k: int | None, top_p: float | None) -> _Mode:
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 0:
        raise ConfigError(f"top_k={top_k} must be a positive integer, or 0 / None for no top-k")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p={top_p} must be in (0, 1] or None")
    if temperature == 0:
        return _Mode(True, None, False)
    return _Mode(False, top_k or None, top_p is not None and top_p < 1.0)


def _select(key: jax.Array, logits: jax.Array, mode: _Mode, temperature, top_p) -> jax.Array:
    """Next tokens [B] from logits [B, V] under ``mode`` (the composition of the pieces above)."""
    if mode.greedy:
        return _argmax(logits)
    vocab = logits.shape[-1]
    if mode.top_k is None and not mode.top_p:  # Gumbel-max, as jax.random.categorical
        gumbel = jax.random.gumbel(key, logits.shape, jnp.float32)
        return _argmax(scale_temperature(logits, temperature) + gumbel)
    # Work on the candidate list only: the top-k (or, for top-p alone, the whole vocabulary sorted).
    # Equivalent to masking the full vocabulary with top_k_filter / top_p_filter, but the categorical
    # draw and the top-p cumulative sum touch k values instead of V.
    k = min(mode.top_k or vocab, vocab)
    values, indices = jax.lax.top_k(logits, k)
    values = scale_temperature(values, temperature)
    if mode.top_p:
        values = jnp.where(_top_p_keep_sorted(values, top_p), values, -jnp.inf)
    choice = _argmax(values + jax.random.gumbel(key, values.shape, jnp.float32))
    return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _select_with_logprobs(key, logits, mode: _Mode, temperature, top_p):
    """``(tokens, log_softmax(raw logits)[tokens])`` for one decode step."""
    if mode.greedy:
        return _greedy(logits)
    tokens = _select(key, logits, mode, temperature, top_p)
    return tokens, token_logprobs(logits, tokens)


def sample_tokens(key: jax.Array, logits: jax.Array, *, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """Draw one token per row of ``logits`` [B, V]: temperature, then top-k, then top-p.

    ``temperature=0`` is greedy (argmax). The order matches transformers' logits warpers.
    """
    mode = _make_mode(temperature, top_k, top_p)
    return _select(key, logits, mode, jnp.float32(temperature or 1.0),
                   jnp.float32(1.0 if top_p is None else top_p))
