"""SPIN / IRIS / SPACE / SPIF: formulas vs independent references, limits, gradients, extremes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgalm_jax.errors import ConfigError, SgalmError
from sgalm_jax.losses import (
    adaptive_alpha,
    cosine_alpha,
    get_loss,
    iris_limit_loss,
    iris_loss,
    likelihood_gap,
    linear_alpha,
    logratio_gap,
    make_alpha_schedule,
    space_loss,
    spif_loss,
    spin_loss,
)

N = 6

# Jitted entry points: one compile per loss instead of one per eager op (and jit-compatibility for free).
_spin = jax.jit(spin_loss, static_argnames=("loss_type",))
_iris = jax.jit(iris_loss)
_space = jax.jit(space_loss)
_spif = jax.jit(spif_loss, static_argnames=("form",))


def _batch(seed=0, scale=5.0):
    rng = np.random.default_rng(seed)
    pr, ps, rr, rs = (jnp.asarray(rng.normal(size=N) * scale - 50, jnp.float32) for _ in range(4))
    return pr, ps, rr, rs


# ------------------------------------------------------------------ SPIN == DPO


def test_spin_equals_dpo_sigmoid_and_hinge():
    pr, ps, rr, rs = _batch(0)
    beta = 0.1
    # DPO written independently: chosen = real, rejected = synthetic, reference = previous iterate.
    z = beta * ((pr - rr) - (ps - rs))
    dpo = jnp.mean(-jax.nn.log_sigmoid(z))
    hinge = jnp.mean(jnp.maximum(0.0, 1.0 - z))
    loss, m = jax.jit(functools.partial(spin_loss, beta=beta))(pr, ps, rr, rs)
    np.testing.assert_allclose(loss, dpo, rtol=1e-6)
    np.testing.assert_allclose(_spin(pr, ps, rr, rs, beta=beta, loss_type="hinge")[0], hinge, rtol=1e-6)
    np.testing.assert_allclose(m["accuracy"], np.mean(np.asarray(z) > 0))
    np.testing.assert_allclose(m["margin"], np.mean(np.asarray(z)), rtol=1e-5)
    # gradients agree too (reference detached inside spin_loss, so grad wrt ref is 0)
    g_spin = jax.jit(jax.grad(lambda a, b: spin_loss(a, b, rr, rs, beta=beta)[0], argnums=(0, 1)))(pr, ps)
    g_dpo = jax.jit(jax.grad(lambda a, b: jnp.mean(-jax.nn.log_sigmoid(beta * ((a - rr) - (b - rs)))), argnums=(0, 1)))(pr, ps)
    for a, b in zip(g_spin, g_dpo):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    assert np.all(jax.jit(jax.grad(lambda r: spin_loss(pr, ps, r, rs)[0]))(rr) == 0)
    # at theta = theta_t the logistic loss is log 2
    np.testing.assert_allclose(_spin(rr, rs, rr, rs)[0], np.log(2.0), rtol=1e-6)


# ------------------------------------------------------------------ IRIS


def _iris_f64(pr, ps, rr, rs, alpha, beta=1.0):
    gr = beta * (np.asarray(pr, np.float64) - np.asarray(rr, np.float64))
    gs = beta * (np.asarray(ps, np.float64) - np.asarray(rs, np.float64))

    def lme(x):
        m = x.max()
        return m + np.log(np.mean(np.exp(x - m)))

    if alpha == 1.0:
        return -gr.mean() + lme(gs)
    return -(alpha / (alpha - 1.0)) * lme((alpha - 1.0) * gr) + lme(alpha * gs)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.9, 1.0, 1.5, 2.0, 4.0])
def test_iris_matches_float64_direct(alpha):
    pr, ps, rr, rs = _batch(1, scale=1.0)
    loss, _ = _iris(pr, ps, rr, rs, alpha=alpha, beta=0.7)
    np.testing.assert_allclose(loss, _iris_f64(pr, ps, rr, rs, alpha, 0.7), rtol=2e-5, atol=2e-5)


def test_iris_continuous_across_alpha_one():
    pr, ps, rr, rs = _batch(2, scale=1.0)
    f = jax.jit(lambda a: iris_loss(pr, ps, rr, rs, alpha=a)[0])
    limit = float(iris_limit_loss(pr - rr, ps - rs))
    np.testing.assert_allclose(f(1.0), limit, rtol=1e-6)
    np.testing.assert_allclose(limit, _iris_f64(pr, ps, rr, rs, 1.0), rtol=1e-5)
    for a in (1 - 1e-4, 1 + 1e-4, 1 - 1e-3, 1 + 1e-3, 1 - 1e-6, 1 + 1e-6):
        val = float(f(jnp.float32(a)))
        np.testing.assert_allclose(val, _iris_f64(pr, ps, rr, rs, np.float64(np.float32(a))), atol=5e-5)
        assert abs(val - limit) < 5 * abs(a - 1) + 1e-5  # Lipschitz across 1: no jump at the switch
    # in jax's float64 mode the same code is exact to ~1e-12 on both sides of 1 and at the limit
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (pr, ps, rr, rs)]
        f64 = jax.jit(lambda a, *xs: iris_loss(*xs, alpha=a)[0])
        for a in (1 - 1e-4, 1.0, 1 + 1e-4, 1 + 1e-2, 2.0):
            v64 = f64(jnp.float64(a), *args)
            assert v64.dtype == jnp.float64
            np.testing.assert_allclose(v64, _iris_f64(*args, a), rtol=1e-10, atol=1e-10)


def test_iris_uniform_weights_when_policy_equals_reference():
    _, _, rr, rs = _batch(3)
    for a in (0.5, 1.0, 2.0):
        loss, m = _iris(rr, rs, rr, rs, alpha=a)
        np.testing.assert_allclose(loss, 0.0, atol=1e-6)
        np.testing.assert_allclose(m["ess_real"], 1.0, rtol=1e-6)
        np.testing.assert_allclose(m["ess_syn"], 1.0, rtol=1e-6)
    # away from theta_t the weights sharpen (ESS drops) as alpha grows
    pr, ps, _, _ = _batch(4, scale=2.0)
    ess = [float(_iris(pr, ps, rr, rs, alpha=a)[1]["ess_syn"]) for a in (0.5, 1.0, 2.0, 4.0)]
    assert all(x > y for x, y in zip(ess, ess[1:])), ess


def _tiny_policy():
    """A log-linear 'policy' over a 5-token vocabulary: log p(y) = sum_k log softmax(theta)[y_k]."""
    rng = np.random.default_rng(5)
    real = jnp.asarray(rng.integers(0, 5, size=(N, 4)))
    syn = jnp.asarray(rng.integers(0, 5, size=(N, 4)))

    def logp(theta, seqs):
        return jnp.sum(jax.nn.log_softmax(theta)[seqs], axis=-1)

    return logp, real, syn


@jax.jit
def _iris_grads(alpha):
    """Autodiff gradient of IRIS vs the hand formulas, at theta_t and away from it (alpha traced)."""
    logp, real, syn = _tiny_policy()
    theta_t = jnp.asarray([0.3, -0.2, 0.1, 0.5, -0.4])
    beta = 0.5
    ref_r, ref_s = logp(theta_t, real), logp(theta_t, syn)

    def loss(theta):
        return iris_loss(logp(theta, real), logp(theta, syn), ref_r, ref_s, alpha=alpha, beta=beta)[0]

    def per_sample_grads(theta, seqs):
        return jax.vmap(lambda s: jax.grad(lambda th: logp(th, s[None])[0])(theta))(seqs)

    at_t = (jax.grad(loss)(theta_t),
            alpha * beta * (per_sample_grads(theta_t, syn).mean(0) - per_sample_grads(theta_t, real).mean(0)))
    # away from theta_t: softmax importance weights w = softmax((a-1) g_real), v = softmax(a g_syn)
    theta = theta_t + jnp.asarray([0.5, -0.3, 0.2, 0.0, 0.1])
    w = jax.nn.softmax((alpha - 1) * beta * (logp(theta, real) - ref_r))
    v = jax.nn.softmax(alpha * beta * (logp(theta, syn) - ref_s))
    away = (jax.grad(loss)(theta),
            alpha * beta * (v @ per_sample_grads(theta, syn) - w @ per_sample_grads(theta, real)))
    return at_t, away


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_iris_gradient_at_theta_t(alpha):
    (grad_t, expect_t), (grad, expect) = _iris_grads(jnp.float32(alpha))
    # at theta = theta_t: grad = alpha * beta * (mean grad l on synthetic - mean grad l on real)
    np.testing.assert_allclose(grad_t, expect_t, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(grad_t)).max() > 1e-2  # a non-trivial check
    np.testing.assert_allclose(grad, expect, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ SPACE, SPIF


def test_space_values():
    _, _, rr, rs = _batch(6)
    for mu in (1.0, 3.0):
        loss, _ = _space(rr, rs, rr, rs, mu=mu)
        np.testing.assert_allclose(loss, np.log1p(mu) + mu * np.log1p(1 / mu), rtol=1e-6)
    pr, ps, _, _ = _batch(7, scale=1.0)
    gr, gs = np.asarray(pr - rr, np.float64), np.asarray(ps - rs, np.float64)
    sp = lambda x: np.log1p(np.exp(x))
    mu = 3.0
    ref = np.mean(sp(np.log(mu) - gr)) + mu * np.mean(sp(gs - np.log(mu)))
    np.testing.assert_allclose(_space(pr, ps, rr, rs, mu=mu)[0], ref, rtol=1e-5)
    # K synthetic samples per prompt: mu * mean over all of them
    ps2 = jnp.stack([ps, ps + 0.3, ps - 0.2], 1)
    rs2 = jnp.stack([rs, rs, rs], 1)
    g2 = np.asarray(ps2 - rs2, np.float64)
    ref2 = np.mean(sp(np.log(mu) - gr)) + np.mean(sp(g2 - np.log(mu)).sum(1))  # notes' form, K = mu = 3
    np.testing.assert_allclose(_space(pr, ps2, rr, rs2, mu=mu)[0], ref2, rtol=1e-5)


def test_spif_values_and_bounded_optimum():
    pr, ps, rr, rs = _batch(8, scale=1.0)
    beta, c = 0.3, 2.0
    gr, gs = beta * np.asarray(pr - rr, np.float64), beta * np.asarray(ps - rs, np.float64)
    ref = -gr.mean() + gs.mean() + c / 2 * ((gr**2).mean() + (gs**2).mean())
    np.testing.assert_allclose(_spif(pr, ps, rr, rs, beta=beta, c=c)[0], ref, rtol=1e-5)
    ref_plain = -gr.mean() + (gs + gs**2 / 4).mean()
    np.testing.assert_allclose(_spif(pr, ps, rr, rs, beta=beta, form="plain")[0], ref_plain, rtol=1e-5)
    # minimiser over free rewards: g_real = +1/c, g_syn = -1/c (bounded rewards)
    f = lambda g: spif_loss(rr + g[0] / beta, rs + g[1] / beta, rr, rs, beta=beta, c=c)[0]
    np.testing.assert_allclose(jax.jit(jax.grad(f))(jnp.asarray([1 / c, -1 / c])), 0.0, atol=1e-5)


# ------------------------------------------------------------------ extremes, jit, grad


LOSSES = [
    ("spin", {}), ("spin", {"loss_type": "hinge"}), ("iris", {"alpha": 0.5}), ("iris", {"alpha": 1.0}),
    ("iris", {"alpha": 1.0 + 1e-4}), ("iris", {"alpha": 2.0}), ("space", {"mu": 2.0}), ("spif", {}),
]


def test_all_selfplay_losses_finite_for_extreme_gaps():
    gaps = jnp.asarray([1e4, -1e4, 0.0, 3.0, -1e4, 1e4], jnp.float32)
    ref_r = jnp.full((N,), -200.0)
    ref_s = jnp.full((N,), -150.0)
    mask = jnp.asarray([1, 1, 1, 1, 1, 0], jnp.float32)

    @jax.jit
    def everything(pr, ps):  # one compile for all losses
        out = []
        for name, hp in LOSSES:
            fn = get_loss(name, family="selfplay")
            f = lambda a, b, fn=fn, hp=hp: fn(a, b, ref_r, ref_s, real_mask=mask, **hp)
            out.append(jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(pr, ps))
        return out

    for (name, hp), ((loss, metrics), grads) in zip(LOSSES, everything(ref_r + gaps, ref_s - gaps[::-1])):
        assert np.isfinite(loss), (name, hp)
        assert all(np.all(np.isfinite(g)) for g in grads), (name, hp)
        assert all(np.all(np.isfinite(v)) for v in metrics.values()), (name, hp, metrics)


def test_iris_alpha_traced_under_jit_and_validation():
    pr, ps, rr, rs = _batch(9, scale=1.0)
    f = lambda a: _iris(pr, ps, rr, rs, alpha=a)[0]
    for a in (0.5, 1.0, 2.0):
        np.testing.assert_allclose(f(jnp.float32(a)), _iris_f64(pr, ps, rr, rs, a), rtol=2e-5, atol=2e-5)
    with pytest.raises(ConfigError):
        iris_loss(pr, ps, rr, rs, alpha=0.0)
    with pytest.raises(SgalmError):
        iris_loss(pr, ps[:3], rr, rs)


# ------------------------------------------------------------------ schedules


def test_alpha_schedules():
    np.testing.assert_allclose([linear_alpha(t, start=2, end=0.5, num_steps=3) for t in range(5)], [2, 1.5, 1, 0.5, 0.5])
    np.testing.assert_allclose([cosine_alpha(t, start=2, end=0.5, num_steps=2) for t in range(3)], [2, 1.25, 0.5])
    np.testing.assert_allclose(adaptive_alpha(0.0), 0.5)
    np.testing.assert_allclose(adaptive_alpha(-3.0), 0.5)
    np.testing.assert_allclose(adaptive_alpha(1.0, gap_scale=2.0), 0.5 + 1.5 * np.tanh(0.5), rtol=1e-6)
    assert adaptive_alpha(100.0) > adaptive_alpha(1.0) > adaptive_alpha(0.1)
    sched = make_alpha_schedule("adaptive", alpha_min=0.5, alpha_max=2.0)
    pr, ps, rr, rs = _batch(10, scale=1.0)
    gap = logratio_gap(pr, ps, rr, rs, real_num_tokens=jnp.full((N,), 10.0), syn_num_tokens=jnp.full((N,), 5.0))
    np.testing.assert_allclose(gap, np.mean((pr - rr) / 10) - np.mean((ps - rs) / 5), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sched(0, gap), adaptive_alpha(gap))
    np.testing.assert_allclose(likelihood_gap(rr, rs), np.mean(rs) - np.mean(rr), rtol=1e-6)
    np.testing.assert_allclose(make_alpha_schedule("constant", alpha=1.5)(7), 1.5)
    with pytest.raises(SgalmError):
        sched(0)
    with pytest.raises(ConfigError):
        make_alpha_schedule("linear", begin=1.0)
    with pytest.raises(ConfigError):
        make_alpha_schedule("exponential")


def test_unpaired_batches_use_cross_pair_accuracy():
    real = jnp.asarray([1.0, 2.0, 3.0])
    syn = jnp.asarray([0.5, 2.5])
    zeros_r, zeros_s = jnp.zeros(3), jnp.zeros(2)
    loss, m = _iris(real, syn, zeros_r, zeros_s, alpha=2.0)
    assert np.isfinite(loss)
    np.testing.assert_allclose(m["accuracy"], 4 / 6)  # pairs (r, s) with r > s: (1,.5) (2,.5) (3,.5) (3,2.5)
    np.testing.assert_allclose(m["margin"], 2.0 - 1.5, rtol=1e-6)
