"""Text diagnostics of generated samples: well-formedness, validity, diversity, overlap, ROUGE-L.

Pure Python (no model): the SGALM loop, the data engine, the demo and the tests call these on
decoded sample texts.

* :func:`well_formed` / :func:`check_validity`: whether a generated *whole sample* has the task's
  shape, and whether it is correct by the task's checker: the arithmetic task's exact step checker,
  GSM8K's step arithmetic (``<<expr=result>>`` annotations and ``#### n``), MBPP code that passes
  its *own* asserts (run in the sandbox). ARC and chat tasks have no checker (validity ``None``).
* :func:`split_sample`: a generated sample text back into a ``(prompt, response)`` SFT pair.
* :func:`diversity`: distinct-1/2 (unique n-grams / all n-grams over the set), the within-sample
  repetition rate (repeated 4-grams), exact duplicates and verbatim copies of real samples.
* :func:`lcs_length` / :func:`rouge_l_f1` / :class:`RougeFilter` (Self-Instruct's "drop when
  ROUGE-L F1 > 0.7 with any earlier one"): defined in :mod:`sgalm_jax.evaluation.rouge`.
* :class:`NgramIndex`: n-gram overlap with a reference split (test-set deduplication).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from sgalm_jax.data.arc import ARCTask
from sgalm_jax.data.base import Task
from sgalm_jax.data.gsm8k import GSM8KTask, parse_qa
from sgalm_jax.data.math_steps import extract_final_answer
from sgalm_jax.data.mbpp import MBPPTask
# ROUGE-L lives in sgalm_jax.evaluation.rouge (GAD's health metric uses it too); re-exported here.
from sgalm_jax.evaluation.rouge import RougeFilter, lcs_length, ngrams as _ngrams, rouge_l_f1, words

__all__ = [
    "NgramIndex", "RougeFilter", "check_validity", "copy_rate", "distinct_n", "diversity",
    "duplicate_rate", "has_checker", "lcs_length", "parse_mbpp_sample", "repetition_rate",
    "rouge_l_f1", "split_sample", "well_formed", "words",
]

_MBPP_RE = re.compile(
    r"^\s*You are an expert Python programmer, and here is your task:\s*(?P<desc>.*?)\s*"
    r"Your code should pass these tests:\s*\n(?P<tests>.*?)\n\s*\[BEGIN\]\s*\n(?P<code>.*?)"
    r"(?:\n?\[DONE\].*)?$", re.S)
_ARC_CHOICE_RE = re.compile(r"^\s*([A-H1-8])\.\s+\S", re.M)
_ARC_ANSWER_RE = re.compile(r"\nAnswer:\s*([A-H1-8])\s*$")


# ------------------------------------------------------------------------------ sample structure
def parse_mbpp_sample(text: str) -> tuple[str, list[str], str] | None:
    """``(description, asserts, code)`` of an MBPP-format sample text, or None if malformed."""
    m = _MBPP_RE.match(text)
    if not m:
        return None
    tests = [t.strip() for t in m.group("tests").splitlines() if t.strip().startswith("assert")]
    code = m.group("code").strip("\n")
    if not m.group("desc").strip() or not tests or not code.strip():
        return None
    return m.group("desc").strip(), tests, code


def split_sample(task: Task, text: str) -> tuple[str, str] | None:
    """A generated sample as the task's SFT pair ``(prompt, response)``, or None if malformed."""
    if isinstance(task, GSM8KTask):
        qa = parse_qa(text)
        if qa is None:
            return None
        return f"Question: {qa[0]}\nAnswer:", " " + qa[1]
    if isinstance(task, MBPPTask):
        parsed = parse_mbpp_sample(text)
        if parsed is None:
            return None
        desc, tests, code = parsed
        prompt = (f"You are an expert Python programmer, and here is your task: {desc} "
                  "Your code should pass these tests:\n\n" + "\n".join(tests) + "\n[BEGIN]\n")
        return prompt, code + "\n[DONE]"
    marker = "\nAnswer:"
    if marker not in text:
        return None
    head, tail = text.rsplit(marker, 1)
    if not head.strip() or not tail.strip():
        return None
    return head + marker, " " + tail.strip()


def well_formed(task: Task, text: str) -> bool:
    """Whether ``text`` has the shape of one of the task's samples."""
    if not text.strip():
        return False
    if isinstance(task, GSM8KTask):
        qa = parse_qa(text)
        return (qa is not None and "####" in qa[1]
                and extract_final_answer(qa[1].rsplit("####", 1)[1]) is not None)
    if isinstance(task, MBPPTask):
        return parse_mbpp_sample(text) is not None
    if isinstance(task, ARCTask):
        labels = _ARC_CHOICE_RE.findall(text)
        m = _ARC_ANSWER_RE.search(text)
        return (text.lstrip().startswith("Question:") and len(labels) >= 2 and m is not None
                and m.group(1) in labels)
    return split_sample(task, text) is not None


def has_checker(task: Task) -> bool:
    """Whether :func:`check_validity` can judge the task's samples (arithmetic, GSM8K, MBPP)."""
    return isinstance(task, (GSM8KTask, MBPPTask))


def check_validity(task: Task, texts: Sequence[str]) -> list[tuple[bool | None, str]]:
    """``(valid, reason)`` per sample text; ``valid`` is None for tasks without a checker.

    Arithmetic: :meth:`ArithmeticTask.check_sample` (exact arithmetic, operands from the question,
    final answer = last result). GSM8K: every ``<<expr=result>>`` evaluates to its result and a
    ``#### n`` line exists (the level every gold answer meets). MBPP: the sample's code passes the
    sample's own asserts in the sandbox.
    """
    if isinstance(task, GSM8KTask):
        return [tuple(task.check_sample(t)) for t in texts]  # type: ignore[misc]
    if isinstance(task, MBPPTask):
        out: list[tuple[bool | None, str]] = [(False, "malformed")] * len(texts)
        jobs, where = [], []
        for i, t in enumerate(texts):
            parsed = parse_mbpp_sample(t)
            if parsed is not None:
                jobs.append((parsed[2] + "\n", "\n".join(parsed[1]) + "\n"))
                where.append(i)
        if jobs:
            results = task.sandbox().run_many(jobs)
            for i, r in zip(where, results):
                out[i] = (bool(r.passed), r.status if not r.passed else "ok")
        return out
    return [(None, "no checker") for _ in texts]


# ------------------------------------------------------------------------------ diversity
def distinct_n(texts: Iterable[str], n: int) -> float:
    """Unique n-grams over all n-grams of ``texts`` (word tokens); 0 when there are none."""
    total, seen = 0, set()
    for t in texts:
        grams = _ngrams(words(t), n)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def repetition_rate(texts: Sequence[str], n: int = 4) -> float:
    """Mean over samples of the fraction of a sample's n-grams that repeat an earlier n-gram of
    the same sample (0 = no loops; degenerate "the the the" text tends to 1)."""
    rates = []
    for t in texts:
        grams = _ngrams(words(t), n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


def _norm(text: str) -> str:
    return " ".join(text.split())


def duplicate_rate(texts: Sequence[str]) -> float:
    """Fraction of samples identical (up to whitespace) to an earlier sample of the set."""
    seen, dup = set(), 0
    for t in texts:
        k = _norm(t)
        dup += k in seen
        seen.add(k)
    return dup / len(texts) if texts else 0.0


def copy_rate(texts: Sequence[str], reference: Iterable[str]) -> float:
    """Fraction of samples that copy a reference (real) sample verbatim (up to whitespace)."""
    ref = {_norm(r) for r in reference}
    return sum(_norm(t) in ref for t in texts) / len(texts) if texts else 0.0


def diversity(texts: Sequence[str], reference: Iterable[str] = ()) -> dict[str, float]:
    """``distinct_1``, ``distinct_2``, ``repetition``, ``duplicates`` and ``copies``."""
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repetition": repetition_rate(texts),
        "duplicates": duplicate_rate(texts),
        "copies": copy_rate(texts, reference),
    }


# ------------------------------------------------------------------------------ n-gram overlap
class NgramIndex:
    """Word n-grams of a reference set (e.g. the test split) for contamination checks."""

    def __init__(self, texts: Iterable[str], n: int = 13):
        self.n = int(n)
        self.grams: set[tuple[str, ...]] = set()
        for t in texts:
            self.grams.update(_ngrams(words(t), self.n))

    def overlap(self, text: str) -> float:
        """Fraction of ``text``'s n-grams that occur in the reference (0 for texts shorter
        than n words)."""
        grams = _ngrams(words(text), self.n)
        if not grams:  # shorter than n words: nothing to compare
            return 0.0
        return sum(g in self.grams for g in grams) / len(grams)
