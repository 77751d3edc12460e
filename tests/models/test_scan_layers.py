"""Scanned layers: one scanned block over stacked [L, ...] weights; the same params run unrolled give
the same numbers, and the stacked KV cache decodes like a full forward (and like a per-layer cache).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from sgalm_jax.models import CausalLM, KVCache, ModelConfig
from sgalm_jax.sharding import make_mesh, state_shardings

CFG = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def _graphdef(**kw):
    return nnx.graphdef(nnx.eval_shape(lambda: CausalLM(ModelConfig(**CFG, **kw),
                                                        rngs=nnx.Rngs(0))))


@functools.lru_cache(maxsize=1)
def _params():
    """The params, initialised once (jitted: eager init is slow); remat and scan_layers do not
    change them."""
    return jax.jit(lambda: nnx.state(CausalLM(ModelConfig(**CFG), rngs=nnx.Rngs(0))))()


def _pair(**kw):
    """(scanned model, graphdef of the unrolled model): the same params serve both."""
    scanned = nnx.merge(_graphdef(**kw), _params())
    return scanned, _graphdef(scan_layers=False, **kw)


def test_params_are_stacked_with_a_layers_axis():
    model, _ = _pair()
    kernel = model.model.layers.self_attn.q_proj.kernel
    assert kernel[...].shape == (2, 32, 32)
    assert kernel.get_metadata()["logical_axes"] == ("layers", "embed", "heads")
    assert model.model.layers.input_layernorm.weight[...].shape == (2, 32)
    spec = state_shardings(nnx.state(model), make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    assert spec["model"]["layers"]["mlp"]["up_proj"]["kernel"].get_value().spec == P(
        None, "fsdp", "tensor")
    # each layer was initialised from its own key
    assert not np.allclose(kernel[...][0], kernel[...][1])


def test_scan_and_unroll_agree_in_values_and_gradients():
    model, unrolled = _pair(remat="full")
    graphdef, params = nnx.split(model)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 12)))
    mask = jnp.asarray(np.r_[[[1] * 12], [[0] * 3 + [1] * 9]])

    def loss(gd, p):
        logits = nnx.merge(gd, p)(ids, mask)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 5] * mask), logits

    run = jax.jit(lambda p: [jax.value_and_grad(lambda q: loss(gd, q), has_aux=True)(p)
                             for gd in (graphdef, unrolled)])
    ((l_s, lg_s), g_s), ((l_u, lg_u), g_u) = run(params)
    np.testing.assert_allclose(np.asarray(lg_s), np.asarray(lg_u), atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_u), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_stacked_cache_decodes_like_a_full_forward_and_like_a_per_layer_cache():
    """Prefill 6 tokens then decode 2 one by one: the logits of each step equal a full forward's,
    for the stacked cache under scan and unrolled, and for a tuple of per-layer arrays."""
    model, unrolled = _pair()
    graphdef, params = nnx.split(model)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 97, (2, 8)))
    stacked = KVCache.init(model.config, 2, 12)
    assert stacked.stacked and stacked.k.shape == (2, 2, 2, 8, 12)
    assert stacked.v.shape == (2, 2, 2, 12, 8)
    per_layer = KVCache(k=tuple(stacked.k), v=tuple(stacked.v), valid=stacked.valid,
                        index=stacked.index)

    def decode(gd, cache):
        m = nnx.merge(gd, params)
        pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
        out, cache = m(ids[:, :6], positions=pos[:, :6], cache=cache)
        outs = [out]
        for t in range(6, 8):
            out, cache = m(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache)
            outs.append(out)
        return jnp.concatenate(outs, axis=1), cache

    @jax.jit
    def run():
        return (nnx.merge(graphdef, params)(ids), decode(graphdef, stacked),
                decode(unrolled, stacked), decode(graphdef, per_layer))

    full, (got_s, cache_s), (got_u, cache_u), (got_t, cache_t) = run()
    for got in (got_s, got_u, got_t):
        np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=1e-5)
    assert isinstance(cache_t.k, tuple) and int(cache_s.index) == 8
    np.testing.assert_allclose(np.asarray(cache_s.k), np.asarray(jnp.stack(cache_t.k)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(cache_s.v), np.asarray(cache_u.v), atol=1e-6)


def test_per_row_write_index_matches_the_shared_index():
    """A cache whose index is a vector [B] (one write slot per row) gives the same logits and cache
    as the shared scalar index when all rows are at the same slot."""
    model, _ = _pair()
    ids = jnp.asarray(np.random.RandomState(2).randint(0, 97, (2, 5)))
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    cache = KVCache.init(model.config, 2, 8)
    rows = KVCache(k=cache.k, v=cache.v, valid=cache.valid, index=jnp.zeros((2,), jnp.int32))
    graphdef, params = nnx.split(model)
    run = jax.jit(lambda c: nnx.merge(graphdef, params)(ids, positions=pos, cache=c))
    (a, ca), (b, cb) = run(cache), run(rows)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ca.k), np.asarray(cb.k))
    np.testing.assert_array_equal(np.asarray(cb.index), [5, 5])
