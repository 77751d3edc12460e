"""Roles on one shared frozen base (LoRA): a causal-LM student and a ScoreModel discriminator
(adapters plus its scalar head, GAD's shape) on one base, a reference that is the base itself
(adapters off), a snapshot that copies adapters only; only adapter/head leaves get gradients and
optimizer state and change; checkpoints hold them alone and a resumed run continues
bit-identically with the base read again."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sgalm_jax import sharding as sh
from sgalm_jax.models import CausalLM, ScoreModel
from sgalm_jax.models import lora as L
from sgalm_jax.training import Checkpointer, Roles, model_loss, split_model

SPEC = L.LoraSpec(rank=4, alpha=8.0, targets=r"(q_proj|v_proj|up_proj)$")


def _sft_loss(model, batch, rng):
    del rng
    logits = model(batch["input_ids"], batch["attention_mask"], batch["positions"])
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    tok = jnp.take_along_axis(lp, batch["input_ids"][:, 1:, None], -1)[..., 0]
    m = batch["loss_mask"][:, 1:]
    return -jnp.sum(tok * m) / jnp.maximum(m.sum(), 1), {}


def _bt_loss(model, batch, rng):
    del rng
    s = model(batch["input_ids"], batch["attention_mask"], batch["positions"])
    return -jnp.mean(jax.nn.log_sigmoid(s[0::2] - s[1::2])), {}


def _adapted(cls, config):
    def make():
        m = cls(config, rngs=nnx.Rngs(0))
        L.add_adapters(m, SPEC)
        return m

    return split_model(nnx.eval_shape(make))


def _declare(mesh, host_params, config):
    base_graph, base_params = host_params
    g_graph, g_abstract = _adapted(CausalLM, config)
    d_graph, d_abstract = _adapted(ScoreModel, config)
    shard = lambda tree: sh.state_shardings(tree, mesh)  # noqa: E731

    def student_init():
        own, _ = L.split_adapters(g_abstract)
        return L.init_adapters(own, seed=1, shardings=shard(own))

    def disc_init():  # adapters from another seed, plus a fresh head (normal(0, 0.02))
        own = nnx.from_flat_state({p: v for p, v in nnx.to_flat_state(d_abstract)
                                   if p[0] != "model" or L.is_adapter_path(p)})
        adapters, head = L.split_adapters(own)
        adapters = L.init_adapters(adapters, seed=2, shardings=shard(adapters))
        kernel = jax.random.normal(jax.random.key(3), (64, 1)) * 0.02
        head["score"]["kernel"] = head["score"]["kernel"].replace(kernel)
        return nnx.merge_state(adapters, head)

    roles = Roles(mesh)
    roles.frozen("base", base_graph, base_params, saved=False,
                 init=lambda: jax.device_put(base_params, shard(base_params)))
    roles.learner("student", g_graph, g_abstract, optax.adamw(1e-2), seed=0, base="base",
                  init=student_init)
    roles.learner("discriminator", d_graph, d_abstract, optax.sgd(1e-1), seed=1, base="base",
                  init=disc_init)
    roles.view("reference", of="base")
    roles.snapshot("start", of="student")  # frozen adapters on the same base
    return roles, g_graph, d_graph


def _leaf_paths(tree):
    return sorted("/".join(map(str, p)) for p, _ in nnx.to_flat_state(tree))


def _np(tree):
    return {"/".join(map(str, p)): np.asarray(jax.device_get(v.get_value()))
            for p, v in nnx.to_flat_state(tree)}


def test_adapter_roles_share_one_base_and_train_only_their_own_params(
        tmp_path, host_params, make_batch, tiny_config):
    mesh = sh.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, jax.devices()[:2])
    roles, g_graph, d_graph = _declare(mesh, host_params, tiny_config)
    roles.build()
    base, student, disc = roles["base"], roles["student"], roles["discriminator"]
    base_before = _np(base.params)

    # Own params: adapters (and the scorer's head); everything else is read from the one base.
    assert _leaf_paths(student.own_params) == [p for p in _leaf_paths(student.params)
                                               if "/lora/" in p]
    assert set(_leaf_paths(disc.own_params)) - {"score/kernel"} == {
        p for p in _leaf_paths(disc.params) if "/lora/" in p}
    assert "lm_head" not in str(_leaf_paths(disc.params))  # a scorer reads the base's body only
    flat_base = dict(nnx.to_flat_state(base.params))
    for role in (student, disc):
        for p, v in nnx.to_flat_state(role.params):
            if p in flat_base:
                assert v.get_value() is flat_base[p].get_value()  # the same buffers, no copy
    # Optimizer state exists for the own params only (AdamW: mu and nu of each adapter).
    n_own = sum(x.size for x in jax.tree.leaves(student.own_params))
    n_opt = sum(x.size for x in jax.tree.leaves(student.state.opt_state) if x.ndim)
    assert n_opt == 2 * n_own
    assert n_own < 0.05 * sum(x.size for x in jax.tree.leaves(base.params))

    # Fresh adapters: the student is the base; the reference view is the base (adapters off).
    batch = sh.global_batch_from_local(make_batch(8, 16), mesh)
    fwd = jax.jit(lambda g, p, b: nnx.merge(g, p)(b["input_ids"], b["attention_mask"],
                                                  b["positions"]), static_argnums=0)
    ref = roles["reference"]
    np.testing.assert_array_equal(fwd(g_graph, student.params, batch),
                                  fwd(ref.graphdef, ref.params, batch))

    student.add_step("sft", model_loss(g_graph, _sft_loss))
    disc.add_step("bt", model_loss(d_graph, _bt_loss))
    snap_before = _np(roles["start"].own_params)
    own_before = _np(student.own_params)
    for _ in range(2):
        m = student.step("sft", batch)
        disc.step("bt", batch)
    assert float(m["grad_norm"]) > 0
    own_after = _np(student.own_params)
    assert all(not np.array_equal(own_before[k], own_after[k]) for k in own_after
               if k.endswith("/a"))  # A moves once B is non-zero (B moves at the first step)
    assert all(not np.array_equal(own_before[k], own_after[k]) for k in own_after
               if k.endswith("/b"))
    for k, v in _np(base.params).items():  # the base is untouched, bit for bit
        np.testing.assert_array_equal(v, base_before[k])
    for k, v in _np(roles["start"].own_params).items():  # the snapshot kept the old adapters
        np.testing.assert_array_equal(v, snap_before[k])
    assert not np.array_equal(fwd(g_graph, student.params, batch),
                              fwd(ref.graphdef, ref.params, batch))

    # One checkpoint: adapters and the head only, no base; resume restores them and reads the
    # base again (its init).
    state = roles.checkpoint_state()
    assert sorted(state) == ["discriminator", "start", "student"]
    stored = _leaf_paths(nnx.State(state["student"]["params"]))
    assert stored and all("/lora/" in p for p in stored)
    assert "score/kernel" in _leaf_paths(nnx.State(state["discriminator"]["params"]))
    saved = {n: _np(roles[n].own_params) for n in ("student", "discriminator", "start")}
    saved_opt = [np.asarray(x) for x in jax.tree.leaves(student.state.opt_state)]
    with Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
        roles.save(ckpt, 2, {"step": 2})
        assert ckpt.read_meta(2)["roles"]["student"] == {"kind": "learner", "step": 2,
                                                          "base": "base"}
    again, _, _ = _declare(mesh, host_params, tiny_config)
    with Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
        again.build(ckpt, 2)
    for name, want in saved.items():
        got = _np(again[name].own_params)
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    for got, want in zip(jax.tree.leaves(again["student"].state.opt_state), saved_opt):
        np.testing.assert_array_equal(got, want)
    assert again["student"].step_count == 2
    for k, v in _np(again["base"].params).items():
        np.testing.assert_array_equal(v, base_before[k])


def test_lora_dropout_follows_the_step_key(host_params, make_batch, tiny_config):
    """Dropout is on inside a role's train step, its masks drawn from the step's key: the same
    state reproduces the step bit for bit, another RNG gives another loss."""
    base_graph, base_params = host_params
    spec = L.LoraSpec(rank=4, dropout=0.5, targets="q_proj$")

    def make():
        m = CausalLM(tiny_config, rngs=nnx.Rngs(0))
        L.add_adapters(m, spec)
        return m

    graph, abstract = split_model(nnx.eval_shape(make))
    mesh = sh.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    roles = Roles(mesh)
    roles.frozen("base", base_graph, base_params, saved=False,
                 init=lambda: jax.tree.map(jnp.asarray, base_params))
    roles.learner("policy", graph, abstract, optax.sgd(1.0), base="base",
                  init=lambda: _nonzero_b(L.init_adapters(L.split_adapters(abstract)[0], 0)))
    roles.build()
    policy = roles["policy"]
    policy.add_step("s", model_loss(graph, _sft_loss))
    batch = sh.global_batch_from_local(make_batch(4, 16), mesh)
    start = jax.tree.map(np.asarray, jax.device_get(policy.state))

    def step_from(rng):
        policy.set_state(dataclasses.replace(jax.tree.map(jnp.asarray, start),
                                             rng=jnp.asarray(rng)))
        return float(jax.device_get(policy.step("s", batch))["loss"])

    first = step_from(start.rng)
    assert step_from(start.rng) == first
    assert step_from(jax.random.key_data(jax.random.key(7))) != first


def _nonzero_b(state):
    return jax.tree.map(lambda x: x + 0.01 if x.ndim >= 2 and not x.any() else x, state)


def test_base_declaration_errors(host_params, tiny_config):
    base_graph, base_params = host_params
    roles = Roles(None)
    roles.frozen("base", base_graph, base_params, saved=False)
    with pytest.raises(ValueError, match="needs both"):
        roles.learner("plain", base_graph, base_params, optax.sgd(1.0), base="base")
    roles.learner("x", base_graph, base_params, optax.sgd(1.0))
    graph, abstract = _adapted(CausalLM, tiny_config)
    with pytest.raises(ValueError, match="must be a frozen role"):
        roles.learner("y", graph, abstract, optax.sgd(1.0), base="x")


def test_lora_setup_declares_base_adapters_and_a_scorer_with_its_head(tmp_path, hf_model_dir):
    """What the algorithms (and GAD's loop) call: LoraSetup from a config gives a bf16 base read
    from model.path, adapter learners, a ScoreModel learner (adapters + a head from the seed), and
    the PEFT adapter of lora.adapter_path as a starting point."""
    from sgalm_jax.algorithms import base_config
    from sgalm_jax.models import load_pretrained
    from sgalm_jax.models.peft import save_peft_adapter
    from sgalm_jax.models.score import init_head_kernel
    from sgalm_jax.training.lora_setup import LoraSetup
    from sgalm_jax.training.model_setup import model_config

    path = hf_model_dir("qwen2")
    start = load_pretrained(path)
    L.add_adapters(start, L.LoraSpec(rank=2, alpha=4.0, targets="v_proj$"), seed=3)
    v_lora = start.model.layers.self_attn.v_proj.lora  # stacked: [L, in, r], [L, r, out]
    v_lora.b.set_value(v_lora.b.get_value().at[1].set(0.1))
    save_peft_adapter(start, tmp_path / "adapter")

    config = base_config()
    config.model.path = str(path)
    config.lora.enabled = True
    config.lora.base_dtype = "bfloat16"
    mesh = sh.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, jax.devices()[:2])
    lora = LoraSetup(config, mesh, model_config(config.model))
    roles = Roles(mesh)
    lora.declare_base(roles)
    lora.learner(roles, "policy", optax.sgd(1.0), seed=0)
    lora.scorer(roles, "discriminator", optax.sgd(1.0), seed=5)
    roles.build()
    base = dict(nnx.to_flat_state(roles["base"].params))
    assert all(v.get_value().dtype == jnp.bfloat16 for v in base.values())
    assert len(_leaf_paths(roles["policy"].own_params)) == 7 * 2  # rank 8 on 7 stacked projections
    d_own = _np(roles["discriminator"].own_params)
    np.testing.assert_array_equal(d_own["score/kernel"],
                                  np.asarray(init_head_kernel(lora.model_config, 5)))
    assert d_own["model/layers/self_attn/q_proj/lora/b"].shape == (2, 8, 64)

    config.lora.adapter_path = str(tmp_path / "adapter")  # start from a PEFT adapter
    lora = LoraSetup(config, None, model_config(config.model))
    assert lora.spec.rank == 2 and lora.spec.scale == 2.0
    roles = Roles(None)
    lora.declare_base(roles)
    lora.learner(roles, "policy", optax.sgd(1.0), seed=0)
    roles.build()
    own = _np(roles["policy"].own_params)
    assert sorted(own) == [f"model/layers/self_attn/v_proj/lora/{p}" for p in ("a", "b")]
    np.testing.assert_allclose(own["model/layers/self_attn/v_proj/lora/b"][1], 0.1)
    np.testing.assert_allclose(own["model/layers/self_attn/v_proj/lora/b"][0], 0.0)
    np.testing.assert_allclose(own["model/layers/self_attn/v_proj/lora/a"],
                               np.asarray(v_lora.a[...]))
