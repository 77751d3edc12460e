"""Attention kernels: which one runs where, and splash attention (Pallas interpret mode on CPU)
against the XLA path on padded rows, packed rows and sliding windows, values and gradients.

cuDNN attention cannot run here (no GPU, and jax checks for cuDNN when tracing it): only its
selection logic is tested.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgalm_jax.errors import ConfigError
from sgalm_jax.models import CausalLM, ModelConfig
from sgalm_jax.models.attention import resolve_attention, splash_attention
from sgalm_jax.sharding import make_mesh

B, T, H, KV, D = 4, 256, 2, 1, 16


def test_selection_by_platform_dtype_and_shape(caplog):
    pick = lambda req, platform, dtype=jnp.bfloat16, t=512, d=128: resolve_attention(  # noqa
        req, platform=platform, dtype=dtype, seq_len=t, head_dim=d)
    assert pick("auto", "cpu") == "xla"
    assert pick("auto", "tpu") == "splash"
    assert pick("auto", "tpu", t=520) == "xla"  # not a multiple of the 128 block
    assert pick("auto", "gpu") == "cudnn" and pick("auto", "cuda") == "cudnn"
    assert pick("auto", "gpu", dtype=jnp.float32) == "xla"  # cuDNN flash needs bf16/fp16
    assert pick("auto", "gpu", d=256) == "xla"
    assert pick("xla", "tpu") == "xla"
    assert pick("splash", "cpu") == "splash"  # interpret mode
    with caplog.at_level(logging.WARNING, logger="sgalm_jax.models.attention"):
        assert pick("splash", "gpu") == "xla"
        assert pick("cudnn", "tpu") == "xla"
        assert pick("cudnn", "gpu", dtype=jnp.float32) == "xla"
    assert "TPU kernel" in caplog.text and "needs a GPU" in caplog.text
    with pytest.raises(ConfigError, match="model.attention"):
        pick("flash", "tpu")
    with pytest.raises(ConfigError, match="attention"):
        ModelConfig(attention="flash")


def _segments() -> jnp.ndarray:
    """Row 0 right-padded, row 1 left-padded, row 2 three packed examples + padding, row 3 full."""
    seg = np.ones((B, T), np.int32)
    seg[0, 200:] = 0
    seg[1, :57] = 0
    seg[2, 90:170] = 2
    seg[2, 170:240] = 3
    seg[2, 240:] = 0
    return jnp.asarray(seg)


def _dense_mask(seg, window):
    pos = jnp.arange(T)
    m = (pos[None, :] <= pos[:, None])[None] & (seg[:, :, None] == seg[:, None, :])
    m = m & (seg[:, None, :] > 0)
    if window:
        m = m & (pos[:, None] - pos[None, :] < window)[None]
    return m[:, None]


def _attn_fns(window):
    seg = _segments()
    valid = (seg > 0).astype(jnp.float32)[:, :, None, None]
    w = jnp.asarray(np.random.RandomState(1).randn(B, T, H, D), jnp.float32)

    def loss(out):  # a masked loss: padding outputs are never read
        return jnp.sum(out * w * valid)

    def splash(q, k, v):
        return splash_attention(q, k, v, seg, scale=D ** -0.5, sliding_window=window, block=128)

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=_dense_mask(seg, window),
                                            scale=D ** -0.5)

    def both(q, k, v):
        return {name: (fn(q, k, v), jax.grad(lambda *a: loss(fn(*a)), argnums=(0, 1, 2))(q, k, v))
                for name, fn in (("splash", splash), ("xla", xla))}

    return jax.jit(both), seg


@pytest.mark.parametrize("window", [None, 100])
def test_splash_matches_xla_values_and_gradients(window):
    """Causal (and a 100-token window crossing 128-token blocks) with right/left padding and packed
    examples: outputs at real tokens and the gradients of a masked loss agree to fp32 rounding."""
    r = np.random.RandomState(0)
    q, k, v = (jnp.asarray(r.randn(B, T, n, D), jnp.float32) for n in (H, KV, KV))
    fn, seg = _attn_fns(window)
    res = fn(q, k, v)
    real = np.asarray(seg) > 0
    (out_s, grads_s), (out_x, grads_x) = res["splash"], res["xla"]
    err = float(np.abs(np.asarray(out_s - out_x))[real].max())
    assert err < 2e-6, err
    for gs, gx in zip(grads_s, grads_x):
        scale = float(np.abs(np.asarray(gx)).max())
        assert float(np.abs(np.asarray(gs - gx)).max()) < 2e-5 * scale


def test_causal_lm_with_splash_matches_xla():
    """The whole model with model.attention='splash' vs 'xla' (same params): logits at real tokens
    of padded and packed rows, and the gradient of a masked next-token loss."""
    base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    xla_model = CausalLM(ModelConfig(**base, attention="xla"), rngs=nnx.Rngs(0))
    graphdef_s = nnx.graphdef(CausalLM(ModelConfig(**base, attention="splash"),
                                       rngs=nnx.Rngs(0)))
    graphdef_x, params = nnx.split(xla_model)
    t = 128
    seg = np.ones((2, t), np.int32)
    seg[0, 100:] = 0
    seg[1, 60:] = 2  # two packed examples
    pos = np.tile(np.arange(t), (2, 1))
    pos[1, 60:] -= 60
    ids = jnp.asarray(np.random.RandomState(2).randint(0, 128, (2, t)))
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    real = np.asarray(seg) > 0

    def loss(graphdef, p):
        logits = nnx.merge(graphdef, p)(ids, seg, pos)
        lp = jax.nn.log_softmax(logits[:, :-1])
        tok = jnp.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
        return -jnp.sum(tok * (seg[:, 1:] > 0)), logits

    run = jax.jit(lambda p: {g: jax.value_and_grad(lambda q: loss(gd, q), has_aux=True)(p)
                             for g, gd in (("splash", graphdef_s), ("xla", graphdef_x))})
    out = run(params)
    (ls, logits_s), grads_s = out["splash"]
    (lx, logits_x), grads_x = out["xla"]
    assert float(np.abs(np.asarray(logits_s - logits_x))[real].max()) < 1e-5
    np.testing.assert_allclose(float(ls), float(lx), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads_x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * max(
            float(np.abs(np.asarray(b)).max()), 1e-3))


def test_splash_under_a_mesh_runs_in_shard_map():
    """With a multi-device context mesh the kernel runs per device (batch over data x fsdp, heads
    over tensor): same values as on one device."""
    r = np.random.RandomState(3)
    q, k, v = (jnp.asarray(r.randn(B, T, n, D), jnp.float32) for n in (H, KV, KV))
    seg = _segments()
    fn = jax.jit(lambda q, k, v: splash_attention(q, k, v, seg, scale=D ** -0.5, block=128))
    single = fn(q, k, v)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with jax.set_mesh(mesh):
        lowered = jax.jit(lambda q, k, v: splash_attention(q, k, v, seg, scale=D ** -0.5,
                                                           block=128)).lower(q, k, v)
        assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
        sharded = lowered.compile()(q, k, v)
    real = np.asarray(seg) > 0
    assert float(np.abs(np.asarray(sharded - single))[real].max()) < 1e-6
