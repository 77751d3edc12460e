"""The scalar-head sequence scorer (GAD's discriminator) against transformers' *ForSequenceClassification.

References: transformers' Qwen2/Qwen3/LlamaForSequenceClassification (num_labels=1) on tiny random
models built offline; they pool at the last token that is not ``pad_token_id``, so the batches below
never use the pad id as a real token, which makes that agree with our "last mask=1 token" rule.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from sgalm_jax.errors import CheckpointError
from sgalm_jax.models import (load_pretrained, load_score_model, make_score_fn, save_score_model,
                              score_model_from_causal_lm)
from sgalm_jax.models.score import init_head_kernel
from sgalm_jax.sharding import make_mesh
from tests.conftest import FAMILIES, TINY

PAD = 999  # never drawn as a real token below (ids < 990)
REL_TOL = 1e-5


def make_hf_scorer(family: str, seed: int = 0, **overrides):
    """A tiny random HF *ForSequenceClassification (num_labels=1), weights perturbed like the
    causal-LM fixtures so a missing tensor would show."""
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(
        **{**TINY, **extra, "num_labels": 1, "pad_token_id": PAD, **overrides})
    torch.manual_seed(seed)
    cls = getattr(transformers, model_cls.replace("ForCausalLM", "ForSequenceClassification"))
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.score.weight.mul_(25.0)  # scores of order 1, so a relative error is meaningful
    return model


def padded_batch(side: str, seed: int = 0):
    """Rows of lengths 24/9/17/1 in a [4, 24] batch, padded with PAD on ``side``."""
    rng = np.random.RandomState(seed)
    lengths = [24, 9, 17, 1]
    ids = np.full((len(lengths), 24), PAD, np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        sl = slice(24 - n, 24) if side == "left" else slice(0, n)
        ids[row, sl] = rng.randint(0, 990, size=n)
        mask[row, sl] = 1
    return ids, mask


def hf_scores(model, ids, mask):
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert out.shape == (ids.shape[0], 1)
    return out[:, 0].float().numpy()


def our_scores(scorer, ids, mask):
    graphdef, params = nnx.split(scorer)
    return np.asarray(_jit_score(graphdef)(params, jnp.asarray(ids), jnp.asarray(mask)))


_SCORE_FNS: dict = {}


def _jit_score(graphdef):
    if graphdef not in _SCORE_FNS:
        _SCORE_FNS[graphdef] = jax.jit(make_score_fn(graphdef))
    return _SCORE_FNS[graphdef]


def rel_err(got, ref):
    """Norm-wise relative error max|got - ref| / max|ref| (an element-wise ratio is ill-posed for a
    score that happens to sit near 0; the absolute errors are ~1e-6 at every row)."""
    assert np.max(np.abs(ref)) > 1.0, ref
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def hf_scorer_dir(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            model = make_hf_scorer(family)
            path = tmp_path_factory.mktemp(f"seqcls_{family}")
            model.save_pretrained(path)
            cache[family] = (model, path)
        return cache[family]

    return get


@pytest.mark.parametrize("family", ["qwen2", "llama31", "qwen3"])
def test_scores_match_transformers_on_left_and_right_padding(family, hf_scorer_dir):
    hf, path = hf_scorer_dir(family)
    ours = load_score_model(path)
    for side in ("left", "right"):
        ids, mask = padded_batch(side)
        ref = hf_scores(hf, ids, mask)
        err = rel_err(our_scores(ours, ids, mask), ref)
        assert err <= REL_TOL, f"{family}/{side}: relative error {err:.2e}"


@pytest.mark.parametrize("family", ["qwen2", "llama31"])
def test_init_from_causal_lm_loads_body_drops_head_and_draws_fresh_head(family, hf_model_dir):
    path = hf_model_dir(family)  # a causal LM (llama31 has an untied lm_head.weight)
    scorer = load_score_model(path, seed=3)
    lm = load_pretrained(path)
    for a, b in zip(jax.tree.leaves(nnx.state(lm.model)), jax.tree.leaves(nnx.state(scorer.model))):
        np.testing.assert_array_equal(a, b)
    kernel = np.asarray(scorer.score.kernel[...])
    np.testing.assert_array_equal(kernel, init_head_kernel(scorer.config, 3, 0.02))
    assert kernel.shape == (64, 1) and 0.01 < kernel.std() < 0.03  # normal(0, initializer_range)
    other = np.asarray(load_score_model(path, seed=4).score.kernel[...])
    assert not np.array_equal(kernel, other)
    # transformers builds the same model from the causal checkpoint (body loaded, score new);
    # with our head copied in, the scores agree.
    cls = getattr(transformers, FAMILIES[family][1].replace("ForCausalLM",
                                                            "ForSequenceClassification"))
    hf = cls.from_pretrained(path, num_labels=1, pad_token_id=PAD).eval()
    with torch.no_grad():
        hf.score.weight.copy_(torch.tensor(kernel.T * 25.0))
    scorer.score.kernel[...] = jnp.asarray(kernel * 25.0)
    ids, mask = padded_batch("left", seed=1)
    assert rel_err(our_scores(scorer, ids, mask), hf_scores(hf, ids, mask)) <= REL_TOL
    # score_model_from_causal_lm on the loaded LM gives the same scorer as loading from disk.
    again = score_model_from_causal_lm(lm, seed=3)
    np.testing.assert_array_equal(again.score.kernel[...], kernel)
    np.testing.assert_array_equal(our_scores(again, ids, mask),
                                  our_scores(load_score_model(path, seed=3), ids, mask))


def test_export_round_trips_through_transformers(hf_model_dir, tmp_path):
    scorer = load_score_model(hf_model_dir("qwen2"), seed=5)
    scorer.score.kernel[...] = scorer.score.kernel[...] * 25.0
    with pytest.raises(CheckpointError, match="pad_token_id"):
        save_score_model(scorer, tmp_path / "nopad")
    save_score_model(scorer, tmp_path / "export", pad_token_id=PAD)
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForSequenceClassification"]
    assert cfg["num_labels"] == 1 and cfg["pad_token_id"] == PAD
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    assert type(hf).__name__ == "Qwen2ForSequenceClassification" and hf.config.num_labels == 1
    for side in ("left", "right"):
        ids, mask = padded_batch(side, seed=2)
        assert rel_err(our_scores(scorer, ids, mask), hf_scores(hf, ids, mask)) <= REL_TOL
    back = load_score_model(tmp_path / "export")
    for a, b in zip(jax.tree.leaves(nnx.state(scorer)), jax.tree.leaves(nnx.state(back))):
        np.testing.assert_array_equal(a, b)
    # transformers' own re-save of our export loads back bit-identically too.
    hf.save_pretrained(tmp_path / "resaved")
    back2 = load_score_model(tmp_path / "resaved")
    np.testing.assert_array_equal(back2.score.kernel[...], scorer.score.kernel[...])


def test_load_onto_mesh_shards_body_and_head(hf_scorer_dir, hf_model_dir):
    _, path = hf_scorer_dir("qwen2")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = load_score_model(path, mesh=mesh)
    P = jax.sharding.PartitionSpec
    assert sharded.score.kernel[...].sharding.spec == P("fsdp", None)
    assert sharded.model.layers.self_attn.q_proj.kernel[...].sharding.spec == P(None, "fsdp",
                                                                                 "tensor")
    ids, mask = padded_batch("right")
    np.testing.assert_allclose(our_scores(sharded, ids, mask),
                               our_scores(load_score_model(path), ids, mask), rtol=1e-5)
    # A fresh head from a causal checkpoint is placed into its sharding too, with the same values.
    fresh = load_score_model(hf_model_dir("qwen2"), seed=1, mesh=mesh)
    assert fresh.score.kernel[...].sharding.spec == P("fsdp", None)
    np.testing.assert_array_equal(fresh.score.kernel[...],
                                  load_score_model(hf_model_dir("qwen2"), seed=1).score.kernel[...])
    # ... and so is one made from a sharded causal LM already in memory (body copied, not aliased).
    lm = load_pretrained(hf_model_dir("qwen2"), mesh=mesh)
    made = score_model_from_causal_lm(lm, seed=1)
    assert made.score.kernel[...].sharding.spec == P("fsdp", None)
    q = made.model.layers.self_attn.q_proj.kernel[...]
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert q is not lm.model.layers.self_attn.q_proj.kernel[...]
    np.testing.assert_array_equal(our_scores(made, ids, mask), our_scores(fresh, ids, mask))


def test_packed_rows_and_empty_rows(hf_scorer_dir):
    _, path = hf_scorer_dir("qwen2")
    scorer = load_score_model(path)
    ids, mask = padded_batch("right", seed=3)
    alone = our_scores(scorer, ids, mask)
    # Pack rows 1 (9 tokens), 2 (17) and 3 (1) into one row with segment ids and restarting positions.
    lengths = [9, 17, 1]
    row = np.concatenate([ids[r, :n] for r, n in zip((1, 2, 3), lengths)])
    seg = np.concatenate([np.full(n, k + 1) for k, n in enumerate(lengths)])
    pos = np.concatenate([np.arange(n) for n in lengths])
    packed = np.asarray(jax.jit(lambda m, i, s, p: m(i, s, p, num_segments=4))(
        scorer, row[None], seg[None], pos[None]))
    np.testing.assert_allclose(packed[0, :3], alone[1:], rtol=1e-5)
    assert packed[0, 3] == 0.0  # segment 4 is absent
    empty = our_scores(scorer, ids, np.zeros_like(mask))
    np.testing.assert_array_equal(empty, np.zeros(4, np.float32))


def test_bad_checkpoints_are_named(tmp_path, hf_scorer_dir):
    two = make_hf_scorer("qwen2", num_labels=2)
    two.save_pretrained(tmp_path / "two")
    with pytest.raises(CheckpointError, match="num_labels=2"):
        load_score_model(tmp_path / "two")
    _, path = hf_scorer_dir("qwen2")
    with pytest.raises(CheckpointError, match="load_score_model"):
        load_pretrained(path)
