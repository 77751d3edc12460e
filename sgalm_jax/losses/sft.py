"""Supervised fine-tuning loss: masked next-token cross-entropy.

Used for SFT pre-training, for the synthetic-data engine's student, and as the optional "anchor"
term in SGALM's generator loss.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from sgalm_jax.errors import ConfigError
from sgalm_jax.losses.common import Array, Metrics, as_f32, sequence_logprobs
from sgalm_jax.losses.registry import register_loss

__all__ = ["sft_loss", "sft_loss_from_logprobs", "SFT_NORMALIZATIONS"]

SFT_NORMALIZATIONS = ("token", "sequence", "sequence_sum", "sum")


def sft_loss_from_logprobs(
    token_logprobs: Array, mask: Array, *, normalize: str = "token"
) -> Tuple[Array, Metrics]:
    """Negative log-likelihood from per-token log-probs ``[B, T]`` and a ``[B, T]`` mask.

    normalize:
      - ``"token"`` (default): sum of token NLLs / number of masked tokens in the batch. Every token
        weighs the same, so long responses count more.
      - ``"sequence"``: mean over sequences of each sequence's token-mean NLL (every sequence weighs
        the same; sequences without tokens are skipped).
      - ``"sequence_sum"``: mean over sequences of each sequence's summed NLL (the sequence-level
        log-likelihood used by SPIN-style objectives).
      - ``"sum"``: plain total of token NLLs (scales with batch size; for custom normalisation).
    """
    if normalize not in SFT_NORMALIZATIONS:
        raise ConfigError(f"sft normalize={normalize!r}: expected one of {SFT_NORMALIZATIONS}")
    mask = as_f32(mask)
    nll = -as_f32(token_logprobs) * mask
    per_seq = jnp.sum(nll, axis=-1)
    n_seq = jnp.sum(mask, axis=-1)
    n_tok = jnp.sum(n_seq)
    has_tok = (n_seq > 0).astype(jnp.float32)
    n_valid_seq = jnp.maximum(jnp.sum(has_tok), 1.0)
    token_mean = jnp.sum(per_seq) / jnp.maximum(n_tok, 1.0)
    if normalize == "token":
        loss = token_mean
    elif normalize == "sequence":
        loss = jnp.sum(has_tok * per_seq / jnp.maximum(n_seq, 1.0)) / n_valid_seq
    elif normalize == "sequence_sum":
        loss = jnp.sum(has_tok * per_seq) / n_valid_seq
    else:
        loss = jnp.sum(per_seq)
    metrics = {
        "loss": loss,
        "nll_per_token": token_mean,
        "ppl": jnp.exp(jnp.minimum(token_mean, 80.0)),
        "num_tokens": n_tok,
    }
    return loss, metrics


@register_loss("sft", family="sft")
def sft_loss(
    logits: Array,
    targets: Array,
    mask: Optional[Array] = None,
    *,
    normalize: str = "token",
) -> Tuple[Array, Metrics]:
    """Masked cross-entropy of aligned ``logits`` [B, T, V] on ``targets`` [B, T].

    ``logits[:, t]`` predicts ``targets[:, t]`` (use ``shift_targets`` / ``causal_lm_logprobs`` to
    align a causal LM's output). ``mask`` marks response tokens; prompt and padding get 0. With
    ``mask=None``, targets < 0 (HF's ``-100``) are ignored. Metrics also report token accuracy.
    """
    lp = sequence_logprobs(logits, targets, mask)
    m = (jnp.asarray(targets) >= 0).astype(jnp.float32) if mask is None else as_f32(mask)
    loss, metrics = sft_loss_from_logprobs(lp.token_logprobs, m, normalize=normalize)
    # Accuracy is a diagnostic only; argmax is not differentiable anyway, stop_gradient documents it.
    pred = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
    correct = (pred == jnp.asarray(targets)).astype(jnp.float32) * m
    metrics["token_accuracy"] = jnp.sum(correct) / jnp.maximum(jnp.sum(m), 1.0)
    return loss, metrics
