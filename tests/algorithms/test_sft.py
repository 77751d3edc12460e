"""SFT data path: records, tokenization with response-only loss masks (plain and chat), truncation,
bucketed / packed batches that are deterministic, resumable and split across hosts."""

from __future__ import annotations

import numpy as np
import pytest

from sgalm_jax.algorithms.sft import encode, load_records
from sgalm_jax.config import base_config
from sgalm_jax.errors import ConfigError, DataError
from sgalm_jax.training.batching import BatchSource, TokenizedExample, bucket_length, truncate
from sgalm_jax.training.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _data_cfg(**kw):
    cfg = base_config()
    for k, v in kw.items():
        cfg.data[k] = v
    return cfg


def test_plain_encoding_masks_only_the_response_and_eos(tok):
    cfg = _data_cfg()
    [ex] = encode([("What is 2 + 3?", " 5")], tok, cfg.data, eos_id=tok.eos_token_id,
                  vocab_size=512)
    prompt = tok("What is 2 + 3?")["input_ids"]
    response = tok(" 5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids.tolist() == prompt + response
    assert ex.loss_mask.tolist() == [0.0] * len(prompt) + [1.0] * len(response)


def test_chat_encoding_uses_the_template(tok):
    cfg = _data_cfg(chat_template=True, system_prompt="Be brief.")
    [ex] = encode([("hi", "hello")], tok, cfg.data, eos_id=tok.eos_token_id, vocab_size=512)
    text = tok.decode(ex.input_ids)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\nhello<|im_end|>")
    target = tok.decode(ex.input_ids[ex.loss_mask == 1])
    assert target == "hello<|im_end|>"


def test_tokenizer_vocab_larger_than_model_is_an_error(tok):
    with pytest.raises(ConfigError, match="^tokenizer.path"):
        encode([("a long prompt here", "and a response")], tok, _data_cfg().data,
               eos_id=tok.eos_token_id, vocab_size=50)


def test_truncation_keeps_prompt_end_and_response_start():
    p, r = truncate(list(range(10)), list(range(100, 110)), 12)
    assert p == list(range(4, 10)) and r == list(range(100, 106))  # prompt keeps half the budget
    p, r = truncate([1, 2], list(range(100, 120)), 8)
    assert p == [1, 2] and r == list(range(100, 106))
    assert truncate([1], [2], 8) == ([1], [2])


def test_load_records_from_jsonl_and_errors(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text('{"q": "a", "a": "b"}\n\n{"q": "c", "a": "d"}\n')
    cfg = _data_cfg(train_file=str(good), prompt_key="q", response_key="a")
    assert load_records(cfg) == [("a", "b"), ("c", "d")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "a", "a": "b"}\n{"q": "c"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'a'"):
        load_records(_data_cfg(train_file=str(bad), prompt_key="q", response_key="a"))
    bad.write_text('{"q": "a", "a": "b"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_records(_data_cfg(train_file=str(bad), prompt_key="q", response_key="a"))


def test_load_records_from_a_task():
    pairs = load_records(_data_cfg(task="arithmetic", max_examples=3))
    assert len(pairs) == 3
    prompt, response = pairs[0]
    assert "Question:" in prompt and "####" in response
    chat = load_records(_data_cfg(task="arithmetic", max_examples=1, chat_template=True))
    assert "####" in chat[0][1]


def _examples(n=40, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(3, 30))
        ids = np.arange(length, dtype=np.int32) + 1000 * i
        mask = (np.arange(length) >= length // 2).astype(np.float32)
        out.append(TokenizedExample(ids, mask))
    return out


def test_padded_batches_are_bucketed_deterministic_and_cover_each_epoch():
    src = BatchSource(_examples(), batch_size=8, max_length=64, seed=1, min_bucket=8)
    again = BatchSource(_examples(), batch_size=8, max_length=64, seed=1, min_bucket=8)
    b = src.batch(3)
    for k in b:
        np.testing.assert_array_equal(b[k], again.batch(3)[k])  # a pure function of the index
    assert b["input_ids"].shape[1] == bucket_length(int(b["attention_mask"].sum(1).max()), 8, 64)
    assert b["input_ids"].shape[1] in (8, 16, 32)
    # 40 examples / 8 = 5 batches per epoch, every example once; epoch 2 is another order.
    epoch0 = np.concatenate([src.batch(i)["input_ids"][:, 0] for i in range(5)]) // 1000
    assert sorted(epoch0.tolist()) == list(range(40))
    epoch1 = np.concatenate([src.batch(i)["input_ids"][:, 0] for i in range(5, 10)]) // 1000
    assert sorted(epoch1.tolist()) == list(range(40)) and epoch1.tolist() != epoch0.tolist()
    assert src.locate(7) == (1, 2)
    # Right padding: positions count real tokens, the loss mask is zero on padding.
    row = int(np.argmin(b["attention_mask"].sum(1)))
    n = int(b["attention_mask"][row].sum())
    assert b["positions"][row, :n].tolist() == list(range(n))
    assert b["loss_mask"][row, n:].sum() == 0


def test_host_shards_concatenate_to_the_global_batch():
    src = BatchSource(_examples(), batch_size=8, max_length=64, seed=2)
    full = src.batch(4)
    parts = [src.batch(4, process_index=p, process_count=4) for p in range(4)]
    for k in full:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])


def test_packing_restarts_positions_per_example():
    src = BatchSource(_examples(), batch_size=2, max_length=48, seed=0, packing=True)
    b = src.batch(0)
    assert b["input_ids"].shape == (2, 48)
    row_ids, row_pos, real = b["input_ids"][0], b["positions"][0], b["attention_mask"][0]
    starts = np.flatnonzero((row_pos == 0) & (real > 0))
    assert len(starts) >= 2  # several examples in one row
    for s in starts:  # each segment is one whole example from its first token, positions 0, 1, ..
        assert row_ids[s] % 1000 == 0
    segment = np.split(row_pos[real > 0], starts[1:])
    assert all(seg.tolist() == list(range(len(seg))) for seg in segment)
    # The attention mask numbers the examples of the row 1, 2, ... (segment ids).
    assert [int(real[s]) for s in starts] == list(range(1, len(starts) + 1))
    # Every example is used at most once per epoch.
    firsts = [int(b2["input_ids"][r, s]) // 1000 for i in range(src.batches_in_epoch(0))
              for b2 in [src.batch(i)] for r in range(2)
              for s in np.flatnonzero((b2["positions"][r] == 0) & (b2["attention_mask"][r] > 0))]
    assert len(firsts) == len(set(firsts))


def test_chunked_loss_equals_full_logits_loss():
    """sft.logits_chunk_size: the same loss without materialising [B, T, vocab] (the chunked
    log-prob's gradients are tested with the losses)."""
    import jax

    from sgalm_jax.algorithms.sft import make_sft_loss
    from sgalm_jax.config import MODEL_PRESETS
    from sgalm_jax.models import ModelConfig
    from sgalm_jax.training import split_model
    from sgalm_jax.training.model_setup import init_model

    cfg = ModelConfig.from_hf(MODEL_PRESETS["tiny-llama"])  # untied head
    graphdef, params = split_model(init_model(cfg, mesh=None))
    src = BatchSource(_examples(8), batch_size=4, max_length=32, seed=0, min_bucket=32)
    batch = {k: jax.numpy.asarray(v % 512) if k == "input_ids" else jax.numpy.asarray(v)
             for k, v in src.batch(0).items()}
    both = jax.jit(lambda p: (make_sft_loss(graphdef)(p, batch, None)[0],
                              make_sft_loss(graphdef, logits_chunk_size=8)(p, batch, None)[0]))
    full, chunked = both(params)
    np.testing.assert_allclose(full, chunked, rtol=1e-6)
