"""Tokenizers for training runs: the checkpoint's own, or a tiny byte-level BPE built offline; and
the token ids of a prompted discriminator's Real/Fake label words (:func:`resolve_label_token_ids`).

``tokenizer.path = 'builtin:tiny'`` builds a small byte-level BPE (ChatML special tokens, a ChatML
chat template) from a fixed corpus, with no download: the tiny random models of tests and the demo
use it. Building is deterministic; a run saves it to ``workdir/tokenizer`` and reuses that copy.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from sgalm_jax.errors import ConfigError

log = logging.getLogger(__name__)

BUILTIN_TINY = "builtin:tiny"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as Qwen2.5-Instruct; {% generation %} marks assistant tokens for assistant masks.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "What is 12 + 7? The answer is 19.",
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many "
    "clips in May. How many clips did Natalia sell altogether in April and May?",
    "Answer: Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether. #### 72",
    "Let's think step by step. First, compute the total. Then subtract the cost. The result is",
    "Solve: 345 * 12 - 67 = 4073. Compute 9 - 3 + 8 / 2 = 10. What is 100 - 58?",
    "You are a helpful assistant. Please answer the question below.",
    "The quick brown fox jumps over the lazy dog. A number, a sum, a product, a difference.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "user assistant system true false yes no correct incorrect real fake",
] + [f"{a} + {b} = {a + b}; {a} * {b} = {a * b}; {a} - {b} = {a - b}."
     for a in range(0, 120, 7) for b in range(1, 60, 11)]


def build_tiny_tokenizer(vocab_size: int = 512, corpus: list[str] | None = None):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ChatML tokens, trained on a fixed corpus.

    Ids 0-2 are ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos); every byte has a
    token, so any text encodes. ``len(tokenizer) <= vocab_size``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus or _CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)


def load_tokenizer(path: str, *, cache_dir: str | None = None, key: str = "tokenizer.path"):
    """``AutoTokenizer`` from ``path``, or the builtin tiny one (saved to / reused from
    ``cache_dir`` when given)."""
    from transformers import AutoTokenizer

    if path == BUILTIN_TINY:
        if cache_dir and os.path.exists(os.path.join(cache_dir, "tokenizer.json")):
            return AutoTokenizer.from_pretrained(cache_dir)
        tok = build_tiny_tokenizer()
        if cache_dir:
            tmp = cache_dir + ".tmp"
            tok.save_pretrained(tmp)
            if os.path.exists(cache_dir):
                import shutil

                shutil.rmtree(cache_dir)
            os.replace(tmp, cache_dir)
            return AutoTokenizer.from_pretrained(cache_dir)
        return tok
    if not path or not os.path.isdir(path):
        raise ConfigError(f"{key}: {path!r} is not a tokenizer directory")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ConfigError(f"{key}: cannot load a tokenizer from {path!r} ({e})") from None


def eos_token_id(tokenizer: Any, model_eos: tuple[int, ...] = ()) -> int:
    """The id appended after responses: the tokenizer's eos, else ChatML's ``<|im_end|>``, else
    ``<|endoftext|>``, else the model config's first eos id."""
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    for t in ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>"):
        if t in vocab:
            return int(vocab[t])
    if model_eos:
        return int(model_eos[0])
    raise ConfigError("tokenizer.path: the tokenizer has no eos token and the model config no "
                      "eos_token_id")


def pad_token_id(tokenizer: Any, fallback: int) -> int:
    """The padding id (any id works: padded positions are masked); the tokenizer's or ``fallback``."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else int(fallback)


# ---------------------------------------------------------------------------------------------
# Label tokens: the words whose next-token logits a prompted LM discriminator (SGALM) reads
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LabelTokenIds:
    """Token ids that carry the discriminator's Real/Fake decision.

    real_id / fake_id: the id whose logit is read (the word's first token if it is multi-token).
    real_tokens / fake_tokens: the full tokenisation of each label (for logging and for building
      supervised targets). multi_token: True if either label needed more than one token.
    message: a human-readable note of what was resolved (logged at WARNING when multi_token).
    """

    real_id: int
    fake_id: int
    real_tokens: tuple[int, ...]
    fake_tokens: tuple[int, ...]
    multi_token: bool
    message: str


def _encode(tokenizer, text: str) -> list:
    out = tokenizer.encode(text, add_special_tokens=False)
    return list(out.ids) if hasattr(out, "ids") else list(out)


def _strip_space_pieces(tokenizer, ids: list) -> list:
    """Drop leading tokens that decode to pure whitespace (SentencePiece may emit a lone '▁')."""
    while len(ids) > 1:
        try:
            piece = tokenizer.decode([ids[0]])
        except Exception:  # pragma: no cover - tokenizer without decode: keep ids as they are
            return ids
        if piece.strip():
            break
        ids = ids[1:]
    return ids


def resolve_label_token_ids(
    tokenizer, real: str = "Real", fake: str = "Fake", *, leading_space: bool = True
) -> LabelTokenIds:
    """Resolve the token ids of the Real/Fake labels from a tokenizer. [design]

    ``leading_space`` must match how the discriminator prompt ends: a prompt ending in ``":"`` is
    continued by ``" Real"`` (True); one ending in ``": "`` by ``"Real"`` (False). If a label is not a
    single token, its first token is used and a warning says so; if the two labels share their
    first token the discriminator cannot tell them apart, which is a ConfigError.
    """
    prefix = " " if leading_space else ""
    r_ids = _strip_space_pieces(tokenizer, _encode(tokenizer, prefix + real))
    f_ids = _strip_space_pieces(tokenizer, _encode(tokenizer, prefix + fake))
    if not r_ids or not f_ids:
        raise ConfigError(f"resolve_label_token_ids: label {real!r} or {fake!r} encodes to no tokens")
    if r_ids[0] == f_ids[0]:
        raise ConfigError(
            f"resolve_label_token_ids: {prefix + real!r} and {prefix + fake!r} start with the same token "
            f"{r_ids[0]}; choose labels whose first tokens differ"
        )
    multi = len(r_ids) > 1 or len(f_ids) > 1
    msg = f"discriminator labels {prefix + real!r} -> {r_ids}, {prefix + fake!r} -> {f_ids}"
    if multi:
        msg += "; multi-token label(s): using each label's FIRST token for the score"
        log.warning(msg)
    else:
        log.info(msg)
    return LabelTokenIds(r_ids[0], f_ids[0], tuple(r_ids), tuple(f_ids), multi, msg)
