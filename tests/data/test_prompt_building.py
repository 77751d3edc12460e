"""k-shot prompts, chat-template rendering with a real tokenizer, SGALM templates."""

from __future__ import annotations

import copy
import random

import pytest

from sgalm_jax.data import (
    ARCTask,
    ArithmeticTask,
    ChatTask,
    GSM8KTask,
    MBPPTask,
    PromptBuilder,
    PromptConfig,
    SGALMTemplates,
    ensure_chat_template,
    real_fake_token_ids,
    render_chat,
    sample_demo_texts,
    select_demos,
    sgalm_discriminator_prompt,
    sgalm_generator_prompt,
)
from sgalm_jax.errors import ConfigError


@pytest.fixture(scope="module")
def gsm8k(shared_data):
    task = GSM8KTask(shared_data / "gsm8k")
    return task, task.load("train"), task.load("test")


@pytest.fixture(scope="module")
def chatml_tokenizer(qwen_tokenizer):
    """The real Qwen2.5 tokenizer (session fixture), copied so that giving it a ChatML template
    (the derived tokenizer ships without one) does not change it for other tests."""
    return ensure_chat_template(copy.copy(qwen_tokenizer))


def test_kshot_never_contains_evaluated_question(gsm8k):
    task, train, test = gsm8k
    evaluated = test[:150]
    # Put the evaluated questions into the pool too (as if the splits overlapped): they must
    # still never be chosen as demonstrations of themselves.
    pool = train[:40] + evaluated
    builder = PromptBuilder(task, pool, PromptConfig(k_shot=8, seed=11))
    for ex in evaluated:
        demos = builder.demos_for(ex)
        assert len(demos) == 8 and all(d.question != ex.question for d in demos)
        prompt = builder.build(ex)
        assert prompt.count(ex.question.strip()) == 1 and prompt.endswith(task.format_prompt(ex))
        assert prompt.count("Question: ") == 9
    tiny = [ex for ex in evaluated[:5]]
    for ex in tiny:
        assert all(d.id != ex.id for d in select_demos(task, tiny, ex, 4, seed=0))
    with pytest.raises(ConfigError):
        select_demos(task, tiny, tiny[0], 5)


def test_same_seed_same_prompt(gsm8k):
    task, train, test = gsm8k
    a = PromptBuilder(task, train, PromptConfig(k_shot=4, seed=3)).build_many(test[:20])
    b = PromptBuilder(task, train, PromptConfig(k_shot=4, seed=3)).build_many(test[:20])
    c = PromptBuilder(task, train, PromptConfig(k_shot=4, seed=4)).build_many(test[:20])
    assert a == b and a != c
    fixed = PromptBuilder(task, train, PromptConfig(k_shot=3, seed=3, per_example_demos=False))
    heads = {fixed.build(ex).rsplit("\n\nQuestion: ", 1)[0] for ex in test[:10]}
    assert len(heads) == 1  # one fixed demo set for every question
    zero = PromptBuilder.for_task(task, PromptConfig(k_shot=0))
    assert zero.build(test[0]) == task.format_prompt(test[0])
    with pytest.raises(ConfigError):
        PromptBuilder(task, [], PromptConfig(k_shot=2))


def test_instruction_and_for_task(gsm8k):
    task, _, test = gsm8k
    b = PromptBuilder.for_task(task, PromptConfig(k_shot=2, seed=0, instruction="Solve it."))
    p = b.build(test[0])
    assert p.startswith("Solve it.\n\nQuestion: ") and p.count("Question: ") == 3


def test_chat_template_prompts(gsm8k, chatml_tokenizer):
    task, train, test = gsm8k
    tok = chatml_tokenizer
    cfg = PromptConfig(k_shot=2, seed=0, chat=True, instruction="You are a careful solver.")
    p = PromptBuilder(task, train, cfg, tok).build(test[0])
    assert isinstance(p, str)
    assert p.startswith("<|im_start|>system\nYou are a careful solver.<|im_end|>\n")
    assert p.count("<|im_start|>user\n") == 3 and p.count("<|im_start|>assistant\n") == 3
    assert p.endswith(test[0].question.strip() + "<|im_end|>\n<|im_start|>assistant\n")
    assert "#### " in p  # demos show worked answers
    inline = PromptBuilder(task, train, PromptConfig(k_shot=2, seed=0, chat=True, fewshot_as_multiturn=False), tok).build(test[0])
    assert inline.count("<|im_start|>user\n") == 1 and inline.count("Question: ") == 3
    ids = tok(p, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    enc = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, add_generation_prompt=True)
    assert "input_ids" in enc  # v5: a BatchEncoding, which is why render_chat uses tokenize=False
    prompt, response = PromptBuilder(task, (), PromptConfig(chat=True), tok).training_sample(test[0])
    assert prompt.endswith("<|im_start|>assistant\n") and response.endswith("#### 18")


def test_chat_rendering_other_tasks(shared_data, chatml_tokenizer, tmp_path):
    tok = chatml_tokenizer
    arc = ARCTask(shared_data / "arc_challenge")
    ex = arc.load("test")[0]
    p = PromptBuilder(arc, arc.load("train"), PromptConfig(k_shot=1, chat=True), tok).build(ex)
    assert "Answer with the letter" in p and p.count("<|im_start|>assistant\n") == 2
    mbpp = MBPPTask(shared_data / "mbpp" / "mbpp.jsonl")
    mex = mbpp.load("test")[0]
    p = PromptBuilder(mbpp, mbpp.load("prompt"), PromptConfig(k_shot=2, chat=True), tok).build(mex)
    assert p.count("```python\n") >= 2
    f = tmp_path / "chat.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}\n')
    chat = ChatTask(str(f))
    cex = chat.load("train")[0]
    p = PromptBuilder(chat, (), PromptConfig(chat=True), tok).build(cex)
    assert p == "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ConfigError):
        PromptBuilder(chat, (), PromptConfig(chat=True))


def test_render_chat_needs_template():
    class NoTemplate:
        chat_template = None

    with pytest.raises(ConfigError, match="no chat template"):
        render_chat(NoTemplate(), [{"role": "user", "content": "x"}])


# ------------------------------------------------------------------------------- SGALM prompts
def test_sgalm_generator_and_discriminator_prompts():
    task = ArithmeticTask(seed=0, sizes={"train": 20})
    pool = task.load("train")
    samples = sample_demo_texts(task, pool, random.Random(0))
    assert len(samples) == 4 and all(s.startswith("Question: ") for s in samples)
    g = sgalm_generator_prompt(samples)
    assert g.startswith("Below are examples from a dataset.")
    assert [f"### Example {i}" in g for i in range(1, 6)] == [True] * 5 and g.endswith("### Example 5\n")
    assert g.index(samples[0]) < g.index("### Example 2")
    r2 = sgalm_generator_prompt(samples, prefix=f"Question: {pool[5].question}\nAnswer:")
    assert r2.endswith("Answer:")
    d = sgalm_discriminator_prompt(samples[0])
    assert d.endswith("### Answer (Real or Fake):") and samples[0] in d
    d2 = sgalm_discriminator_prompt(samples[0], exemplars=[(samples[1], True), (samples[2], False)])
    assert "### Answer (Real or Fake): Real\n" in d2 and "### Answer (Real or Fake): Fake\n" in d2


def test_sgalm_templates_from_config_and_validation():
    t = SGALMTemplates.from_config({"discriminator": "Is this real?\n{sample}\nVerdict:", "real_word": "Yes", "fake_word": "No"})
    assert sgalm_discriminator_prompt("S", t) == "Is this real?\nS\nVerdict:"
    with pytest.raises(ConfigError, match="unknown SGALM prompt key"):
        SGALMTemplates.from_config({"discriminatr": "x {sample}"})
    with pytest.raises(ConfigError, match="lacks field"):
        SGALMTemplates(generator="no fields here")
    with pytest.raises(ConfigError, match="unknown field"):
        SGALMTemplates(discriminator="{sample} {oops}")
    with pytest.raises(ConfigError, match="exemplars"):
        sgalm_discriminator_prompt("S", t, exemplars=[("a", True)])
    custom = SGALMTemplates(generator="Examples:\n{examples}Now write example {next_index}:\n", generator_example="[{index}] {sample}\n")
    assert sgalm_generator_prompt(["a", "b"], custom) == "Examples:\n[1] a\n[2] b\nNow write example 3:\n"


def test_real_fake_token_ids(qwen_tokenizer):
    real, fake = real_fake_token_ids(qwen_tokenizer)
    assert real != fake
    assert qwen_tokenizer.decode([real]) == " Real" and qwen_tokenizer.decode([fake]) == " Fake"
    r2, f2 = real_fake_token_ids(qwen_tokenizer, leading_space=False)
    assert qwen_tokenizer.decode([r2]) == "Real" and qwen_tokenizer.decode([f2]) == "Fake"
