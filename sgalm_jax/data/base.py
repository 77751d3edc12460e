"""The task interface shared by every dataset, and the task registry.

A :class:`Task` knows how to

* load a split (from the Hugging Face hub by name, or from local JSONL / JSON / parquet files),
* turn a raw record into an :class:`Example` (raising a :class:`DataError` that names the file and
  line of a malformed record, or counting it as skipped when ``skip_malformed=True``),
* format a training sample ``(prompt, response)`` and an evaluation prompt, and
* check a model's answer.

Prompt *assembly* (k-shot demonstrations, chat templates) lives in :mod:`sgalm_jax.data.prompts`;
tasks only say how one example looks as a prompt and as a target.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sgalm_jax.data import io
from sgalm_jax.errors import DataError

log = logging.getLogger(__name__)

_PATHLIKE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Example:
    """One task example, normalised across datasets.

    Attributes:
      id: stable identifier (dataset id, task_id, or ``split-index``).
      question: the input text (GSM8K question, ARC question stem, MBPP description, user turn).
      answer: the gold response text (worked solution, gold choice text, reference code, reply).
      target: what :meth:`Task.check_answer` compares against (final number string, gold choice
        index, test asserts, ...).
      fields: task-specific extras (choices, labels, tests, messages, ...).
    """

    id: str
    question: str
    answer: str
    target: Any = None
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class LoadReport:
    """The result of loading a split: the examples, and how many malformed records were skipped."""

    examples: list[Example]
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    source: str = ""


@dataclass(frozen=True)
class Score:
    """The outcome of checking one model output: correct or not, the extracted answer, details."""

    correct: bool
    extracted: Any = None
    details: Mapping[str, Any] = field(default_factory=dict)


class Task(ABC):
    """Base class of every task.

    Args:
      source: a hub dataset name (``openai/gsm8k``) or a local file / directory. ``None`` uses the
        task's default hub name.
      data_files: optional ``{split: path or [paths]}`` of local files; overrides ``source``.
      hub_config: the hub configuration name (``main`` for GSM8K); ``None`` uses the default.
      skip_malformed: skip (and count) malformed records instead of raising DataError.
      hub_kwargs: extra keyword arguments for ``datasets.load_dataset``.
    """

    name: ClassVar[str] = "task"
    default_hub: ClassVar[str | None] = None
    default_hub_config: ClassVar[str | None] = None
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    # The split that k-shot demonstrations and SGALM's real pool come from by default.
    train_split: ClassVar[str] = "train"
    eval_split: ClassVar[str] = "test"
    # Strings at which a generated answer is cut (the start of the next few-shot example, ...).
    stop_sequences: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        source: str | os.PathLike | None = None,
        *,
        data_files: Mapping[str, Any] | None = None,
        hub_config: str | None = None,
        skip_malformed: bool = False,
        hub_kwargs: Mapping[str, Any] | None = None,
    ):
        self.source = None if source is None else str(source)
        self.data_files = dict(data_files) if data_files else None
        self.hub_config = hub_config if hub_config is not None else self.default_hub_config
        self.skip_malformed = skip_malformed
        self.hub_kwargs = dict(hub_kwargs or {})
        self.last_skipped = 0
        if self.source is not None and not io.is_local_source(self.source) and _looks_like_path(self.source):
            raise DataError(f"{self.source}: local data path not found")

    # ----------------------------------------------------------------------------------- loading
    def hub_split_name(self, split: str) -> str:
        """The hub's name for ``split`` (override when they differ, e.g. UltraChat's train_sft)."""
        return split

    def raw_records(self, split: str) -> Iterable[io.RawRecord | io.MalformedRecord]:
        """Raw records of ``split`` from local files or the hub."""
        paths = io.resolve_local(self.source, self.data_files, split)
        if paths is not None:
            return (r for p in paths for r in io.iter_local_file(p))
        name = self.source or self.default_hub
        if name is None:
            raise DataError(f"task {self.name!r} needs a `source` (hub name or local path)")
        return io.iter_hub(name, self.hub_config, self.hub_split_name(split), **self.hub_kwargs)

    def select(self, example: Example, split: str) -> bool:
        """Whether a parsed example belongs to ``split`` (MBPP filters one file by task_id)."""
        return True

    def load_split(self, split: str | None = None, *, limit: int | None = None) -> LoadReport:
        """Load ``split`` (default: the evaluation split) and report skipped records.

        A malformed record raises DataError naming its file and line, unless ``skip_malformed``
        was set, in which case it is counted in the report and logged (never silently dropped).
        """
        split = split or self.eval_split
        report = LoadReport(examples=[], source=self.describe_source(split))
        index = 0
        for rec in self.raw_records(split):
            if isinstance(rec, io.MalformedRecord):
                self._malformed(report, rec.location, rec.reason)
                continue
            try:
                if not isinstance(rec.data, Mapping):
                    raise DataError(f"expected a JSON object, got {type(rec.data).__name__}")
                ex = self.parse_record(rec.data, index=index, split=split)
            except (DataError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                reason = str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}"
                if isinstance(e, KeyError):
                    reason = f"missing field {e}"
                self._malformed(report, rec.location, reason)
                continue
            index += 1
            if not self.select(ex, split):
                continue
            report.examples.append(ex)
            if limit is not None and len(report.examples) >= limit:
                break
        if report.skipped:
            log.warning(
                "%s: skipped %d malformed record(s) in split %r of %s (first: %s)",
                self.name, report.skipped, split, report.source, report.skip_reasons[0],
            )
        return report

    def load(self, split: str | None = None, *, limit: int | None = None) -> list[Example]:
        """Load ``split`` as a list of examples (see :meth:`load_split` for the skip count)."""
        report = self.load_split(split, limit=limit)
        self.last_skipped = report.skipped
        return report.examples

    def describe_source(self, split: str) -> str:
        """A short human description of where ``split`` is read from."""
        try:
            paths = io.resolve_local(self.source, self.data_files, split)
        except DataError:
            paths = None
        if paths:
            return ", ".join(str(p) for p in paths)
        name = self.source or self.default_hub or "?"
        return name + (f"/{self.hub_config}" if self.hub_config else "")

    def _malformed(self, report: LoadReport, location: str, reason: str) -> None:
        if not self.skip_malformed:
            raise DataError(f"{location}: malformed {self.name} record: {reason}")
        report.skipped += 1
        report.skip_reasons.append(f"{location}: {reason}")

    @abstractmethod
    def parse_record(self, record: Mapping[str, Any], *, index: int, split: str) -> Example:
        """Turn one raw record into an Example; raise DataError (or KeyError/TypeError) if malformed."""

    # -------------------------------------------------------------------------------- formatting
    @abstractmethod
    def format_prompt(self, example: Example) -> str:
        """The zero-shot evaluation prompt for ``example`` (plain text, ends where the answer starts)."""

    @abstractmethod
    def format_target(self, example: Example) -> str:
        """The gold continuation of :meth:`format_prompt` (what a few-shot demo shows after it)."""

    def format_sample(self, example: Example) -> tuple[str, str]:
        """A supervised training pair ``(prompt, response)``; response = prompt's gold continuation."""
        return self.format_prompt(example), self.format_target(example)

    def format_demo(self, example: Example) -> str:
        """One few-shot demonstration: prompt followed by its gold continuation."""
        return self.format_prompt(example) + self.format_target(example)

    def chat_user(self, example: Example) -> str:
        """The user turn when the task is rendered through a chat template."""
        return self.format_prompt(example).rstrip()

    def chat_assistant(self, example: Example) -> str:
        """The assistant turn (gold) when the task is rendered through a chat template."""
        return self.format_target(example).strip()

    def sample_text(self, example: Example) -> str:
        """The whole example as one text: the unit SGALM's generator writes and its discriminator judges."""
        return self.format_demo(example).strip()

    # ---------------------------------------------------------------------------------- checking
    @abstractmethod
    def score(self, example: Example, output: str) -> Score:
        """Check one model output (the continuation of the prompt) against the example."""

    def check_answer(self, example: Example, output: str) -> bool:
        """True when ``output`` answers ``example`` correctly."""
        return self.score(example, output).correct

    def score_batch(self, examples: Sequence[Example], outputs: Sequence[str], *, progress: bool = False) -> list[Score]:
        """Score many outputs (MBPP overrides this to run its sandbox in parallel)."""
        return [self.score(e, o) for e, o in zip(examples, outputs, strict=True)]

    def same_question(self, a: Example, b: Example) -> bool:
        """Whether two examples pose the same question (used to keep it out of k-shot demos)."""
        return a.id == b.id or _norm_ws(a.question) == _norm_ws(b.question)


def truncate_at_stop(text: str, stops: Iterable[str]) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stops:
        if s:
            k = text.find(s)
            if k != -1:
                cut = min(cut, k)
    return text[:cut]


def _norm_ws(s: str) -> str:
    return " ".join(s.split()).lower()


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or s.lower().endswith(_PATHLIKE_SUFFIXES)


def require_str(record: Mapping[str, Any], key: str, *, allow_empty: bool = False) -> str:
    """``record[key]`` as a string, or DataError naming the field."""
    if key not in record:
        raise DataError(f"missing field {key!r}")
    v = record[key]
    if not isinstance(v, str):
        raise DataError(f"field {key!r} must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise DataError(f"field {key!r} is empty")
    return v


# ------------------------------------------------------------------------------------ registry
_REGISTRY: dict[str, Callable[..., Task]] = {}


def register_task(name: str, factory: Callable[..., Task], *, overwrite: bool = False) -> None:
    """Register a task factory under ``name`` (lower case; ``-`` and ``_`` are equivalent)."""
    key = _key(name)
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"task {name!r} is already registered")
    _REGISTRY[key] = factory


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the task registered as ``name`` with ``kwargs`` (source=, data_files=, skip_malformed=, ...)."""
    key = _key(name)
    if key not in _REGISTRY:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}")
    return _REGISTRY[key](**kwargs)


def list_tasks() -> list[str]:
    """Names of all registered tasks."""
    return sorted(_REGISTRY)


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")
