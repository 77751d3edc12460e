"""Our decoder's fp32 logits against transformers' on tiny random Qwen2, Qwen3 and Llama 3.x models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sgalm_jax.models import CausalLM, load_pretrained, positions_from_mask
from tests.conftest import FAMILIES, make_hf_model

TOL = 1e-4


def hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@jax.jit
def our_logits(model: CausalLM, ids, mask):
    return model(ids, attention_mask=mask)


def _long_batch(vocab: int):
    rng = np.random.RandomState(0)
    ids = rng.randint(0, vocab, size=(2, 640))
    return ids, np.ones_like(ids)


def _left_padded_batch(vocab: int):
    rng = np.random.RandomState(1)
    lengths = [48, 17, 33, 1]
    ids = rng.randint(0, vocab, size=(len(lengths), 48))
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, 48 - n:] = 1
        ids[row, : 48 - n] = 0  # pad id; must not influence anything
    return ids, mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("batch", ["long", "left_padded"])
def test_logits_match_transformers(family, batch, hf_model_dir):
    path = hf_model_dir(family)
    ref_model = make_hf_model(family)
    ours = load_pretrained(path)
    ids, mask = (_long_batch if batch == "long" else _left_padded_batch)(ours.config.vocab_size)
    ref = hf_logits(ref_model, ids, mask)
    got = np.asarray(our_logits(ours, jnp.asarray(ids), jnp.asarray(mask)))
    err = np.abs(ref - got)[mask.astype(bool)].max()
    assert err <= TOL, f"{family}/{batch}: max abs logit difference {err:.2e} > {TOL}"


def test_linear_rope_scaling_matches_transformers(tmp_path):
    model = make_hf_model("qwen2", rope_scaling={"rope_type": "linear", "factor": 4.0})
    model.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert ours.config.rope_type == "linear" and ours.config.rope_factor == 4.0
    ids, mask = _long_batch(ours.config.vocab_size)
    err = np.abs(hf_logits(model, ids, mask) - np.asarray(our_logits(ours, ids, mask))).max()
    assert err <= TOL


def test_left_padding_equals_unpadded_rows(hf_model_dir):
    """A left-padded row gives the same logits as the same tokens alone (positions from the mask)."""
    ours = load_pretrained(hf_model_dir("qwen3"))
    ids, mask = _left_padded_batch(ours.config.vocab_size)
    padded = np.asarray(our_logits(ours, ids, mask))
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        alone = np.asarray(our_logits(ours, ids[row:row + 1, -n:], np.ones((1, n), np.int32)))
        np.testing.assert_allclose(padded[row, -n:], alone[0], atol=1e-5)


def test_positions_from_mask():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


def test_remat_gives_same_values_and_gradients(hf_model_dir):
    """Rematerialisation changes memory, not math: logits and gradients are identical."""
    from flax import nnx

    plain = load_pretrained(hf_model_dir("llama31"))
    remat = load_pretrained(hf_model_dir("llama31"), remat="full")
    ids = jnp.asarray(np.random.RandomState(2).randint(0, 1000, (2, 32)))

    def loss(model):
        return jnp.mean(jax.nn.log_softmax(model(ids))[..., 0])

    value_and_grad = nnx.jit(nnx.value_and_grad(loss))
    l_plain, g_plain = value_and_grad(plain)
    l_remat, g_remat = value_and_grad(remat)
    np.testing.assert_allclose(l_plain, l_remat, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_compute_with_fp32_params(hf_model_dir):
    """Compute dtype bf16 over fp32 params: logits stay float32 and close to the fp32 forward."""
    path = hf_model_dir("qwen2")
    fp32 = load_pretrained(path)
    mixed = load_pretrained(path, dtype="bfloat16", param_dtype="float32")
    assert mixed.model.layers.mlp.up_proj.kernel[...].dtype == jnp.float32
    ids, mask = _left_padded_batch(1000)
    out = our_logits(mixed, ids, mask)
    assert out.dtype == jnp.float32
    ref = np.asarray(our_logits(fp32, ids, mask))
    assert np.abs(np.asarray(out) - ref)[mask.astype(bool)].max() < 0.05


def test_packed_segments_equal_separate_rows(hf_model_dir):
    """Segment ids in the attention mask keep packed examples from attending to each other."""
    ours = load_pretrained(hf_model_dir("qwen2"))
    rng = np.random.RandomState(5)
    a, b = rng.randint(0, 1000, 20), rng.randint(0, 1000, 12)
    packed = np.concatenate([a, b, np.zeros(4, int)])[None]
    segments = np.array([[1] * 20 + [2] * 12 + [0] * 4])
    positions = np.array([list(range(20)) + list(range(12)) + [0] * 4])
    got = np.asarray(ours(jnp.asarray(packed), attention_mask=jnp.asarray(segments),
                          positions=jnp.asarray(positions)))
    alone_a = np.asarray(ours(jnp.asarray(a[None])))
    alone_b = np.asarray(ours(jnp.asarray(b[None])))
    np.testing.assert_allclose(got[0, :20], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(got[0, 20:32], alone_b[0], atol=1e-5)
