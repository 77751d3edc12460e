"""Prompt building: zero-/k-shot prompts, chat templates, and SGALM's generator/discriminator prompts.

* :class:`PromptBuilder` turns a task example into an evaluation prompt: optional instruction,
  ``k`` demonstrations drawn with a fixed seed from a pool (the train split; the evaluated
  question is never among them), then the example's prompt; plain text or rendered through a
  tokenizer's chat template (demos as earlier user/assistant turns, or inline in one user turn).
* :class:`SGALMTemplates` holds the two SGALM prompts as config-overridable template strings with
  named fields: the generator's "write a new sample like these" k-shot prompt (fields
  ``{examples}``, ``{next_index}``; each example through ``{index}``/``{sample}``) and the
  discriminator's "is this sample Real or Fake" prompt (field ``{sample}``, optional
  ``{exemplars}``), whose answer word is ``Real`` or ``Fake``.
"""

from __future__ import annotations

import logging
import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from sgalm_jax.data.base import Example, Task
from sgalm_jax.errors import ConfigError

log = logging.getLogger(__name__)

# A minimal ChatML template (Qwen-style) for tokenizers that ship without one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer: Any, template: str = CHATML_TEMPLATE) -> Any:
    """Give ``tokenizer`` a chat template if it has none (returns the same tokenizer)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    return tokenizer


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> str:
    """Render ``messages`` with the tokenizer's chat template as a string (never token ids).

    transformers v5: ``apply_chat_template(tokenize=False)`` returns the string; with
    ``tokenize=True`` it would return a BatchEncoding, which callers tokenise separately.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "the tokenizer has no chat template; set one (e.g. prompts.ensure_chat_template) or use plain prompts"
        )
    out = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
    )
    if isinstance(out, list):  # some versions return a list for batched input
        out = out[0]
    if not isinstance(out, str):
        raise ConfigError(f"apply_chat_template(tokenize=False) returned {type(out).__name__}, expected str")
    return out


def task_chat_messages(task: Task, example: Example) -> list[dict[str, str]]:
    """The user-side turns of ``example`` (multi-turn chat records keep their whole context)."""
    ctx = getattr(task, "context_messages", None)
    if callable(ctx):
        return [dict(m) for m in ctx(example)]
    return [{"role": "user", "content": task.chat_user(example)}]


def select_demos(
    task: Task,
    pool: Sequence[Example],
    example: Example | None,
    k: int,
    *,
    seed: int = 1234,
    per_example: bool = True,
) -> list[Example]:
    """``k`` demonstrations from ``pool``, deterministic in ``seed`` (and the example id when
    ``per_example``), never one that poses the same question as ``example``."""
    if k <= 0:
        return []
    n = len(pool)
    key = f"{seed}:{example.id}" if (per_example and example is not None) else f"{seed}"
    rng = random.Random(key)
    order = rng.sample(range(n), min(n, k + 8))
    demos = [pool[i] for i in order if example is None or not task.same_question(pool[i], example)]
    if len(demos) < k:  # many collisions (tiny pool): fall back to a full deterministic pass
        rest = [i for i in range(n) if i not in set(order)]
        random.Random(key + ":rest").shuffle(rest)
        demos += [pool[i] for i in rest if example is None or not task.same_question(pool[i], example)]
    if len(demos) < k:
        raise ConfigError(f"only {len(demos)} usable demonstrations in a pool of {n}; need k_shot={k}")
    return demos[:k]


@dataclass(frozen=True)
class PromptConfig:
    """How evaluation prompts are assembled.

    Attributes:
      k_shot: number of demonstrations.
      seed: demo-selection seed (same seed and pool -> same prompt).
      per_example_demos: draw demos per evaluated example (seeded by its id) instead of one
        fixed set for all.
      instruction: optional text placed before everything (plain) or as the system turn (chat).
      chat: render through the tokenizer's chat template.
      fewshot_as_multiturn: chat mode: demos as earlier user/assistant turns (True) or inline in
        the single user turn (False).
      demo_separator: separator between plain-text demos and the query.
    """

    k_shot: int = 0
    seed: int = 1234
    per_example_demos: bool = True
    instruction: str | None = None
    chat: bool = False
    fewshot_as_multiturn: bool = True
    demo_separator: str = "\n\n"


class PromptBuilder:
    """Builds evaluation prompts for one task (see module docstring).

    Args:
      task: the task whose examples are formatted.
      demo_pool: examples demonstrations are drawn from: the *train* split, never the split
        being evaluated (use :meth:`for_task` to load it).
      config: a :class:`PromptConfig`.
      tokenizer: needed when ``config.chat`` (a transformers tokenizer with a chat template).
    """

    def __init__(self, task: Task, demo_pool: Sequence[Example] = (), config: PromptConfig | None = None, tokenizer: Any = None):
        self.task = task
        self.pool = list(demo_pool)
        self.config = config or PromptConfig()
        self.tokenizer = tokenizer
        if self.config.chat and tokenizer is None:
            raise ConfigError("PromptConfig.chat=True needs a tokenizer")
        if self.config.k_shot > 0 and not self.pool:
            raise ConfigError(f"k_shot={self.config.k_shot} needs a demo pool (the task's train split)")

    @classmethod
    def for_task(cls, task: Task, config: PromptConfig | None = None, tokenizer: Any = None, *, demo_split: str | None = None) -> PromptBuilder:
        """A builder whose demo pool is the task's train split (loaded only when k_shot > 0)."""
        config = config or PromptConfig()
        pool = task.load(demo_split or task.train_split) if config.k_shot > 0 else []
        return cls(task, pool, config, tokenizer)

    @property
    def uses_chat(self) -> bool:
        """True when prompts go through the chat template (continuations then need no leading space)."""
        return self.config.chat

    def demos_for(self, example: Example) -> list[Example]:
        """The demonstrations used for ``example``."""
        c = self.config
        return select_demos(self.task, self.pool, example, c.k_shot, seed=c.seed, per_example=c.per_example_demos)

    def build(self, example: Example) -> str:
        """The full prompt for ``example``; the model's continuation is its answer."""
        demos = self.demos_for(example)
        c = self.config
        if not c.chat:
            parts = ([c.instruction.strip()] if c.instruction else []) + [self.task.format_demo(d) for d in demos]
            parts.append(self.task.format_prompt(example))
            return c.demo_separator.join(parts)
        messages: list[dict[str, str]] = []
        if c.instruction:
            messages.append({"role": "system", "content": c.instruction.strip()})
        if c.fewshot_as_multiturn:
            for d in demos:
                messages += task_chat_messages(self.task, d)
                messages.append({"role": "assistant", "content": self.task.chat_assistant(d)})
            messages += task_chat_messages(self.task, example)
        else:
            inline = [self.task.format_demo(d) for d in demos] + [self.task.format_prompt(example)]
            messages.append({"role": "user", "content": c.demo_separator.join(inline)})
        return render_chat(self.tokenizer, messages, add_generation_prompt=True)

    def build_many(self, examples: Sequence[Example]) -> list[str]:
        """:meth:`build` for each example."""
        return [self.build(e) for e in examples]

    def training_sample(self, example: Example) -> tuple[str, str]:
        """A zero-shot ``(prompt, response)`` training pair, plain or chat-rendered."""
        if not self.config.chat:
            return self.task.format_sample(example)
        messages = task_chat_messages(self.task, example)
        if self.config.instruction:
            messages = [{"role": "system", "content": self.config.instruction.strip()}, *messages]
        return render_chat(self.tokenizer, messages, add_generation_prompt=True), self.task.chat_assistant(example)


# ------------------------------------------------------------------------------ SGALM templates
GENERATOR_TEMPLATE = (
    "Below are examples from a dataset. Write one new example in exactly the same format.\n"
    "{examples}### Example {next_index}\n"
)
GENERATOR_EXAMPLE_TEMPLATE = "### Example {index}\n{sample}\n"
DISCRIMINATOR_TEMPLATE = (
    "Decide whether the following example was written by a human for the dataset (Real) or "
    "generated by a model (Fake).\n{exemplars}### Example\n{sample}\n### Answer (Real or Fake):"
)
DISCRIMINATOR_EXEMPLAR_TEMPLATE = "### Example\n{sample}\n### Answer (Real or Fake): {label}\n\n"

_REQUIRED = {
    "generator": ({"examples", "next_index"}, {"examples", "next_index"}),
    "generator_example": ({"sample"}, {"index", "sample"}),
    "discriminator": ({"sample"}, {"sample", "exemplars"}),
    "discriminator_exemplar": ({"sample", "label"}, {"sample", "label"}),
}


def template_fields(template: str) -> set[str]:
    """The named ``{fields}`` of a ``str.format`` template."""
    try:
        return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ConfigError(f"bad template {template!r}: {e}") from e


@dataclass(frozen=True)
class SGALMTemplates:
    """SGALM's prompts as template strings (override any field from a config).

    Attributes:
      generator: the k-shot "write a new example" prompt; fields ``{examples}`` (the rendered
        demos) and ``{next_index}`` (k + 1). The model continues after it with a new sample.
      generator_example: one demo inside ``{examples}``; fields ``{index}``, ``{sample}``.
      discriminator: the "Real or Fake" prompt; field ``{sample}``, optional ``{exemplars}``.
      discriminator_exemplar: a labelled few-shot exemplar; fields ``{sample}``, ``{label}``.
      real_word / fake_word: the answer words whose next-token probabilities D compares.
      generator_stop: generation stops where the model starts another example.
    """

    generator: str = GENERATOR_TEMPLATE
    generator_example: str = GENERATOR_EXAMPLE_TEMPLATE
    discriminator: str = DISCRIMINATOR_TEMPLATE
    discriminator_exemplar: str = DISCRIMINATOR_EXEMPLAR_TEMPLATE
    real_word: str = "Real"
    fake_word: str = "Fake"
    generator_stop: str = "### Example"
    num_examples: int = 4

    def __post_init__(self) -> None:
        for name, (required, allowed) in _REQUIRED.items():
            got = template_fields(getattr(self, name))
            if not required <= got:
                raise ConfigError(f"SGALM template {name!r} lacks field(s) {sorted(required - got)}")
            if not got <= allowed:
                raise ConfigError(f"SGALM template {name!r} has unknown field(s) {sorted(got - allowed)} (allowed: {sorted(allowed)})")
        if not self.real_word.strip() or not self.fake_word.strip() or self.real_word == self.fake_word:
            raise ConfigError("real_word and fake_word must be distinct non-empty words")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> SGALMTemplates:
        """Build from a mapping (e.g. ``config.sgalm.prompts``); unknown keys are errors."""
        if not cfg:
            return cls()
        names = {f.name for f in fields(cls)}
        unknown = set(cfg) - names
        if unknown:
            raise ConfigError(f"unknown SGALM prompt key(s) {sorted(unknown)}; known: {sorted(names)}")
        return replace(cls(), **dict(cfg))


def sgalm_generator_prompt(samples: Sequence[str], templates: SGALMTemplates | None = None, *, prefix: str = "") -> str:
    """The generator prompt: ``samples`` as numbered examples, then the header of the next one.

    ``prefix`` is appended after the header (answer-generation mode: the real question, so the
    model writes only the answer).
    """
    t = templates or SGALMTemplates()
    if not samples:
        raise ConfigError("the SGALM generator prompt needs at least one example")
    examples = "".join(t.generator_example.format(index=i + 1, sample=s.strip()) for i, s in enumerate(samples))
    return t.generator.format(examples=examples, next_index=len(samples) + 1) + prefix


def sample_demo_texts(task: Task, pool: Sequence[Example], rng: random.Random, k: int | None = None, templates: SGALMTemplates | None = None) -> list[str]:
    """``k`` random real samples (as :meth:`Task.sample_text`) for one generator prompt."""
    k = k if k is not None else (templates or SGALMTemplates()).num_examples
    if len(pool) < k:
        raise ConfigError(f"SGALM needs at least {k} real samples, the pool has {len(pool)}")
    return [task.sample_text(pool[i]) for i in rng.sample(range(len(pool)), k)]


def sgalm_discriminator_prompt(
    sample: str,
    templates: SGALMTemplates | None = None,
    *,
    exemplars: Sequence[tuple[str, bool]] = (),
) -> str:
    """The discriminator prompt for ``sample``; optional labelled ``(text, is_real)`` exemplars."""
    t = templates or SGALMTemplates()
    if exemplars and "exemplars" not in template_fields(t.discriminator):
        raise ConfigError("discriminator exemplars given but the template has no {exemplars} field")
    ex = "".join(
        t.discriminator_exemplar.format(sample=s.strip(), label=t.real_word if real else t.fake_word) for s, real in exemplars
    )
    kwargs = {"sample": sample.strip()}
    if "exemplars" in template_fields(t.discriminator):
        kwargs["exemplars"] = ex
    return t.discriminator.format(**kwargs)


def real_fake_token_ids(tokenizer: Any, templates: SGALMTemplates | None = None, *, leading_space: bool = True) -> tuple[int, int]:
    """Token ids of the Real and Fake answer words (``" Real"``/``" Fake"`` with ``leading_space``).

    A thin wrapper of :func:`sgalm_jax.training.tokenizer.resolve_label_token_ids` (the one implementation):
    a multi-token word uses its first token (logged), and the two first tokens must differ.
    """
    from sgalm_jax.training.tokenizer import resolve_label_token_ids

    t = templates or SGALMTemplates()
    ids = resolve_label_token_ids(tokenizer, t.real_word, t.fake_word, leading_space=leading_space)
    return ids.real_id, ids.fake_id
