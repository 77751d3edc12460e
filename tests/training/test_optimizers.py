"""Optimizers match torch.optim numerically; schedules, clipping and the trainable mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sgalm_jax.config import base_config
from sgalm_jax.errors import ConfigError
from sgalm_jax.training import make_optimizer, make_schedule, param_paths, trainable_mask

torch = pytest.importorskip("torch")


def _run_ours(tx, params, grads_seq):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads_seq:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


def _run_torch(make_opt, params, grads_seq):
    tensors = {k: torch.nn.Parameter(torch.tensor(np.asarray(v))) for k, v in params.items()}
    opt = make_opt(list(tensors.values()))
    for g in grads_seq:
        for k, t in tensors.items():
            t.grad = torch.tensor(np.asarray(g[k]))
        opt.step()
    return {k: t.detach().numpy() for k, t in tensors.items()}


def _problem(seed=0, steps=6):
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=(7, 5)).astype(np.float32),
              "v": rng.normal(size=(4, 3)).astype(np.float32)}
    # Gradients of mixed scale, including tiny ones where eps placement matters.
    grads = [{k: (rng.normal(size=p.shape) * 10.0 ** rng.integers(-6, 1, size=p.shape))
              .astype(np.float32) for k, p in params.items()} for _ in range(steps)]
    return params, grads


def _opt_cfg(**kw):
    cfg = base_config().optimizer
    cfg.max_grad_norm = 0.0
    for k, v in kw.items():
        cfg[k] = v
    return cfg


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.01)])
def test_rmsprop_matches_torch(momentum, weight_decay):
    params, grads = _problem()
    cfg = _opt_cfg(name="rmsprop", learning_rate=1e-2, momentum=momentum,
                   weight_decay=weight_decay)
    assert cfg.rmsprop_decay == 0.99 and cfg.eps == 1e-8  # torch's defaults are the defaults
    tx, _ = make_optimizer(cfg, num_steps=10)
    ours = _run_ours(tx, jax.tree.map(jnp.asarray, params), [jax.tree.map(jnp.asarray, g)
                                                              for g in grads])
    ref = _run_torch(lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.99, eps=1e-8,
                                                   momentum=momentum, weight_decay=weight_decay),
                     params, grads)
    for k in params:
        np.testing.assert_allclose(np.asarray(ours[k]), ref[k], rtol=1e-5, atol=1e-6)


def test_optax_default_rmsprop_differs_from_torch():
    """Why torch_rmsprop exists: optax's default puts eps inside the sqrt and decays by 0.9."""
    params, grads = _problem()
    ours = _run_ours(optax.rmsprop(1e-2, decay=0.99, eps=1e-8), params, grads)
    ref = _run_torch(lambda p: torch.optim.RMSprop(p, lr=1e-2), params, grads)
    assert not np.allclose(np.asarray(ours["w"]), ref["w"], rtol=1e-5, atol=1e-6)


def test_sgd_matches_torch():
    params, grads = _problem(1)
    tx, _ = make_optimizer(_opt_cfg(name="sgd", learning_rate=0.1, momentum=0.9,
                                    weight_decay=0.01), num_steps=10)
    ours = _run_ours(tx, params, grads)
    ref = _run_torch(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
                     params, grads)
    for k in params:
        np.testing.assert_allclose(np.asarray(ours[k]), ref[k], rtol=1e-5, atol=1e-6)


def test_adamw_matches_torch():
    params, grads = _problem(2)
    tx, _ = make_optimizer(_opt_cfg(name="adamw", learning_rate=1e-2, weight_decay=0.1,
                                    b1=0.9, b2=0.95), num_steps=10, params=params)
    ours = _run_ours(tx, params, grads)
    ref = _run_torch(lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                                 weight_decay=0.1), params, grads)
    for k in params:
        np.testing.assert_allclose(np.asarray(ours[k]), ref[k], rtol=1e-5, atol=1e-6)


def test_clipping_matches_torch_clip_grad_norm():
    params, grads = _problem(3)
    grads = [jax.tree.map(lambda g: g * 100, g) for g in grads]
    tx, _ = make_optimizer(_opt_cfg(name="sgd", learning_rate=0.1, max_grad_norm=1.0),
                           num_steps=10)
    ours = _run_ours(tx, params, grads)
    tensors = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    opt = torch.optim.SGD(list(tensors.values()), lr=0.1)
    for g in grads:
        for k, t in tensors.items():
            t.grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(list(tensors.values()), 1.0)
        opt.step()
    for k in params:
        np.testing.assert_allclose(np.asarray(ours[k]), tensors[k].detach().numpy(), rtol=1e-5,
                                   atol=1e-6)


def test_schedules():
    lr = make_schedule(1.0, schedule="cosine", warmup_steps=10, num_steps=110, end_lr_factor=0.1)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(lr(60)), 0.55, rtol=1e-5)  # halfway down the cosine
    np.testing.assert_allclose(float(lr(110)), 0.1, rtol=1e-5)
    lin = make_schedule(2.0, schedule="linear", warmup_steps=0, num_steps=100)
    np.testing.assert_allclose([float(lin(0)), float(lin(50)), float(lin(100))], [2, 1, 0],
                               atol=1e-6)
    const = make_schedule(3.0, schedule="constant", warmup_steps=4)
    np.testing.assert_allclose([float(const(2)), float(const(4)), float(const(1000))],
                               [1.5, 3.0, 3.0])


def test_trainable_mask_and_paths(tiny_config, host_params):
    _, params = host_params
    paths = jax.tree.leaves(param_paths(params))
    assert "model/embed_tokens/embedding" in paths
    assert "model/layers/self_attn/q_proj/kernel" in paths  # stacked: one path for all layers
    mask = trainable_mask(params, r"embed_tokens|layers/mlp/")
    flat = dict(zip(paths, jax.tree.leaves(mask)))
    assert not flat["model/embed_tokens/embedding"]
    assert not flat["model/layers/mlp/up_proj/kernel"]
    assert flat["model/layers/self_attn/q_proj/kernel"]
    with pytest.raises(ConfigError, match="optimizer.freeze"):
        trainable_mask(params, "no_such_param")
    with pytest.raises(ConfigError, match="optimizer.freeze"):
        trainable_mask(params, "(")
