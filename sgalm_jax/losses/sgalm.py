"""SGALM losses: one LLM as discriminator (Real/Fake token score) and generator (score function).

Provenance marks (see ``shared/research/sgalm.md`` and ``algorithms.md`` §5):

- **[paper]** stated in the SGALM paper summary (arXiv 2602.01137): the score
  ``D(s) = p(Real) / (p(Real) + p(Fake)) = sigmoid(z_Real - z_Fake)`` read from the next-token
  logits; alternating discrimination / generation updates with RMSProp; parameter detachment
  (stop-gradient) so the two objectives do not couple through the shared weights; "batch
  standardisation" as the balancing device.
- **[design]** this project's reconstruction (algorithms.md §5.3, tagged [INF] there): the BCE form of
  ``L_D``; the score-function generator loss with a detached, batch-standardised reward
  ``A = standardize(log D)``; the reward alternatives ``D`` and the logit; the weighted-likelihood
  alternative; the optional SFT anchor; gradient-norm balancing. Each is a keyword option here.

Why the generator loss must be detached: generated samples are discrete token ids, so a gradient of
``-log D(s)`` through the shared weights only teaches the *classifier* to call fakes real (it
sabotages D and does not move the generator). The generator moves through the likelihood of its own
samples, with D's score as a constant weight: ``L_G = -mean_j sg(A_j) * log p_G(s_j | prompt_j)``.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from sgalm_jax.errors import ConfigError
from sgalm_jax.losses.common import (
    Array,
    Metrics,
    as_f32,
    effective_sample_size,
    mask_or_ones,
    masked_mean,
    masked_std,
    standardize,
)
from sgalm_jax.losses.registry import register_loss

logger = logging.getLogger(__name__)

__all__ = [
    "gather_answer_logits",
    "discriminator_score_logits",
    "discriminator_prob",
    "discriminator_loss",
    "generator_reward",
    "generator_loss",
    "balanced_gradient_sum",
    "GENERATOR_REWARDS",
    "GENERATOR_FORMS",
]

GENERATOR_REWARDS = ("log_d", "d", "logit")
GENERATOR_FORMS = ("score_function", "weighted_likelihood")
ADVANTAGES = ("standardize", "center", "raw")

TokenIds = Union[int, Sequence[int], Array]


# ---------------------------------------------------------------------------------------------
# Discriminator
# ---------------------------------------------------------------------------------------------


def gather_answer_logits(logits: Array, positions: Optional[Array] = None) -> Array:
    """Pick the next-token logits at the answer position: [B, T, V] -> [B, V].

    ``positions`` [B] is the index of the last prompt token of each row (for right padding,
    ``lengths - 1``); ``None`` takes the last position (left-padded batches).
    """
    if positions is None:
        return logits[:, -1]
    idx = jnp.asarray(positions, jnp.int32)[:, None, None]
    return jnp.take_along_axis(logits, idx, axis=1)[:, 0]


def _label_logit(x: Array, ids: TokenIds) -> Array:
    ids = jnp.atleast_1d(jnp.asarray(ids, jnp.int32))
    picked = jnp.take(x, ids, axis=-1)  # [B, n_ids]
    # Several ids (e.g. "Real" and " Real") pool their probability mass: log sum_i exp(z_i).
    return picked[..., 0] if ids.shape[0] == 1 else jax.nn.logsumexp(picked, axis=-1)


def discriminator_score_logits(answer_logits: Array, real_ids: TokenIds, fake_ids: TokenIds) -> Array:
    """``z = z_Real - z_Fake`` [B] from next-token logits [B, V] at the answer position. [paper]

    ``D(s) = sigmoid(z)`` is the Real probability renormalised over the pair {Real, Fake} (the rest
    of the vocabulary cancels). ``real_ids`` / ``fake_ids`` are one id each (a label's single or
    first token), or a sequence of ids whose probabilities are summed.
    """
    x = as_f32(answer_logits)
    return _label_logit(x, real_ids) - _label_logit(x, fake_ids)


def discriminator_prob(z: Array) -> Array:
    """``D = sigmoid(z)``, the probability the discriminator assigns to "Real". [paper]"""
    return jax.nn.sigmoid(as_f32(z))


@register_loss("sgalm_discriminator", family="discriminator")
def discriminator_loss(
    z_real: Array,
    z_fake: Array,
    *,
    real_mask: Optional[Array] = None,
    fake_mask: Optional[Array] = None,
) -> Tuple[Array, Metrics]:
    """Binary cross-entropy of D on real vs generated samples. [design; algorithms.md §5.3]

    ``L_D = mean_real softplus(-z) + mean_fake softplus(z)``
    (``= -mean log D(real) - mean log(1 - D(fake))``, computed from logits for stability).

    Metrics: ``d_acc`` (pooled accuracy with threshold D = 0.5), ``d_acc_real``, ``d_acc_fake``,
    ``d_real`` / ``d_fake`` (mean D), ``fake_alarm`` (1.0 if mean D on fakes < 0.1: D has won and the
    generator's reward is nearly flat).
    """
    zr, zf = as_f32(z_real), as_f32(z_fake)
    mr, mf = mask_or_ones(real_mask, zr), mask_or_ones(fake_mask, zf)
    loss_real = masked_mean(jax.nn.softplus(-zr), mr)
    loss_fake = masked_mean(jax.nn.softplus(zf), mf)
    loss = loss_real + loss_fake
    # Metrics are diagnostics: detach them so nobody differentiates through a thresholded count.
    zr_d, zf_d = jax.lax.stop_gradient(zr), jax.lax.stop_gradient(zf)
    right_r, right_f = (zr_d > 0).astype(jnp.float32), (zf_d < 0).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mr) + jnp.sum(mf), 1.0)
    d_fake = masked_mean(jax.nn.sigmoid(zf_d), mf)
    metrics = {
        "d_loss": loss,
        "d_loss_real": loss_real,
        "d_loss_fake": loss_fake,
        "d_acc": (jnp.sum(right_r * mr) + jnp.sum(right_f * mf)) / n,
        "d_acc_real": masked_mean(right_r, mr),
        "d_acc_fake": masked_mean(right_f, mf),
        "d_real": masked_mean(jax.nn.sigmoid(zr_d), mr),
        "d_fake": d_fake,
        "fake_alarm": (d_fake < 0.1).astype(jnp.float32),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------


def generator_reward(z_fake: Array, reward: str = "log_d") -> Array:
    """The generator's per-sample reward from the discriminator logit; always detached.

    - ``"log_d"`` (default, [design]): ``log D = -softplus(-z)``, the non-saturating GAN reward.
    - ``"d"``: ``D = sigmoid(z)``.
    - ``"logit"``: ``z`` itself (the log-odds ``log D - log(1 - D)``).
    """
    if reward not in GENERATOR_REWARDS:
        raise ConfigError(f"generator reward={reward!r}: expected one of {GENERATOR_REWARDS}")
    # Detached: the reward is a constant weight on the generator's likelihood. A gradient through
    # D's logits would train the *classifier* to call fakes real (algorithms.md §5.3, G3).
    z = jax.lax.stop_gradient(as_f32(z_fake))
    if reward == "log_d":
        return -jax.nn.softplus(-z)
    if reward == "d":
        return jax.nn.sigmoid(z)
    return z


@register_loss("sgalm_generator", family="generator")
def generator_loss(
    gen_logprobs: Array,
    z_fake: Array,
    mask: Optional[Array] = None,
    *,
    reward: str = "log_d",
    form: str = "score_function",
    advantage: str = "standardize",
    tau: float = 1.0,
    eps: float = 1e-6,
    anchor_logprobs: Optional[Array] = None,
    anchor_mask: Optional[Array] = None,
    anchor_weight: float = 0.0,
) -> Tuple[Array, Metrics]:
    """SGALM generator objective on a batch of generated samples. [design; algorithms.md §5.3]

    Args:
      gen_logprobs: [B] log p_G(s_j | icl_prompt_j) of each generated sample, summed over the generated
        tokens only (pass the per-token mean for the length-normalised variant). Carries the gradient.
      z_fake: [B] discriminator logits ``z_Real - z_Fake`` of the same samples. Always detached.
      mask: [B] 1 for real rows, 0 for padding rows.
      reward: ``"log_d"`` | ``"d"`` | ``"logit"`` (see :func:`generator_reward`).
      form:
        - ``"score_function"`` (G1, default): ``L_G = -mean_j sg(A_j) * gen_logprobs_j`` with
          ``A = standardize(R)`` over the batch (the paper's "batch standardisation" [paper], read as a
          z-score of the reward [design]). Its gradient is the REINFORCE estimator of
          ``grad E_{s~G}[R(s)]`` for on-policy samples, with the batch mean as baseline.
        - ``"weighted_likelihood"`` (G2): ``L_G = -sum_j sg(w_j) * gen_logprobs_j``,
          ``w = softmax(R / tau)`` over the batch (reward-weighted regression / filtered SFT). With
          ``reward="log_d", tau=1`` the weights are ``D_j / sum_k D_k``.
      advantage: for the score-function form, ``"standardize"`` (default), ``"center"`` (R - mean R)
        or ``"raw"`` (R itself, no baseline).
      tau: temperature of the weighted-likelihood softmax.
      anchor_logprobs / anchor_mask / anchor_weight: optional SFT anchor on *real* samples,
        ``+ eta * (-mean anchor_logprobs)`` with ``eta = anchor_weight`` (default 0, off). [design]

    Metrics: ``g_loss``, ``reward_mean``, ``reward_std``, ``d_fake``, ``gen_logp``, ``adv_abs_mean``
    (score function) or ``weight_ess`` (weighted likelihood), ``anchor_nll``.
    """
    if form not in GENERATOR_FORMS:
        raise ConfigError(f"generator form={form!r}: expected one of {GENERATOR_FORMS}")
    if advantage not in ADVANTAGES:
        raise ConfigError(f"generator advantage={advantage!r}: expected one of {ADVANTAGES}")
    lp = as_f32(gen_logprobs)
    m = mask_or_ones(mask, lp)
    r = generator_reward(z_fake, reward)  # already stop_gradient'ed
    metrics: Metrics = {}
    if form == "score_function":
        if advantage == "standardize":
            a = standardize(r, m, eps)
        elif advantage == "center":
            a = (r - masked_mean(r, m)) * m
        else:
            a = r * m
        # Detached: A is a per-sample constant (a function of the detached reward only).
        a = jax.lax.stop_gradient(a)
        loss = -masked_mean(a * lp, m)
        metrics["adv_abs_mean"] = masked_mean(jnp.abs(a), m)
    else:
        logw = jnp.where(m > 0, r / tau, -1e30)  # finite: an all-padding batch stays NaN-free
        # Detached: the weights select which samples to imitate; they must not receive gradient.
        w = jax.lax.stop_gradient(jax.nn.softmax(logw))
        loss = -jnp.sum(w * lp * m)
        metrics["weight_ess"] = effective_sample_size(r / tau, m)
    if anchor_logprobs is not None:
        anchor_nll = -masked_mean(as_f32(anchor_logprobs), anchor_mask)
        loss = loss + anchor_weight * anchor_nll
        metrics["anchor_nll"] = jax.lax.stop_gradient(anchor_nll)
    zf = jax.lax.stop_gradient(as_f32(z_fake))
    metrics.update(
        {
            "g_loss": loss,
            "reward_mean": masked_mean(r, m),
            "reward_std": masked_std(r, m),
            "d_fake": masked_mean(jax.nn.sigmoid(zf), m),
            "gen_logp": jax.lax.stop_gradient(masked_mean(lp, m)),
        }
    )
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# Gradient balancing (joint-update variant)
# ---------------------------------------------------------------------------------------------


def _global_norm(tree) -> Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(as_f32(x) ** 2) for x in leaves)) if leaves else jnp.float32(0.0)


def balanced_gradient_sum(grads_d, grads_g, *, eps: float = 1e-8, scale: float = 1.0):
    """Joint update ``g = g_D + lambda_G * g_G`` with ``lambda_G = sg(|g_D| / (|g_G| + eps)) * scale``.

    [design; algorithms.md §5.3 "joint update" reading of the paper's gradient balancing.] The default
    SGALM loop alternates D and G steps instead; this helper serves the joint-update ablation.
    Returns ``(combined_grads, metrics)``; the grads are cast back to each leaf's dtype.
    """
    nd, ng = _global_norm(grads_d), _global_norm(grads_g)
    # Detached: lambda_G is a step-size-like constant, not part of either objective.
    lam = jax.lax.stop_gradient(nd / (ng + eps)) * scale
    out = jax.tree_util.tree_map(lambda a, b: (as_f32(a) + lam * as_f32(b)).astype(a.dtype), grads_d, grads_g)
    return out, {"grad_norm_d": nd, "grad_norm_g": ng, "lambda_g": lam}


def __getattr__(name: str):
    # The Real/Fake label-token resolution is tokenizer work and now lives in
    # sgalm_jax.training.tokenizer; these names keep old imports working (resolved on access only,
    # so importing the losses never imports the training layer).
    if name in ("LabelTokenIds", "resolve_label_token_ids"):
        import warnings

        from sgalm_jax.training import tokenizer

        warnings.warn(f"sgalm_jax.losses.sgalm.{name} moved to sgalm_jax.training.tokenizer",
                      DeprecationWarning, stacklevel=2)
        return getattr(tokenizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
