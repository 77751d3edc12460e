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
import re
from collections.abc import Iterable, Mapping, Sequence
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
STEP_KINDS: dict[str, Any] = {"add": _step_add, "sub": _step_sub, "groups": _step_groups,
                              "mul": _step_mul, "div": _step_div}

# Difficulty presets (``ArithmeticTask(level=...)``); keyword arguments given alongside win.
# ``hard`` is the task's default (GSM8K-like 2-4 step stories); ``easy`` has headroom for a tiny
# model trained for a few CPU minutes (docs/evidence.md measures the base rates).
LEVELS: dict[str, dict[str, Any]] = {
    "hard": {"min_steps": 2, "max_steps": 4, "max_value": 999, "max_start": 40,
             "ops": tuple(STEP_KINDS), "sell_prob": 0.3, "num_names": len(_NAMES),
             "num_items": len(_ITEMS)},
    "medium": {"min_steps": 1, "max_steps": 1, "max_value": 99, "max_start": 40,
               "ops": tuple(STEP_KINDS), "sell_prob": 0.3, "num_names": len(_NAMES),
               "num_items": len(_ITEMS)},
    "easy": {"min_steps": 1, "max_steps": 1, "max_value": 30, "max_start": 15,
             "ops": ("add", "sub"), "sell_prob": 0.0, "num_names": 1, "num_items": 1},
}
# Split sizes of a level whose problem space is small (easy: 917 distinct problems); ``sizes=``
# given to the task wins.
LEVEL_SIZES: dict[str, dict[str, int]] = {"easy": {"train": 600, "validation": 300, "test": 400}}


def _parse_ops(ops: str | Sequence[str]) -> tuple[str, ...]:
    names = [o.strip() for o in (ops.split(",") if isinstance(ops, str) else ops) if o.strip()]
    bad = [o for o in names if o not in STEP_KINDS]
    if bad or not names:
        raise DataError(f"arithmetic task: ops {names!r}: unknown {bad!r}; each must be one "
                        f"of {sorted(STEP_KINDS)} (at least one)")
    return tuple(dict.fromkeys(names))


def generate_problem(
    rng: random.Random, *, min_steps: int = 2, max_steps: int = 4, max_value: int = 999,
    max_start: int = 40, ops: str | Sequence[str] = tuple(STEP_KINDS), sell_prob: float = 0.3,
    num_names: int = len(_NAMES), num_items: int = len(_ITEMS),
) -> tuple[str, str]:
    """One random word problem and its worked answer (question, answer) in GSM8K format.

    ``ops`` restricts the story steps (``add``, ``sub``, ``groups``, ``mul``, ``div``),
    ``max_start`` bounds the starting amount, ``sell_prob`` is the chance of a final "sell them
    all" money step, and ``num_names`` / ``num_items`` use only the first names / item words
    (a smaller template vocabulary). The defaults give the task's original problems.
    """
    steps = tuple(STEP_KINDS[o] for o in _parse_ops(ops))
    for _ in range(100):  # a start from which too few steps are possible (ops='sub', 2 items)
        out = _try_problem(rng, steps, min_steps=min_steps, max_steps=max_steps,
                           max_value=max_value, max_start=max_start, sell_prob=sell_prob,
                           num_names=num_names, num_items=num_items)
        if out is not None:
            return out
    raise DataError(f"arithmetic task: no problem with {min_steps} steps of {_parse_ops(ops)} within "
                    f"max_value={max_value} (100 tries)")


def _try_problem(rng: random.Random, steps: tuple[Any, ...], *, min_steps: int, max_steps: int,
                 max_value: int, max_start: int, sell_prob: float, num_names: int,
                 num_items: int) -> tuple[str, str] | None:
    """One problem, or None when fewer than ``min_steps`` steps fit after the start."""
    name, pronoun, poss = rng.choice(_NAMES[:max(1, num_names)])
    items = rng.choice(_ITEMS[:max(1, num_items)])
    ctx = {"name": name, "P": pronoun, "p": pronoun.lower(), "poss": poss, "items": items}
    t = rng.randint(2, max(2, max_start))
    q_parts = [f"{name} has {t} {items}."]
    a_lines: list[str] = []
    n_steps = rng.randint(min_steps, max_steps)
    done = 0
    attempts = 0
    prev = None
    while done < n_steps and attempts < 50:
        attempts += 1
        step = rng.choice(steps)
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
    if done < min_steps:
        return None
    if rng.random() < sell_prob:
        price = rng.randint(2, 9)
        money = t * price
        q_parts.append(f"Each of the {items} sells for ${price}. How much money does {name} make by selling all of them?")
        a_lines.append(f"Selling them all gives {t} * {price} = $<<{t}*{price}={money}>>{money}.")
        t = money
    else:
        q_parts.append(f"How many {items} does {name} have now?")
    a_lines.append(f"#### {t}")
    return " ".join(q_parts), "\n".join(a_lines)


# ------------------------------------------------------------------------------ the solver
_NAME_RE = "|".join(n for n, _, _ in _NAMES)
_ITEM_RE = "|".join(_ITEMS)
_FRIEND_RE = "|".join(re.escape(f) for f in _FRIENDS)
_PRON = "(?:She|He)"
_SENTENCES: list[tuple[str, re.Pattern[str]]] = [
    ("add", re.compile(rf"{_PRON} buys (\d+) more ({_ITEM_RE})\.")),
    ("sub", re.compile(rf"Then (?:she|he) gives (\d+) ({_ITEM_RE}) to (?:{_FRIEND_RE})\.")),
    ("groups", re.compile(rf"{_PRON} gets (\d+) boxes with (\d+) ({_ITEM_RE}) in each box\.")),
    ("mul", re.compile(rf"Then the number of ({_ITEM_RE}) ({_NAME_RE}) has becomes (\d+) times "
                       r"as large\.")),
    ("div", re.compile(rf"{_PRON} splits the ({_ITEM_RE}) equally into (\d+) bags and keeps only "
                       r"one bag\.")),
]
_START_RE = re.compile(rf"^({_NAME_RE}) has (\d+) ({_ITEM_RE})\.")
_ASK_RE = re.compile(rf"How many ({_ITEM_RE}) does ({_NAME_RE}) have now\?$")
_SELL_RE = re.compile(rf"Each of the ({_ITEM_RE}) sells for \$(\d+)\. How much money does "
                      rf"({_NAME_RE}) make by selling all of them\?$")


def solve_question(question: str) -> tuple[int | None, str]:
    """The task's own solver: read a question written in the task's templates and compute its
    answer. Returns ``(answer, "ok")``, or ``(None, reason)`` when the question is not a
    well-posed story of the task (a sentence no template reads, another person or item word
    midway, a negative amount, a split that does not divide)."""
    q = " ".join(question.split())
    m = _START_RE.match(q)
    if not m:
        return None, "question does not start with '<name> has <n> <items>.'"
    name, t, items = m.group(1), int(m.group(2)), m.group(3)
    rest = q[m.end():].strip()
    n_steps = 0
    while rest:
        end = _ASK_RE.match(rest) or _SELL_RE.match(rest)
        if end is not None:
            if end.re is _ASK_RE:
                it, who = end.group(1), end.group(2)
            else:
                it, price, who = end.group(1), int(end.group(2)), end.group(3)
                t *= price
            if it != items or who != name:
                return None, f"the question asks about {who}'s {it}, the story is {name}'s {items}"
            if n_steps == 0:
                return None, "no story step between the start and the question"
            return t, "ok"
        for kind, pat in _SENTENCES:
            sm = pat.match(rest)
            if sm is None:
                continue
            g = sm.groups()
            if kind == "add":
                b, it = int(g[0]), g[1]
                t += b
            elif kind == "sub":
                b, it = int(g[0]), g[1]
                if b >= t:
                    return None, f"gives away {b} of only {t} {items}"
                t -= b
            elif kind == "groups":
                it = g[2]
                t += int(g[0]) * int(g[1])
            elif kind == "mul":
                it, who, k = g[0], g[1], int(g[2])
                if who != name:
                    return None, f"step {n_steps + 1} is about {who}, the story is {name}'s"
                t *= k
            else:
                it, k = g[0], int(g[1])
                if k == 0 or t % k:
                    return None, f"{t} {items} do not split equally into {k} bags"
                t //= k
            if it != items:
                return None, f"step {n_steps + 1} is about {it}, the story is about {items}"
            n_steps += 1
            rest = rest[sm.end():].strip()
            break
        else:
            return None, f"no template reads {rest[:40]!r}"
    return None, "the question never asks 'How many ... now?' or 'How much money ...?'"


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
      level: a difficulty preset of :data:`LEVELS` (``hard``, the default: 2-4 steps of every
        kind up to 999; ``medium``: one step up to 99; ``easy``: one addition or subtraction up to
        20, 4 names and 4 item words, no money step). The keywords below override it.
      min_steps / max_steps: number of story steps (one or two annotated computations each).
      max_value: bound on every intermediate value.
      max_start: bound on the starting amount.
      ops: story steps allowed (comma-separated or a list of ``add, sub, groups, mul, div``).
      sell_prob: chance of a final "sell them all" money step.
      num_names / num_items: use only the first names / item words.
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
        level: str | None = None,
        min_steps: int | None = None,
        max_steps: int | None = None,
        max_value: int | None = None,
        max_start: int | None = None,
        ops: str | Sequence[str] | None = None,
        sell_prob: float | None = None,
        num_names: int | None = None,
        num_items: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(source, **kwargs)
        self.seed = seed
        self.level = level or "hard"
        if self.level not in LEVELS:
            raise DataError(f"arithmetic task: unknown level {level!r}; known: {sorted(LEVELS)}")
        self.sizes = {"train": 2000, "validation": 200, "test": 200,
                      **LEVEL_SIZES.get(self.level, {}), **(sizes or {})}
        given = {"min_steps": min_steps, "max_steps": max_steps, "max_value": max_value,
                 "max_start": max_start, "ops": ops, "sell_prob": sell_prob,
                 "num_names": num_names, "num_items": num_items}
        opts = {**LEVELS[self.level], **{k: v for k, v in given.items() if v is not None}}
        opts["ops"] = _parse_ops(opts["ops"])
        if not 1 <= opts["min_steps"] <= opts["max_steps"]:
            raise DataError(f"arithmetic task: need 1 <= min_steps <= max_steps, got "
                            f"{opts['min_steps']} and {opts['max_steps']}")
        if not 0.0 <= opts["sell_prob"] <= 1.0:
            raise DataError(f"arithmetic task: sell_prob {opts['sell_prob']} is not in [0, 1]")
        self.options = opts
        self.min_steps, self.max_steps = opts["min_steps"], opts["max_steps"]
        self.max_value = opts["max_value"]

    def generate(self, split: str, n: int) -> list[tuple[str, str]]:
        """``n`` distinct (question, answer) pairs for ``split`` (deterministic)."""
        rng = random.Random(f"{self.seed}:{split}")
        seen: set[str] = set()
        out: list[tuple[str, str]] = []
        while len(out) < n:
            q, a = generate_problem(rng, **self.options)
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
        """Verify a whole ``Question: ...\\nAnswer: ...`` sample: every step of the worked answer
        checks (:func:`check_arithmetic_sample`), and the question is a story of the task whose
        answer, by the task's own solver (:func:`solve_question`), is the sample's final answer."""
        qa = parse_qa(text)
        if qa is None:
            return False, "not of the form 'Question: ...\\nAnswer: ...'"
        ok, reason = check_arithmetic_sample(qa[0], qa[1])
        if not ok:
            return ok, reason
        solved, why = solve_question(qa[0])
        if solved is None:
            return False, f"question: {why}"
        final = extract_final_answer(qa[1].rsplit("####", 1)[1])
        if final is None or int(final) != solved:
            return False, f"final answer {final} != {solved}, the solver's answer to the question"
        return True, "ok"
