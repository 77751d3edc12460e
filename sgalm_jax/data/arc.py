"""ARC-Challenge (AI2 Reasoning Challenge, the hard set): multiple-choice science questions.

Records (HF ``allenai/ai2_arc`` layout, config ``ARC-Challenge``, splits train / validation /
test)::

    {"id": str, "question": str, "choices": {"text": [...], "label": [...]}, "answerKey": str}

Labels are letters (``A``-``E``) for most items and digits (``1``-``5``) for a few; there are
3, 4 or 5 choices. The example keeps the original labels and the gold *index*.

Two prompt styles:

* ``cloze`` (lm-evaluation-harness ``arc_challenge``): ``Question: <q>\\nAnswer:``; each choice
  is scored as the continuation ``" " + choice text``. Used for log-likelihood acc / acc_norm.
* ``mc``: the choices are listed (``A. ...``) and the answer is the label (``" C"``). Used for
  the generation mode, where the model writes the letter.

Local files: a directory with ``{split}.jsonl`` or ``{split}_*.jsonl`` (``train_partial.jsonl``).
"""

from __future__ import annotations

import os

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from sgalm_jax.data.base import Example, Score, Task, require_str, truncate_at_stop
from sgalm_jax.errors import DataError

LETTERS = "ABCDEFGH"


class ARCTask(Task):
    """ARC-Challenge. ``style`` is ``"cloze"`` or ``"mc"``; ``letter_labels`` shows numeric labels as letters."""

    name: ClassVar[str] = "arc_challenge"
    default_hub: ClassVar[str | None] = "allenai/ai2_arc"
    default_hub_config: ClassVar[str | None] = "ARC-Challenge"
    splits: ClassVar[tuple[str, ...]] = ("train", "validation", "test")
    stop_sequences: ClassVar[tuple[str, ...]] = ("\n\nQuestion:", "\nQuestion:", "<|im_end|>", "</s>")

    def __init__(self, source: str | os.PathLike | None = None, *, style: str = "mc", letter_labels: bool = True, **kwargs: Any):
        super().__init__(source, **kwargs)
        if style not in ("mc", "cloze"):
            raise DataError(f"ARC style must be 'mc' or 'cloze', got {style!r}")
        self.style = style
        self.letter_labels = letter_labels

    def parse_record(self, record: Mapping[str, Any], *, index: int, split: str) -> Example:
        question = require_str(record, "question")
        choices = record.get("choices")
        if not isinstance(choices, Mapping):
            raise DataError("field 'choices' must be an object with 'text' and 'label' lists")
        texts, labels = choices.get("text"), choices.get("label")
        if not isinstance(texts, Sequence) or not isinstance(labels, Sequence) or isinstance(texts, str):
            raise DataError("choices.text and choices.label must be lists")
        texts, labels = [str(t) for t in texts], [str(x).strip() for x in labels]
        if len(texts) != len(labels):
            raise DataError(f"{len(texts)} choice texts but {len(labels)} labels")
        if not 2 <= len(texts) <= len(LETTERS):
            raise DataError(f"{len(texts)} choices (expected 2-{len(LETTERS)})")
        if len(set(labels)) != len(labels):
            raise DataError(f"duplicate choice labels {labels}")
        key = str(record.get("answerKey", "")).strip()
        gold = gold_index(labels, key)
        if gold is None:
            raise DataError(f"answerKey {key!r} is not one of the labels {labels}")
        rid = record.get("id")
        return Example(
            id=str(rid) if rid is not None else f"{split}-{index}",
            question=question,
            answer=texts[gold],
            target=gold,
            fields={"choices": texts, "labels": labels},
        )

    # ------------------------------------------------------------------------------- formatting
    def display_labels(self, example: Example) -> list[str]:
        """Labels as shown in ``mc`` prompts (letters when ``letter_labels``, else the originals)."""
        labels = example.fields["labels"]
        return list(LETTERS[: len(labels)]) if self.letter_labels else list(labels)

    def format_prompt(self, example: Example) -> str:
        if self.style == "cloze":
            return f"Question: {example.question.strip()}\nAnswer:"
        lines = [f"Question: {example.question.strip()}"]
        for lab, text in zip(self.display_labels(example), example.fields["choices"]):
            lines.append(f"{lab}. {text}")
        lines.append("Answer:")
        return "\n".join(lines)

    def format_target(self, example: Example) -> str:
        if self.style == "cloze":
            return " " + example.answer
        return " " + self.display_labels(example)[example.target]

    def chat_user(self, example: Example) -> str:
        if self.style == "cloze":
            return example.question.strip()
        body = self.format_prompt(example).rsplit("\nAnswer:", 1)[0]
        return body + "\nAnswer with the letter of the correct choice."

    def continuations(self, example: Example, *, leading_space: bool = True) -> list[str]:
        """The continuation scored for each choice: choice texts (cloze) or labels (mc)."""
        items = example.fields["choices"] if self.style == "cloze" else self.display_labels(example)
        sp = " " if leading_space else ""
        return [sp + c for c in items]

    def loglik_requests(self, example: Example, context: str, *, leading_space: bool = True) -> list[tuple[str, str]]:
        """``(context, continuation)`` pairs, one per choice, for a log-likelihood scorer."""
        return [(context, c) for c in self.continuations(example, leading_space=leading_space)]

    # --------------------------------------------------------------------------------- checking
    def extract_choice(self, example: Example, output: str) -> int | None:
        """Index of the choice a generated output names (its label, or its exact text), or None."""
        text = truncate_at_stop(output, self.stop_sequences).strip()
        shown = self.display_labels(example)
        alts = {lab.upper(): i for i, lab in enumerate(shown)}
        for i, lab in enumerate(example.fields["labels"]):
            alts.setdefault(lab.upper(), i)
        pat = "|".join(re.escape(k) for k in sorted(alts, key=len, reverse=True))
        m = re.match(rf"^\(?({pat})\)?(?:[\.\):,\s]|$)", text, re.I)
        if m is None:
            m = re.search(rf"answer(?: is|:)?\s*\(?({pat})\)?\b", text, re.I)
        if m is None:
            m = re.search(rf"(?<![A-Za-z0-9])\(?({pat})\)?(?![A-Za-z0-9])", text)
        if m is not None:
            return alts[m.group(1).upper()]
        low = text.lower()
        for i, c in enumerate(example.fields["choices"]):
            if c.strip() and low.startswith(c.strip().lower()):
                return i
        return None

    def score(self, example: Example, output: str) -> Score:
        pred = self.extract_choice(example, output)
        extracted = None if pred is None else self.display_labels(example)[pred]
        return Score(correct=pred == example.target, extracted=extracted, details={"pred_index": pred})


def gold_index(labels: Sequence[str], answer_key: str) -> int | None:
    """Index of ``answer_key`` among ``labels``; numeric keys also match letter labels and vice versa."""
    if answer_key in labels:
        return labels.index(answer_key)
    if answer_key.isdigit() and 1 <= int(answer_key) <= len(labels) and labels[int(answer_key) - 1] == LETTERS[int(answer_key) - 1]:
        return int(answer_key) - 1
    if len(answer_key) == 1 and answer_key.upper() in LETTERS:
        k = LETTERS.index(answer_key.upper())
        if k < len(labels) and labels[k] == str(k + 1):
            return k
    return None
