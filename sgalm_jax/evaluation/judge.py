"""The GAD / MiniLLM judge protocol: the judge's own reference answer vs the student's, scored 1-10.

For each prompt (GAD paper §3.1 and App. A.3, following MiniLLM's "GPT-4 feedback"):

1. the judge answers the prompt itself (its *reference answer*; asked once per prompt and cached,
   so it is reused for every checkpoint evaluated with the same judge);
2. the judge sees the question, the student's answer and its reference answer and scores both on
   1-10 for helpfulness, relevance, accuracy and level of detail, first line ``"<s1> <s2>"``, with
   an instruction not to let the order of presentation bias it;
3. the item's figure is ``100 * student / (student + reference)``; the reported ``judge_score`` is
   its mean over items (about 50 when the student matches the judge; GAD's GPT-5-Chat teacher scores
   49.7-51.7 with GPT-4o as judge). ``judge_score_of_sums``, ``100 * sum(student) /
   (sum(student) + sum(reference))``, is reported beside it, as MiniLLM aggregates by totals.

**The prompt.** :data:`JUDGE_TEMPLATE` is the pairwise "general" reviewer prompt of Vicuna /
FastChat, which MiniLLM's GPT-4 feedback uses and GAD follows. GAD's own prompt (its Fig. 8) was not
available to check word for word, so this is a faithful reconstruction, not a verified copy; both
the system prompt and the template can be replaced. By default the student is Assistant 1;
``both_orders=True`` also asks with the answers swapped and averages, which removes the order bias
at twice the cost.

Backends (:mod:`sgalm_jax.evaluation.judge_backends`): any OpenAI-compatible endpoint, or a local HF
checkpoint through our sampler. ROUGE-L against the teacher's response (when items carry it) is
reported too, as the offline health metric.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from sgalm_jax.data.base import Example
from sgalm_jax.errors import ConfigError, JudgeError
from sgalm_jax.evaluation.judge_backends import (CachedBackend, ChatRequest, LocalChatBackend,
                                                 OpenAIChatBackend)
from sgalm_jax.evaluation.results import EvalResult, mean
from sgalm_jax.evaluation.rouge import rouge_l

log = logging.getLogger(__name__)

JUDGE_SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."

JUDGE_TEMPLATE = """[Question]
{question}

[The Start of Assistant 1's Answer]
{answer_1}

[The End of Assistant 1's Answer]

[The Start of Assistant 2's Answer]
{answer_2}

[The End of Assistant 2's Answer]

[System]
We would like to request your feedback on the performance of two AI assistants in response to the user question displayed above.
Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.
Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, respectively. The two scores are separated by a space. In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that the order in which the responses were presented does not affect your judgment."""

DEFAULT_REFERENCE_PARAMS = {"temperature": 0.0, "max_tokens": 2048}
DEFAULT_SCORING_PARAMS = {"temperature": 0.0, "max_tokens": 512}

_LABEL_RE = re.compile(r"assistant\s*[12]\s*[:=]?", re.I)
_NUMBER_RE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])")


def parse_scores(reply: str, item: str = "?") -> tuple[float, float]:
    """The two scores on the first non-empty line of a judge reply (``"8 7"``, ``"8, 7"``,
    ``"Assistant 1: 8  Assistant 2: 7"``, ``"**8 7**"``); each must be in [0, 10] and not both 0.
    Anything else is a :class:`JudgeError` naming ``item`` and quoting the line."""
    lines = [ln for ln in reply.strip().splitlines() if ln.strip()]
    if not lines:
        raise JudgeError(f"judge item {item!r}: empty scoring reply")
    first = lines[0]
    nums = _NUMBER_RE.findall(_LABEL_RE.sub(" ", first))
    if len(nums) != 2:
        raise JudgeError(f"judge item {item!r}: cannot read two scores from the first line "
                         f"{first[:120]!r}")
    a, b = float(nums[0]), float(nums[1])
    if not (0.0 <= a <= 10.0 and 0.0 <= b <= 10.0) or a + b == 0.0:
        raise JudgeError(f"judge item {item!r}: scores {a:g} and {b:g} are not on the 1-10 scale "
                         f"(line {first[:120]!r})")
    return a, b


@dataclasses.dataclass(frozen=True)
class JudgeItem:
    """One evaluated answer: ``prompt`` (a string or chat messages), the student's ``answer``, and
    optionally the dataset ``teacher`` response (for ROUGE-L only; the judge writes its own
    reference)."""

    id: str
    prompt: str | tuple[Mapping[str, str], ...]
    answer: str
    teacher: str | None = None

    @classmethod
    def from_example(cls, example: Example, answer: str) -> "JudgeItem":
        """From a :class:`~sgalm_jax.data.distill.DistillationTask` (or chat) example."""
        msgs = example.fields.get("messages") or [{"role": "user", "content": example.question}]
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        return cls(id=example.id, prompt=tuple(dict(m) for m in msgs), answer=answer,
                   teacher=example.answer or None)

    def messages(self) -> list[dict[str, str]]:
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [dict(m) for m in self.prompt]

    def question(self) -> str:
        """The prompt as the judge's ``[Question]``: the user turn, or the whole dialogue."""
        msgs = self.messages()
        if len(msgs) == 1:
            return msgs[0]["content"]
        who = {"user": "User", "assistant": "Assistant", "system": "System"}
        return "\n\n".join(f"{who.get(m['role'], m['role'])}: {m['content']}" for m in msgs)


class Judge:
    """Runs the protocol over :class:`JudgeItem` s with a chat backend.

    Args:
      backend: an :class:`~sgalm_jax.evaluation.judge_backends.OpenAIChatBackend` or
        :class:`~sgalm_jax.evaluation.judge_backends.LocalChatBackend` (anything with
        ``complete(requests, return_exceptions=...)`` and a ``model`` name).
      reference_params, scoring_params: sampling params of the two calls (default: greedy; 2048
        and 512 new tokens).
      both_orders: also score with the answers swapped and average (removes order bias, 2x cost).
      on_error: ``"raise"`` (default): the first unusable item is a :class:`JudgeError` naming it,
        raised after every other request has run and been cached (a rerun asks only for what
        failed); ``"skip"``: such items are left out of the means, counted in ``n_failed`` and
        kept in the records with their ``error``.
      system_prompt, template: the scoring prompt (fields ``{question}``, ``{answer_1}``,
        ``{answer_2}``).
    """

    def __init__(self, backend: CachedBackend, *, reference_params: Mapping[str, Any] | None = None,
                 scoring_params: Mapping[str, Any] | None = None, both_orders: bool = False,
                 on_error: str = "raise", system_prompt: str = JUDGE_SYSTEM_PROMPT,
                 template: str = JUDGE_TEMPLATE):
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"judge.on_error: {on_error!r} is not 'raise' or 'skip'")
        for field in ("{question}", "{answer_1}", "{answer_2}"):
            if field not in template:
                raise ConfigError(f"judge.template: the field {field} is missing")
        self.backend = backend
        self.reference_params = dict(DEFAULT_REFERENCE_PARAMS if reference_params is None
                                     else reference_params)
        self.scoring_params = dict(DEFAULT_SCORING_PARAMS if scoring_params is None
                                   else scoring_params)
        self.both_orders = both_orders
        self.on_error = on_error
        self.system_prompt, self.template = system_prompt, template

    def references(self, items: Sequence[JudgeItem]) -> list[Any]:
        """The judge's own answer to each item's prompt (a JudgeError where that failed)."""
        return self.backend.complete([ChatRequest(it.id, tuple(it.messages()),
                                                  self.reference_params, _nonempty(it.id))
                                      for it in items], return_exceptions=True)

    def _scoring_request(self, item: JudgeItem, answer_1: str, answer_2: str) -> ChatRequest:
        text = self.template.format(question=item.question(), answer_1=answer_1, answer_2=answer_2)
        messages = ({"role": "system", "content": self.system_prompt},
                    {"role": "user", "content": text})
        return ChatRequest(item.id, messages, self.scoring_params,
                           lambda reply, i=item.id: parse_scores(reply, i))

    def evaluate(self, items: Sequence[JudgeItem], *, name: str = "judge",
                 out_dir: str | os.PathLike | None = None) -> EvalResult:
        """Score every item; returns an :class:`EvalResult` (written to ``out_dir`` when given as
        ``{name}_summary.json`` and ``{name}_examples.jsonl``)."""
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):
            raise ConfigError("judge: item ids must be unique")
        refs = self.references(items)
        scoring: list[ChatRequest] = []
        owners: list[tuple[int, bool]] = []  # (item index, swapped)
        for k, (it, ref) in enumerate(zip(items, refs)):
            if isinstance(ref, JudgeError):
                continue
            scoring.append(self._scoring_request(it, it.answer, ref))
            owners.append((k, False))
            if self.both_orders:
                scoring.append(self._scoring_request(it, ref, it.answer))
                owners.append((k, True))
        replies = self.backend.complete(scoring, return_exceptions=True)
        got: dict[int, list[Any]] = {}
        for (k, swapped), reply in zip(owners, replies):
            got.setdefault(k, []).append((swapped, reply))

        records, ratios, s_scores, r_scores = [], [], [], []
        for k, (it, ref) in enumerate(zip(items, refs)):
            rec: dict[str, Any] = {"id": it.id, "prompt": it.question(), "output": it.answer,
                                   "reference": None if isinstance(ref, JudgeError) else ref}
            if it.teacher is not None:
                rec["rouge_l"] = rouge_l(it.answer, it.teacher).fmeasure
            error = ref if isinstance(ref, JudgeError) else next(
                (r for _, r in got.get(k, []) if isinstance(r, JudgeError)), None)
            if error is not None:
                if self.on_error == "raise":  # everything else has run and been cached
                    raise error
                rec["error"] = str(error)
                log.warning("%s", error)
                records.append(rec)
                continue
            pairs = [parse_scores(r, it.id)[::-1] if swapped else parse_scores(r, it.id)
                     for swapped, r in got[k]]
            s = mean([p[0] for p in pairs])
            r = mean([p[1] for p in pairs])
            rec.update(student_score=s, reference_score=r, judge_replies=[r_ for _, r_ in got[k]],
                       ratio=100.0 * s / (s + r))
            records.append(rec)
            ratios.append(rec["ratio"])
            s_scores.append(s)
            r_scores.append(r)

        metrics: dict[str, Any] = {
            "judge_model": self.backend.model,
            "n": len(items),
            "n_scored": len(ratios),
            "n_failed": len(items) - len(ratios),
            "judge_score": mean(ratios) if ratios else float("nan"),
            "judge_score_of_sums": (100.0 * sum(s_scores) / (sum(s_scores) + sum(r_scores))
                                    if ratios else float("nan")),
            "student_score": mean(s_scores) if ratios else float("nan"),
            "reference_score": mean(r_scores) if ratios else float("nan"),
            "both_orders": self.both_orders,
            "response_words": mean([float(len(it.answer.split())) for it in items]),
        }
        if any(it.teacher is not None for it in items):
            metrics["rouge_l"] = mean([r["rouge_l"] for r in records if "rouge_l" in r])
        result = EvalResult(name=name, metrics=metrics, records=records)
        if out_dir is not None:
            result.write(out_dir)
        return result


def _nonempty(item: str):
    def check(reply: str) -> None:
        if not reply.strip():
            raise JudgeError(f"judge item {item!r}: the judge's reference answer is empty")

    return check


# ------------------------------------------------------------------------------------ config
_HTTP_KEYS = {"base_url", "model", "api_key_env", "timeout", "max_retries", "backoff",
              "max_backoff", "jitter", "max_workers", "extra_headers"}
_LOCAL_KEYS = {"path", "dtype", "max_new_tokens", "batch_size", "seed", "name"}
_JUDGE_KEYS = {"backend", "cache_dir", "reference_params", "scoring_params", "both_orders",
               "on_error", "system_prompt", "template"}


def check_judge_config(cfg: Mapping[str, Any], prefix: str = "judge") -> str:
    """The backend kind of a judge config, after checking its keys without building anything
    (a run validates its ``judge`` section before it trains); ConfigError naming the key."""
    kind = cfg.get("backend", "openai")
    if kind not in ("openai", "local"):
        raise ConfigError(f"{prefix}.backend: {kind!r} is not 'openai' or 'local'")
    allowed = _JUDGE_KEYS | (_HTTP_KEYS if kind == "openai" else _LOCAL_KEYS)
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown key for the {kind!r} backend "
                          f"(known: {sorted(allowed)})")
    required = ("base_url", "model") if kind == "openai" else ("path",)
    for key in required:
        if not cfg.get(key):
            what = "" if kind == "openai" else " (an HF checkpoint)"
            raise ConfigError(f"{prefix}.{key}: required for the {kind!r} backend{what}")
    return kind


def build_judge(cfg: Mapping[str, Any], *, run_dir: str | os.PathLike | None = None,
                mesh: Any = None) -> Judge:
    """A :class:`Judge` from a config mapping (e.g. a run config's ``judge`` section).

    ``backend = "openai"``: keys ``base_url``, ``model``, ``api_key_env`` (default
    ``OPENAI_API_KEY``; None for no key), ``timeout``, ``max_retries``, ``backoff``, ``max_backoff``,
    ``jitter``, ``max_workers``, ``extra_headers``. ``backend = "local"``: ``path`` (an HF
    checkpoint with its tokenizer), ``dtype``, ``max_new_tokens``, ``batch_size``, ``seed``,
    ``name``. Both: ``cache_dir`` (default ``<run_dir>/judge_cache``; None without a run dir),
    ``reference_params``, ``scoring_params``, ``both_orders``, ``on_error``, ``system_prompt``,
    ``template``. An unknown or missing key is a :class:`ConfigError` naming it.
    """
    cfg = dict(cfg)
    kind = check_judge_config(cfg)
    cache_dir = cfg.get("cache_dir")
    if cache_dir is None and run_dir is not None:
        cache_dir = os.path.join(os.fspath(run_dir), "judge_cache")
    if kind == "openai":
        kwargs = {k: cfg[k] for k in _HTTP_KEYS - {"base_url", "model"} if k in cfg}
        backend: CachedBackend = OpenAIChatBackend(cfg["base_url"], cfg["model"],
                                                   cache_dir=cache_dir, **kwargs)
    else:
        kwargs = {k: cfg[k] for k in _LOCAL_KEYS - {"path"} if k in cfg}
        backend = LocalChatBackend.from_pretrained(cfg["path"], mesh=mesh, cache_dir=cache_dir,
                                                   **kwargs)
    return Judge(backend, **{k: cfg[k] for k in _JUDGE_KEYS - {"backend", "cache_dir"} if k in cfg})
