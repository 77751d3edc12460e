"""The real Qwen2.5, Qwen3 and Llama 3 tokenizers load offline and round-trip text and chat templates."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

TEXTS = [
    "Natalia sold clips to 48 of her friends in April. #### 72",
    "def add(a, b):\n    return a + b  # <<2+3=5>>",
    "Unicode: naïve café – 数学 🧮, and trailing spaces   ",
]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "You are a careful solver."},
            {"role": "user", "content": "What is 12*7?"}]


@pytest.fixture(scope="module", params=["qwen2.5", "qwen3", "llama3"])
def tokenizer(request, shared_data):
    return request.param, AutoTokenizer.from_pretrained(shared_data / "tokenizers" / request.param)


def test_text_round_trip(tokenizer):
    name, tok = tokenizer
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text, name


def test_special_token_ids(tokenizer):
    name, tok = tokenizer
    expected = {"qwen2.5": {"<|im_start|>": 151644, "<|im_end|>": 151645, "<|endoftext|>": 151643},
                "qwen3": {"<|im_start|>": 151644, "<|im_end|>": 151645, "<think>": 151667},
                "llama3": {"<|begin_of_text|>": 128000, "<|eot_id|>": 128009}}[name]
    for token, token_id in expected.items():
        assert tok.convert_tokens_to_ids(token) == token_id


def test_chat_template_round_trip(tokenizer):
    """Rendering then tokenizing equals tokenizing through the template, and special tokens stay whole."""
    name, tok = tokenizer
    if not tok.chat_template:  # Qwen2.5 and Llama 3 ship no template here: use ChatML
        tok.chat_template = CHATML
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str) and "What is 12*7?" in text
    encoded = tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    ids = encoded["input_ids"]  # transformers v5 returns a BatchEncoding
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    if name.startswith("qwen"):
        assert ids.count(151644) == 3  # <|im_start|> is one token: system, user, generation prompt
