"""Self-play losses as pure functions of per-sequence log-probs: SPIN, IRIS (Rényi order α), SPACE, SPIF.

Every loss here follows one calling convention (registry family ``"selfplay"``)::

    loss, metrics = fn(policy_real, policy_syn, ref_real, ref_syn, *, real_mask=None, syn_mask=None, **hp)

- ``policy_real`` [B]: ℓ_θ(x, y), summed response log-probs of the real (annotated) responses under the
  policy being trained (carries the gradient).
- ``policy_syn`` [B] or [B, K]: ℓ_θ(x, y') of synthetic responses y' ~ π_θt (K per prompt allowed).
- ``ref_real`` / ``ref_syn``: the same under the frozen opponent θ_t (the previous iterate), computed once
  per iteration. They are ``stop_gradient``'ed here whatever the caller passes.
- ``real_mask`` / ``syn_mask``: 0 marks padding rows (fixed batch shapes under jit).

The implicit reward is the log-ratio r = ℓ_θ − ℓ_t (algorithms.md §0). Provenance, using the tags of
``shared/research/algorithms.md``: SPIN is from the official code [CODE]; SPACE's formula is from two
secondary paper notes [SEC]; IRIS's loss (§4.2), its α schedule (§4.3) and SPIF's loss (§3.2) are
reconstructions [INF] — design proposals consistent with the papers' abstracts, not the papers' losses.
See ``docs/selfplay.md``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import jax
import jax.numpy as jnp

from sgalm_jax.errors import ConfigError, SgalmError
from sgalm_jax.losses.common import (
    Array,
    Metrics,
    as_f32,
    effective_sample_size,
    mask_or_ones,
    masked_mean,
)
from sgalm_jax.losses.preference import dpo_loss
from sgalm_jax.losses.registry import register_loss

__all__ = [
    "spin_loss",
    "iris_loss",
    "space_loss",
    "spif_loss",
    "tilted_mean",
    "iris_limit_loss",
    "constant_alpha",
    "linear_alpha",
    "cosine_alpha",
    "adaptive_alpha",
    "logratio_gap",
    "likelihood_gap",
    "make_alpha_schedule",
    "ALPHA_SCHEDULES",
]

Scalar = Union[float, Array]


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _prepare(policy_real, policy_syn, ref_real, ref_syn, real_mask, syn_mask):
    pr, ps = as_f32(policy_real), as_f32(policy_syn)
    # Detached: θ_t is the frozen opponent/reference for the whole iteration; its log-probs are
    # constants of the objective even if a caller computed them from the same params.
    rr = jax.lax.stop_gradient(as_f32(ref_real))
    rs = jax.lax.stop_gradient(as_f32(ref_syn))
    if pr.shape != rr.shape or ps.shape != rs.shape:
        raise SgalmError(
            f"selfplay loss: policy/reference shapes differ: real {pr.shape} vs {rr.shape}, "
            f"synthetic {ps.shape} vs {rs.shape}"
        )
    return pr - rr, ps - rs, mask_or_ones(real_mask, pr), mask_or_ones(syn_mask, ps)


def _reward_metrics(g_real: Array, g_syn: Array, mr: Array, ms: Array) -> Metrics:
    """Detached diagnostics of the scaled rewards g = β·r on real and synthetic responses.

    ``accuracy`` is the fraction of (real, synthetic) pairs with real reward > synthetic reward: pairs
    are per prompt when the leading dims agree (syn [B] or [B, K] against real [B]), otherwise all
    cross pairs (an AUC).
    """
    gr, gs = jax.lax.stop_gradient(g_real), jax.lax.stop_gradient(g_syn)
    if gr.ndim == 1 and gs.shape[:1] == gr.shape:
        gr_b = gr.reshape(gr.shape + (1,) * (gs.ndim - 1))
        mr_b = mr.reshape(mr.shape + (1,) * (ms.ndim - 1))
        pair_m = mr_b * ms
        acc = masked_mean((gr_b > gs).astype(jnp.float32), pair_m)
    else:
        fr, fs, fmr, fms = gr.reshape(-1), gs.reshape(-1), mr.reshape(-1), ms.reshape(-1)
        acc = masked_mean((fr[:, None] > fs[None, :]).astype(jnp.float32), fmr[:, None] * fms[None, :])
    real_reward, syn_reward = masked_mean(gr, mr), masked_mean(gs, ms)
    return {
        "real_reward": real_reward,
        "syn_reward": syn_reward,
        "margin": real_reward - syn_reward,
        "accuracy": acc,
    }


def _check_positive(name: str, value) -> None:
    if isinstance(value, (int, float)) and not value > 0:
        raise ConfigError(f"selfplay loss: {name}={value!r} must be > 0")


# ---------------------------------------------------------------------------------------------
# SPIN [CODE]
# ---------------------------------------------------------------------------------------------


@register_loss("spin", family="selfplay")
def spin_loss(
    policy_real: Array,
    policy_syn: Array,
    ref_real: Array,
    ref_syn: Array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    real_mask: Optional[Array] = None,
    syn_mask: Optional[Array] = None,
) -> Tuple[Array, Metrics]:
    """SPIN (Chen et al., ICML 2024), exactly as ``uclaml/SPIN`` ``spin_loss`` [CODE].

    ``z = β·((ℓθ(y) − ℓθ(y')) − (ℓt(y) − ℓt(y')))``; ``"sigmoid"`` (alias ``"logistic"``):
    ``mean −log σ(z)``; ``"hinge"``: ``mean max(0, 1 − z)``. This is DPO with chosen = real,
    rejected = synthetic, reference = previous iterate. At θ = θ_t the sigmoid loss is log 2.
    Metrics: ``real_reward``/``syn_reward`` (β·r, detached as in SPIN's logging), ``margin``,
    ``accuracy`` (real reward > synthetic reward), ``logp_real``/``logp_syn``.
    """
    if loss_type == "logistic":
        loss_type = "sigmoid"
    return dpo_loss(
        policy_real, policy_syn, ref_real, ref_syn, beta=beta, loss_type=loss_type,
        real_mask=real_mask, syn_mask=syn_mask,
    )


# ---------------------------------------------------------------------------------------------
# IRIS [INF reconstruction, algorithms.md §4.2]
# ---------------------------------------------------------------------------------------------


def tilted_mean(
    t: Scalar, g: Array, mask: Optional[Array] = None, *, series_eps: float = 1e-3, series_tol: float = 1e-2
) -> Array:
    """Tilted mean ``T(t; g) = (1/t)·log mean_i exp(t·g_i)``, continuous at ``t = 0`` (= mean g).

    This is TERM's tilted empirical risk (Li et al. 2021). Computed on the centred values
    ``c = g − mean(g)`` as ``mean(g) + K(t)/t`` with the cumulant-generating function
    ``K(t) = M + log1p(mean(expm1(t·c − M)))``, ``M = max(t·c, 0)``: no overflow for any t·c, and no
    cancellation for small t (expm1/log1p keep the O(t²) content of K). When ``|t| < series_eps``
    *and* ``|t|·max|c| < series_tol`` (always true at t = 0) the cumulant series
    ``mean + t·κ2/2 + t²·κ3/6`` is used instead; both forms agree there to O((t·max|c|)³·max|c|).
    ``t`` may be a traced scalar (the branch is a ``jnp.where``, safe for gradients).
    """
    m = mask_or_ones(mask, g)
    g = jnp.where(m != 0, as_f32(g), 0.0)  # padding rows may hold anything; keep them out
    t = as_f32(t)
    mean = masked_mean(g, m)
    c = (g - mean) * m
    cmax = jnp.max(jnp.abs(c))
    k2 = masked_mean(c**2, m)
    k3 = masked_mean(c**3, m)
    series = mean + t * k2 / 2.0 + t * t * k3 / 6.0
    use_series = (t == 0) | ((jnp.abs(t) < series_eps) & (jnp.abs(t) * cmax < series_tol))
    # Double-where: the unused branch gets a harmless t so its gradient is finite (no 1/0).
    t_safe = jnp.where(use_series, 1.0, t)
    x = t_safe * c
    big_m = jnp.max(x * m)  # >= 0 up to rounding since mean(c) = 0; any M >= max(x) is exact
    k = big_m + jnp.log1p(masked_mean(jnp.expm1(x - big_m), m))
    direct = mean + k / t_safe
    return jnp.where(use_series, series, direct)


def iris_limit_loss(g_real: Array, g_syn: Array, real_mask=None, syn_mask=None) -> Array:
    """IRIS at α = 1 exactly (Donsker–Varadhan bound on KL): ``−mean g_real + log mean exp(g_syn)``."""
    gs = as_f32(g_syn)
    ms = mask_or_ones(syn_mask, gs)
    lse = jax.nn.logsumexp(jnp.where(ms > 0, gs, -1e30).reshape(-1))
    return -masked_mean(g_real, real_mask) + lse - jnp.log(jnp.maximum(jnp.sum(ms), 1.0))


@register_loss("iris", family="selfplay")
def iris_loss(
    policy_real: Array,
    policy_syn: Array,
    ref_real: Array,
    ref_syn: Array,
    *,
    alpha: Scalar = 1.0,
    beta: float = 1.0,
    real_mask: Optional[Array] = None,
    syn_mask: Optional[Array] = None,
    series_eps: float = 1e-3,
) -> Tuple[Array, Metrics]:
    """IRIS: Rényi-α variational objective as two tilted risks. **Reconstruction [INF]** (§4.2).

    With critic ``g = β·r`` (r = ℓθ − ℓt), P = data, Q = π_θt, the Rényi-α Donsker–Varadhan-style
    bound (Birrell et al.) gives the loss (the negated bound, minimised by the main player)::

        L(α) = −(α/(α−1))·log Ê_real[exp((α−1)·g)] + log Ê_syn[exp(α·g)]
             = α·[ T(α; g_syn) − T(α−1; g_real) ],     T(t; g) = (1/t)·log mean exp(t·g)

    Gradient: ``αβ·[−Σ_i w_i ∇ℓθ(y_i) + Σ_j v_j ∇ℓθ(y'_j)]`` with importance weights
    ``w = softmax((α−1)·g_real)`` and ``v = softmax(α·g_syn)`` over the (masked, pooled) batch.
    At θ = θ_t (g ≡ 0) the weights are uniform and ``∇L = αβ·(mean ∇ℓ_syn − mean ∇ℓ_real)``.

    Regimes: α → 1 is the KL / Donsker–Varadhan limit ``−mean g_real + log mean exp(g_syn)``
    (SPIN-like), handled continuously by :func:`tilted_mean`; α = 2 is Rényi-2 = log(1 + χ²), the
    SPIF / χ² regime; α = 1/2 (the symmetric order) is *our guess* for the JS / SPACE-like regime.
    Larger α concentrates real-data weight on high-reward (under-covered) samples: mode covering;
    α < 1 flips it toward low-reward samples: mode seeking.

    ``alpha`` may be a Python float (must be > 0) or a traced scalar (e.g. from an adaptive schedule;
    pass it as an array to avoid a recompile per value). Weights pool over the whole batch (all B·K
    synthetic samples); per-prompt pooling is an open question in the notes.
    Metrics: rewards/margin/accuracy, ``ess_real``/``ess_syn`` (normalised effective sample size of
    w and v), ``renyi_bound`` (= −loss, the batch estimate of the bound), ``alpha``.
    """
    _check_positive("alpha", alpha)
    r_real, r_syn, mr, ms = _prepare(policy_real, policy_syn, ref_real, ref_syn, real_mask, syn_mask)
    a = as_f32(alpha)
    g_real, g_syn = beta * r_real, beta * r_syn
    t_real = tilted_mean(a - 1.0, g_real, mr, series_eps=series_eps)
    t_syn = tilted_mean(a, g_syn, ms, series_eps=series_eps)
    loss = a * (t_syn - t_real)
    metrics = _reward_metrics(g_real, g_syn, mr, ms)
    gr_d, gs_d = jax.lax.stop_gradient(g_real), jax.lax.stop_gradient(g_syn)  # diagnostics only
    metrics.update(
        {
            "loss": loss,
            "renyi_bound": -jax.lax.stop_gradient(loss),
            "ess_real": effective_sample_size((a - 1.0) * gr_d, mr),
            "ess_syn": effective_sample_size(a * gs_d, ms),
            "alpha": a,
        }
    )
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# SPACE [SEC formula] and SPIF [INF candidate]
# ---------------------------------------------------------------------------------------------


@register_loss("space", family="selfplay")
def space_loss(
    policy_real: Array,
    policy_syn: Array,
    ref_real: Array,
    ref_syn: Array,
    *,
    mu: float = 1.0,
    beta: float = 1.0,
    real_mask: Optional[Array] = None,
    syn_mask: Optional[Array] = None,
) -> Tuple[Array, Metrics]:
    """SPACE (Wang et al., NeurIPS 2025): noise-contrastive self-play. Formula [SEC], algorithms.md §2.1.

    ``L = E_real[softplus(log μ − g)] + μ·E_syn[softplus(g − log μ)]``, ``g = β·r``
    (= −E_real log σ_μ(g) − μ·E_syn log σ_{1/μ}(−g), σ_μ(z) = 1/(1 + μe^{−z})).
    NCE with model π_θ, noise π_θt and μ noise samples per data sample; P(real | y) = σ(g − log μ).
    Each response type is fitted to an absolute target, so the loss does not collapse when y' ≈ y.
    ``μ·E_syn`` is estimated by μ × the mean over all synthetic samples, which equals the notes'
    "mean over prompts of the sum over K = μ samples" when K = μ. The secondary notes apply no scale,
    so ``beta`` defaults to 1. At r = 0 the loss is log(1+μ) + μ·log(1+1/μ) (2·log 2 at μ = 1).
    """
    _check_positive("mu", mu)
    r_real, r_syn, mr, ms = _prepare(policy_real, policy_syn, ref_real, ref_syn, real_mask, syn_mask)
    log_mu = jnp.log(as_f32(mu))
    g_real, g_syn = beta * r_real, beta * r_syn
    loss_real = masked_mean(jax.nn.softplus(log_mu - g_real), mr)
    loss_syn = mu * masked_mean(jax.nn.softplus(g_syn - log_mu), ms)
    loss = loss_real + loss_syn
    metrics = _reward_metrics(g_real, g_syn, mr, ms)
    p_real = jax.nn.sigmoid(jax.lax.stop_gradient(g_real) - log_mu)  # diagnostics only
    p_syn = jax.nn.sigmoid(jax.lax.stop_gradient(g_syn) - log_mu)
    metrics.update(
        {
            "loss": loss,
            "loss_real": loss_real,
            "loss_syn": loss_syn,
            "p_real_on_real": masked_mean(p_real, mr),
            "p_real_on_syn": masked_mean(p_syn, ms),
        }
    )
    return loss, metrics


@register_loss("spif", family="selfplay")
def spif_loss(
    policy_real: Array,
    policy_syn: Array,
    ref_real: Array,
    ref_syn: Array,
    *,
    beta: float = 0.1,
    c: float = 1.0,
    form: str = "mixture",
    real_mask: Optional[Array] = None,
    syn_mask: Optional[Array] = None,
) -> Tuple[Array, Metrics]:
    """χ²-regularised self-play (SPIF). **Candidate loss, reconstruction [INF]** (algorithms.md §3.2).

    The real SPIF loss (arXiv 2602.01357) was not recovered; verify against the paper before using it
    as a baseline. With g = β·r:

    - ``form="mixture"`` (default; Pearson-χ² on the data/synthetic mixture, as LS-IQ)::

          L = −E_real[g] + E_syn[g] + (c/2)·(E_real[g²] + E_syn[g²])

      ≡ least squares of g onto +1/c (real) and −1/c (synthetic); the pointwise optimum
      g* = (p_data − π_t)/(c·(p_data + π_t)) is bounded in [−1/c, 1/c] ("bounded rewards").
    - ``form="plain"`` (plain χ² variational form): ``L = −E_real[g] + E_syn[g + g²/4]``.

    β (default 0.1, SPIN's scale) and c (default 1) are unknown in the paper.
    """
    if form not in ("mixture", "plain"):
        raise ConfigError(f"spif form={form!r}: expected 'mixture' or 'plain'")
    _check_positive("c", c)
    r_real, r_syn, mr, ms = _prepare(policy_real, policy_syn, ref_real, ref_syn, real_mask, syn_mask)
    g_real, g_syn = beta * r_real, beta * r_syn
    if form == "mixture":
        loss = (
            -masked_mean(g_real, mr)
            + masked_mean(g_syn, ms)
            + 0.5 * c * (masked_mean(g_real**2, mr) + masked_mean(g_syn**2, ms))
        )
    else:
        loss = -masked_mean(g_real, mr) + masked_mean(g_syn + 0.25 * g_syn**2, ms)
    metrics = _reward_metrics(g_real, g_syn, mr, ms)
    metrics["loss"] = loss
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# α schedules (IRIS). Direction [SEC]: α large when the gap is large, decreasing near convergence.
# Formulas [INF]: the paper's f and gap estimator were not recovered (algorithms.md §4.3).
# ---------------------------------------------------------------------------------------------

ALPHA_SCHEDULES = ("constant", "linear", "cosine", "adaptive")


def constant_alpha(step: Scalar, *, alpha: float = 1.0) -> Array:
    """α(t) = alpha."""
    return jnp.full((), alpha, jnp.float32) + 0.0 * as_f32(step)


def _progress(step: Scalar, num_steps: int) -> Array:
    return jnp.clip(as_f32(step) / max(float(num_steps), 1.0), 0.0, 1.0)


def linear_alpha(step: Scalar, *, start: float = 2.0, end: float = 0.5, num_steps: int = 4) -> Array:
    """α(t) = start + (end − start)·min(t / num_steps, 1)."""
    return start + (end - start) * _progress(step, num_steps)


def cosine_alpha(step: Scalar, *, start: float = 2.0, end: float = 0.5, num_steps: int = 4) -> Array:
    """α(t) = end + (start − end)·(1 + cos(π·min(t / num_steps, 1)))/2."""
    return end + (start - end) * 0.5 * (1.0 + jnp.cos(math.pi * _progress(step, num_steps)))


def adaptive_alpha(
    gap: Scalar, *, alpha_min: float = 0.5, alpha_max: float = 2.0, gap_scale: float = 1.0
) -> Array:
    """α = α_min + (α_max − α_min)·tanh(max(gap, 0) / gap_scale). [INF placeholder, §4.3]

    Monotone in the measured gap (as the paper states): a large real-vs-synthetic gap gives α near
    α_max (sharp, mode-covering weights); a vanishing gap gives α_min (smooth, mode-seeking).
    ``gap`` comes from :func:`logratio_gap` or :func:`likelihood_gap`; update once per iteration.
    """
    _check_positive("gap_scale", gap_scale)
    return alpha_min + (alpha_max - alpha_min) * jnp.tanh(jnp.maximum(as_f32(gap), 0.0) / gap_scale)


def _per_token(x: Array, n: Optional[Array]) -> Array:
    return as_f32(x) if n is None else as_f32(x) / jnp.maximum(as_f32(n), 1.0)


def logratio_gap(
    policy_real: Array,
    policy_syn: Array,
    ref_real: Array,
    ref_syn: Array,
    *,
    beta: float = 1.0,
    real_num_tokens: Optional[Array] = None,
    syn_num_tokens: Optional[Array] = None,
    real_mask: Optional[Array] = None,
    syn_mask: Optional[Array] = None,
) -> Array:
    """D̂ = mean_real β·r/|y| − mean_syn β·r'/|y'| (per token when token counts are given). [INF]

    The default gap for :func:`adaptive_alpha`: measured on held-out pairs at the *end* of
    iteration t−1 (θ = the freshly trained iterate, reference = its predecessor), it is how far the
    last iteration could still separate real from synthetic responses. It shrinks toward 0 as
    π_θt approaches p_data, so α_t decreases near convergence.
    """
    r_real, r_syn, mr, ms = _prepare(policy_real, policy_syn, ref_real, ref_syn, real_mask, syn_mask)
    gap = masked_mean(beta * _per_token(r_real, real_num_tokens), mr) - masked_mean(
        beta * _per_token(r_syn, syn_num_tokens), ms
    )
    return jax.lax.stop_gradient(gap)  # a schedule input, never a training signal


def likelihood_gap(
    ref_real: Array,
    ref_syn: Array,
    *,
    real_num_tokens: Optional[Array] = None,
    syn_num_tokens: Optional[Array] = None,
    real_mask: Optional[Array] = None,
    syn_mask: Optional[Array] = None,
) -> Array:
    """D̂ = mean_syn ℓt(y')/|y'| − mean_real ℓt(y)/|y| under θ_t, before iteration t. [INF]

    Costs no extra forward pass (the reference log-probs are computed once per iteration anyway).
    Positive when the opponent prefers its own samples to the data, per token; it estimates
    H(p_data) + KL(p_data‖π_t) − H(π_t), a proxy for the distribution gap, not a divergence.
    """
    rr, rs = jax.lax.stop_gradient(as_f32(ref_real)), jax.lax.stop_gradient(as_f32(ref_syn))
    return masked_mean(_per_token(rs, syn_num_tokens), syn_mask) - masked_mean(
        _per_token(rr, real_num_tokens), real_mask
    )


def make_alpha_schedule(kind: str = "constant", **kwargs) -> Callable[..., Array]:
    """Build ``schedule(step, gap=None) -> α`` from a config.

    kind: ``"constant"`` (alpha), ``"linear"`` / ``"cosine"`` (start, end, num_steps; step = iteration
    index), ``"adaptive"`` (alpha_min, alpha_max, gap_scale; needs ``gap``).
    """
    if kind not in ALPHA_SCHEDULES:
        raise ConfigError(f"alpha schedule {kind!r}: expected one of {ALPHA_SCHEDULES}")
    fn = {"constant": constant_alpha, "linear": linear_alpha, "cosine": cosine_alpha}.get(kind)
    try:
        if fn is not None:
            fn(0, **kwargs)  # validate keyword names now, not inside a jitted loop
        else:
            adaptive_alpha(0.0, **kwargs)
    except TypeError as e:
        raise ConfigError(f"alpha schedule {kind!r}: bad arguments {sorted(kwargs)}: {e}") from None

    def schedule(step: Scalar, gap: Optional[Scalar] = None) -> Array:
        if fn is not None:
            return fn(step, **kwargs)
        if gap is None:
            raise SgalmError("adaptive alpha schedule needs the measured gap (logratio_gap / likelihood_gap)")
        return adaptive_alpha(gap, **kwargs)

    return schedule
