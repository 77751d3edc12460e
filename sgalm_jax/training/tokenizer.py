"""Tokenizers for training runs: the checkpoint's own, or a tiny byte-level BPE built offline.

``tokenizer.path = 'builtin:tiny'`` builds a small byte-level BPE (ChatML special tokens, a ChatML
chat template) from a fixed corpus, with no download: the tiny random models of tests and the demo
use it. Building is deterministic; a run saves it to ``workdir/tokenizer`` and reuses that copy.
"""

from __future__ import annotations

import os
from typing import Any

from sgalm_jax.errors import ConfigError

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
