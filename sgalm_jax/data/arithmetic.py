"""A built-in, procedurally generated arithmetic word-problem task in GSM8K's format.

It needs no download: it is the default task of demos and offline tests, and because every step
of a sample can be verified (:func:`check_arithmetic_sample`), it lets tests and experiments
measure whether *generated* samples are valid, not only whether final answers are right.

A sample::

    Question: Mia has 12 apples. She gets 3 boxes with 4 apples in each box. Then she gives
    7 apples to Noah. How many apples does Mia have now?
    Answer: The boxes hold 3 * 4 = <<3*4=12>>12 apples.
    Mia then has 12 + 12 = <<12+12=24>>24 apples.
    After giving some away, Mia has 24 - 7 = <<24-7=17>>17 apples.
    #### 17

Generation is deterministic in ``(seed, split, index)``; any number of samples can be made.
"""

from __future__ import annotations

import os

import random
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from sgalm_jax.data import io
from sgalm_jax.data.gsm8k import GSM8KTask, parse_qa
from sgalm_jax.data.math_steps import check_steps, extract_final_answer
from sgalm_jax.errors import DataError

_NAMES = [
    ("Mia", "She", "her"), ("Noah", "He", "his"), ("Ava", "She", "her"), ("Liam", "He", "his"),
    ("Zoe", "She", "her"), ("Omar", "He", "his"), ("Lena", "She", "her"), ("Ravi", "He", "his"),
    ("Sofia", "She", "her"), ("Kenji", "He", "his"), ("Amara", "She", "her"), ("Diego", "He", "his"),
]
_ITEMS = [
    "apples", "marbles", "stickers", "pencils", "cookies", "books", "shells", "cards",
    "stamps", "balloons", "candles", "buttons", "coins", "plums", "erasers", "beads",
]
_FRIENDS = ["a friend", "a neighbour", "a classmate", "a cousin", "the teacher", "a younger kid"]


def _step_add(rng: random.Random, t: int, ctx: dict[str, str], max_value: int) -> tuple[str, list[str], int] | None:
    b = rng.randint(2, max(2, min(60, max_value - t)))
    if t + b > max_value:
        return None
    r = t + b
    q = f"{ctx['P']} buys {b} more {ctx['items']}."
    a = [f"{ctx['name']} then has {t} + {b} = <<{t}+{b}={r}>>{r} {ctx['items']}."]
    return q, a, r


def _step_sub(rng: random.Random, t: int, ctx: dict[str, str], max_value: int) -> tuple[str, list[str], int] | None:
    if t < 3:
        return None
    b = rng.randint(1, t - 1)
    r = t - b
    q = f"Then {ctx['p']} gives {b} {ctx['items']} to {rng.choice(_FRIENDS)}."
    a = [f"After giving some away, {ctx['name']} has {t} - {b} = <<{t}-{b}={r}>>{r} {ctx['items']}."]
    return q, a, r


def _step_groups(rng: random.Random, t: int, ctx: dict[str, str], max_value: int) -> tuple[str, list[str], int] | None:
    g, c = rng.randint(2, 9), rng.randint(2, 12)
    x = g * c
    r = t + x
    if r > max_value:
        return None
    q = f"{ctx['P']} gets {g} boxes with {c} {ctx['items']} in each box."
    a = [
        f"The boxes hold {g} * {c} = <<{g}*{c}={x}>>{x} {ctx['items']}.",
        f"{ctx['name']} then has {t} + {x} = <<{t}+{x}={r}>>{r} {ctx['items']}.",
    ]
    return q, a, r


def _step_mul(rng: random.Random, t: int, ctx: dict[str, str], max_value: int) -> tuple[str, list[str], int] | None:
    k = rng.randint(2, 5)
    r = t * k
    if r > max_value:
        return None
    q = f"Then the number of {ctx['items']} {ctx['name']} has becomes {k} times as large."
    a = [f"Now {ctx['name']} has {t} * {k} = <<{t}*{k}={r}>>{r} {ctx['items']}."]
    return q, a, r


def _step_div(rng: random.Random, t: int, ctx: dict[str, str], max_value: int) -> tuple[str, list[str], int] | None:
    ks = [k for k in range(2, 10) if t % k == 0 and t // k >= 1]
    if not ks:
        return None
    k = rng.choice(ks)
    r = t // k
    q = f"{ctx['P']} splits the {ctx['items']} equally into {k} bags and keeps only one bag."
    a = [f"One bag holds {t} / {k} = <<{t}/{k}={r}>>{r} {ctx['items']}, so {ctx['name']} keeps {r}."]
    return q, a, r


_STEPS = (_step_add, _step_sub, _step_groups, _step_mul, _step_div)


def generate_problem(
    rng: random.Random, *, min_steps: int = 2, max_steps: int = 4, max_value: int = 999
) -> tuple[str, str]:
    """One random word problem and its worked answer (question, answer) in GSM8K format."""
    name, pronoun, poss = rng.choice(_NAMES)
    items = rng.choice(_ITEMS)
    ctx = {"name": name, "P": pronoun, "p": pronoun.lower(), "poss": poss, "items": items}
    t = rng.randint(2, 40)
    q_parts = [f"{name} has {t} {items}."]
    a_lines: list[str] = []
    n_steps = rng.randint(min_steps, max_steps)
    done = 0
    attempts = 0
    prev = None
    while done < n_steps and attempts < 50:
        attempts += 1
        step = rng.choice(_STEPS)
        if step is _step_div and prev is _step_mul:
            continue  # "k times as large, then split into k bags" would undo the previous step
        out = step(rng, t, ctx, max_value)
        if out is None:
            continue
        prev = step
        q, a, t = out
        q_parts.append(q)
        a_lines.extend(a)
        done += 1
    if rng.random() < 0.3:
        price = rng.randint(2, 9)
        money = t * price
        q_parts.append(f"Each of the {items} sells for ${price}. How much money does {name} make by selling all of them?")
        a_lines.append(f"Selling them all gives {t} * {price} = $<<{t}*{price}={money}>>{money}.")
        t = money
    else:
        q_parts.append(f"How many {items} does {name} have now?")
    a_lines.append(f"#### {t}")
    return " ".join(q_parts), "\n".join(a_lines)


def check_arithmetic_sample(question: str, answer: str) -> tuple[bool, str]:
    """Verify every step of an arithmetic-task sample. Returns ``(valid, reason)``.

    Stricter than the GSM8K checker: exact arithmetic, every step annotated with its visible
    result, the written expression before ``<<`` equal to the annotation, every operand either a
    number of the question or an earlier result, and the final ``#### n`` equal to the last
    computed value (a non-negative integer).
    """
    ok, reason = check_steps(
        answer,
        question,
        exact=True,
        require_steps=True,
        require_visible_result=True,
        check_provenance=True,
        check_text_expr=True,
        require_final_matches_last=True,
    )
    if not ok:
        return ok, reason
    final = extract_final_answer(answer.rsplit("####", 1)[1])
    if final is None or final.startswith("-") or "." in final:
        return False, f"final answer {final!r} is not a non-negative integer"
    return True, "ok"


class ArithmeticTask(GSM8KTask):
    """Procedural arithmetic word problems (GSM8K format). Seeded; any split size.

    Args:
      seed: base seed; split ``s`` uses ``random.Random(f"{seed}:{s}")``.
      sizes: number of problems per split (default train 2000, test 200, validation 200).
      min_steps / max_steps: number of story steps (one or two annotated computations each).
      max_value: bound on every intermediate value.
      source / data_files: optional local GSM8K-format files instead of generating (for
        instance synthetic samples saved by a run); the checker still applies.
    """

    name: ClassVar[str] = "arithmetic"
    default_hub: ClassVar[str | None] = None
    default_hub_config: ClassVar[str | None] = None
    splits: ClassVar[tuple[str, ...]] = ("train", "validation", "test")

    def __init__(
        self,
        source: str | os.PathLike | None = None,
        *,
        seed: int = 0,
        sizes: Mapping[str, int] | None = None,
        min_steps: int = 2,
        max_steps: int = 4,
        max_value: int = 999,
        **kwargs: Any,
    ):
        super().__init__(source, **kwargs)
        self.seed = seed
        self.sizes = {"train": 2000, "validation": 200, "test": 200, **(sizes or {})}
        self.min_steps, self.max_steps, self.max_value = min_steps, max_steps, max_value

    def generate(self, split: str, n: int) -> list[tuple[str, str]]:
        """``n`` distinct (question, answer) pairs for ``split`` (deterministic)."""
        rng = random.Random(f"{self.seed}:{split}")
        seen: set[str] = set()
        out: list[tuple[str, str]] = []
        while len(out) < n:
            q, a = generate_problem(rng, min_steps=self.min_steps, max_steps=self.max_steps, max_value=self.max_value)
            if q in seen:
                continue
            seen.add(q)
            out.append((q, a))
        return out

    def raw_records(self, split: str) -> Iterable[io.RawRecord | io.MalformedRecord]:
        if self.source is not None or self.data_files:
            return super().raw_records(split)
        if split not in self.sizes:
            raise DataError(f"arithmetic task has no split {split!r} (sizes: {sorted(self.sizes)})")
        pairs = self.generate(split, self.sizes[split])
        return (
            io.RawRecord({"question": q, "answer": a, "id": f"arith-{self.seed}-{split}-{i}"}, f"<arithmetic seed={self.seed} {split}>:{i}")
            for i, (q, a) in enumerate(pairs)
        )

    def describe_source(self, split: str) -> str:
        if self.source is None and not self.data_files:
            return f"<generated arithmetic, seed={self.seed}>"
        return super().describe_source(split)

    def check_sample(self, text: str, *, strict: bool = True) -> tuple[bool, str]:
        """Verify a whole ``Question: ...\\nAnswer: ...`` sample with :func:`check_arithmetic_sample`."""
        qa = parse_qa(text)
        if qa is None:
            return False, "not of the form 'Question: ...\\nAnswer: ...'"
        return check_arithmetic_sample(qa[0], qa[1])
