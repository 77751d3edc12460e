"""SGALM: D(s) score, BCE discriminator loss, score-function generator loss and its detachment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgalm_jax.errors import ConfigError
from sgalm_jax.losses import (
    balanced_gradient_sum,
    discriminator_loss,
    discriminator_prob,
    discriminator_score_logits,
    gather_answer_logits,
    generator_loss,
)

def test_d_score_matches_hand_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 20)).astype(np.float32) * 4
    real_id, fake_id = 7, 13
    p = np.exp(logits.astype(np.float64))
    p /= p.sum(-1, keepdims=True)
    d_hand = p[:, real_id] / (p[:, real_id] + p[:, fake_id])
    z = discriminator_score_logits(jnp.asarray(logits), real_id, fake_id)
    np.testing.assert_allclose(discriminator_prob(z), d_hand, rtol=1e-5)
    # several ids per label pool their probability mass
    z2 = discriminator_score_logits(jnp.asarray(logits), [7, 8], [13])
    d2 = (p[:, 7] + p[:, 8]) / (p[:, 7] + p[:, 8] + p[:, 13])
    np.testing.assert_allclose(discriminator_prob(z2), d2, rtol=1e-5)
    # answer position gather (right padding: positions = lengths - 1; left padding: last)
    seq = jnp.asarray(rng.normal(size=(2, 5, 20)), jnp.float32)
    np.testing.assert_array_equal(gather_answer_logits(seq, jnp.asarray([2, 4])), np.stack([seq[0, 2], seq[1, 4]]))
    np.testing.assert_array_equal(gather_answer_logits(seq), seq[:, -1])


def test_discriminator_loss_values_and_metrics():
    zr = jnp.asarray([2.0, -1.0, 0.5, 3.0])
    zf = jnp.asarray([-2.0, 1.0, -4.0, -0.5])
    loss, m = jax.jit(discriminator_loss)(zr, zf)
    sp = lambda x: np.log1p(np.exp(x))
    bce = -np.mean(np.log(1 / (1 + np.exp(-np.asarray(zr))))) - np.mean(np.log(1 - 1 / (1 + np.exp(-np.asarray(zf)))))
    np.testing.assert_allclose(loss, np.mean(sp(-np.asarray(zr))) + np.mean(sp(np.asarray(zf))), rtol=1e-6)
    np.testing.assert_allclose(loss, bce, rtol=1e-5)
    np.testing.assert_allclose(m["d_acc"], 6 / 8)
    np.testing.assert_allclose(m["d_acc_real"], 3 / 4)
    np.testing.assert_allclose(m["d_real"], np.mean(1 / (1 + np.exp(-np.asarray(zr)))), rtol=1e-6)
    assert m["fake_alarm"] == 0.0
    _, m2 = discriminator_loss(zr, jnp.full((4,), -5.0))
    assert m2["fake_alarm"] == 1.0


def _tiny_generator():
    rng = np.random.default_rng(1)
    samples = jnp.asarray(rng.integers(0, 5, size=(6, 4)))

    def logp(theta):
        return jnp.sum(jax.nn.log_softmax(theta)[samples], axis=-1)

    theta = jnp.asarray([0.2, -0.1, 0.4, 0.0, -0.3])
    z_fake = jnp.asarray(rng.normal(size=6) * 2, jnp.float32)
    return logp, theta, z_fake


@jax.jit
def _generator_grads():
    logp, theta, z = _tiny_generator()
    grads = {r: jax.grad(lambda th, r=r: generator_loss(logp(th), z, reward=r)[0])(theta) for r in ("log_d", "d", "logit")}
    per_sample = jax.vmap(lambda i: jax.grad(lambda th: logp(th)[i])(theta))(jnp.arange(6))
    return grads, per_sample


@pytest.mark.parametrize("reward", ["log_d", "d", "logit"])
def test_generator_gradient_is_score_function_estimator(reward):
    _, _, z = _tiny_generator()
    grads, per_sample = _generator_grads()
    grad = grads[reward]
    zn = np.asarray(z, np.float64)
    r = {"log_d": -np.log1p(np.exp(-zn)), "d": 1 / (1 + np.exp(-zn)), "logit": zn}[reward]
    a = (r - r.mean()) / (r.std() + 1e-6)
    expect = -np.mean(a[:, None] * np.asarray(per_sample), axis=0)  # -mean_j A_j grad log p(s_j)
    np.testing.assert_allclose(grad, expect, rtol=1e-4, atol=1e-6)


@jax.jit
def _detachment_checks():
    logp, theta, z = _tiny_generator()
    lp = logp(theta)
    out = {}
    for form in ("score_function", "weighted_likelihood"):
        f = lambda zz, form=form: generator_loss(lp, zz, form=form, anchor_logprobs=lp, anchor_weight=0.1)[0]
        out["gz_" + form] = jax.grad(f)(z)
    # shared-weights case: D logits and G log-probs from the same theta
    disc_w = jnp.asarray([0.5, -1.0, 2.0, 0.3, 0.1])
    zs = jnp.tanh(theta) @ disc_w + z
    out["shared"] = jax.grad(lambda th: generator_loss(logp(th), jnp.tanh(th) @ disc_w + z)[0])(theta)
    out["lp_only"] = jax.grad(lambda th: generator_loss(logp(th), zs)[0])(theta)
    out["wl"] = generator_loss(lp, z, form="weighted_likelihood", tau=1.0)
    out["base"] = generator_loss(lp, z)[0]
    out["anchored"] = generator_loss(lp, z, anchor_logprobs=jnp.asarray([-3.0, -5.0]), anchor_weight=0.5)[0]
    out["lp"] = lp
    return out


def test_generator_reward_detached_and_weighted_likelihood():
    _, _, z = _tiny_generator()
    out = _detachment_checks()
    for form in ("score_function", "weighted_likelihood"):
        assert np.all(np.asarray(out["gz_" + form]) == 0.0), form  # no gradient reaches D's logits
    # shared weights: the generator loss's gradient equals the gradient through log p alone
    np.testing.assert_allclose(out["shared"], out["lp_only"], rtol=1e-6)
    # weighted likelihood: w = softmax(log D / tau); with tau=1 that is D / sum D
    loss, m = out["wl"]
    d = 1 / (1 + np.exp(-np.asarray(z, np.float64)))
    np.testing.assert_allclose(loss, -np.sum(d / d.sum() * np.asarray(out["lp"])), rtol=1e-5)
    assert 0 < m["weight_ess"] <= 1
    # anchor adds eta * NLL of real samples
    np.testing.assert_allclose(out["anchored"] - out["base"], 0.5 * 4.0, rtol=1e-5)
    with pytest.raises(ConfigError):
        generator_loss(out["lp"], z, reward="prob")


def test_sgalm_losses_finite_for_extreme_logits():
    z = jnp.asarray([1e4, -1e4, 0.0, 5.0, -1e4, 1e4])
    lp = jnp.asarray([-1e4, -3.0, -50.0, -1e4, 0.0, -7.0])
    mask = jnp.asarray([1, 1, 1, 1, 1, 0.0])

    def total(lp, zr, zf):
        ld, md = discriminator_loss(zr, zf, fake_mask=mask)
        lg, mg = generator_loss(lp, zf, mask)
        lw, mw = generator_loss(lp, zf, mask, form="weighted_likelihood", tau=0.1)
        return ld + lg + lw, (md, mg, mw)

    (loss, ms), grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True))(lp, z, -z)
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert all(np.isfinite(v) for m in ms for v in m.values())


def test_balanced_gradient_sum():
    gd = {"w": jnp.asarray([3.0, 4.0])}
    gg = {"w": jnp.asarray([0.0, 0.5])}
    out, m = balanced_gradient_sum(gd, gg)
    np.testing.assert_allclose(m["lambda_g"], 10.0, rtol=1e-6)
    np.testing.assert_allclose(out["w"], [3.0, 9.0], rtol=1e-6)
