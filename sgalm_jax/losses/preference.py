"""Pairwise preference losses: Bradley-Terry on scalar scores (GAD's discriminator) and DPO.

Sources:
- Bradley-Terry for GAD's discriminator: GAD paper (arXiv 2511.10643, Eq. 8, App. A.1) and its verl
  fork as described second-hand by the port ``qin-star/black-opd`` (gad_spin_grpo.md §1.3). The
  teacher answer is always the preferred one; each of the G student samples of a prompt is paired
  with that prompt's single teacher answer, whose score is shared across the group.
- DPO's sigmoid / hinge loss, written as in SPIN's ``spin_loss`` (gad_spin_grpo.md §2.2, algorithms.md
  §1.1 [CODE]); ``selfplay.spin_loss`` is this loss with chosen = real and rejected = synthetic.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from sgalm_jax.errors import ConfigError
from sgalm_jax.losses.common import Array, Metrics, as_f32, mask_or_ones, masked_mean
from sgalm_jax.losses.registry import register_loss

__all__ = ["bradley_terry_loss", "dpo_loss", "last_token_scores", "DPO_LOSS_TYPES"]

DPO_LOSS_TYPES = ("sigmoid", "hinge")


def _broadcast_chosen(chosen: Array, rejected: Array) -> Array:
    """Broadcast a per-prompt chosen score [B] against grouped rejected scores [B, G]."""
    if chosen.ndim < rejected.ndim:
        chosen = chosen.reshape(chosen.shape + (1,) * (rejected.ndim - chosen.ndim))
    return jnp.broadcast_to(chosen, jnp.broadcast_shapes(chosen.shape, rejected.shape))


@register_loss("bradley_terry", family="preference")
def bradley_terry_loss(
    chosen_scores: Array,
    rejected_scores: Array,
    *,
    mask: Optional[Array] = None,
) -> Tuple[Array, Metrics]:
    """``mean -log sigmoid(s_chosen - s_rejected)`` over pairs.

    Args:
      chosen_scores: [B] (one preferred answer per prompt, e.g. the teacher's) or the same shape as
        ``rejected_scores``.
      rejected_scores: [B] or [B, G] (G student samples per prompt, each paired with its prompt's
        chosen score, GAD's group form).
      mask: broadcastable to the pair shape; 0 for padded pairs.

    Metrics (GAD's names): ``d_loss``, ``d_acc`` (fraction of pairs with chosen > rejected),
    ``chosen_score``, ``rejected_score`` (means), ``margin``.
    """
    r = as_f32(rejected_scores)
    c = _broadcast_chosen(as_f32(chosen_scores), r)
    m = mask_or_ones(mask, r)
    diff = c - r
    loss = masked_mean(jax.nn.softplus(-diff), m)
    # Metrics only: detached so they never contribute gradient.
    d = jax.lax.stop_gradient(diff)
    metrics = {
        "d_loss": loss,
        "d_acc": masked_mean((d > 0).astype(jnp.float32), m),
        "chosen_score": masked_mean(jax.lax.stop_gradient(c), m),
        "rejected_score": masked_mean(jax.lax.stop_gradient(r), m),
        "margin": masked_mean(d, m),
    }
    return loss, metrics


def last_token_scores(values: Array, mask: Array) -> Array:
    """Per-sequence score read at the last position where ``mask`` is 1: [B, T] -> [B].

    GAD's discriminator is a value head whose output at the last valid response token is the
    sequence score (gad_spin_grpo.md §1.2). End chosen and rejected sequences the same way (both with
    EOS, or neither), or D learns the EOS shortcut. Rows with an empty mask give 0.
    """
    m = as_f32(mask)
    t = m.shape[-1]
    pos = jnp.arange(t)
    last = jnp.max(jnp.where(m > 0, pos, -1), axis=-1)
    picked = jnp.take_along_axis(as_f32(values), jnp.maximum(last, 0)[:, None], axis=-1)[:, 0]
    return jnp.where(last >= 0, picked, 0.0)


@register_loss("dpo", family="selfplay")
def dpo_loss(
    policy_chosen: Array,
    policy_rejected: Array,
    ref_chosen: Array,
    ref_rejected: Array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    real_mask: Optional[Array] = None,
    syn_mask: Optional[Array] = None,
) -> Tuple[Array, Metrics]:
    """DPO on per-sequence log-probs: ``z = beta * ((pi_c - ref_c) - (pi_r - ref_r))``.

    ``loss_type="sigmoid"``: ``mean softplus(-z) = mean -log sigmoid(z)``; ``"hinge"``:
    ``mean relu(1 - z)`` (SLiC-style, as in SPIN's code). Reference log-probs are detached.
    ``policy_rejected`` / ``ref_rejected`` may be [B, K] (K rejected per prompt, each paired with the
    prompt's chosen). ``real_mask`` / ``syn_mask`` (the self-play family's names) mask pairs.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(f"dpo/spin loss_type={loss_type!r}: expected one of {DPO_LOSS_TYPES}")
    pr = as_f32(policy_rejected)
    pc = _broadcast_chosen(as_f32(policy_chosen), pr)
    # Detached: the reference (the frozen previous iterate in SPIN) is a constant of the objective.
    rc = _broadcast_chosen(jax.lax.stop_gradient(as_f32(ref_chosen)), pr)
    rr = jax.lax.stop_gradient(as_f32(ref_rejected))
    m = mask_or_ones(None if real_mask is None else _broadcast_chosen(as_f32(real_mask), pr), pr)
    m = m * mask_or_ones(syn_mask, pr)
    reward_c = beta * (pc - rc)
    reward_r = beta * (pr - rr)
    z = reward_c - reward_r
    per_pair = jax.nn.softplus(-z) if loss_type == "sigmoid" else jax.nn.relu(1.0 - z)
    loss = masked_mean(per_pair, m)
    # Logged rewards are detached, exactly as in SPIN's trainer (``.detach()``).
    rc_d, rr_d = jax.lax.stop_gradient(reward_c), jax.lax.stop_gradient(reward_r)
    metrics = {
        "loss": loss,
        "real_reward": masked_mean(rc_d, m),
        "syn_reward": masked_mean(rr_d, m),
        "margin": masked_mean(rc_d - rr_d, m),
        "accuracy": masked_mean((rc_d > rr_d).astype(jnp.float32), m),
        "logp_real": masked_mean(jax.lax.stop_gradient(pc), m),
        "logp_syn": masked_mean(jax.lax.stop_gradient(pr), m),
    }
    return loss, metrics
