"""sequence_logprobs / causal shift / chunked-from-hidden vs naive float64 computations; sft_loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgalm_jax.errors import ConfigError
from sgalm_jax.losses import (
    causal_lm_logprobs,
    sequence_logprobs,
    sequence_logprobs_from_hidden,
    sft_loss,
    shift_targets,
)

B, T, V, H = 3, 7, 11, 5


def _data(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
    targets = rng.integers(0, V, size=(B, T))
    mask = (rng.random((B, T)) > 0.3).astype(np.float32)
    mask[2] = 0.0  # a row with no scored tokens
    return logits, targets, mask


def _naive_logprobs(logits, targets):
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]


def test_sequence_logprobs_matches_naive():
    logits, targets, mask = _data()
    out = jax.jit(sequence_logprobs)(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    ref_tok = _naive_logprobs(logits, targets) * mask
    np.testing.assert_allclose(out.token_logprobs, ref_tok, atol=2e-5)
    np.testing.assert_allclose(out.sequence_sum, ref_tok.sum(-1), atol=5e-5)
    np.testing.assert_allclose(out.num_tokens, mask.sum(-1))
    np.testing.assert_allclose(out.sequence_mean, ref_tok.sum(-1) / np.maximum(mask.sum(-1), 1), atol=2e-5)
    assert out.sequence_sum[2] == 0.0 and out.sequence_mean[2] == 0.0


def test_custom_vjp_gradient_matches_autodiff_and_bf16():
    logits, targets, mask = _data(1)

    def ours(lg):
        return jnp.sum(sequence_logprobs(lg, targets, mask).sequence_sum * jnp.arange(1.0, B + 1))

    def naive(lg):
        lp = jax.nn.log_softmax(lg.astype(jnp.float32), -1)
        tok = jnp.take_along_axis(lp, jnp.asarray(targets)[..., None], -1)[..., 0]
        return jnp.sum((tok * mask).sum(-1) * jnp.arange(1.0, B + 1))

    g1 = jax.jit(jax.grad(ours))(jnp.asarray(logits))
    g2 = jax.jit(jax.grad(naive))(jnp.asarray(logits))
    np.testing.assert_allclose(g1, g2, atol=1e-5)
    gb = jax.jit(jax.grad(ours))(jnp.asarray(logits, jnp.bfloat16))
    assert gb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(gb, np.float32), g2, atol=2e-2)


def test_hf_ignore_index_and_mask_none():
    logits, targets, _ = _data(2)
    t = np.array(targets)
    t[:, :3] = -100
    out = jax.jit(sequence_logprobs)(jnp.asarray(logits), jnp.asarray(t))
    ref = (_naive_logprobs(logits, np.maximum(t, 0)) * (t >= 0)).sum(-1)
    np.testing.assert_allclose(out.sequence_sum, ref, atol=5e-5)


def test_causal_shift_alignment():
    logits, ids, _ = _data(3)
    loss_mask = np.zeros((B, T), np.float32)
    loss_mask[:, 4:] = 1.0  # prompt = first 4 tokens, response = rest
    targets, m = jax.jit(shift_targets)(jnp.asarray(ids), jnp.asarray(loss_mask))
    np.testing.assert_array_equal(targets[:, :-1], ids[:, 1:])
    np.testing.assert_array_equal(m[:, -1], 0.0)
    out = jax.jit(causal_lm_logprobs)(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(loss_mask))
    # by hand: logits[:, t] predicts ids[:, t+1], scored iff loss_mask[:, t+1]
    lp = _naive_logprobs(logits[:, :-1], ids[:, 1:])
    np.testing.assert_allclose(out.sequence_sum, (lp * loss_mask[:, 1:]).sum(-1), atol=5e-5)
    np.testing.assert_allclose(out.num_tokens, T - 4)


@pytest.mark.parametrize("chunk", [3, 16])
def test_chunked_from_hidden_matches_dense(chunk):
    rng = np.random.default_rng(4)
    hidden = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(H, V)), jnp.float32)
    _, targets, mask = _data(4)

    def dense(h, k):
        return jnp.sum(sequence_logprobs(h @ k, targets, mask).sequence_sum)

    def chunked(h, k):
        return jnp.sum(sequence_logprobs_from_hidden(h, k, targets, mask, chunk_size=chunk).sequence_sum)

    np.testing.assert_allclose(jax.jit(chunked)(hidden, kernel), jax.jit(dense)(hidden, kernel), rtol=1e-5)
    gd = jax.jit(jax.grad(dense, argnums=(0, 1)))(hidden, kernel)
    gc = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, kernel)
    for a, b in zip(gc, gd):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # callable head closing over params
    out = jax.jit(lambda h: sequence_logprobs_from_hidden(h, lambda x: x @ kernel, targets, mask, chunk_size=chunk))(hidden)
    ref = (_naive_logprobs(np.asarray(hidden @ kernel), targets) * mask).sum(-1)
    np.testing.assert_allclose(out.sequence_sum, ref, atol=1e-4)


def test_sft_loss_masking_and_normalisations():
    logits, targets, mask = _data(5)
    nll = -_naive_logprobs(logits, targets) * mask
    n = mask.sum(-1)
    expect = {
        "token": nll.sum() / mask.sum(),
        "sequence": np.mean([nll[i].sum() / n[i] for i in range(B) if n[i] > 0]),
        "sequence_sum": np.mean([nll[i].sum() for i in range(B) if n[i] > 0]),
        "sum": nll.sum(),
    }
    got = jax.jit(lambda lg: {k: sft_loss(lg, targets, mask, normalize=k) for k in expect})(jnp.asarray(logits))
    for norm, val in expect.items():
        loss, metrics = got[norm]
        np.testing.assert_allclose(loss, val, rtol=1e-5, err_msg=norm)
        assert metrics["num_tokens"] == mask.sum()
    # masked positions never matter: change their logits wildly, loss unchanged
    lg2 = np.where(mask[..., None] > 0, logits, 1e4 * np.sign(logits))
    np.testing.assert_allclose(jax.jit(sft_loss)(jnp.asarray(lg2), targets, mask)[0], expect["token"], rtol=1e-5)
    # gradient is zero at masked positions
    g = jax.jit(jax.grad(lambda lg: sft_loss(lg, targets, mask)[0]))(jnp.asarray(logits))
    assert np.all(np.asarray(g)[mask == 0] == 0)
    with pytest.raises(ConfigError):
        sft_loss(jnp.asarray(logits), targets, mask, normalize="mean")
