"""The roles layer: learners with different graphs and optimizers, frozen snapshots, views and
aliases; one checkpoint holds every role and a resumed run continues bit-identically."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sgalm_jax import sharding as sh
from sgalm_jax.errors import CheckpointError
from sgalm_jax.training import Checkpointer, Roles, model_loss, split_model


class ScalarHead(nnx.Module):
    """A graph unlike the causal LM's (GAD's discriminator is backbone + head): mean-pooled token
    embeddings of the student's vocabulary size through Linear(64, 1)."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(512, 64, rngs=rngs)
        self.head = nnx.Linear(64, 1, use_bias=False, rngs=rngs)

    def __call__(self, ids, mask):
        h = self.embed(ids) * mask[..., None]
        return self.head(h.sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1))[:, 0]


def _sft_loss(model, batch, rng):
    del rng
    logits = model(batch["input_ids"], batch["attention_mask"], batch["positions"])
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    tok = jnp.take_along_axis(lp, batch["input_ids"][:, 1:, None], -1)[..., 0]
    m = batch["loss_mask"][:, 1:]
    return -jnp.sum(tok * m) / jnp.maximum(m.sum(), 1), {}


def _bt_loss(model, batch, rng):
    del rng
    s = model(batch["input_ids"], batch["attention_mask"].astype(jnp.float32))
    # rows alternate (teacher, student): -log sigmoid(s_teacher - s_student)
    return -jnp.mean(jax.nn.log_sigmoid(s[0::2] - s[1::2])), {"score_mean": jnp.mean(s)}


def _declare(mesh, host_params, *, saved_reference=True):
    graphdef, params = host_params
    d_graph, d_params = split_model(ScalarHead(nnx.Rngs(1)))
    roles = Roles(mesh)
    roles.learner("student", graphdef, params, optax.adamw(1e-3), seed=0,
                  init=lambda: jax.tree.map(jnp.asarray, params))
    roles.learner("discriminator", d_graph, d_params, optax.sgd(1e-2), seed=1)
    roles.snapshot("reference", of="student", saved=saved_reference,
                   rebuild=None if saved_reference else (lambda: jax.tree.map(jnp.asarray, params)))
    roles.view("policy_now", of="student")
    roles.alias("generator", "student")
    return roles


def _steps(roles, graphdef, d_graph, batch, n):
    roles["student"].add_step("sft", model_loss(graphdef, _sft_loss))
    roles["discriminator"].add_step("bt", model_loss(d_graph, _bt_loss))
    out = []
    for _ in range(n):
        out.append(jax.device_get(roles["discriminator"].step("bt", batch)))
        out.append(jax.device_get(roles["generator"].step("sft", batch)))
    return out


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_roles_share_train_snapshot_and_resume_bit_identically(tmp_path, host_params, make_batch):
    mesh = sh.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
    graphdef, params = host_params
    d_graph, _ = split_model(ScalarHead(nnx.Rngs(1)))
    batch = sh.global_batch_from_local(make_batch(batch=8, length=16), mesh)

    roles = _declare(mesh, host_params)
    assert roles.build() == {}
    assert roles.same("generator", "student") and not roles.same("reference", "student")
    assert sorted(roles.names()) == ["discriminator", "policy_now", "reference", "student"]
    assert roles["reference"].step_count == 0 and not roles["reference"].is_learner
    with pytest.raises(ValueError, match="frozen"):
        roles["reference"].add_step("x", model_loss(graphdef, _sft_loss))

    _steps(roles, graphdef, d_graph, batch, 2)
    # The snapshot kept the start params; the view follows the student; both learners moved.
    for a, b in zip(_leaves(roles["reference"].params), _leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(roles["policy_now"].params),
                                                        _leaves(params)))
    assert roles["student"].step_count == 2 and roles["discriminator"].step_count == 2

    with Checkpointer(str(tmp_path / "ck"), async_save=False) as ck:
        roles.save(ck, 2, {"stage": "warmup"})
        ck.wait()
        continued = _steps(roles, graphdef, d_graph, batch, 2)

        resumed = _declare(mesh, host_params)
        meta = resumed.build(ck, 2)
        assert meta["stage"] == "warmup"
        assert meta["roles"] == {"student": {"kind": "learner", "step": 2},
                                 "discriminator": {"kind": "learner", "step": 2},
                                 "reference": {"kind": "frozen", "step": 0}}
        for name in ("student", "discriminator"):  # same shardings: reuse the compiled steps
            resumed[name].steps = roles[name].steps
        again = _steps(resumed, graphdef, d_graph, batch, 2)
    for a, b in zip(continued, again):
        assert {k: float(v) for k, v in a.items()} == {k: float(v) for k, v in b.items()}
    for name in ("student", "discriminator", "reference"):
        for a, b in zip(_leaves(roles[name].params), _leaves(resumed[name].params)):
            np.testing.assert_array_equal(a, b, err_msg=name)
    for a, b in zip(_leaves(roles["student"].state.opt_state),
                    _leaves(resumed["student"].state.opt_state)):
        np.testing.assert_array_equal(a, b)


def test_unsaved_frozen_role_is_rebuilt_and_other_roles_are_an_error(tmp_path, host_params):
    mesh = sh.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, jax.devices()[:2])
    graphdef, params = host_params
    roles = _declare(mesh, host_params, saved_reference=False)
    roles.build()
    with Checkpointer(str(tmp_path / "ck"), async_save=False) as ck:
        roles.save(ck, 1)
        ck.wait()
        assert "reference" not in roles.manifest()
        back = _declare(mesh, host_params, saved_reference=False)
        back.build(ck, 1)
        for a, b in zip(_leaves(back["reference"].params), _leaves(params)):
            np.testing.assert_array_equal(a, b)

        other = Roles(mesh)  # a run whose roles differ from the checkpoint's
        other.learner("policy", graphdef, params, optax.adamw(1e-3))
        with pytest.raises(CheckpointError, match="roles"):
            other.build(ck, 1)
    with pytest.raises(ValueError, match="already declared"):
        roles.learner("student", graphdef, params, optax.adamw(1e-3))
    with pytest.raises(KeyError, match="no role 'critic'"):
        roles["critic"]


def test_a_new_stage_starts_from_another_stages_checkpoint(tmp_path, host_params):
    """GAD's adversarial stage: the student and discriminator come from the warmup's checkpoint
    (``only=``), the KL reference is a fresh snapshot of the restored student."""
    mesh = sh.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, jax.devices()[:2])
    graphdef, params = host_params
    d_graph, d_params = split_model(ScalarHead(nnx.Rngs(1)))
    warm = Roles(mesh)
    warm.learner("student", graphdef, params, optax.adamw(1e-3))
    warm.learner("discriminator", d_graph, d_params, optax.adamw(1e-3))
    warm.build()
    shifted = jax.tree.map(lambda x: x + 1.0, warm["student"].params)
    warm["student"].set_state(dataclasses.replace(warm["student"].state, params=shifted))
    with Checkpointer(str(tmp_path / "warmup"), async_save=False) as ck:
        warm.save(ck, 800)
        ck.wait()
        gad = Roles(mesh)
        gad.learner("student", graphdef, params, optax.adamw(1e-6))
        gad.learner("discriminator", d_graph, d_params, optax.adamw(1e-6))
        gad.snapshot("reference", of="student")
        with pytest.raises(CheckpointError, match="holds roles"):
            gad.build(ck, 800)  # the warmup has no reference
        gad.build(ck, 800, only=["student", "discriminator"])
    for name in ("student", "reference"):
        for a, b in zip(_leaves(gad[name].params), _leaves(shifted)):
            np.testing.assert_array_equal(a, b, err_msg=name)
