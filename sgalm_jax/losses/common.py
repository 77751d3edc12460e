"""Shared building blocks of every loss: per-token / per-sequence log-probs and masked statistics.

Alignment convention (used by every per-token array in ``sgalm_jax.losses``)
----------------------------------------------------------------------------
``logits[:, t]`` is the model's distribution over the token that ``targets[:, t]`` holds, i.e. the
logits are already aligned with their targets. A causal LM run on ``input_ids`` produces logits whose
position ``t`` predicts ``input_ids[:, t + 1]``; :func:`shift_targets` builds the aligned
``(targets, mask)`` pair from ``input_ids`` and a loss mask over *input positions*
(``loss_mask[b, k] = 1`` iff token ``k`` of ``input_ids`` is a response token that should be scored),
and :func:`causal_lm_logprobs` does the shift and the log-prob computation in one call. Every per-token
output (``SequenceLogprobs.token_logprobs``) therefore has the logits' alignment: column ``t`` scores
the token predicted from position ``t``; the last column of a shifted batch is always masked.

Numerics and memory
-------------------
All math is fp32 whatever the logits' dtype (bf16 logits are upcast inside the fused reductions).
:func:`token_logprobs` has a custom VJP: the forward keeps only the original logits and the
``[B, T]`` log-normaliser, and the backward recomputes the softmax in one pass, so at most one
``[B, T, V]`` fp32 temporary exists beyond the logits and their cotangent (XLA CPU, bf16 logits
B=4, T=256, V=32000: 125 MiB of temporaries for value-and-grad vs 250 MiB for autodiff of
``log_softmax``).
:func:`sequence_logprobs_from_hidden` goes further and never materialises ``[B, T, V]`` at all: it
projects hidden states to logits chunk by chunk along T under ``jax.checkpoint`` (same shapes, H=64,
chunk 32: 47 MiB of temporaries vs 320 MiB for ``hidden @ kernel`` followed by the dense path).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp

from sgalm_jax.errors import SgalmError

Array = jax.Array
Metrics = dict

__all__ = [
    "SequenceLogprobs",
    "token_logprobs",
    "sequence_logprobs",
    "shift_targets",
    "causal_lm_logprobs",
    "sequence_logprobs_from_hidden",
    "token_logprobs_and_entropy_from_hidden",
    "masked_sum",
    "masked_mean",
    "masked_std",
    "standardize",
    "effective_sample_size",
    "as_f32",
    "mask_or_ones",
]


def as_f32(x) -> Array:
    """Cast to at least float32: every loss does its math in fp32 whatever the params' dtype.

    bf16/fp16/int inputs become float32; float64 inputs (only possible with ``jax_enable_x64``) stay
    float64, so a loss can be checked against an exact float64 reference.
    """
    x = jnp.asarray(x)
    if x.dtype == jnp.float64:
        return x
    return x.astype(jnp.float32)


def mask_or_ones(mask: Optional[Array], like: Array) -> Array:
    """Return ``mask`` as fp32 broadcast to ``like``'s shape, or all ones when ``mask`` is None."""
    if mask is None:
        return jnp.ones(jnp.shape(like), jnp.float32)
    return jnp.broadcast_to(as_f32(mask), jnp.shape(like))


def _zero_masked(x: Array, m: Array) -> Array:
    # where, not multiply: garbage (inf/NaN) in padding rows must not leak into sums or gradients.
    return jnp.where(m != 0, as_f32(x), 0.0)


def masked_sum(x: Array, mask: Optional[Array] = None, axis=None) -> Array:
    """Sum of ``x * mask`` (``mask`` broadcast to ``x``)."""
    m = mask_or_ones(mask, x)
    return jnp.sum(_zero_masked(x, m) * m, axis=axis)


def masked_mean(x: Array, mask: Optional[Array] = None, axis=None) -> Array:
    """Mean of ``x`` over positions where ``mask`` is non-zero (weighted by ``mask``); 0 if empty."""
    m = mask_or_ones(mask, x)
    return jnp.sum(_zero_masked(x, m) * m, axis=axis) / jnp.maximum(jnp.sum(m, axis=axis), 1e-12)


def masked_std(x: Array, mask: Optional[Array] = None, axis=None, ddof: int = 0) -> Array:
    """Standard deviation over masked positions; ``ddof=1`` is the Bessel-corrected estimate."""
    m = mask_or_ones(mask, x)
    n = jnp.sum(m, axis=axis)
    mu = masked_mean(x, m, axis=axis)
    mu_b = mu if axis is None else jnp.expand_dims(mu, axis)
    var = jnp.sum(m * (_zero_masked(x, m) - mu_b) ** 2, axis=axis) / jnp.maximum(n - ddof, 1e-12)
    return jnp.sqrt(jnp.maximum(var, 0.0))


def standardize(x: Array, mask: Optional[Array] = None, eps: float = 1e-6) -> Array:
    """Batch z-score ``(x - mean) / (std + eps)`` over the masked entries (population std, ddof=0).

    This is the "batch standardisation" of algorithms.md §0. Masked-out entries get 0. With one
    valid entry (std = 0) the result is 0, i.e. no signal rather than a division blow-up.
    """
    m = mask_or_ones(mask, x)
    z = (_zero_masked(x, m) - masked_mean(x, m)) / (masked_std(x, m) + eps)
    return z * m


def effective_sample_size(log_weights: Array, mask: Optional[Array] = None) -> Array:
    """Normalised effective sample size ``(1 / sum w_i^2) / n`` of softmax(log_weights) over the mask.

    1.0 means uniform importance weights; ``1/n`` means all weight on one sample.
    """
    m = mask_or_ones(mask, log_weights)
    lw = jnp.where(m > 0, as_f32(log_weights), -1e30)  # finite, so an empty mask gives no NaN
    w = jax.nn.softmax(lw.reshape(-1))
    n = jnp.maximum(jnp.sum(m), 1.0)
    return 1.0 / jnp.maximum(jnp.sum(w**2), 1e-30) / n


# ---------------------------------------------------------------------------------------------
# Per-token log-probs
# ---------------------------------------------------------------------------------------------


def _target_logit(x: Array, targets: Array) -> Array:
    # A masked reduction instead of take_along_axis: it fuses with the logsumexp pass and stays a
    # local partial sum + all-reduce when the vocab axis is sharded (a gather would all-gather V).
    hit = jnp.arange(x.shape[-1], dtype=targets.dtype) == targets[..., None]
    return jnp.sum(jnp.where(hit, x, 0.0), axis=-1)


@jax.custom_vjp
def _gather_logprobs(logits: Array, targets: Array) -> Array:
    x = logits.astype(jnp.float32)
    return _target_logit(x, targets) - jax.nn.logsumexp(x, axis=-1)


def _gather_logprobs_fwd(logits: Array, targets: Array):
    x = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(x, axis=-1)
    tgt = _target_logit(x, targets)
    # Residuals: the logits in their own dtype and the [.., T] normaliser only; the softmax is
    # recomputed in the backward so no fp32 [B, T, V] array is kept alive between passes.
    return tgt - lse, (logits, targets, lse)


def _gather_logprobs_bwd(res, g):
    logits, targets, lse = res
    vocab = logits.shape[-1]
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    onehot = (jnp.arange(vocab, dtype=targets.dtype) == targets[..., None]).astype(jnp.float32)
    grad = (g.astype(jnp.float32)[..., None] * (onehot - probs)).astype(logits.dtype)
    return grad, None  # integer targets get no cotangent


_gather_logprobs.defvjp(_gather_logprobs_fwd, _gather_logprobs_bwd)


def token_logprobs(logits: Array, targets: Array) -> Array:
    """``log softmax(logits)[..., targets]`` in fp32, shape ``logits.shape[:-1]``.

    ``targets`` may contain out-of-range ids (e.g. HF's ``-100``) at positions the caller masks; they
    are clipped to a valid id here so the gather is defined, and the caller's mask removes them.
    """
    if logits.ndim != targets.ndim + 1:
        raise SgalmError(
            f"token_logprobs: logits {logits.shape} must have one more axis than targets {targets.shape}"
        )
    targets = jnp.clip(jnp.asarray(targets, jnp.int32), 0, logits.shape[-1] - 1)
    return _gather_logprobs(logits, targets)


class SequenceLogprobs(NamedTuple):
    """Per-token and per-sequence log-probs of masked target tokens (all fp32).

    token_logprobs: [B, T], 0 at masked positions (aligned with the logits, see module doc).
    sequence_sum:   [B], sum over masked tokens (SPIN's ``average_log_prob=False`` convention).
    num_tokens:     [B], number (or total weight) of masked tokens.
    sequence_mean:  [B], ``sequence_sum / max(num_tokens, 1)``, the length-normalised variant.
    """

    token_logprobs: Array
    sequence_sum: Array
    num_tokens: Array
    sequence_mean: Array


def _pack(tok: Array, mask: Array) -> SequenceLogprobs:
    tok = tok * mask
    s = jnp.sum(tok, axis=-1)
    n = jnp.sum(mask, axis=-1)
    return SequenceLogprobs(tok, s, n, s / jnp.maximum(n, 1.0))


def sequence_logprobs(logits: Array, targets: Array, mask: Optional[Array] = None) -> SequenceLogprobs:
    """Log-probs of ``targets`` under aligned ``logits`` (``logits[:, t]`` predicts ``targets[:, t]``).

    Args:
      logits: [B, T, V] in any float dtype (upcast to fp32 inside the reductions).
      targets: [B, T] int token ids.
      mask: [B, T] 1 for tokens to score (response tokens), 0 for prompt/padding. If None, every
        position with ``targets >= 0`` is scored (so HF-style ``-100`` labels work directly).
    Returns:
      :class:`SequenceLogprobs`.
    """
    if mask is None:
        mask = (jnp.asarray(targets) >= 0).astype(jnp.float32)
    mask = as_f32(mask)
    return _pack(token_logprobs(logits, targets), mask)


def shift_targets(input_ids: Array, loss_mask: Array) -> Tuple[Array, Array]:
    """Align next-token targets with the logits of a causal LM run on ``input_ids``.

    Returns ``(targets, mask)`` of shape [B, T] with ``targets[:, t] = input_ids[:, t + 1]`` and
    ``mask[:, t] = loss_mask[:, t + 1]``; the last column has target 0 and mask 0. No slicing of the
    [B, T, V] logits is needed: they are used whole, and their last position is simply masked.
    ``loss_mask`` is over *input* positions (1 = this token of ``input_ids`` is scored).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    loss_mask = as_f32(loss_mask)
    pad_i = jnp.zeros_like(input_ids[:, :1])
    pad_m = jnp.zeros_like(loss_mask[:, :1])
    targets = jnp.concatenate([input_ids[:, 1:], pad_i], axis=1)
    mask = jnp.concatenate([loss_mask[:, 1:], pad_m], axis=1)
    return targets, mask


def causal_lm_logprobs(logits: Array, input_ids: Array, loss_mask: Array) -> SequenceLogprobs:
    """Shift-and-score in one call: ``logits = model(input_ids)``, ``loss_mask`` over input positions.

    Equivalent to ``sequence_logprobs(logits, *shift_targets(input_ids, loss_mask))``. Position 0 of
    ``loss_mask`` is ignored (the first token has no prediction).
    """
    return sequence_logprobs(logits, *shift_targets(input_ids, loss_mask))


def sequence_logprobs_from_hidden(
    hidden: Array,
    head: Union[Array, Callable[[Array], Array]],
    targets: Array,
    mask: Optional[Array] = None,
    *,
    chunk_size: int = 128,
) -> SequenceLogprobs:
    """Chunked log-probs from final hidden states, never materialising the [B, T, V] logits.

    The sequence axis is split into chunks of ``chunk_size``; each chunk's logits are computed,
    reduced to log-probs, and dropped. ``jax.checkpoint`` on the chunk body makes the backward
    recompute each chunk's logits instead of storing them, so peak memory is one [B, C, V] chunk.

    Args:
      hidden: [B, T, H] final (normed) hidden states, aligned with ``targets`` like logits are.
      head: either an [H, V] kernel (``logits = hidden @ head``; note HF ``lm_head.weight`` is [V, H]
        and must be transposed) or a callable ``[B, C, H] -> [B, C, V]`` (closing over params is fine;
        gradients flow to them).
      targets, mask: as in :func:`sequence_logprobs`.
      chunk_size: tokens per chunk along T; T is padded up to a multiple of it.
    """
    if mask is None:
        mask = (jnp.asarray(targets) >= 0).astype(jnp.float32)
    mask = as_f32(mask)
    b, t, h = hidden.shape
    c = max(1, min(int(chunk_size), t))
    n = -(-t // c)
    pad = n * c - t
    tg = jnp.clip(jnp.asarray(targets, jnp.int32), 0, None)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        tg = jnp.pad(tg, ((0, 0), (0, pad)))
    project = head if callable(head) else (lambda x: x @ head)

    @jax.checkpoint
    def chunk_fn(hc: Array, tc: Array) -> Array:
        logits = project(hc)
        tc = jnp.clip(tc, 0, logits.shape[-1] - 1)
        return _gather_logprobs(logits, tc)

    hs = hidden.reshape(b, n, c, h).swapaxes(0, 1)  # [n, B, C, H]: a copy of hidden, not of logits
    ts = tg.reshape(b, n, c).swapaxes(0, 1)

    def body(carry, xs):
        return carry, chunk_fn(*xs)

    _, lp = jax.lax.scan(body, None, (hs, ts))
    lp = lp.swapaxes(0, 1).reshape(b, n * c)[:, :t]
    return _pack(lp, mask)


def token_logprobs_and_entropy_from_hidden(
    hidden: Array,
    head: Union[Array, Callable[[Array], Array]],
    targets: Array,
    *,
    chunk_size: int = 128,
    temperature: float = 1.0,
) -> Tuple[Array, Array]:
    """Per-token log-probs (differentiable) and entropies (detached) of ``logits / temperature``.

    The chunked, checkpointed projection of :func:`sequence_logprobs_from_hidden` (no [B, T, V]
    array), with two additions a policy-gradient step needs: the temperature the completions were
    sampled at divides the logits (as TRL and verl do, so the ratio and KL are those of the
    sampling distribution's logits), and the entropy of each position's distribution comes from
    the same chunk's logits, as a diagnostic (``stop_gradient``: no entropy bonus).

    Returns ``(logprobs [B, T], entropy [B, T])`` in fp32, unmasked (apply the caller's mask).
    """
    b, t, h = hidden.shape
    c = max(1, min(int(chunk_size), t))
    n = -(-t // c)
    pad = n * c - t
    tg = jnp.clip(jnp.asarray(targets, jnp.int32), 0, None)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        tg = jnp.pad(tg, ((0, 0), (0, pad)))
    project = head if callable(head) else (lambda x: x @ head)
    inv_t = 1.0 / float(temperature)

    @jax.checkpoint
    def chunk_fn(hc: Array, tc: Array) -> Tuple[Array, Array]:
        logits = project(hc).astype(jnp.float32) * inv_t
        tc = jnp.clip(tc, 0, logits.shape[-1] - 1)
        # Detached: the entropy is reported, not optimised.
        x = jax.lax.stop_gradient(logits)
        lse = jax.nn.logsumexp(x, axis=-1)
        ent = lse - jnp.sum(jax.nn.softmax(x, axis=-1) * x, axis=-1)
        return _gather_logprobs(logits, tc), ent

    hs = hidden.reshape(b, n, c, h).swapaxes(0, 1)
    ts = tg.reshape(b, n, c).swapaxes(0, 1)

    def body(carry, xs):
        return carry, chunk_fn(*xs)

    _, (lp, ent) = jax.lax.scan(body, None, (hs, ts))
    lp = lp.swapaxes(0, 1).reshape(b, n * c)[:, :t]
    ent = ent.swapaxes(0, 1).reshape(b, n * c)[:, :t]
    return lp, ent
