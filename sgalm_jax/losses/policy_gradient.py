"""GRPO: group-normalised advantages and the clipped policy-gradient loss with optional KL.

Follows verl's ``core_algos.py`` and TRL's ``grpo_trainer.py`` as summarised in
``shared/research/gad_spin_grpo.md`` §3. GAD's generator update is this loss with the discriminator's
scores as rewards (G = 8, token-mean, ε = 0.2, k3 KL with coefficient 1e-3).

Per-token arrays are [B, T] aligned with the logits (see ``sgalm_jax.losses.common``); ``mask`` marks
the response tokens.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from sgalm_jax.errors import ConfigError, SgalmError
from sgalm_jax.losses.common import Array, Metrics, as_f32, mask_or_ones, masked_mean, masked_std
from sgalm_jax.losses.registry import register_loss

__all__ = ["group_advantages", "kl_penalty", "aggregate_token_loss", "grpo_loss", "LOSS_AGG_MODES", "KL_ESTIMATORS"]

LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
ADV_SCALES = ("group", "batch", "none")


def group_advantages(
    rewards: Array,
    *,
    group_size: Optional[int] = None,
    scale: str = "group",
    eps: float = 1e-6,
    mask: Optional[Array] = None,
) -> Array:
    """GRPO advantages ``A_i = (r_i − mean_group r) / (std_group r + eps)``.

    Args:
      rewards: [P, G] (P prompts × G samples) or flat [P·G] with ``group_size=G`` (consecutive
        entries form a group); the output has the input's shape.
      scale: ``"group"`` (default; Bessel-corrected group std, as verl and TRL), ``"batch"`` (group
        mean, std over the whole batch: TRL ``scale_rewards="batch"``), ``"none"`` (Dr.GRPO: no
        division, ``r − mean``).
      eps: verl uses 1e-6, TRL 1e-4.
      mask: same shape as rewards; 0 for completions that could not be scored (left out of the
        baseline, advantage 0; TRL's NaN handling).
    A group with a single valid sample gets mean 0 and std 1 (verl's convention), i.e. A = r.
    Groups whose rewards are all equal get A = 0 everywhere: zero loss and zero gradient.
    The result is detached: advantages are constants of the policy loss.
    """
    if scale not in ADV_SCALES:
        raise ConfigError(f"group_advantages scale={scale!r}: expected one of {ADV_SCALES}")
    r = as_f32(rewards)
    shape = r.shape
    if r.ndim == 1:
        if group_size is None:
            raise SgalmError("group_advantages: flat rewards need group_size")
        if shape[0] % group_size:
            raise SgalmError(f"group_advantages: {shape[0]} rewards are not divisible by group_size={group_size}")
        r = r.reshape(-1, group_size)
    elif r.ndim != 2:
        raise SgalmError(f"group_advantages: rewards must be [P, G] or flat, got {shape}")
    m = mask_or_ones(None if mask is None else as_f32(mask).reshape(r.shape), r)
    n = jnp.sum(m, axis=1)
    mean = jnp.sum(r * m, axis=1) / jnp.maximum(n, 1.0)
    var = jnp.sum(m * (r - mean[:, None]) ** 2, axis=1) / jnp.maximum(n - 1.0, 1.0)
    single = n <= 1.0
    mean = jnp.where(single, 0.0, mean)
    std = jnp.where(single, 1.0, jnp.sqrt(var))
    if scale == "batch":
        std = jnp.full_like(std, masked_std(r, m, ddof=1))
    centred = r - mean[:, None]
    adv = centred if scale == "none" else centred / (std[:, None] + eps)
    # Detached: rewards come from a fixed scorer; the advantage is a per-sample constant.
    return jax.lax.stop_gradient((adv * m).reshape(shape))


def kl_penalty(logprobs: Array, ref_logprobs: Array, estimator: str = "k3") -> Array:
    """Per-token KL(π_θ ‖ π_ref) estimate from sampled tokens (Schulman's k1/k2/k3).

    k1 = logπ − logπ_ref; k2 = ½(logπ − logπ_ref)²; k3 = exp(d) − d − 1 with d = logπ_ref − logπ
    (non-negative, low variance; verl's ``low_var_kl``: d clamped to ±20 and the value to [−10, 10]).
    """
    if estimator not in KL_ESTIMATORS:
        raise ConfigError(f"kl estimator {estimator!r}: expected one of {KL_ESTIMATORS}")
    lp = as_f32(logprobs)
    # Detached: the reference model is frozen.
    ref = jax.lax.stop_gradient(as_f32(ref_logprobs))
    if estimator == "k1":
        return lp - ref
    if estimator == "k2":
        return 0.5 * (lp - ref) ** 2
    d = jnp.clip(ref - lp, -20.0, 20.0)
    return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)


def aggregate_token_loss(
    token_loss: Array, mask: Array, mode: str = "token_mean", *, max_response_len: Optional[int] = None
) -> Array:
    """Reduce a [B, T] per-token loss to a scalar (gad_spin_grpo.md §3.1).

    - ``token_mean`` (DAPO / verl default / TRL ``dapo`` per batch): Σ loss / Σ mask.
    - ``seq_mean_token_mean`` (original GRPO, TRL ``grpo``): mean over sequences of token means;
      length-biased.
    - ``seq_mean_token_sum``: mean over sequences of token sums.
    - ``seq_mean_token_sum_norm`` (Dr.GRPO): Σ loss / (B · max_response_len); ``max_response_len``
      defaults to T.
    """
    if mode not in LOSS_AGG_MODES:
        raise ConfigError(f"loss_agg={mode!r}: expected one of {LOSS_AGG_MODES}")
    m = as_f32(mask)
    lm = as_f32(token_loss) * m
    if mode == "token_mean":
        return jnp.sum(lm) / jnp.maximum(jnp.sum(m), 1.0)
    per_seq = jnp.sum(lm, axis=-1)
    n = jnp.sum(m, axis=-1)
    if mode == "seq_mean_token_mean":
        has = (n > 0).astype(jnp.float32)
        return jnp.sum(has * per_seq / jnp.maximum(n, 1.0)) / jnp.maximum(jnp.sum(has), 1.0)
    if mode == "seq_mean_token_sum":
        return jnp.mean(per_seq)
    length = float(max_response_len if max_response_len is not None else lm.shape[-1])
    return jnp.sum(lm) / (lm.shape[0] * length)


@register_loss("grpo", family="policy_gradient")
def grpo_loss(
    logprobs: Array,
    old_logprobs: Optional[Array],
    advantages: Array,
    mask: Array,
    *,
    ref_logprobs: Optional[Array] = None,
    clip_eps: float = 0.2,
    clip_eps_high: Optional[float] = None,
    clip_ratio_c: Optional[float] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    loss_agg: str = "token_mean",
    max_response_len: Optional[int] = None,
    logratio_clamp: float = 20.0,
    kl_bias_correction: bool = False,
) -> Tuple[Array, Metrics]:
    """PPO-clipped GRPO policy loss with optional KL-to-reference, per token then aggregated.

    Args:
      logprobs: [B, T] log π_θ of the sampled tokens (carries the gradient).
      old_logprobs: [B, T] log π_old from the sampler / before the update (detached). ``None`` means
        one on-policy step: π_old = stop_gradient(π_θ), so the ratio is 1 but the gradient is not 0.
      advantages: [B] (broadcast over tokens) or [B, T]; detached (see :func:`group_advantages`).
      mask: [B, T] response tokens.
      ref_logprobs: [B, T] log π_ref (detached); used when ``kl_coef != 0``.
      clip_eps / clip_eps_high: ratio clipped to [1 − clip_eps, 1 + (clip_eps_high or clip_eps)]
        (DAPO's clip-higher suggests 0.28).
      clip_ratio_c: dual-clip bound for negative advantages (verl uses 3.0); None disables it.
      kl_coef, kl_estimator: ``kl_coef · KL`` added to the per-token loss before aggregation (verl
        ``use_kl_loss`` / TRL ``beta``); k3 is verl's ``low_var_kl``.
      loss_agg: see :func:`aggregate_token_loss`.
      logratio_clamp: |log π_θ − log π_old| is clamped to this before exp (verl: 20).
      kl_bias_correction: multiply the per-token KL by the importance ratio ρ (not detached, not
        clipped), which makes the KL estimate unbiased under samples from π_old (TRL's
        ``use_bias_correction_kl``, default False there too; DeepSeek-V3.2). With π_old = π_θ
        (one on-policy update) ρ = 1 in value but the gradient gains the ρ term.

    Per-token loss: ``max(−A·ρ, −A·clip(ρ))`` (the negated PPO minimum), ρ = exp(logπ_θ − logπ_old).
    Metrics: ``pg_loss``, ``kl``, ``clip_frac``, ``ratio_mean``, ``approx_kl_old``, ``adv_mean``.
    """
    lp = as_f32(logprobs)
    m = as_f32(mask)
    # Detached: the behaviour policy and the advantages are fixed for this update.
    old = jax.lax.stop_gradient(lp if old_logprobs is None else as_f32(old_logprobs))
    adv = jax.lax.stop_gradient(as_f32(advantages))
    if adv.ndim == 1:
        adv = adv[:, None]
    adv = jnp.broadcast_to(adv, lp.shape)
    log_ratio = jnp.clip(lp - old, -logratio_clamp, logratio_clamp)
    ratio = jnp.exp(log_ratio)
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + hi)
    pg = jnp.maximum(pg1, pg2)
    if clip_ratio_c is not None:
        if isinstance(clip_ratio_c, (int, float)) and not clip_ratio_c > 1.0:
            raise ConfigError(f"grpo clip_ratio_c={clip_ratio_c} must be > 1")
        pg = jnp.where(adv < 0, jnp.minimum(pg, -adv * clip_ratio_c), pg)
    pg_loss = aggregate_token_loss(pg, m, loss_agg, max_response_len=max_response_len)
    loss = pg_loss
    kl_val = jnp.float32(0.0)
    # kl_coef may be traced (e.g. a schedule); only a literal 0 skips the KL computation.
    if ref_logprobs is not None and not (isinstance(kl_coef, (int, float)) and kl_coef == 0.0):
        kl_tok = kl_penalty(lp, ref_logprobs, kl_estimator)
        if kl_bias_correction:
            kl_tok = kl_tok * ratio
        kl_val = aggregate_token_loss(kl_tok, m, loss_agg, max_response_len=max_response_len)
        loss = loss + kl_coef * kl_val
    sg = jax.lax.stop_gradient  # metrics are diagnostics only
    metrics = {
        "loss": loss,
        "pg_loss": sg(pg_loss),
        "kl": sg(kl_val),
        "clip_frac": masked_mean((sg(pg2) > sg(pg1)).astype(jnp.float32), m),
        "ratio_mean": masked_mean(sg(ratio), m),
        "approx_kl_old": masked_mean(0.5 * sg(log_ratio) ** 2, m),
        "adv_mean": masked_mean(adv, m),
    }
    return loss, metrics
