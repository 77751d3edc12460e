"""GRPO: config errors, two rollouts of updates equal a hand computation, the loop raises a learnable
reward, and a run killed mid-way (SIGKILL) then rerun ends bit-identical to an uninterrupted one.

One tiny shape family throughout (``configs/grpo_tiny.py``: the ``tiny-qwen2`` preset, the offline
``builtin:tiny`` tokenizer and arithmetic prompts). The reward is the fraction of a completion's
tokens with an id below 256 (``tests/algorithms/grpo_rewards.py``): a random model's groups always
have spread, and the policy can move it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgalm_jax.algorithms import grpo
from sgalm_jax.algorithms.grpo_data import load_rollout_records
from sgalm_jax.config import load_config_file
from sgalm_jax.errors import ConfigError
from sgalm_jax.evaluation.rewards import register_reward
from tests.algorithms.grpo_rewards import low_token_fraction

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "grpo_tiny.py")
REWARD = "tests.algorithms.grpo_rewards:low_token_fraction"

register_reward("test_low_tokens", low_token_fraction)


def tiny_config(workdir, **overrides):
    """configs/grpo_tiny.py with ``section.key=value`` overrides (in-process: 8 CPU devices)."""
    config = load_config_file("grpo_tiny.py", TINY)
    config.workdir = str(workdir)
    config.grpo.reward = "test_low_tokens"
    config.metrics.tensorboard = False
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _records(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize("overrides, message", [
    ({"grpo.reward": "no_such_reward"}, r"^grpo.reward: unknown reward 'no_such_reward'"),
    ({"grpo.reward": "no_such_pkg.rewards:fn"}, r"^grpo.reward: reward 'no_such_pkg.rewards:fn': "
                                                r"cannot import"),
    ({"grpo.reward": REWARD.split(":")[0] + ":nope"}, r"^grpo.reward: .* has no function 'nope'"),
    ({"grpo.reward_weights": "1,2"}, r"^grpo.reward_weights: 2 weights for 1"),
    ({"grpo.reward_module": "no_such_module"}, r"^grpo.reward_module: cannot import"),
    ({"grpo.num_generations": 3}, r"^train.batch_size: .* groups of grpo.num_generations=3"),
    ({"train.num_steps": 5}, r"^train.num_steps: 5 optimizer steps"),
    ({"grpo.loss_type": "ppo"}, r"^grpo.loss_type: 'ppo' is not one of"),
    ({"grpo.old_logprobs": "sampler", "grpo.temperature": 0.7}, r"^grpo.old_logprobs"),
    ({"grpo.max_new_tokens": 200}, r"^grpo.max_new_tokens: max_prompt_length"),
])
def test_bad_grpo_configs_name_the_key(tmp_path, overrides, message):
    config = tiny_config(tmp_path, **overrides)
    with pytest.raises(ConfigError, match=message):
        grpo.validate(config)


def test_unknown_reward_from_the_command_line_exits_2(tmp_path):
    from sgalm_jax import main as cli

    assert cli.main(["m", f"--config={TINY}", "--config.grpo.reward=nope",
                     f"--config.workdir={tmp_path}"]) == 2


# ------------------------------------------------------------------------------ hand computation
def _hand_logprobs(graphdef, params, ids, attn, targets_mask, temperature):
    from flax import nnx

    positions = jnp.maximum(jnp.cumsum(attn, axis=-1) - 1, 0)
    logits = nnx.merge(graphdef, params)(ids, attn, positions)  # full [B, T, V] logits
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32) / temperature, axis=-1)
    tok = jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]
    return tok * targets_mask


def test_two_rollouts_of_updates_equal_a_hand_computation(tmp_path):
    """Two rollouts, two mini-batches each (so pi_old differs from pi in the second), beta 0.1 k3
    KL to the start model, temperature 0.7, token-mean loss, plain SGD: the exported params equal
    the start params updated four times by gradients of the loss written out here by hand from
    the saved rollouts (advantages by numpy; log-probs from the full logits, not the chunked
    path the loop uses)."""
    from sgalm_jax.models import load_pretrained
    from sgalm_jax.training import split_model
    from sgalm_jax.training.model_setup import build_model

    lr, beta, temp, eps = 0.5, 0.1, 0.7, 0.2
    config = tiny_config(tmp_path, **{
        "grpo.beta": beta, "grpo.temperature": temp, "grpo.clip_eps": eps,
        "grpo.max_new_tokens": 16, "optimizer.name": "sgd", "optimizer.learning_rate": lr,
        "optimizer.max_grad_norm": 0.0, "train.num_steps": 4, "checkpoint.every_steps": 0})
    grpo.validate(config)
    out = grpo.run(config, str(tmp_path))
    assert out["step"] == 4 and not out["preempted"]

    graphdef, params = split_model(build_model(config.model, mesh=None, seed=config.seed))
    start = params
    hand_lp = jax.jit(lambda p, ids, attn, m: _hand_logprobs(graphdef, p, ids, attn, m, temp))

    def loss(p, ids, attn, m, old, ref, adv):
        lp = _hand_logprobs(graphdef, p, ids, attn, m, temp)
        ratio = jnp.exp(lp - old)
        pg = jnp.maximum(-adv[:, None] * ratio, -adv[:, None] * jnp.clip(ratio, 1 - eps, 1 + eps))
        d = ref - lp
        k3 = jnp.exp(d) - d - 1
        return jnp.sum((pg + beta * k3) * m) / jnp.sum(m)

    grad = jax.jit(jax.grad(loss))
    for r in range(2):
        recs = load_rollout_records(str(tmp_path / "rollouts" / f"rollout_{r:06d}.jsonl"))
        assert len(recs) == 16 and sorted(x["minibatch"] for x in recs) == [0] * 8 + [1] * 8
        rewards = np.asarray([np.mean(np.asarray(x["completion_ids"]) < 256) for x in recs])
        np.testing.assert_allclose([x["reward"] for x in recs], rewards, rtol=1e-12)
        groups = rewards.reshape(-1, 4)
        adv = ((groups - groups.mean(1, keepdims=True))
               / (groups.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)
        np.testing.assert_allclose([x["advantage"] for x in recs], adv, rtol=1e-5, atol=1e-6)

        width = max(len(x["prompt_ids"]) + len(x["completion_ids"]) for x in recs)
        width = -(-width // 64) * 64  # one shape for both rollouts: one compile
        ids = np.zeros((16, width), np.int32)
        attn = np.zeros((16, width), np.int32)
        tmask = np.zeros((16, width - 1), np.float32)  # targets ids[:, 1:]
        for i, x in enumerate(recs):
            a, b = len(x["prompt_ids"]), len(x["prompt_ids"]) + len(x["completion_ids"])
            ids[i, :a], ids[i, a:b] = x["prompt_ids"], x["completion_ids"]
            attn[i, :b] = 1
            tmask[i, a - 1:b - 1] = 1.0
        ids, attn, tmask = jnp.asarray(ids), jnp.asarray(attn), jnp.asarray(tmask)
        old = hand_lp(params, ids, attn, tmask)
        ref = hand_lp(start, ids, attn, tmask)
        for k in range(2):
            rows = np.asarray([i for i, x in enumerate(recs) if x["minibatch"] == k])
            grads = grad(params, ids[rows], attn[rows], tmask[rows], old[rows], ref[rows],
                         jnp.asarray(adv[rows], jnp.float32))
            params = jax.tree.map(lambda p, g: p - lr * g, params, grads)

    exported = split_model(load_pretrained(str(tmp_path / "export")))[1]
    diffs = [float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(exported), jax.tree.leaves(params), strict=True)]
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(params), jax.tree.leaves(start)))
    print(f"GRPO hand computation: max |loop - hand| = {max(diffs):.3g}, max |update| = "
          f"{moved:.3g}")
    assert moved > 1e-3  # the four steps moved the params
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-6)
    kl = [r["kl"] for r in _records(tmp_path) if "kl" in r]
    assert kl[0] >= 0 and kl[1] > 0  # rollout 1 is sampled away from the reference


# ------------------------------------------------------------------------------ learning signal
def test_the_loop_raises_a_learnable_reward(tmp_path):
    """Seeded: 6 rollouts of 4 prompts x 8 completions (AdamW) lift the mean reward (the fraction
    of low-id tokens, about 0.5 for the random start) clearly."""
    config = tiny_config(tmp_path, **{
        "grpo.beta": 0.0, "grpo.num_generations": 8, "grpo.num_minibatches": 1,
        "grpo.max_new_tokens": 16, "train.batch_size": 32, "train.num_steps": 6,
        "optimizer.learning_rate": 5e-2, "checkpoint.every_steps": 0,
        "checkpoint.export": False, "grpo.save_rollouts": False})
    grpo.validate(config)
    grpo.run(config, str(tmp_path))
    rewards = [r["reward_mean"] for r in _records(tmp_path) if "reward_mean" in r]
    print("GRPO reward per rollout:", [round(x, 3) for x in rewards])
    assert len(rewards) == 6
    assert np.mean(rewards[-2:]) > np.mean(rewards[:2]) + 0.15, rewards


# ------------------------------------------------------------------------------ CLI + resume
def _cli(workdir, cache_dir, *extra, fault=None):
    env = dict(os.environ)
    env.update({"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
                "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
                "HF_HUB_OFFLINE": "1", "SGALM_LOG_LEVEL": "WARNING"})
    env.pop("SGALM_FAULT_INJECT", None)
    if fault:
        env["SGALM_FAULT_INJECT"] = fault
    cmd = [sys.executable, "-m", "sgalm_jax.main", f"--config={TINY}",
           f"--config.workdir={workdir}", "--config.checkpoint.async_save=false",
           "--config.mesh.data=2", f"--config.grpo.reward={REWARD}",
           "--config.grpo.max_new_tokens=16", *extra]
    return subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=300)


def _steps(workdir):
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir()
                  if p.name.isdigit())


def test_cli_run_killed_mid_way_resumes_bit_identically(tmp_path):
    """configs/grpo_tiny.py (4 rollouts x 2 updates, KL to the frozen start model): killed with
    SIGKILL after the checkpoint of step 4, then rerun with the same command: it restores the
    policy, rebuilds the reference, takes the same prompts and samples, and ends with the same
    params and rollouts as an uninterrupted run."""
    cache = tmp_path / "jax_cache"
    full, broken = tmp_path / "full", tmp_path / "broken"
    proc = _cli(full, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(full) == [4, 8]
    assert (full / "export" / "config.json").exists()
    recs = [r for r in _records(full) if "reward_mean" in r]
    assert [r["step"] for r in recs] == [2, 4, 6, 8]
    for key in ("reward_std", "kl", "entropy", "clip_frac", "completion_length_mean",
                "completion_length_max", "truncated", "time/rollout", "time/logprobs",
                "time/update"):
        assert all(np.isfinite(r[key]) for r in recs), key

    proc = _cli(broken, cache, fault="sigkill@6")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert _steps(broken) == [4]
    proc = _cli(broken, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r["step"] for r in _records(broken) if "reward_mean" in r]
    assert steps == [2, 4, 6, 6, 8]  # rollout 2 ran twice: before the kill and after
    for r in range(4):
        name = f"rollout_{r:06d}.jsonl"
        assert (full / "rollouts" / name).read_text() == (broken / "rollouts" / name).read_text()
    from safetensors.numpy import load_file

    a = load_file(str(full / "export" / "model.safetensors"))
    b = load_file(str(broken / "export" / "model.safetensors"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------------------ rows and log-probs
def test_rows_align_the_samplers_logprobs_with_the_recomputed_ones():
    """build_rows puts completion token k's sampler log-prob where the loss's shifted targets
    score it: at temperature 1 the sampler's log-probs equal the no-grad recompute pass (so
    grpo.old_logprobs = sampler is a drop-in); mask_truncated drops unfinished rows' tokens."""
    from sgalm_jax import sharding as sh
    from sgalm_jax.algorithms.grpo_data import PromptPool, Rollout, build_rows
    from sgalm_jax.config import MODEL_PRESETS
    from sgalm_jax.models import ModelConfig
    from sgalm_jax.sampling import Sampler
    from sgalm_jax.training import split_model
    from sgalm_jax.training.model_setup import init_model

    mesh = sh.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, jax.devices()[:2])
    mcfg = ModelConfig.from_hf(MODEL_PRESETS["tiny-qwen2"])
    graphdef, params = split_model(init_model(mcfg, mesh=mesh, seed=0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 512, n).astype(np.int32) for n in (5, 9)]
    gen = Sampler(graphdef, mcfg, mesh=mesh, pad_token_id=0).generate(
        params, prompts, max_new_tokens=8, num_samples=2, stop_token_ids=(7,),
        rng=jax.random.key(1))
    pool = PromptPool(["a", "b"], prompts, [None, None], None)
    rollout = Rollout(prompt_index=np.repeat([0, 1], 2),
                      completion_ids=[r[:n] for r, n in zip(gen.tokens, gen.lengths)],
                      finished=np.asarray([True, False, True, False]),
                      sampler_logprobs=[r[:n] for r, n in zip(gen.logprobs, gen.lengths)],
                      advantages=np.asarray([1.0, -1.0, 0.5, np.nan]))
    rows = build_rows(pool, rollout, pad_id=0, min_bucket=16, max_length=64)
    np.testing.assert_array_equal(rows["advantages"], [1.0, -1.0, 0.5, 0.0])
    opts = grpo.GRPOOptions(temperature=1.0, chunk_size=8)
    recomputed = grpo.LogprobPass(graphdef, opts, mesh, rows_per_call=4)(params, rows)
    np.testing.assert_allclose(rows["sampler_logprobs"], recomputed, atol=2e-5)
    assert (rows["loss_mask"].sum(1) == gen.lengths).all()
    masked = build_rows(pool, rollout, pad_id=0, min_bucket=16, max_length=64,
                        mask_truncated=True)
    assert (masked["loss_mask"][[1, 3]] == 0).all() and (masked["loss_mask"][[0, 2]].sum(1)
                                                        == gen.lengths[[0, 2]]).all()


# ------------------------------------------------------------------------------ fault handling
@pytest.mark.parametrize("mode", ["error", "skip"])
def test_a_diverging_policy_stops_naming_the_step_and_closes_the_checkpointer(tmp_path,
                                                                              monkeypatch, mode):
    """A NaN policy (its first weight NaN): 'error' stops at step 1; 'skip' skips the updates
    (metric skipped = 1) and stops after train.max_skipped_steps consecutive ones. Nothing of the
    diverged state is saved or exported, and the checkpointer is closed on the way out."""
    from sgalm_jax.errors import NonFiniteError
    from sgalm_jax.training import checkpoint, model_setup

    real = model_setup.build_model

    def nan_model(*args, **kwargs):
        model = real(*args, **kwargs)
        emb = model.model.embed_tokens.embedding
        emb.set_value(emb[...] * jnp.nan)
        return model

    monkeypatch.setattr(model_setup, "build_model", nan_model)
    config = tiny_config(tmp_path, **{"train.nonfinite": mode, "train.max_skipped_steps": 1,
                                      "grpo.max_new_tokens": 16})
    grpo.validate(config)
    message = (r"^step 1: loss = nan, grad_norm = nan: the run diverged" if mode == "error"
               else r"^step 2: .*2 consecutive steps were skipped")
    with pytest.raises(NonFiniteError, match=message):
        grpo.run(config, str(tmp_path))
    assert not list(checkpoint._OPEN)
    assert not (tmp_path / "checkpoints").exists() or not [
        p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert not (tmp_path / "export").exists()
    if mode == "skip":
        assert _records(tmp_path)[0]["skipped"] == 1.0
