"""The sampler: greedy parity with transformers, log-probs, top-k/top-p sets, sampling frequencies,
several samples per prompt, bucketing, sharding, and the text helper.

Shapes are shared across tests (4 prompts of at most 16 tokens, 12 new tokens) so that compiled
programs are reused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sgalm_jax.models import load_pretrained
from sgalm_jax.models.transformer import CausalLM
from sgalm_jax.sampling import (Generation, Sampler, bucket_size, generate, sample_tokens,
                                token_logprobs, top_k_filter, top_p_filter, trim_stop_strings)
from sgalm_jax.sharding import make_mesh
from tests.conftest import make_hf_model

MAX_NEW = 12
LENGTHS = (5, 11, 3, 8)  # different lengths: left padding matters


def _prompts(vocab: int = 1000, seed: int = 0) -> list[list[int]]:
    rs = np.random.RandomState(seed)
    return [rs.randint(3, vocab, n).tolist() for n in LENGTHS]


def _left_pad(prompts):
    t = max(map(len, prompts))
    ids = np.zeros((len(prompts), t), np.int64)
    mask = np.zeros((len(prompts), t), np.int64)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = p
        mask[i, t - len(p):] = 1
    return ids, mask


def _hf_greedy(hf_model, prompts, eos: list[int] | None):
    ids, mask = _left_pad(prompts)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                                do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos,
                                pad_token_id=0)
    out = out[:, ids.shape[1]:].numpy()
    return np.pad(out, ((0, 0), (0, MAX_NEW - out.shape[1])))  # HF stops when every row is done


@pytest.fixture(scope="module")
def models(hf_model_dir):
    """``models(family)`` -> (our model, the transformers model with the same weights)."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = (load_pretrained(hf_model_dir(family)), make_hf_model(family))
        return cache[family]

    return get


# --------------------------------------------------------------------------- greedy parity
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama32"])
def test_greedy_matches_transformers_with_early_eos(models, family):
    ours, hf = models(family)
    prompts = _prompts()
    free = _hf_greedy(hf, prompts, eos=None)
    # An EOS id greedy decoding reaches early: the third token of row 0's free continuation.
    eos = int(free[0, 2])
    ref = _hf_greedy(hf, prompts, eos=[*ours.config.eos_token_ids, eos])

    out = generate(ours, prompts, max_new_tokens=MAX_NEW, temperature=0.0, stop_token_ids=[eos],
                   rng=jax.random.key(0))
    stops = {eos, *ours.config.eos_token_ids}
    for row in range(len(prompts)):
        hits = [i for i, t in enumerate(ref[row]) if t in stops]
        want_len = hits[0] + 1 if hits else MAX_NEW
        assert out.lengths[row] == want_len, (row, out.tokens[row], ref[row])
        np.testing.assert_array_equal(out.tokens[row, :want_len], ref[row, :want_len])
        assert out.finished[row] == bool(hits)
        assert (out.tokens[row, want_len:] == 0).all() and (out.logprobs[row, want_len:] == 0).all()
    assert out.lengths[0] <= 3 and out.finished[0]  # row 0 stopped early, the others went on
    assert out.lengths.max() > out.lengths[0]


# ------------------------------------------------------------- log-probs and allowed token sets
@jax.jit
def _forward(model: CausalLM, ids, mask):
    return model(ids, attention_mask=mask)


def test_logprobs_equal_teacher_forcing_and_tokens_in_topk_topp(models):
    ours, _ = models("qwen2")
    prompts = _prompts(seed=1)
    temperature, top_k, top_p = 0.8, 20, 0.9
    out = generate(ours, prompts, max_new_tokens=MAX_NEW, temperature=temperature, top_k=top_k,
                   top_p=top_p, num_samples=2, rng=jax.random.key(3))
    assert out.tokens.shape == (len(prompts) * 2, MAX_NEW)
    np.testing.assert_array_equal(out.prompt_index, np.repeat(np.arange(len(prompts)), 2))

    # Teacher-forced forward over prompt + completion (left-padded to a fixed shape).
    width = 16 + MAX_NEW
    ids = np.zeros((len(out.tokens), width), np.int32)
    mask = np.zeros_like(ids)
    for i, (p, n) in enumerate(zip(out.prompt_index, out.lengths)):
        seq = prompts[p] + out.tokens[i, :n].tolist()
        ids[i, width - len(seq):] = seq
        mask[i, width - len(seq):] = 1
    logits = np.asarray(_forward(ours, jnp.asarray(ids), jnp.asarray(mask)), np.float64)
    checked = 0
    for i, (p, n) in enumerate(zip(out.prompt_index, out.lengths)):
        start = width - len(prompts[p]) - n  # position of the prompt's first token
        for j in range(n):
            row = logits[i, start + len(prompts[p]) - 1 + j]  # predicts completion token j
            tok = out.tokens[i, j]
            ref_lp = row[tok] - np.log(np.exp(row - row.max()).sum()) - row.max()
            assert abs(out.logprobs[i, j] - ref_lp) <= 1e-4, (i, j, out.logprobs[i, j], ref_lp)
            assert tok in _reference_set(row, temperature, top_k, top_p), (i, j)
            checked += 1
    assert checked >= len(out.tokens) * 3


def _reference_set(logits: np.ndarray, temperature: float, top_k: int | None,
                   top_p: float | None) -> set[int]:
    """Brute force: the ids top-k then top-p (on the temperature-scaled softmax) allow."""
    order = np.argsort(-logits, kind="stable")
    allowed = order[:top_k] if top_k else order
    if top_p is not None:
        z = logits[allowed] / temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        cum = np.cumsum(probs)
        m = int(np.searchsorted(cum, top_p - 1e-12)) + 1  # smallest prefix with mass >= p
        allowed = allowed[:m]
    return set(allowed.tolist())


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.7), (8, 0.6), (1, None),
                                         (None, 1e-6)])
def test_filters_and_draws_match_bruteforce_sets(top_k, top_p):
    rs = np.random.RandomState(0)
    logits = (rs.randn(16, 50) * 2).astype(np.float32)
    temperature = 0.7

    @jax.jit
    def masked_and_draws(logits):
        masked = logits / temperature
        if top_k is not None:
            masked = top_k_filter(masked, top_k)
        if top_p is not None:
            masked = top_p_filter(masked, top_p)
        draw = lambda key: sample_tokens(key, logits, temperature=temperature, top_k=top_k,  # noqa
                                         top_p=top_p)
        return masked, jax.vmap(draw)(jax.random.split(jax.random.key(0), 40))

    masked, draws = (np.asarray(x) for x in masked_and_draws(jnp.asarray(logits)))
    for r in range(len(logits)):
        want = _reference_set(logits[r].astype(np.float64), temperature, top_k, top_p)
        assert set(np.flatnonzero(np.isfinite(masked[r])).tolist()) == want, r
        assert set(draws[:, r].tolist()) <= want, r


def test_sampling_frequencies_match_softmax():
    from scipy.stats import chisquare

    logits = np.array([1.5, 0.3, -0.2, 0.9, -1.0, 0.0, 2.0, -0.5], np.float32)
    n = 40000
    batch = jnp.broadcast_to(jnp.asarray(logits), (n, len(logits)))
    for kw, allowed in [(dict(), range(8)), (dict(top_k=4, temperature=0.7), [6, 0, 3, 1])]:
        temperature = kw.get("temperature", 1.0)
        draws = np.asarray(sample_tokens(jax.random.key(7), batch, **kw))
        counts = np.bincount(draws, minlength=len(logits))
        z = np.full(len(logits), -np.inf)
        z[list(allowed)] = logits[list(allowed)] / temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        assert counts[probs == 0].sum() == 0
        keep = probs > 0
        stat = chisquare(counts[keep], probs[keep] * n)
        assert stat.pvalue > 1e-3, (kw, counts, probs * n)


def test_greedy_logprobs_helper():
    logits = jax.random.normal(jax.random.key(0), (3, 17)) * 3
    tokens = jnp.argmax(logits, -1)
    np.testing.assert_allclose(token_logprobs(logits, tokens),
                               jax.nn.log_softmax(logits)[jnp.arange(3), tokens], atol=1e-6)
    np.testing.assert_array_equal(sample_tokens(jax.random.key(1), logits, temperature=0.0),
                                  tokens)


# ------------------------------------------------------------------ several samples per prompt
def test_num_samples_distinct_and_reproducible(models):
    ours, _ = models("qwen2")
    prompts = _prompts(seed=2)[:2]
    kw = dict(max_new_tokens=MAX_NEW, temperature=1.0, num_samples=4)
    sampler = Sampler.from_model(ours)
    state = nnx.state(ours)  # the sampler takes params as an argument (e.g. a frozen snapshot)
    a = sampler.generate(state, prompts, rng=jax.random.key(11), **kw)
    b = sampler.generate(state, prompts, rng=jax.random.key(11), **kw)
    c = sampler.generate(state, prompts, rng=jax.random.key(12), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.tokens, c.tokens)
    for p in range(len(prompts)):
        rows = [tuple(r) for r in a.completions()[p * 4:(p + 1) * 4]]
        assert len(set(rows)) == 4, rows  # independent samples, not copies
    # One prefill over the 2 prompts (batch bucket 2), not over the 8 sampled rows.
    assert sampler.buckets == [(2, 16, 4, MAX_NEW)]
    assert sampler.num_compilations == 2


# --------------------------------------------------------------------- bucketing and inputs
def test_bucketing_compiles_few_programs_and_accepts_arrays(models):
    ours, _ = models("qwen2")
    graphdef, state = nnx.split(ours)
    sampler = Sampler(graphdef, ours.config, min_batch_bucket=4)
    prompts = _prompts(seed=3)
    kw = dict(max_new_tokens=MAX_NEW, temperature=0.0, rng=jax.random.key(0))
    full = sampler.generate(state, prompts, **kw)
    part = sampler.generate(state, prompts[:3], **kw)  # batch 3 -> bucket 4
    np.testing.assert_array_equal(part.tokens, full.tokens[:3])
    ids, mask = _left_pad(prompts)
    right_ids = np.zeros_like(ids)
    right_mask = np.zeros_like(mask)
    for i, p in enumerate(prompts):  # right padding works as well
        right_ids[i, :len(p)] = p
        right_mask[i, :len(p)] = 1
    arr = sampler.generate(state, right_ids, prompt_mask=right_mask, **kw)
    np.testing.assert_array_equal(arr.tokens, full.tokens)
    np.testing.assert_allclose(arr.logprobs, full.logprobs, atol=1e-6)
    assert sampler.num_compilations == 2  # one prefill + one decode for every call above

    chunked = Sampler(graphdef, ours.config, max_batch_size=2)  # 4 prompts -> 2 calls of 2
    split = chunked.generate(state, prompts, **kw)
    np.testing.assert_array_equal(split.tokens, full.tokens)
    assert bucket_size(5, 16) == 16 and bucket_size(17, 16) == 32 and bucket_size(3, 1, 4) == 4
    assert bucket_size(6, 1, 4) == 8 and bucket_size(1) == 1


def test_invalid_arguments(models):
    from sgalm_jax.errors import ConfigError

    ours, _ = models("qwen2")
    with pytest.raises(ConfigError, match="empty"):
        generate(ours, [[1, 2], []], max_new_tokens=2, rng=jax.random.key(0))
    with pytest.raises(ConfigError, match="top_p"):
        generate(ours, [[1, 2]], max_new_tokens=2, top_p=1.5, rng=jax.random.key(0))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(ours, [[1, 2]], max_new_tokens=0, rng=jax.random.key(0))


# ------------------------------------------------------------------------------------ sharding
def test_sharded_greedy_equals_unsharded(models, hf_model_dir):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    ours, _ = models("qwen2")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = load_pretrained(hf_model_dir("qwen2"), mesh=mesh)
    prompts = _prompts()
    kw = dict(max_new_tokens=MAX_NEW, temperature=0.0, rng=jax.random.key(0))
    want = generate(ours, prompts, **kw)
    got = generate(sharded, prompts, **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


# ----------------------------------------------------------------------------------- text
def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tmodels.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                  "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["What is 2 + 3? The answer is 5.", "hello world, how are you"] * 4,
                            trainer=trainer)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=template)


def test_generate_text_chat_and_stop_strings(models):
    from sgalm_jax.sampling import generate_text

    ours, _ = models("qwen2")
    tok = _tiny_tokenizer()
    chats = [[{"role": "user", "content": "What is 2 + 3?"}], "hello"]
    res = generate_text(ours, tok, chats, chat_template=True, max_new_tokens=MAX_NEW,
                        temperature=0.0, rng=jax.random.key(0))
    assert res.prompts[0] == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert res.prompts[1].startswith("<|im_start|>user\nhello")
    assert isinstance(res.generation, Generation) and len(res.texts) == 2
    for text, ids in zip(res.texts, res.generation.completions()):
        assert text == tok.decode(ids, skip_special_tokens=True)
    # Stop strings cut the decoded text (at the earliest of several).
    full = res.texts[0]
    if len(full) >= 4:
        cut = generate_text(ours, tok, chats, chat_template=True, max_new_tokens=MAX_NEW,
                            temperature=0.0, rng=jax.random.key(0),
                            stop_strings=[full[3:], full[2:4]])
        assert cut.texts[0] == full[:full.index(full[2:4])]
    assert trim_stop_strings("abc</s>def<|x|>", ["<|x|>", "</s>"]) == "abc"
    assert trim_stop_strings("abc", []) == "abc"


def test_greedy_matches_transformers_across_the_sliding_window(models):
    """Mistral's sliding window (96 tokens in the tiny model) is honoured during decoding too."""
    ours, hf = models("mistral")
    rs = np.random.RandomState(7)
    prompts = [rs.randint(3, 1000, n).tolist() for n in (90, 70)]
    ids, mask = _left_pad(prompts)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=40, eos_token_id=None, pad_token_id=0)
    ref = ref[:, ids.shape[1]:].numpy()
    gen = generate(ours, prompts, max_new_tokens=40, temperature=0.0, rng=jax.random.key(0),
                   use_eos=False)
    np.testing.assert_array_equal(np.asarray(gen.tokens), ref)
