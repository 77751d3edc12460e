"""The Real/Fake label-token resolution of a prompted discriminator (training/tokenizer.py)."""

import logging
import os
from pathlib import Path

import pytest

from sgalm_jax.errors import ConfigError
from sgalm_jax.training.tokenizer import resolve_label_token_ids

# ../shared/data/tokenizers next to the checkout, as in tests/conftest.py
TOKENIZERS = str(Path(__file__).resolve().parents[3] / "shared" / "data" / "tokenizers")


class _CharTokenizer:
    """Character-level stand-in: every label is multi-token."""

    def encode(self, text, add_special_tokens=False):
        return [ord(ch) for ch in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_resolve_label_ids_multi_token_and_collision(caplog):
    with caplog.at_level(logging.WARNING):
        ids = resolve_label_token_ids(_CharTokenizer(), "Real", "Fake", leading_space=True)
    assert ids.multi_token and ids.real_id == ord("R") and ids.fake_id == ord("F")
    assert ids.real_tokens == tuple(map(ord, "Real"))  # the lone leading-space piece is dropped
    assert "multi-token" in caplog.text
    with pytest.raises(ConfigError):
        resolve_label_token_ids(_CharTokenizer(), "Real", "Rare")


@pytest.mark.skipif(not os.path.isfile(f"{TOKENIZERS}/qwen2.5/tokenizer.json"), reason="shared tokenizers not present")
def test_resolve_label_ids_real_tokenizers():
    tokenizers = pytest.importorskip("tokenizers")
    # the raw `tokenizers` object loads in well under a second (AutoTokenizer takes seconds);
    # resolve_label_token_ids accepts both (encode(...) -> ids or Encoding, decode(ids) -> str).
    tok = tokenizers.Tokenizer.from_file(f"{TOKENIZERS}/qwen2.5/tokenizer.json")
    for space, (real, fake) in ((True, (8800, 36965)), (False, (12768, 52317))):
        ids = resolve_label_token_ids(tok, leading_space=space)
        assert not ids.multi_token
        assert (ids.real_tokens, ids.fake_tokens) == ((real,), (fake,))
        assert (ids.real_id, ids.fake_id) == (real, fake)
