"""SGALM: the discriminator score against transformers, the gradients of the generator and
discriminator objectives, the variants, the CLI run with kill + resume, and a real learning signal.

The expensive parts (model compiles, subprocess runs) use one tiny shape family: the
``tiny-qwen2`` preset (hidden 64, 2 layers, vocab 512) with the offline ``builtin:tiny`` tokenizer.
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

from sgalm_jax.algorithms import sgalm
from sgalm_jax.algorithms.sgalm_data import load_samples, pad_rows
from sgalm_jax.config import base_config
from sgalm_jax.losses.common import causal_lm_logprobs
from sgalm_jax.losses.sgalm import resolve_label_token_ids

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "sgalm_tiny.py")


def tiny_config(workdir, **overrides):
    """configs/sgalm_tiny.py as a ConfigDict, with ``section.key=value`` overrides."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sgalm_tiny", TINY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    config.workdir = str(workdir)
    config.train.batch_size = 16  # in-process runs see the 8 simulated devices: 8 rows per half
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


# ------------------------------------------------------------------------------ D(s) vs transformers
def test_discriminator_score_matches_transformers(qwen_tokenizer, tmp_path):
    """D(s) = sigmoid(z_Real - z_Fake) from our model equals the value computed by hand from a
    transformers Qwen2 model's next-token logits at the answer position (real Qwen tokenizer)."""
    import torch
    import transformers

    from sgalm_jax.data.prompts import sgalm_discriminator_prompt
    from sgalm_jax.models import load_pretrained

    tok = qwen_tokenizer
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path)

    labels = resolve_label_token_ids(tok, "Real", "Fake", leading_space=True)
    assert not labels.multi_token
    assert tok.decode([labels.real_id]) == " Real" and tok.decode([labels.fake_id]) == " Fake"
    samples = ["Question: Mia has 3 apples. She buys 2 more. How many apples does Mia have now?\n"
               "Answer: Mia then has 3 + 2 = <<3+2=5>>5 apples.\n#### 5",
               "Question: What is 7 * 6?\nAnswer: 7 * 6 = <<7*6=42>>42.\n#### 42"]
    rows = [tok(sgalm_discriminator_prompt(s))["input_ids"] for s in samples]

    by_hand = []
    for r in rows:
        with torch.no_grad():
            logits = hf(torch.tensor([r])).logits[0, -1].double()
        p = torch.softmax(logits, -1)
        by_hand.append(float(p[labels.real_id] / (p[labels.real_id] + p[labels.fake_id])))

    model = load_pretrained(tmp_path)
    batch = {k: jnp.asarray(v) for k, v in pad_rows(rows, bucket=16, pad_id=0).items()}
    z = jax.jit(lambda m, b: sgalm.discriminator_logits(m, b, labels))(model, batch)  # 2 lengths
    np.testing.assert_allclose(np.asarray(jax.nn.sigmoid(z)), by_hand, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ gradients
@pytest.fixture(scope="module")
def small_model():
    """A tiny random model, its params, and G/D batches made of random token rows."""
    from sgalm_jax.config import MODEL_PRESETS
    from sgalm_jax.models import ModelConfig
    from sgalm_jax.training import split_model
    from sgalm_jax.training.model_setup import init_model

    mcfg = ModelConfig.from_hf(MODEL_PRESETS["tiny-qwen2"])
    graphdef, params = split_model(init_model(mcfg, mesh=None, seed=0))
    rng = np.random.default_rng(0)
    g_rows, g_masks, d_rows = [], [], []
    for n_prompt, n_comp, n_d in [(5, 6, 9), (7, 3, 12), (4, 8, 7), (6, 5, 10)]:
        ids = rng.integers(3, 512, n_prompt + n_comp).tolist()
        g_rows.append(ids)
        g_masks.append([0.0] * n_prompt + [1.0] * n_comp)
        d_rows.append(rng.integers(3, 512, n_d).tolist())
    batch = pad_rows(g_rows, loss_masks=g_masks, bucket=16, pad_id=0)
    batch.update(pad_rows(d_rows, bucket=16, pad_id=0, prefix="d_"))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    labels = sgalm.LabelTokenIds(7, 11, (7,), (11,), False, "test")
    return graphdef, params, batch, labels, g_rows, g_masks


def _tree_allclose(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def test_generator_gradient_is_the_score_function_estimator(small_model):
    """grad L_G = -mean_j A_j grad log p(s_j | prompt_j), A = standardize(log D) computed by hand
    (the rows' log-probs through the full-logits path, their Jacobian taken separately)."""
    from flax import nnx

    graphdef, params, batch, labels, g_rows, g_masks = small_model
    z = np.asarray([1.5, -0.3, 0.2, -2.0], np.float32)
    snap = dict(batch, z_snapshot=jnp.asarray(z))
    loss_fn = sgalm.make_g_loss(graphdef, labels, sgalm.GeneratorOptions(reward_source="snapshot"))
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, snap, None)[0]))(params)

    r = -np.log1p(np.exp(-z.astype(np.float64)))  # log D = log sigmoid(z)
    a = (r - r.mean()) / (r.std() + 1e-6)
    # Per-row gradients of log p(s_j | prompt_j) through the full [B, T, V] logits (not the
    # chunked path the loss uses): the Jacobian of the 4 sequence log-probs.
    ids, mask = batch["input_ids"], batch["loss_mask"]

    def logps(p):
        logits = nnx.merge(graphdef, p)(ids, batch["attention_mask"], batch["positions"])
        return causal_lm_logprobs(logits, ids, mask).sequence_sum

    jac = jax.jit(jax.jacrev(logps))(params)
    expected = jax.tree.map(lambda j: -jnp.tensordot(jnp.asarray(a, j.dtype), j, 1) / len(a), jac)
    _tree_allclose(grads, expected, rtol=2e-4, atol=2e-6)


def test_reward_path_is_detached(small_model):
    """With shared weights the generator loss's D forward (reward) sends no gradient: the
    gradient equals that with the reward given as constants. In two_models, the G loss gives D's
    params exactly zero gradient, and the D loss has no generator path at all."""
    graphdef, params, batch, labels, _, _ = small_model
    shared = sgalm.make_g_loss(graphdef, labels, sgalm.GeneratorOptions(reward_source="shared"))
    g_shared, m_shared = jax.jit(jax.grad(lambda p: shared(p, batch, None), has_aux=True))(params)
    d_batch = {k[2:]: v for k, v in batch.items() if k.startswith("d_")}
    from flax import nnx

    z = jax.jit(lambda p: sgalm.discriminator_logits(nnx.merge(graphdef, p), d_batch, labels))(
        params)
    snap = sgalm.make_g_loss(graphdef, labels, sgalm.GeneratorOptions(reward_source="snapshot"))
    g_snap = jax.jit(jax.grad(lambda p: snap(p, dict(batch, z_snapshot=z), None)[0]))(params)
    _tree_allclose(g_shared, g_snap, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(m_shared["d_fake"]), float(jnp.mean(jax.nn.sigmoid(z))),
                               rtol=1e-6)

    # Without the stop_gradient the D path *would* contribute: the check above is not vacuous.
    def undetached(p):
        lp = sgalm._sequence_logprobs(nnx.merge(graphdef, p), batch["input_ids"],
                                      batch["attention_mask"], batch["positions"],
                                      batch["loss_mask"], 256).sequence_sum
        zz = sgalm.discriminator_logits(nnx.merge(graphdef, p), d_batch, labels)
        return -jnp.mean(jax.nn.log_sigmoid(zz)) - jnp.mean(lp * 0.0)

    g_d_path = jax.jit(jax.grad(undetached))(params)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_d_path)) > 1e-4

    separate = sgalm.make_g_loss(graphdef, labels,
                                 sgalm.GeneratorOptions(reward_source="separate"))
    d_params = jax.tree.map(lambda x: x * 1.01, params)
    g_to_d = jax.jit(jax.grad(lambda dp: separate(params, batch, None, dp)[0]))(d_params)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_to_d))


def test_discriminator_loss_and_gradient(small_model):
    """The D step's loss is the BCE of z on its real / fake rows, and padding rows are ignored."""
    graphdef, params, batch, labels, _, _ = small_model
    d_batch = {k[2:]: v for k, v in batch.items() if k.startswith("d_")}
    d_batch["is_real"] = jnp.asarray([1.0, 1.0, 0.0, 0.0])
    d_batch["row_mask"] = jnp.asarray([1.0, 1.0, 1.0, 0.0])  # last row is filler
    loss_fn = sgalm.make_d_loss(graphdef, labels)
    loss, m = jax.jit(loss_fn)(params, d_batch, None)
    from flax import nnx

    z = np.asarray(sgalm.discriminator_logits(nnx.merge(graphdef, params), d_batch, labels),
                   np.float64)
    by_hand = np.mean(np.log1p(np.exp(-z[:2]))) + np.log1p(np.exp(z[2]))
    np.testing.assert_allclose(float(loss), by_hand, rtol=1e-5)
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, d_batch, None)[0]))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


# ------------------------------------------------------------------------------ variants
def _records(workdir):
    return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("variant", ["d_only", "g_only", "two_models"])
def test_variants_train_through_their_loss_only(variant, tmp_path):
    """d_only takes only D steps, g_only only G steps rewarded by the frozen iteration-start D,
    two_models keeps two param sets (and exports both)."""
    config = tiny_config(tmp_path, **{"sgalm.variant": variant, "sgalm.iterations": 1,
                                      "sgalm.final_samples": 0, "checkpoint.every_steps": 0})
    sgalm.validate(config)
    out = sgalm.run(config, str(tmp_path))
    recs = _records(tmp_path)
    d_steps = [r for r in recs if "d_loss" in r]
    g_steps = [r for r in recs if "g_loss" in r]
    if variant == "d_only":
        assert len(d_steps) == 2 and not g_steps
    elif variant == "g_only":
        assert len(g_steps) == 2 and not d_steps
        # The reward is the snapshot's D: the batch's mean D equals the saved z_snapshot values.
        samples = load_samples(tmp_path / "samples" / "iter_000.jsonl")
        z = np.asarray([s.z_snapshot for s in samples if not s.heldout])
        d = 1 / (1 + np.exp(-z))
        assert all(d.min() - 1e-6 <= r["g_reward_d"] <= d.max() + 1e-6 for r in g_steps)
    else:
        assert len(d_steps) == 2 and len(g_steps) == 2
        assert (tmp_path / "export_discriminator" / "config.json").exists()
        from safetensors.numpy import load_file

        g = load_file(str(tmp_path / "export" / "model.safetensors"))
        d = load_file(str(tmp_path / "export_discriminator" / "model.safetensors"))
        assert any(not np.array_equal(g[k], d[k]) for k in g)
    assert out["export"] == str(tmp_path / "export")


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
           "--config.mesh.data=2", *extra]
    return subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=300)


def _steps(workdir):
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def test_cli_iteration_writes_everything_and_resumes_after_a_kill(tmp_path):
    """configs/sgalm_tiny.py: 2 iterations x 4 updates. An uninterrupted run, and one killed
    (SIGKILL) after update 7, in the middle of iteration 1, then rerun: it resumes from the
    checkpoint of update 6, reuses iteration 1's saved samples and ends with the same params."""
    cache = tmp_path / "jax_cache"
    full, broken = tmp_path / "full", tmp_path / "broken"
    proc = _cli(full, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (full / "config.json").exists() and (full / "export" / "config.json").exists()
    assert sorted(p.name for p in (full / "samples").iterdir()) == [
        "final.jsonl", "iter_000.jsonl", "iter_001.jsonl"]
    samples = load_samples(full / "samples" / "iter_000.jsonl")
    assert len(samples) == 16 and sum(s.heldout for s in samples) == 4
    assert all(s.text and s.prompt.startswith("Below are examples") for s in samples)
    recs = _records(full)
    assert [r["step"] for r in recs if "d_loss" in r] == [1, 3, 5, 7]
    assert [r["step"] for r in recs if "g_loss" in r] == [2, 4, 6, 8]
    assert [r["diag/iteration"] for r in recs if "diag/d_fake" in r] == [0, 1, 2]
    assert any(p.name.startswith("events.out.tfevents") for p in full.iterdir())
    assert _steps(full) == [6, 8]

    proc = _cli(broken, cache, fault="sigkill@7")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert 6 in _steps(broken) and max(_steps(broken)) == 6
    saved = (broken / "samples" / "iter_001.jsonl").read_text()
    proc = _cli(broken, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (broken / "samples" / "iter_001.jsonl").read_text() == saved
    steps = [r["step"] for r in _records(broken) if "d_loss" in r or "g_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 7, 8]  # update 7 ran twice: before the kill and after
    starts = [r["diag/iteration"] for r in _records(broken) if "diag/d_fake" in r]
    assert starts == [0, 1, 2]  # iteration 1's start diagnostics are not repeated on resume
    from safetensors.numpy import load_file

    a = load_file(str(full / "export" / "model.safetensors"))
    b = load_file(str(broken / "export" / "model.safetensors"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------------------ learning signal
def test_discriminator_steps_learn_on_heldout_samples(tmp_path):
    """A small model pre-trained briefly with SFT on the arithmetic task writes samples; a few
    SGALM discriminator steps raise D's accuracy on *held-out* real vs *held-out* generated samples
    from chance to clearly above it (fixed seed)."""
    from sgalm_jax.algorithms import sft

    pre = base_config()
    pre.algorithm, pre.workdir = "sft", str(tmp_path / "pre")
    pre.model.init, pre.tokenizer.path = "tiny-qwen2", "builtin:tiny"
    pre.data.task, pre.data.max_examples = "arithmetic", 256
    pre.data.max_length, pre.data.packing = 256, True
    pre.optimizer.learning_rate, pre.optimizer.warmup_steps = 3e-3, 5
    pre.train.num_steps, pre.train.batch_size = 40, 8
    pre.checkpoint.every_steps = 0
    pre.metrics.progress_bar = pre.metrics.tensorboard = False
    sft.run(pre, pre.workdir)

    work = tmp_path / "sgalm"
    config = tiny_config(work, **{
        "model.init": "", "model.path": str(tmp_path / "pre" / "export"),
        "tokenizer.path": str(tmp_path / "pre" / "export"),
        "sgalm.variant": "d_only", "sgalm.iterations": 1, "sgalm.num_samples": 64,
        "sgalm.heldout_size": 32, "sgalm.rounds_per_iteration": 20, "sgalm.max_new_tokens": 96,
        "sgalm.sample_batch_size": 32, "sgalm.final_samples": 0,
        "data.max_examples": 192, "optimizer.learning_rate": 3e-4, "optimizer.warmup_steps": 2,
        "checkpoint.every_steps": 0, "checkpoint.export": False,
        "metrics.tensorboard": False})
    sgalm.validate(config)
    out = sgalm.run(config, str(work))
    recs = _records(work)
    start = next(r for r in recs if "diag/d_acc_heldout" in r)
    assert abs(start["diag/d_acc_heldout"] - 0.5) < 0.1  # the untrained D: chance
    assert out["diag/end_d_acc_heldout"] >= 0.7, out  # balanced accuracy
    # Held out means held out: none of the 16 held-out samples was in a D batch.
    samples = load_samples(work / "samples" / "iter_000.jsonl")
    assert sum(s.heldout for s in samples) == 16
