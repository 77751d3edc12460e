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


def test_grpo_bias_corrected_kl_matches_the_formula():
    """kl_bias_correction (TRL's use_bias_correction_kl): the per-token k3 is multiplied by the
    non-detached ratio rho = exp(lp - old) before aggregation; value and gradient by hand (float64
    numpy / an independent jnp expression)."""
    rng = np.random.default_rng(3)
    b, t, beta = 3, 4, 0.2
    lp = jnp.asarray(rng.normal(size=(b, t)) - 2, jnp.float32)
    old = lp + jnp.asarray(rng.normal(size=(b, t)) * 0.1, jnp.float32)
    ref = lp + jnp.asarray(rng.normal(size=(b, t)) * 0.3, jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], jnp.float32)
    adv = jnp.zeros(b)  # only the KL term
    f = functools.partial(grpo_loss, ref_logprobs=ref, kl_coef=beta, kl_bias_correction=True)
    loss, m = jax.jit(lambda x: f(x, old, adv, mask))(lp)
    x, o, r, mk = (np.asarray(a, np.float64) for a in (lp, old, ref, mask))
    rho = np.exp(x - o)
    k3 = np.exp(r - x) - (r - x) - 1
    np.testing.assert_allclose(m["kl"], np.sum(rho * k3 * mk) / mk.sum(), rtol=1e-5)
    np.testing.assert_allclose(loss, beta * np.sum(rho * k3 * mk) / mk.sum(), rtol=1e-5)

    def by_hand(z):
        d = ref - z
        return beta * jnp.sum(jnp.exp(z - old) * (jnp.exp(d) - d - 1) * mask) / jnp.sum(mask)

    np.testing.assert_allclose(jax.grad(lambda z: f(z, old, adv, mask)[0])(lp),
                               jax.grad(by_hand)(lp), rtol=1e-5, atol=1e-8)
    # without the correction the gradient lacks the rho term: different
    plain = functools.partial(grpo_loss, ref_logprobs=ref, kl_coef=beta)
    assert not np.allclose(jax.grad(lambda z: plain(z, old, adv, mask)[0])(lp),
                           jax.grad(by_hand)(lp))


def test_seq_mean_token_mean_divides_by_non_empty_rows():
    """A fully masked row (e.g. a truncated completion with mask_truncated) is left out of the
    mean over sequences; TRL's loss_type='grpo' divides by every row instead (documented)."""
    loss = jnp.asarray([[1.0, 3.0], [5.0, 7.0], [100.0, 100.0]])
    mask = jnp.asarray([[1, 1], [1, 0], [0, 0]], jnp.float32)
    ours = aggregate_token_loss(loss, mask, "seq_mean_token_mean")
    np.testing.assert_allclose(ours, (2.0 + 5.0) / 2)
    trl = np.mean([2.0, 5.0, 0.0])  # TRL: ((loss*mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    assert not np.isclose(float(ours), trl)


def test_token_logprobs_and_entropy_from_hidden():
    """Chunked log-probs at a temperature equal log_softmax(h @ W / T)[target]; the entropy is
    that distribution's, and carries no gradient."""
    from sgalm_jax.losses import token_logprobs_and_entropy_from_hidden

    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 7, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 11)), jnp.float32)
    tg = jnp.asarray(rng.integers(0, 11, size=(2, 7)))
    lp, ent = token_logprobs_and_entropy_from_hidden(h, w, tg, chunk_size=3, temperature=0.7)
    logp = jax.nn.log_softmax((h @ w) / 0.7, axis=-1)
    np.testing.assert_allclose(lp, jnp.take_along_axis(logp, tg[..., None], -1)[..., 0],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ent, -jnp.sum(jnp.exp(logp) * logp, -1), rtol=1e-5, atol=1e-6)
    g_ent = jax.grad(lambda x: token_logprobs_and_entropy_from_hidden(
        x, w, tg, chunk_size=3)[1].sum())(h)
    assert float(jnp.abs(g_ent).max()) == 0.0
