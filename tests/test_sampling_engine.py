"""The continuous-batching engine: token-identical to the static sampler (and so to transformers) on a
ragged workload, sampled rows reproducible and independent of the schedule, the sampling
distribution (chi-square), log-probs equal to teacher forcing, 8 sharded devices equal to one, and a
bounded number of compiled programs.

Shapes are shared across tests (prompts of at most 16 tokens, rows of at most 12 new tokens, 4 slots)
so compiled programs are reused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sgalm_jax.errors import ConfigError
from sgalm_jax.models import load_pretrained
from sgalm_jax.models.transformer import CausalLM
from sgalm_jax.sampling import Sampler, generate
from sgalm_jax.sampling_engine import ContinuousEngine, default_prefill_chunk
from sgalm_jax.sharding import make_mesh
from tests.conftest import make_hf_model

MAX_NEW = 12
SLOTS = 4
# The tied test models decode on CPU with a [hidden, vocab] copy of the head, made by one more
# program per engine (once per run, not once per decode call).
HEAD = 1


def _workload(n: int = 11, seed: int = 0, vocab: int = 1000):
    """``n`` prompts of 2-15 tokens and per-prompt maximum lengths 1..MAX_NEW (the max included)."""
    rs = np.random.RandomState(seed)
    prompts = [rs.randint(3, vocab, rs.randint(2, 16)).tolist() for _ in range(n)]
    limits = rs.randint(1, MAX_NEW + 1, n)
    limits[0] = MAX_NEW
    return prompts, limits


@pytest.fixture(scope="module")
def qwen2(hf_model_dir):
    model = load_pretrained(hf_model_dir("qwen2"))
    graphdef, state = nnx.split(model)
    return model, graphdef, state


@pytest.fixture(scope="module")
def cont(qwen2):
    """A continuous-engine sampler shared by the tests below (its programs compile once)."""
    model, graphdef, _ = qwen2
    return Sampler(graphdef, model.config, engine="continuous", num_slots=SLOTS)


SAMPLED = dict(temperature=0.8, top_k=20, top_p=0.9, num_samples=2, use_eos=False)


# ------------------------------------------------------------------------ greedy = static = HF
def test_greedy_token_identical_to_static_on_ragged_workload(qwen2):
    model, graphdef, state = qwen2
    prompts, limits = _workload()
    static = Sampler(graphdef, model.config, engine="static")
    cont = Sampler(graphdef, model.config, engine="continuous", num_slots=SLOTS)  # own counter
    free = cont.generate(state, prompts, max_new_tokens=MAX_NEW, temperature=0.0,
                         rng=jax.random.key(0), use_eos=False)
    free_sizes = set(cont.continuous_engine.last_run["slot_sizes"])
    # Stop ids that some rows reach early (the third token of a few free continuations).
    stops = sorted({int(free.tokens[i, 2]) for i in (1, 4, 7)})
    kw = dict(max_new_tokens=limits, temperature=0.0, rng=jax.random.key(0), use_eos=False,
              stop_token_ids=stops)
    want = static.generate(state, prompts, **kw)
    got = cont.generate(state, prompts, **kw)
    sizes = {"free": free_sizes, "stops": set(cont.continuous_engine.last_run["slot_sizes"])}
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_array_equal(got.finished, want.finished)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    assert got.tokens.shape == (len(prompts), MAX_NEW)
    assert (got.lengths <= limits).all() and (got.lengths == limits)[~got.finished].all()
    assert got.finished.any() and (~got.finished).any() and got.lengths.min() < MAX_NEW
    for row, n in zip(got.tokens, got.lengths):  # pad after the end
        assert (row[n:] == cont.pad_token_id).all()
    # The static sampler honours per-row limits too: equal to cutting the full-length rows.
    for i, n in enumerate(want.lengths):
        np.testing.assert_array_equal(want.tokens[i, :n], free.tokens[i, :n])

    # 11 rows through 4 slots: the slots were refilled, and in the tail the live rows moved to
    # programs with fewer slots (4 -> 2 -> 1). Programs per stop set: init, prefill and decode
    # (which starts waiting rows in free slots itself), plus a decode and a compaction per smaller
    # slot count visited, plus the head copy once;
    # a new workload reuses them (and compiles only a smaller slot count it visits for the first
    # time).
    def expected():
        return HEAD + sum(3 + 2 * (len(v) - 1) for v in sizes.values())

    assert SLOTS in sizes["stops"] and sizes["stops"] <= {1, 2, 4}
    assert cont.num_compilations == expected()
    prompts2, limits2 = _workload(seed=5)
    again = cont.generate(state, prompts2, max_new_tokens=limits2, temperature=0.0,
                          rng=jax.random.key(1), use_eos=False, stop_token_ids=stops)
    sizes["stops"] |= set(cont.continuous_engine.last_run["slot_sizes"])
    ref = static.generate(state, prompts2, max_new_tokens=limits2, temperature=0.0,
                          rng=jax.random.key(1), use_eos=False, stop_token_ids=stops)
    np.testing.assert_array_equal(again.tokens, ref.tokens)
    assert cont.num_compilations == expected() <= HEAD + 2 * (3 + 2 * 2)
    assert static.num_compilations == 2
    assert cont.continuous_engine.shapes == [(n, 16, MAX_NEW) for n in sorted(sizes["stops"])]


def test_prompts_of_several_buckets_prefill_at_their_own_length(qwen2):
    """Prompts of 3..40 tokens (buckets 16, 32 and 64 of a 64-token call): scheduled longest first,
    each prefill chunk runs at its own bucket and pads its stash to the call's, one prefill program
    per bucket; greedy rows equal the static sampler's, in the original order."""
    model, graphdef, state = qwen2
    rs = np.random.RandomState(11)
    prompts = [rs.randint(3, 1000, n).tolist() for n in (3, 40, 12, 25, 31, 7, 18, 36, 5)]
    limits = rs.randint(1, MAX_NEW + 1, len(prompts))
    kw = dict(max_new_tokens=limits, temperature=0.0, rng=jax.random.key(0), use_eos=False)
    want = Sampler(graphdef, model.config, engine="static").generate(state, prompts, **kw)
    sampler = Sampler(graphdef, model.config, engine="continuous", num_slots=SLOTS,
                      prefill_chunk=2, min_slots=SLOTS)
    got = sampler.generate(state, prompts, **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    run = sampler.continuous_engine.last_run
    assert run["prefills"] == 5 and run["slot_sizes"] == (SLOTS,)
    assert sum(run["decode_steps"].values()) >= (limits.max() - 1)
    # init, decode, the head copy, and a prefill per bucket (64: 40, 36; 32: 31, 25, 18 ...; 16)
    assert sampler.num_compilations == HEAD + 2 + 3


def test_greedy_matches_transformers_with_sliding_window_one_slot(hf_model_dir):
    """Mistral's sliding window (96) over the engine's ring of write positions (the second row wraps
    around it); one slot, so rows run in turn."""
    ours = load_pretrained(hf_model_dir("mistral"))
    hf = make_hf_model("mistral")
    rs = np.random.RandomState(7)
    prompts = [rs.randint(3, 1000, n).tolist() for n in (90, 70)]
    out = generate(ours, prompts, max_new_tokens=30, temperature=0.0, rng=jax.random.key(0),
                   use_eos=False, engine="continuous", num_slots=1)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=30,
                              eos_token_id=None, pad_token_id=0)
        np.testing.assert_array_equal(out.tokens[i], ref[0, len(p):].numpy())


# --------------------------------------------------------------------------------- sampling
@jax.jit
def _forward(model: CausalLM, ids, mask):
    return model(ids, attention_mask=mask)


def test_sampled_reproducible_schedule_free_and_logprobs_equal_teacher_forcing(qwen2, cont):
    model, graphdef, state = qwen2
    prompts, limits = _workload(n=6, seed=1)
    kw = dict(max_new_tokens=limits, **SAMPLED)
    a = cont
    b = Sampler(graphdef, model.config, engine="continuous", num_slots=SLOTS, prefill_chunk=1,
                refill_min=3)
    x = a.generate(state, prompts, rng=jax.random.key(3), **kw)
    y = a.generate(state, prompts, rng=jax.random.key(3), **kw)
    z = b.generate(state, prompts, rng=jax.random.key(3), **kw)  # another schedule
    w = a.generate(state, prompts, rng=jax.random.key(4), **kw)
    for other in (y, z):
        np.testing.assert_array_equal(other.tokens, x.tokens)
        np.testing.assert_allclose(other.logprobs, x.logprobs, atol=1e-6)
    assert not np.array_equal(w.tokens, x.tokens)
    np.testing.assert_array_equal(x.lengths, np.repeat(limits, 2))
    assert all(tuple(x.tokens[2 * p]) != tuple(x.tokens[2 * p + 1])
               for p in range(len(prompts)) if limits[p] > 3)  # samples, not copies

    # Log-probs equal a teacher-forced forward, and tokens lie in the top-k / top-p set.
    from tests.test_sampling import _reference_set

    width = 16 + MAX_NEW
    ids = np.zeros((len(x.tokens), width), np.int32)
    mask = np.zeros_like(ids)
    for i, (p, n) in enumerate(zip(x.prompt_index, x.lengths)):
        seq = prompts[p] + x.tokens[i, :n].tolist()
        ids[i, width - len(seq):] = seq
        mask[i, width - len(seq):] = 1
    logits = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)), np.float64)
    for i, (p, n) in enumerate(zip(x.prompt_index, x.lengths)):
        start = width - len(prompts[p]) - n
        for j in range(n):
            row = logits[i, start + len(prompts[p]) - 1 + j]
            ref = row[x.tokens[i, j]] - row.max() - np.log(np.exp(row - row.max()).sum())
            assert abs(x.logprobs[i, j] - ref) <= 1e-4, (i, j, x.logprobs[i, j], ref)
            assert x.tokens[i, j] in _reference_set(row, 0.8, 20, 0.9), (i, j)


def test_sampling_distribution_chi_square_small_vocab(tmp_path):
    """Joint law of two sampled tokens over an 8-token vocabulary: p(t1) p(t2 | t1) from forwards."""
    from scipy.stats import chisquare

    make_hf_model("qwen2", vocab_size=8).save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    graphdef, state = nnx.split(model)
    prompt = [3, 1, 4, 1, 5]
    for kw in (dict(temperature=0.7, top_k=5),):
        n = 3000
        sampler = Sampler(graphdef, model.config, engine="continuous", num_slots=64)
        out = sampler.generate(state, [prompt], max_new_tokens=2, num_samples=n, use_eos=False,
                               rng=jax.random.key(11), **kw)
        counts = np.zeros((8, 8))
        np.add.at(counts, (out.tokens[:, 0], out.tokens[:, 1]), 1)
        ids = jnp.asarray([prompt + [t] for t in range(8)])
        logits = np.asarray(_forward(model, ids, jnp.ones_like(ids)), np.float64)

        def probs(z):
            z = z / kw["temperature"]
            if "top_k" in kw:
                z = np.where(z >= np.sort(z)[-kw["top_k"]], z, -np.inf)
            e = np.exp(z - z.max())
            return e / e.sum()

        p1 = probs(logits[0, len(prompt) - 1])
        joint = p1[:, None] * np.stack([probs(logits[t, len(prompt)]) for t in range(8)])
        keep = joint > 0
        assert counts[~keep].sum() == 0
        stat = chisquare(counts[keep], joint[keep] * n)
        assert stat.pvalue > 1e-3, (kw, stat)
        # Raw-logit log-probs of the first token, whatever the filters.
        lp1 = logits[0, len(prompt) - 1] - np.log(np.exp(logits[0, len(prompt) - 1]).sum())
        np.testing.assert_allclose(out.logprobs[:, 0], lp1[out.tokens[:, 0]], atol=1e-5)


# ------------------------------------------------------------------------------------ sharding
@pytest.fixture(scope="module")
def sharded(hf_model_dir):
    """The qwen2 model placed on a data=2, fsdp=2, tensor=2 mesh (the training layout)."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = load_pretrained(hf_model_dir("qwen2"), mesh=mesh)
    return model, *nnx.split(model)


def test_sharded_over_8_devices_equals_one_device(qwen2, cont, sharded):
    """Sampled rows (so the per-row keys too) on data=2, fsdp=2, tensor=2 equal one device's."""
    model, g2, s2 = sharded
    prompts, limits = _workload(n=6, seed=2)
    kw = dict(max_new_tokens=limits, rng=jax.random.key(0), **SAMPLED)
    want = cont.generate(qwen2[2], prompts, **kw)
    sampler = Sampler(g2, model.config, engine="continuous", num_slots=SLOTS)
    got = sampler.generate(s2, prompts, **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    sizes = sampler.continuous_engine.last_run["slot_sizes"]
    assert sampler.num_compilations == HEAD + 3 + 2 * (len(sizes) - 1)  # + decode, compact per shrink


def test_host_local_equals_global_and_simulated_hosts(qwen2, cont, sharded):
    """placement="host_local" (single process): the params resharded from the training mesh onto
    this host's sampling mesh give the global run's rows; three hosts played in turn, each with its
    share of the prompts, give them too, in order."""
    from sgalm_jax.sampling import _make_mode, row_limits
    from sgalm_jax.sampling_placement import host_local_params, run_host_local

    model, graphdef, state = sharded
    prompts, limits = _workload(n=6, seed=2)
    kw = dict(max_new_tokens=limits, rng=jax.random.key(0), **SAMPLED)
    want = cont.generate(qwen2[2], prompts, **kw)

    # This host's copy on a (data=4, tensor=2) mesh of its devices: fsdp dropped, tensor kept.
    sampler = Sampler(graphdef, model.config, num_slots=SLOTS, placement="host_local",
                      local_mesh_shape={"data": 4, "tensor": 2})
    got = sampler.generate(state, prompts, **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    local = host_local_params(state, sampler.host_local_mesh())
    q = local["model"]["layers"]["self_attn"]["q_proj"]["kernel"].get_value()  # stacked [L, ...]
    assert isinstance(q.sharding, NamedSharding) and q.sharding.spec == P(None, None, "tensor")
    assert q.sharding.mesh.shape == {"data": 4, "fsdp": 1, "tensor": 2}
    np.testing.assert_array_equal(
        np.asarray(q), np.asarray(state["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
                                  .get_value()))

    # Three "hosts" in turn, each sampling its share on its own copy: the same rows, in order.
    rows = [np.asarray(p, np.int32) for p in prompts]
    lims = row_limits(limits, len(prompts), SAMPLED["num_samples"])
    shares = [run_host_local(
        sampler.continuous_engine, state, rows, lims, mesh=sampler.host_local_mesh(),
        process_index=h, process_count=3, gather=False, stop_ids=(),
        mode=_make_mode(SAMPLED["temperature"], SAMPLED["top_k"], SAMPLED["top_p"]),
        pad_id=sampler.pad_token_id, cache_dtype=model.config.dtype, num_samples=2,
        rng=jax.random.key(0), temperature=0.8, top_p=0.9, slots=SLOTS,
        width=int(lims.max())) for h in range(3)]
    assert [len(s["lengths"]) for s in shares] == [4, 4, 4]
    np.testing.assert_array_equal(np.concatenate([s["tokens"] for s in shares]), want.tokens)
    np.testing.assert_array_equal(np.concatenate([s["lengths"] for s in shares]), want.lengths)
    # The played hosts reused the local programs (but may visit other tail slot counts).
    assert sampler.num_compilations <= HEAD + 3 + 2 * 2


# ---------------------------------------------------------------------------------------- LoRA
def test_lora_adapters_are_in_the_sampled_model(hf_model_dir, qwen2, cont):
    """A LoRA model (adapters on every projection, B non-zero) through the engine gives the rows of
    the same model with the adapters folded into its kernels (merge_adapters), which differ from the
    base model's: the engine samples the adapted model, not its base."""
    from sgalm_jax.models import lora as L

    model = load_pretrained(hf_model_dir("qwen2"))
    L.add_adapters(model, L.LoraSpec(rank=2, alpha=4.0), seed=1)
    rs = np.random.RandomState(0)
    for ad in L.adapter_modules(model).values():
        ad.b.set_value(jnp.asarray(0.05 * rs.randn(*ad.b.get_value().shape), jnp.float32))
    # merge_adapters writes the folded kernels into Variables it shares with `model` (flax 0.12's
    # nnx.merge reuses them), so it gets a clone: `model` keeps its own kernels.
    merged = L.merge_adapters(nnx.clone(model))
    prompts, limits = _workload(n=6, seed=3)
    kw = dict(max_new_tokens=limits, rng=jax.random.key(0), **SAMPLED)
    graphdef, state = nnx.split(model)
    got = Sampler(graphdef, model.config, engine="continuous", num_slots=SLOTS).generate(
        state, prompts, **kw)
    want = cont.generate(nnx.split(merged)[1], prompts, **kw)  # the plain graph's programs
    base = cont.generate(qwen2[2], prompts, **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
    assert not np.array_equal(got.tokens, base.tokens)


# ------------------------------------------------------------------------------ unrolled layers
def test_unrolled_model_gives_the_scanned_rows(qwen2, cont):
    """The same params with ``scan_layers=False`` (its layers unrolled over the same stacked
    [L, slots, ...] cache) sample the rows of the scanned model, schedule and shrinking included."""
    import dataclasses

    model, _, state = qwen2
    config = dataclasses.replace(model.config, scan_layers=False)
    unrolled = nnx.graphdef(nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0))))
    prompts, limits = _workload(n=6, seed=5)
    kw = dict(max_new_tokens=limits, rng=jax.random.key(2), **SAMPLED)
    sampler = Sampler(unrolled, config, engine="continuous", num_slots=SLOTS)
    got = sampler.generate(state, prompts, **kw)
    want = cont.generate(state, prompts, **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    assert len(sampler.continuous_engine.last_run["slot_sizes"]) > 1  # compact ran


# ------------------------------------------------------------------------------- the options
def test_engine_choice_and_invalid_arguments(qwen2):
    model, graphdef, state = qwen2
    auto = Sampler(graphdef, model.config, max_batch_size=8)
    assert auto.resolve_engine(9) == "continuous" and auto.resolve_engine(8) == "static"
    assert Sampler(graphdef, model.config).resolve_engine(1000) == "static"
    assert Sampler(graphdef, model.config, num_slots=4).resolve_engine(5) == "continuous"
    assert auto.resolve_engine(100, "static") == "static"
    assert default_prefill_chunk(32, 8, 100) == 4 and default_prefill_chunk(32, 1, 5) == 8
    with pytest.raises(ConfigError, match="engine"):
        Sampler(graphdef, model.config, engine="paged")
    with pytest.raises(ConfigError, match="num_slots"):
        Sampler(graphdef, model.config, num_slots=0)
    with pytest.raises(ConfigError, match="placement"):
        Sampler(graphdef, model.config, placement="everywhere")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        auto.generate(state, [[1, 2], [3]], max_new_tokens=[4, 0], rng=jax.random.key(0))
    with pytest.raises(ConfigError, match="one per prompt"):
        auto.generate(state, [[1, 2], [3]], max_new_tokens=[4, 5, 6], rng=jax.random.key(0))
    engine = ContinuousEngine(graphdef, model.config)
    with pytest.raises(ConfigError, match="limits"):
        engine.run(state, [np.array([1, 2])], np.array([3, 3]), mode=None, stop_ids=(), pad_id=0,
                   cache_dtype=jnp.float32, num_samples=1, rng=jax.random.key(0),
                   temperature=1.0, top_p=None, slots=2)
