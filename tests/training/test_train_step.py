"""The generic train step: multi-device == one device, accumulation == full batch, mixed precision,
frozen params, a frozen reference model (closure and argument), donation.

Compiles dominate on CPU, so the compiled steps are shared between tests (``_step``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from sgalm_jax import sharding as sh
from sgalm_jax.algorithms.sft import make_sft_loss
from sgalm_jax.config import base_config
from sgalm_jax.losses.common import causal_lm_logprobs
from sgalm_jax.training import (
    create_train_state,
    make_optimizer,
    make_train_step,
    trainable_mask,
)

MESHES = {
    "one": ({"data": 1, "fsdp": 1, "tensor": 1}, 1),
    "222": ({"data": 2, "fsdp": 2, "tensor": 2}, 8),
}


@functools.cache
def _mesh(name):
    shape, n = MESHES[name]
    return sh.make_mesh(shape, devices=jax.devices()[:n])


def _optimizer(lr=0.5, name="sgd", **kw):
    cfg = base_config().optimizer
    cfg.learning_rate = lr
    cfg.name = name
    cfg.max_grad_norm = 1.0
    for k, v in kw.items():
        cfg[k] = v
    return cfg


_STEPS: dict = {}


def _step(host_params, mesh_name, opt_key="sgd", **step_kw):
    """A fresh train state and a (cached) compiled step for it."""
    graphdef, params = host_params
    # SGD with momentum by default: the update is linear in the gradient, so comparisons are well
    # conditioned (Adam's g / (sqrt(v) + eps) turns reduction-order noise in near-zero gradients
    # into lr-sized differences).
    opt_cfg = {"sgd": _optimizer(momentum=0.9),
               "adamw_frozen": _optimizer(lr=1e-2, name="adamw", freeze="embed_tokens")}[opt_key]
    mesh = _mesh(mesh_name)
    tx, schedule = make_optimizer(opt_cfg, num_steps=10, params=params)
    state, shardings = create_train_state(params, tx, seed=0, mesh=mesh)
    key = (mesh_name, opt_key, tuple(sorted(step_kw.items())))
    if key not in _STEPS:
        kw = dict(step_kw)
        if kw.pop("freeze", False):
            kw["trainable"] = trainable_mask(params, opt_cfg.freeze)
        _STEPS[key] = make_train_step(make_sft_loss(graphdef), tx, mesh=mesh,
                                      state_shardings=shardings, learning_rate=schedule, **kw)
    return state, _STEPS[key]


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-7):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_sft_step_on_222_mesh_equals_one_device(host_params, make_batch):
    results = {}
    for name in ("one", "222"):
        state, step = _step(host_params, name)
        for seed in (0, 1):  # two steps: the momentum buffer is exercised too
            batch = sh.global_batch_from_local(make_batch(seed=seed), _mesh(name))
            state, metrics = step(state, batch)
        results[name] = (jax.device_get(metrics), state)

    (m1, s1), (m8, s8) = results["one"], results["222"]
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-5)
    p1, p8 = jax.device_get(s1.params), jax.device_get(s8.params)
    _assert_trees_close(p1, p8)
    _assert_trees_close(jax.device_get(s1.opt_state), jax.device_get(s8.opt_state))
    assert not np.allclose(p8["model"]["norm"]["weight"][...], 1.0)  # the steps moved the params

    # Really sharded: FSDP over `fsdp`, heads/MLP over `tensor`, optimizer state alike.
    q = s8.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"][...]  # stacked [L, ...]
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2)
    emb = s8.params["model"]["embed_tokens"]["embedding"][...]
    assert emb.sharding.spec == P("tensor", "fsdp")
    trace = s8.opt_state[1][0].trace["model"]["layers"]["mlp"]["up_proj"]["kernel"][...]
    assert trace.sharding.spec == P(None, "fsdp", "tensor")
    assert trace.addressable_shards[0].data.size == trace.size // 4


def test_grad_accumulation_4_micro_batches_equals_full_batch(host_params, make_batch):
    batch = sh.global_batch_from_local(make_batch(seed=3), _mesh("222"))
    out = []
    for kw in ({}, {"grad_accum_steps": 4, "accum_weight": "num_tokens"}):
        state, step = _step(host_params, "222", **kw)
        state, metrics = step(state, batch)
        out.append((jax.device_get(state.params), jax.device_get(metrics)))
    (p_full, m_full), (p_acc, m_acc) = out
    np.testing.assert_allclose(m_full["loss"], m_acc["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_full["grad_norm"], m_acc["grad_norm"], rtol=1e-5)
    assert m_full["num_tokens"] == m_acc["num_tokens"]
    _assert_trees_close(p_full, p_acc)


def test_bf16_compute_keeps_fp32_master_weights(host_params, make_batch):
    batch = sh.global_batch_from_local(make_batch(), _mesh("one"))
    state32, step32 = _step(host_params, "one")
    state16, step16 = _step(host_params, "one", compute_dtype="bfloat16")
    state32, m32 = step32(state32, batch)
    state16, m16 = step16(state16, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state16.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state16.opt_state)
               if jnp.issubdtype(x.dtype, jnp.floating))
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=2e-2)
    np.testing.assert_allclose(m16["grad_norm"], m32["grad_norm"], rtol=0.1)


def test_frozen_params_do_not_move(host_params, make_batch):
    _, params = host_params
    state, step = _step(host_params, "one", "adamw_frozen", freeze=True)
    state, _ = step(state, sh.global_batch_from_local(make_batch(), _mesh("one")))
    new = jax.device_get(state.params)
    np.testing.assert_array_equal(new["model"]["embed_tokens"]["embedding"][...],
                                  params["model"]["embed_tokens"]["embedding"][...])
    assert not np.allclose(new["model"]["norm"]["weight"][...],
                           params["model"]["norm"]["weight"][...])
    # Frozen params carry no optimizer state (set_to_zero is stateless).
    n_state = sum(x.size for x in jax.tree.leaves(state.opt_state))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    n_emb = params["model"]["embed_tokens"]["embedding"][...].size
    assert n_state < 2 * (n_params - n_emb) + 100


_REF_RESULTS: dict = {}


@pytest.mark.parametrize("how", ["closure", "argument"])
def test_loss_with_frozen_reference_model(host_params, make_batch, how):
    """A KL-to-reference loss: the reference params are a second, frozen pytree."""
    graphdef, params = host_params
    mesh = _mesh("222")
    ref_shardings = sh.state_shardings(params, mesh)
    ref_params = jax.device_put(jax.tree.map(lambda x: x * 1.01, params), ref_shardings)
    ref_before = jax.device_get(ref_params)

    def loss_with_ref(p, batch, rng, ref):
        model, ref_model = nnx.merge(graphdef, p), nnx.merge(graphdef, ref)
        args = (batch["input_ids"], batch["attention_mask"], batch["positions"])
        lp = causal_lm_logprobs(model(*args), batch["input_ids"], batch["loss_mask"])
        # The reference is a fixed target: no gradient may reach it.
        ref_lp = jax.lax.stop_gradient(
            causal_lm_logprobs(ref_model(*args), batch["input_ids"], batch["loss_mask"]))
        kl = jnp.mean(lp.sequence_sum - ref_lp.sequence_sum)
        nll = -jnp.mean(lp.sequence_mean)
        return nll + 0.1 * kl, {"kl": kl}

    tx = optax.sgd(0.1)
    if how == "closure":
        loss_fn, extra, extra_sh = (lambda p, b, r: loss_with_ref(p, b, r, ref_params)), (), ()
    else:
        loss_fn, extra, extra_sh = loss_with_ref, (ref_params,), (ref_shardings,)
    state, shardings = create_train_state(params, tx, mesh=mesh)
    step = make_train_step(loss_fn, tx, mesh=mesh, state_shardings=shardings,
                           extra_shardings=extra_sh)
    batch = sh.global_batch_from_local(make_batch(), mesh)
    state, m1 = step(state, batch, *extra)
    state, m2 = step(state, batch, *extra)
    assert float(m1["kl"]) != 0 and np.isfinite(float(m2["loss"]))
    assert float(m2["loss"]) < float(m1["loss"])
    _assert_trees_close(jax.device_get(ref_params), ref_before, rtol=0, atol=0)
    _REF_RESULTS[how] = float(m2["loss"])
    if len(_REF_RESULTS) == 2:  # both ways compute the same thing
        np.testing.assert_allclose(_REF_RESULTS["closure"], _REF_RESULTS["argument"], rtol=1e-6)


def test_state_is_donated(host_params, make_batch):
    state, step = _step(host_params, "one")
    old_leaf = jax.tree.leaves(state.params)[0]
    new_state, _ = step(state, sh.global_batch_from_local(make_batch(), _mesh("one")))
    assert old_leaf.is_deleted()
    assert int(new_state.step) == 1
