"""The self-play loop: data and batches, the scorer, the jitted self-play step, a researcher's own
loss in the loop (in-process), and one CLI run killed mid-iteration and resumed (subprocess).

Shapes are tiny (2-layer model, sequences of 32 tokens) so the compiled programs are few and
small; the subprocess runs share one persistent compilation cache.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgalm_jax.algorithms import selfplay
from sgalm_jax.algorithms.scoring import SequenceScorer
from sgalm_jax.algorithms.selfplay_data import (
    IterationData,
    PairBatches,
    load_prompt_set,
    synthetic_rows,
)
from sgalm_jax.config import base_config
from sgalm_jax.errors import ConfigError
from sgalm_jax.training.tokenizer import build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "selfplay_tiny.py")


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def sums_jsonl(tmp_path_factory):
    """16 short prompt/response records: two-number sums."""
    path = tmp_path_factory.mktemp("sp_data") / "sums.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(16):
            a, b = (int(x) for x in rng.integers(0, 50, size=2))
            f.write(json.dumps({"prompt": f"{a} + {b} =", "response": f" {a + b}"}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _config(jsonl: str, **selfplay_overrides):
    c = base_config()
    c.algorithm = "selfplay"
    c.model.init = "tiny-qwen2"
    c.tokenizer.path = "builtin:tiny"
    c.data.train_file = jsonl
    c.data.max_length = 32
    c.data.min_bucket = 32
    c.selfplay.max_prompt_length = 12
    c.selfplay.max_new_tokens = 12
    c.selfplay.generation_batch_size = 16
    c.selfplay.ref_batch_size = 16
    c.selfplay.logprob_chunk_size = 16
    c.selfplay.iterations = 1
    c.selfplay.eval_every = 0
    c.optimizer.learning_rate = 1e-2
    c.train.batch_size = 8
    c.checkpoint.every_steps = 0
    c.checkpoint.async_save = False
    c.metrics.progress_bar = False
    c.metrics.tensorboard = False
    for k, v in selfplay_overrides.items():
        c.selfplay[k] = v
    return c


@pytest.fixture(scope="module")
def tiny_model():
    from sgalm_jax.config import MODEL_PRESETS
    from sgalm_jax.models import ModelConfig
    from sgalm_jax.training import split_model
    from sgalm_jax.training.model_setup import init_model

    cfg = ModelConfig.from_hf(MODEL_PRESETS["tiny-qwen2"])
    graphdef, params = split_model(init_model(cfg, mesh=None, seed=0))
    return cfg, graphdef, params


# ------------------------------------------------------------------------------ data and batches
def test_prompt_set_truncation_and_chat_first_turn(tmp_path, tok, sums_jsonl):
    c = _config(sums_jsonl)
    ps = load_prompt_set(c, tok, eos_id=tok.eos_token_id, vocab_size=512)
    assert len(ps) == 16 and all(r[-1] == tok.eos_token_id for r in ps.real)
    assert ps.prompts[0].tolist() == tok(ps.prompt_texts[0])["input_ids"]
    # Chat data: the first user turn and the first assistant reply, through the chat template.
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"}, {"role": "assistant", "content": "bye"}]}) + "\n")
    c = _config(sums_jsonl)
    c.data.train_file, c.data.task = "", "chat"
    c.data.data_dir = str(chat)
    c.data.chat_template = True
    c.data.max_length = 64
    ps = load_prompt_set(c, tok, eos_id=tok.eos_token_id, vocab_size=512)
    assert ps.prompt_texts == ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    assert tok.decode(ps.real[0]) == "hello<|im_end|>"
    # Long prompts keep their end; responses get what is left of data.max_length.
    c = _config(sums_jsonl, max_prompt_length=3)
    c.data.max_length = 5
    ps = load_prompt_set(c, tok, eos_id=tok.eos_token_id, vocab_size=512)
    full = tok(ps.prompt_texts[0])["input_ids"]
    assert ps.prompts[0].tolist() == full[-3:] and len(ps.real[0]) <= 2


def test_synthetic_rows_append_eos_only_when_unfinished():
    tokens = np.array([[5, 6, 2, 0], [7, 8, 9, 10]], np.int32)
    rows = synthetic_rows(tokens, np.array([3, 4]), np.array([True, False]), [2],
                          num_samples=2, eos_id=2, max_length=8)
    assert [r.tolist() for r in rows] == [[5, 6, 2], [7, 8, 9, 10, 2]]
    rows = synthetic_rows(tokens, np.array([3, 4]), np.array([True, False]), [5],
                          num_samples=2, eos_id=2, max_length=8)
    assert [r.tolist() for r in rows] == [[5, 6, 2], [7, 8, 9]]  # cut to 8 - 5 tokens


def test_pair_batches_layout_mixing_and_determinism():
    prompts = [np.arange(3, dtype=np.int32) + 10 * i for i in range(4)]
    real = [np.array([100 + i, 2], np.int32) for i in range(4)]
    cur = [np.array([200 + i, 201 + i, 2], np.int32) for i in range(4)]
    prev = [np.array([300 + i, 2], np.int32) for i in range(4)]
    ref_real, ref_cur, ref_prev = np.arange(4.0), np.arange(4.0)[:, None] + 10, np.arange(4.0)[:, None] + 20
    pb = PairBatches(prompts, real, [(cur, ref_cur), (prev, ref_prev)], ref_real, num_samples=1,
                     batch_size=4, max_length=16, min_bucket=8, seed=0, iteration=1, pad_id=0)
    assert pb.num_rows == 8 and pb.per_epoch == 2
    seen = []
    for index in range(2):
        b = pb.batch(index)
        assert b["input_ids"].shape == (4, 2, 8) and b["ref_logprobs"].shape == (4, 2)
        for j in range(4):
            i = int(b["input_ids"][j, 0, 0]) // 10
            assert b["input_ids"][j, 0, :5].tolist() == prompts[i].tolist() + real[i].tolist()
            assert b["loss_mask"][j, 0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
            src = 0 if b["input_ids"][j, 1, 3] >= 200 and b["input_ids"][j, 1, 3] < 300 else 1
            assert b["ref_logprobs"][j].tolist() == [ref_real[i], (ref_cur if src == 0 else ref_prev)[i, 0]]
            seen.append((i, src))
    assert sorted(seen) == [(i, s) for i in range(4) for s in range(2)]  # every row once per epoch
    again = PairBatches(prompts, real, [(cur, ref_cur), (prev, ref_prev)], ref_real, num_samples=1,
                        batch_size=4, max_length=16, min_bucket=8, seed=0, iteration=1, pad_id=0)
    np.testing.assert_array_equal(again.batch(3)["input_ids"], pb.batch(3)["input_ids"])
    halves = [pb.batch(1, process_index=p, process_count=2)["input_ids"] for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), pb.batch(1)["input_ids"])


def test_iteration_data_round_trip(tmp_path):
    d = IterationData(iteration=2, num_samples=2, syn=[np.array([1, 2]), np.array([3]),
                                                        np.array([4, 5, 6]), np.array([7])],
                      ref_real=np.array([-1.0, -2.0], np.float32),
                      ref_syn=np.array([[-3.0, -4.0], [-5.0, -6.0]], np.float32),
                      real_ntok=np.array([2.0, 1.0]), syn_ntok=np.ones((2, 2)),
                      meta={"alpha": 1.5})
    d.save(str(tmp_path / "data.npz"))
    e = IterationData.load(str(tmp_path / "data.npz"))
    assert [x.tolist() for x in e.syn] == [[1, 2], [3], [4, 5, 6], [7]]
    assert e.meta == {"alpha": 1.5} and e.ref_prev_syn is None and e.iteration == 2
    np.testing.assert_array_equal(e.ref_syn, d.ref_syn)


def test_schedules_and_learning_rates(sums_jsonl):
    c = _config(sums_jsonl, iterations=3, alpha_schedule="linear", alpha_start=2.0, alpha_end=0.5)
    assert [selfplay.alpha_for_iteration(c, t, None) for t in range(3)] == pytest.approx([2.0, 1.25, 0.5])
    c = _config(sums_jsonl, alpha_schedule="adaptive", alpha_min=0.5, alpha_max=2.0, gap_scale=1.0)
    assert selfplay.alpha_for_iteration(c, 0, 0.0) == pytest.approx(0.5)
    assert selfplay.alpha_for_iteration(c, 0, 1.0) == pytest.approx(0.5 + 1.5 * math.tanh(1.0))
    c = _config(sums_jsonl, lr_per_iteration="5e-7, 5e-7,1e-7")
    assert [selfplay.learning_rate(c, t) for t in range(5)] == [5e-7, 5e-7, 1e-7, 1e-7, 1e-7]
    c = _config(sums_jsonl, iterations=3, mix_previous=True, epochs_per_iteration=2.0)
    assert [selfplay.steps_per_iteration(16, c, t) for t in range(3)] == [4, 8, 8]


@pytest.mark.parametrize("overrides,key", [
    (dict(loss="spni"), "selfplay.loss"),
    (dict(loss="grpo"), "selfplay.loss"),
    (dict(loss_module="no_such_module_xyz"), "selfplay.loss_module"),
    (dict(alpha_schedule="step"), "selfplay.alpha_schedule"),
    (dict(gap="kl"), "selfplay.gap"),
    (dict(max_new_tokens=30), "selfplay.max_new_tokens"),  # 12 + 30 > data.max_length 32
    (dict(lr_per_iteration="1e-5,fast"), "selfplay.lr_per_iteration"),
    (dict(num_samples=0), "selfplay.num_samples"),
    (dict(top_p=0.0), "selfplay.top_p"),
])
def test_bad_selfplay_config_names_the_key(sums_jsonl, overrides, key):
    c = _config(sums_jsonl, **overrides)
    with pytest.raises(ConfigError) as err:
        selfplay.validate(c)
    assert str(err.value).startswith(key), str(err.value)


def test_loss_kwargs_are_checked(sums_jsonl):
    c = _config(sums_jsonl)
    c.selfplay.loss_kwargs = {"los_type": "hinge"}
    with pytest.raises(ConfigError, match="^selfplay.loss_kwargs"):
        selfplay.validate(c)
    c = _config(sums_jsonl, loss="iris")
    c.selfplay.loss_kwargs = {"alpha": 2.0}
    with pytest.raises(ConfigError, match="alpha_schedule"):
        selfplay.validate(c)
    c = _config(sums_jsonl, loss="spin", beta=0.5)
    c.selfplay.loss_kwargs = {"loss_type": "hinge"}
    fn, takes_alpha = selfplay.resolve_loss(c)
    assert fn.keywords == {"loss_type": "hinge", "beta": 0.5} and not takes_alpha


# ------------------------------------------------------------------------------ model side
def test_scorer_matches_a_direct_forward(tiny_model):
    """Bucketed, sharded, chunked scoring = log-probs of one unpadded forward per sequence."""
    from flax import nnx

    from sgalm_jax import sharding as sh

    cfg, graphdef, params = tiny_model
    mesh = sh.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    sharded = jax.device_put(params, sh.state_shardings(params, mesh))
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 512, size=int(n)).astype(np.int32) for n in (5, 17, 9, 40, 3, 33)]
    masks = [(np.arange(len(s)) >= len(s) // 2).astype(np.float32) for s in seqs]
    scorer = SequenceScorer(graphdef, mesh=mesh, batch_size=4, min_bucket=8, max_length=64,
                            chunk_size=8)
    res = scorer.score(sharded, seqs, masks)
    # Reference: one plain full-logits forward, rows right-padded to 64 (causal: the padding after a
    # sequence does not change its logits), unsharded.
    padded = np.zeros((len(seqs), 64), np.int32)
    for i, s in enumerate(seqs):
        padded[i, :len(s)] = s
    all_logits = np.asarray(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, padded))
    for i, (s, m) in enumerate(zip(seqs, masks)):
        logits = all_logits[i, :len(s)]
        logp = np.asarray(jax.nn.log_softmax(logits[:-1], axis=-1))[np.arange(len(s) - 1), s[1:]]
        np.testing.assert_allclose(res.logprob_sum[i], float(np.sum(np.asarray(logp) * m[1:])),
                                   rtol=1e-5, atol=1e-4)
        assert res.num_tokens[i] == m[1:].sum()
        greedy = bool(np.all((logits[:-1].argmax(-1) == s[1:])[m[1:] > 0]))
        assert res.greedy[i] == greedy
    assert scorer.calls == 1 and scorer.forwards == 2  # 6 sequences, 4 per forward


def test_selfplay_step_decreases_the_loss_and_alpha_does_not_recompile(tiny_model):
    """The jitted step on one fixed batch: at θ = θ_t SPIN's loss is log 2; repeated steps lower it.
    IRIS with α passed as an array: new α values reuse the compiled step."""
    from sgalm_jax import sharding as sh
    from sgalm_jax.losses import make_loss
    from sgalm_jax.training import create_train_state, make_train_step, make_optimizer

    cfg, graphdef, params = tiny_model
    mesh = sh.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 512, size=6).astype(np.int32) for _ in range(8)]
    real = [rng.integers(3, 512, size=8).astype(np.int32) for _ in range(8)]
    syn = [rng.integers(3, 512, size=int(rng.integers(4, 12))).astype(np.int32) for _ in range(16)]
    scorer = SequenceScorer(graphdef, batch_size=32, min_bucket=32, max_length=32)
    groups = [(prompts[i], r) for i, r in enumerate(real)] + [(prompts[j // 2], s) for j, s in enumerate(syn)]
    res = scorer.score(params, [np.concatenate(g) for g in groups],
                       [np.r_[np.zeros(len(p)), np.ones(len(r))] for p, r in groups])
    ref_real, ref_syn = res.logprob_sum[:8], res.logprob_sum[8:].reshape(8, 2)
    batches = PairBatches(prompts, real, [(syn, ref_syn)], ref_real, num_samples=2, batch_size=8,
                          max_length=32, min_bucket=32, seed=0, iteration=0, pad_id=0)
    batch = sh.global_batch_from_local(batches.batch(0), mesh)

    def train(loss_name, alphas, **kw):
        from sgalm_jax.losses import get_loss
        import inspect

        takes_alpha = "alpha" in inspect.signature(get_loss(loss_name)).parameters
        opt = base_config().optimizer
        opt.learning_rate = 1e-2
        tx, _ = make_optimizer(opt, num_steps=10, params=params)
        state, shardings = create_train_state(jax.tree.map(jnp.array, params), tx, mesh=mesh)
        step = make_train_step(
            selfplay.make_selfplay_loss(graphdef, make_loss(loss_name, **kw),
                                        takes_alpha=takes_alpha, chunk_size=0),
            tx, mesh=mesh, state_shardings=shardings, extra_shardings=(sh.replicated(mesh),))
        losses = []
        for a in alphas:
            state, m = step(state, batch, jnp.float32(a))
            losses.append(float(m["loss"]))
        return losses, step, m

    losses, _, m = train("spin", [1.0] * 6, beta=0.1)
    assert losses[0] == pytest.approx(math.log(2.0), abs=1e-4)  # stored ref = policy at θ_t
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert m["accuracy"] == 1.0 and m["margin"] > 0
    losses, step, m = train("iris", [2.0, 1.0, 0.5, 1.5, 1.5])
    assert step._cache_size() == 1  # five α values, one compiled program
    assert losses[0] == pytest.approx(0.0, abs=1e-4) and losses[-1] < losses[0]  # L(θ_t) = 0
    assert float(m["alpha"]) == 1.5 and 0 < float(m["ess_syn"]) <= 1


# ------------------------------------------------------------------------------ a researcher's loss
MY_LOSS = '''
import jax.numpy as jnp
from sgalm_jax.losses import iris_loss, register_loss

CALLS = []

@register_loss("test_my_iris", family="selfplay", overwrite=True)
def my_iris(policy_real, policy_syn, ref_real, ref_syn, *, alpha=1.0, beta=1.0, margin=0.0,
            real_mask=None, syn_mask=None):
    """IRIS plus a hinge on the log-ratio margin: a researcher's variant."""
    CALLS.append(1)
    loss, metrics = iris_loss(policy_real, policy_syn, ref_real, ref_syn, alpha=alpha, beta=beta)
    z = (policy_real - ref_real) - (policy_syn - ref_syn)
    extra = jnp.mean(jnp.maximum(margin - z, 0.0))
    metrics = dict(metrics, my_hinge=extra)
    return loss + extra, metrics
'''


def test_custom_registered_loss_runs_in_the_loop(tmp_path, monkeypatch, sums_jsonl):
    """A loss registered from the researcher's own module (``selfplay.loss_module``) trains in the
    loop, with the adaptive α schedule from the log-ratio gap; reference log-probs: one pass per
    iteration."""
    (tmp_path / "my_selfplay_losses.py").write_text(MY_LOSS)
    monkeypatch.syspath_prepend(str(tmp_path))
    c = _config(sums_jsonl, loss="test_my_iris", loss_module="my_selfplay_losses", iterations=2,
                steps_per_iteration=2, alpha_schedule="adaptive", gap="logratio",
                mix_previous=False)
    c.selfplay.loss_kwargs = {"margin": 1.0}
    selfplay.validate(c)
    selfplay.REFERENCE_PASSES.clear()
    out = selfplay.run(c, str(tmp_path / "run"))
    import my_selfplay_losses

    assert my_selfplay_losses.CALLS  # traced by the step
    assert selfplay.REFERENCE_PASSES == {0: 1, 1: 1}
    assert out["step"] == 4 and not out["preempted"]
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    iters = [r for r in records if "iter/alpha" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all("my_hinge" in r for r in steps)
    assert len(iters) == 2 and "iter/logratio_gap" in iters[1] and "iter/logratio_gap" not in iters[0]
    for r in steps:  # the step saw the iteration's α
        assert r["alpha"] == pytest.approx(iters[r["iteration"]]["iter/alpha"], rel=1e-6)
    assert iters[1]["iter/gap"] == iters[1]["iter/logratio_gap"]
    assert (tmp_path / "run" / "export" / "model.safetensors").exists()
    samples = (tmp_path / "run" / "samples" / "iter_001.jsonl").read_text().splitlines()
    assert len(samples) == 16 and {"prompt", "real", "synthetic"} <= set(json.loads(samples[0]))


# ------------------------------------------------------------------------------ the CLI, killed and resumed
def _cli(workdir, jsonl, cache_dir, *, fault=None, timeout=300):
    env = dict(os.environ)
    env.update({
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "HF_HUB_OFFLINE": "1",
        "SGALM_LOG_LEVEL": "WARNING",
    })
    env.pop("SGALM_FAULT_INJECT", None)
    if fault:
        env["SGALM_FAULT_INJECT"] = fault
    cmd = [sys.executable, "-m", "sgalm_jax.main", f"--config={TINY}",
           f"--config.workdir={workdir}",
           "--config.data.task=", f"--config.data.train_file={jsonl}",
           "--config.data.max_length=32", "--config.data.min_bucket=32",
           "--config.selfplay.max_prompt_length=12", "--config.selfplay.max_new_tokens=12",
           "--config.selfplay.generation_batch_size=8", "--config.selfplay.ref_batch_size=16",
           "--config.selfplay.logprob_chunk_size=16",
           "--config.selfplay.iterations=2", "--config.selfplay.epochs_per_iteration=2",
           "--config.optimizer.learning_rate=0.01",
           "--config.eval.max_examples=2", "--config.eval.max_new_tokens=8",
           "--config.eval.batch_size=4",
           "--config.checkpoint.every_steps=3", "--config.checkpoint.keep=2",
           "--config.checkpoint.async_save=false",  # step 6 is on disk when step 8 is killed
           "--config.metrics.progress_bar=false", "--config.metrics.tensorboard=false",
           "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.tensor=1"]
    return subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=timeout)


def _events(workdir):
    return [json.loads(l) for l in (Path(workdir) / "selfplay" / "events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, sums_jsonl):
    """Iteration 0 = 4 steps (16 prompts, batch 8, 2 epochs); iteration 1 = 8 steps (SPIN's
    mixing doubles the rows). SIGKILL right after global step 8 (iteration 1), then rerun."""
    root = tmp_path_factory.mktemp("sp_cli")
    work = root / "run"
    log = {"killed": _cli(work, sums_jsonl, root / "jax_cache", fault="sigkill@8")}
    log["events_before"] = _events(work)
    log["checkpoints_before"] = sorted(int(p.name) for p in (work / "checkpoints").iterdir()
                                       if p.name.isdigit() and (p / "commit_success.txt").exists())
    log["data_mtime"] = (work / "selfplay" / "iter_001" / "data.npz").stat().st_mtime_ns
    log["resumed"] = _cli(work, sums_jsonl, root / "jax_cache")
    return work, log


def test_cli_iteration_scores_once_and_the_loss_decreases(killed_and_resumed):
    work, log = killed_and_resumed
    assert log["killed"].returncode == -9, log["killed"].stderr[-3000:]
    assert log["resumed"].returncode == 0, log["resumed"].stderr[-3000:]
    events = _events(work)
    refs = [e for e in events if e["event"] == "reference"]
    assert [e["iteration"] for e in refs] == [0, 1]  # one reference pass per iteration, ever
    assert refs[0]["sequences"] == 32 and refs[1]["sequences"] == 48  # real + syn (+ previous syn)
    records = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
    first = {}
    for r in records:
        if "loss" in r:
            first.setdefault(r["iteration"], r)
    for t in (0, 1):  # at θ = θ_t the policy equals the stored reference: SPIN's loss is log 2
        assert first[t]["loss"] == pytest.approx(math.log(2.0), abs=1e-4)
    it0 = [r["loss"] for r in records if r.get("iteration") == 0 and "loss" in r]
    assert len(it0) == 4 and it0[-1] < it0[0] - 0.05, it0
    for r in records:
        if "loss" in r:
            assert {"real_reward", "syn_reward", "margin", "accuracy", "alpha"} <= set(r)
    iters = [r for r in records if "iter/ref_sequences" in r]
    assert [r["iter/ref_sequences"] for r in iters] == [32, 48]
    config = json.loads((work / "config.json").read_text())
    assert config["algorithm"] == "selfplay" and config["selfplay"]["loss"] == "spin"


def test_cli_resumes_mid_iteration_without_regenerating(killed_and_resumed):
    work, log = killed_and_resumed
    before = log["events_before"]
    assert [e["event"] for e in before if e["event"] != "eval"] == [
        "generate", "generate", "reference", "generate", "generate", "reference"]
    resumed_at = max(log["checkpoints_before"])
    assert resumed_at == 6  # iteration 1, 2 of its 8 steps done: optimizer state restored too
    after = _events(work)[len(before):]
    assert after[0] == {**after[0], "event": "resume", "step": resumed_at, "iteration": 1,
                        "iter_step": resumed_at - 4}
    assert {e["event"] for e in after} == {"resume", "reuse", "eval"}  # nothing regenerated
    assert (work / "selfplay" / "iter_001" / "data.npz").stat().st_mtime_ns == log["data_mtime"]
    steps = [json.loads(l)["step"] for l in (work / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == list(range(1, 9)) + list(range(resumed_at + 1, 13))
    # Evaluation after each iteration (the offline arithmetic task of the config), and the export.
    for tag in ("iter_000", "iter_001"):
        results = json.loads((work / "eval" / tag / "results.json").read_text())
        assert results["arithmetic"]["n"] == 2
        assert (work / "eval" / tag / "arithmetic_examples.jsonl").exists()
    assert (work / "export" / "model.safetensors").exists()
    assert sorted(p.name for p in (work / "samples").iterdir()) == ["iter_000.jsonl", "iter_001.jsonl"]


@pytest.mark.parametrize("name", ["spin_qwen3b_gsm8k", "iris_qwen3b_ultrachat",
                                  "spin_zephyr7b_ultrachat", "selfplay_tiny"])
def test_experiment_configs_validate(name, shared_data):
    """Each self-play config passes every pre-compile check on 8 devices (the model as a preset of
    the same shape family, the Qwen2.5 tokenizer from ../shared/data; nothing is loaded)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    if not c.model.init:
        c.model.init = "qwen2.5-3b"
        c.tokenizer.path = str(shared_data / "tokenizers" / "qwen2.5")
    from sgalm_jax.config import validate_config

    validate_config(c)
    selfplay.validate(c)
    assert c.algorithm == "selfplay" and c.train.batch_size % c.train.grad_accum_steps == 0
