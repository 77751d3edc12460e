"""Bradley-Terry (GAD discriminator), DPO aliasing, GRPO advantages / clipped loss / KL / aggregation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgalm_jax.errors import ConfigError, SgalmError
from sgalm_jax.losses import (
    aggregate_token_loss,
    bradley_terry_loss,
    group_advantages,
    grpo_loss,
    kl_penalty,
    last_token_scores,
)


_bt = jax.jit(bradley_terry_loss)
_grpo = jax.jit(grpo_loss, static_argnames=("kl_estimator", "loss_agg", "max_response_len", "clip_ratio_c"))
_adv = jax.jit(group_advantages, static_argnames=("group_size", "scale"))


def test_bradley_terry_values_group_form_and_metrics():
    c = jnp.asarray([1.0, -0.5])
    r = jnp.asarray([[0.0, 2.0, -1.0], [-0.5, -3.0, 1.0]])  # G = 3 students per prompt
    loss, m = jax.jit(bradley_terry_loss)(c, r)
    diff = np.asarray(c)[:, None] - np.asarray(r)
    np.testing.assert_allclose(loss, np.mean(-np.log(1 / (1 + np.exp(-diff)))), rtol=1e-6)
    np.testing.assert_allclose(m["d_acc"], np.mean(diff > 0))
    np.testing.assert_allclose(m["chosen_score"], np.mean(np.broadcast_to(np.asarray(c)[:, None], (2, 3))))
    np.testing.assert_allclose(m["rejected_score"], np.mean(np.asarray(r)), rtol=1e-6)
    # the shared teacher score gets the summed gradient of its group
    g = jax.jit(jax.grad(lambda cc: bradley_terry_loss(cc, r)[0]))(c)
    np.testing.assert_allclose(g, np.sum(-1 / (1 + np.exp(diff)), axis=1) / 6, rtol=1e-5)
    # masking a pair removes it
    mask = jnp.asarray([[1, 1, 0], [1, 1, 1]], jnp.float32)
    np.testing.assert_allclose(
        _bt(c, r, mask=mask)[0], np.sum(np.log1p(np.exp(-diff)) * mask) / 5, rtol=1e-6
    )
    big = _bt(jnp.asarray([1e4, -1e4]), jnp.asarray([-1e4, 1e4]))[0]
    np.testing.assert_allclose(big, 1e4, rtol=1e-6)


def test_last_token_scores():
    vals = jnp.arange(12.0).reshape(2, 6)
    mask = jnp.asarray([[0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(last_token_scores(vals, mask), [3.0, 0.0])


def test_group_advantages_by_hand():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [0.2, 0.4, 0.9, 0.5], [3.0, 3.0, 3.0, 3.0]])
    adv = _adv(jnp.asarray(r))
    expect = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(adv, expect, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(adv)[2] == 0)  # equal rewards: no signal
    flat = _adv(jnp.asarray(r.reshape(-1)), group_size=4)
    np.testing.assert_allclose(flat, expect.reshape(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_adv(jnp.asarray(r), scale="none"), r - r.mean(1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(
        _adv(jnp.asarray(r), scale="batch"), (r - r.mean(1, keepdims=True)) / (r.std(ddof=1) + 1e-6),
        rtol=1e-5, atol=1e-6,
    )
    # an unscoreable completion is left out of the baseline
    mask = np.ones_like(r)
    mask[1, 3] = 0
    am = _adv(jnp.asarray(r), mask=jnp.asarray(mask))
    row = r[1, :3]
    np.testing.assert_allclose(am[1, :3], (row - row.mean()) / (row.std(ddof=1) + 1e-6), rtol=1e-5)
    assert am[1, 3] == 0
    # verl's convention for singleton groups: mean 0, std 1
    np.testing.assert_allclose(_adv(jnp.asarray([[2.5], [-1.0]])), [[2.5], [-1.0]], rtol=1e-5)
    with pytest.raises(SgalmError):
        group_advantages(jnp.ones(5), group_size=2)


def test_kl_estimators():
    lp = jnp.asarray([-1.0, -2.0, -0.5])
    ref = jnp.asarray([-1.5, -2.0, -0.1])
    d = np.asarray(ref - lp)
    np.testing.assert_allclose(kl_penalty(lp, ref, "k3"), np.exp(d) - d - 1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(kl_penalty(lp, ref, "k1"), -d, rtol=1e-6)
    np.testing.assert_allclose(kl_penalty(lp, ref, "k2"), 0.5 * d**2, rtol=1e-6)
    assert np.all(np.asarray(kl_penalty(lp, ref)) >= 0)
    with pytest.raises(ConfigError):
        kl_penalty(lp, ref, "k4")


def test_aggregation_modes():
    loss = jnp.asarray([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = jnp.asarray([[1, 1, 1], [1, 0, 0]], jnp.float32)
    np.testing.assert_allclose(aggregate_token_loss(loss, mask, "token_mean"), 10 / 4)
    np.testing.assert_allclose(aggregate_token_loss(loss, mask, "seq_mean_token_mean"), (2 + 4) / 2)
    np.testing.assert_allclose(aggregate_token_loss(loss, mask, "seq_mean_token_sum"), (6 + 4) / 2)
    np.testing.assert_allclose(aggregate_token_loss(loss, mask, "seq_mean_token_sum_norm"), 10 / 6)
    np.testing.assert_allclose(aggregate_token_loss(loss, mask, "seq_mean_token_sum_norm", max_response_len=5), 1.0)


def test_grpo_loss_on_policy_gradient_clipping_and_kl():
    rng = np.random.default_rng(0)
    b, t = 4, 5
    lp = jnp.asarray(rng.normal(size=(b, t)) - 2, jnp.float32)
    mask = jnp.asarray(rng.random((b, t)) > 0.2, jnp.float32)
    adv = jnp.asarray([1.0, -0.5, 0.3, -1.2])
    # on-policy (old = sg(current)): loss = -token_mean(A), gradient = -A * mask / n_tokens
    loss, m = _grpo(lp, None, adv, mask)
    n = float(mask.sum())
    np.testing.assert_allclose(loss, -np.sum(np.asarray(adv)[:, None] * np.asarray(mask)) / n, rtol=1e-6)
    g = jax.jit(jax.grad(lambda x: grpo_loss(x, None, adv, mask)[0]))(lp)
    np.testing.assert_allclose(g, -np.asarray(adv)[:, None] * np.asarray(mask) / n, rtol=1e-6)
    np.testing.assert_allclose(m["ratio_mean"], 1.0)
    # clipping: ratio 1.5 with A > 0 is clipped at 1.2 (no gradient), with A < 0 it is not
    old = lp - jnp.log(1.5)
    adv2 = jnp.asarray([1.0, -1.0, 1.0, -1.0])
    loss2, m2 = _grpo(lp, old, adv2, mask, clip_eps=0.2)
    per = np.where(np.asarray(adv2)[:, None] > 0, -1.2, 1.5)
    np.testing.assert_allclose(loss2, np.sum(per * np.asarray(mask)) / n, rtol=1e-5)
    g2 = np.asarray(jax.jit(jax.grad(lambda x: grpo_loss(x, old, adv2, mask)[0]))(lp))
    assert np.all(g2[[0, 2]] == 0) and np.all(g2[[1, 3]][np.asarray(mask)[[1, 3]] > 0] != 0)
    np.testing.assert_allclose(m2["clip_frac"], np.sum(np.asarray(mask)[[0, 2]]) / n)
    # dual clip bounds negative-advantage losses at c * |A|
    old3 = lp - jnp.log(5.0)
    loss3, _ = _grpo(lp, old3, -jnp.ones(b), mask, clip_ratio_c=3.0)
    np.testing.assert_allclose(loss3, 3.0, rtol=1e-5)
    # KL term: coef * token_mean(k3)
    ref = lp + 0.3
    loss4, m4 = _grpo(lp, None, adv, mask, ref_logprobs=ref, kl_coef=0.1)
    k3 = np.exp(0.3) - 0.3 - 1
    np.testing.assert_allclose(m4["kl"], k3, rtol=1e-4)
    np.testing.assert_allclose(loss4 - loss, 0.1 * k3, rtol=1e-4)


def test_grpo_finite_for_extreme_logratios():
    lp = jnp.asarray([[-1e4, -1.0, 0.0], [-3.0, -1e4, -2.0]])
    old = jnp.asarray([[0.0, -1e4, -1e4], [-3.0, 0.0, -2.0]])
    ref = jnp.asarray([[0.0, 1e4, -1e4], [1e4, 0.0, -1e4]])
    mask = jnp.ones_like(lp)
    adv = group_advantages(jnp.asarray([1e4, -1e4]), group_size=2)
    f = functools.partial(grpo_loss, ref_logprobs=ref, kl_coef=0.01, clip_ratio_c=3.0)
    (loss, m), g = jax.jit(jax.value_and_grad(lambda x: f(x, old, adv, mask), has_aux=True))(lp)
    assert np.isfinite(loss) and np.all(np.isfinite(g)) and all(np.isfinite(v) for v in m.values())
