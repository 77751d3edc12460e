"""ROUGE-L: the longest-common-subsequence F-measure of two token sequences.

Used in two places: Self-Instruct's novelty filter in SGALM's data engine (:class:`RougeFilter`,
"drop a sample whose ROUGE-L F1 with any kept one exceeds 0.7", on :func:`words` tokens), and GAD's
offline health metric, ROUGE-L of a student's response against the teacher's (:func:`rouge_l`,
:func:`mean_rouge_l`; a diagnostic only, it does not predict judge scores).

Tokenisers (``tokenizer=``):

* ``"rouge_score"`` (default of :func:`rouge_l`): Google's ``rouge_score`` package's default
  tokenisation: lower-case, every run of characters outside ``[a-z0-9]`` becomes a separator. No
  stemming (``rouge_score``'s ``use_stemmer=True``, which MiniLLM's evaluation sets, Porter-stems
  tokens longer than 3 characters; not reproduced here).
* ``"words"``: lower-cased word and punctuation tokens (``\\w+`` or one punctuation character),
  the unit of the SGALM diagnostics (distinct-n, dedupe).
* any callable ``str -> list[str]``.

P = LCS / |prediction|, R = LCS / |reference|, F = 2PR / (P + R) = 2 LCS / (|prediction| +
|reference|), as ``rouge_score``'s ``rougeL``; 0 when either side has no tokens.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

_WORD_RE = re.compile(r"\w+|[^\w\s]")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens (the unit of distinct-n, ROUGE-L and dedupe)."""
    return _WORD_RE.findall(text.lower())


def rouge_score_tokens(text: str) -> list[str]:
    """``rouge_score``'s default tokenisation without stemming: lower-case ``[a-z0-9]+`` runs."""
    return [t for t in _NON_ALNUM.sub(" ", text.lower()).split() if t]


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The ``n``-grams of ``tokens`` in order (empty when shorter than ``n``)."""
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (bit-parallel, Hyyrö 2004).

    One big-integer update per element of ``b``: ``V' = (V + (V & M)) | (V & ~M)`` over a bit
    vector of ``len(a)`` bits, where ``M`` marks the positions of ``a`` equal to the element; the
    LCS length is the number of zero bits of ``V``.
    """
    if not a or not b:
        return 0
    masks: dict[Any, int] = {}
    for i, x in enumerate(a):
        masks[x] = masks.get(x, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for y in b:
        m = masks.get(y)
        if m is None:
            continue
        u = v & m
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l_f1(a: str | Sequence[str], b: str | Sequence[str]) -> float:
    """ROUGE-L F1 of two texts (or token lists): ``2 LCS / (|a| + |b|)`` (P and R weighted
    equally, as ``rouge_score``'s ``fmeasure``), on :func:`words` tokens."""
    ta = words(a) if isinstance(a, str) else list(a)
    tb = words(b) if isinstance(b, str) else list(b)
    if not ta or not tb:
        return 0.0
    return 2.0 * lcs_length(ta, tb) / (len(ta) + len(tb))


class RougeFilter:
    """Self-Instruct's novelty filter: keep a text only if its ROUGE-L F1 with every text kept so
    far (seeds included) is at most ``threshold``.

    Exact: an inverted index of word trigrams only chooses the *order* of comparisons (likely
    near-duplicates first, so rejections are found early); every pair whose F1 could exceed the
    threshold is compared. The bound ``F1 <= 2 min(|a|, |b|) / (|a| + |b|)`` and the multiset
    overlap skip pairs that cannot pass it.
    """

    def __init__(self, threshold: float = 0.7, seeds: Iterable[str] = ()):
        self.threshold = float(threshold)
        self.texts: list[list[str]] = []
        self.counts: list[Counter] = []
        self.index: dict[tuple[str, ...], list[int]] = {}
        for s in seeds:
            self._add(words(s))

    def _add(self, tokens: list[str]) -> None:
        i = len(self.texts)
        self.texts.append(tokens)
        self.counts.append(Counter(tokens))
        for g in set(ngrams(tokens, 3)):
            self.index.setdefault(g, []).append(i)

    def max_score(self, text: str) -> float:
        """The largest ROUGE-L F1 of ``text`` with a kept text (stops once above threshold)."""
        tokens = words(text)
        if not tokens:
            return 0.0
        hits: Counter = Counter()
        for g in set(ngrams(tokens, 3)):
            for j in self.index.get(g, ()):
                hits[j] += 1
        order = [j for j, _ in hits.most_common()]
        ordered = set(order)
        order += [j for j in range(len(self.texts)) if j not in ordered]
        best, n, c = 0.0, len(tokens), Counter(tokens)
        for j in order:
            other = self.texts[j]
            m = len(other)
            if 2.0 * min(n, m) / (n + m) <= max(best, self.threshold):
                continue
            overlap = sum((c & self.counts[j]).values())
            if 2.0 * overlap / (n + m) <= max(best, self.threshold):
                continue
            best = max(best, 2.0 * lcs_length(tokens, other) / (n + m))
            if best > self.threshold:
                break
        return best

    def add_if_novel(self, text: str) -> bool:
        """Keep ``text`` (and return True) if no kept text has ROUGE-L F1 above the threshold."""
        if self.max_score(text) > self.threshold:
            return False
        self._add(words(text))
        return True


@dataclasses.dataclass(frozen=True)
class RougeScore:
    """ROUGE-L precision, recall and F-measure (each in [0, 1])."""

    precision: float
    recall: float
    fmeasure: float


Tokenizer = str | Callable[[str], list[str]]
_TOKENIZERS: dict[str, Callable[[str], list[str]]] = {"rouge_score": rouge_score_tokens,
                                                      "words": words}


def _tokenizer(tokenizer: Tokenizer) -> Callable[[str], list[str]]:
    if callable(tokenizer):
        return tokenizer
    if tokenizer not in _TOKENIZERS:
        raise ValueError(f"unknown ROUGE tokenizer {tokenizer!r}; use one of {sorted(_TOKENIZERS)} "
                         "or a callable")
    return _TOKENIZERS[tokenizer]


def rouge_l(prediction: str, reference: str, *, tokenizer: Tokenizer = "rouge_score") -> RougeScore:
    """ROUGE-L of ``prediction`` against ``reference`` (see the module docstring)."""
    tok = _tokenizer(tokenizer)
    p, r = tok(prediction), tok(reference)
    if not p or not r:
        return RougeScore(0.0, 0.0, 0.0)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return RougeScore(0.0, 0.0, 0.0)
    precision, recall = lcs / len(p), lcs / len(r)
    return RougeScore(precision, recall, 2 * precision * recall / (precision + recall))


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str], *,
                 tokenizer: Tokenizer = "rouge_score") -> float:
    """Mean ROUGE-L F-measure over aligned (prediction, reference) pairs (0 for no pairs)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return 0.0
    return sum(rouge_l(p, r, tokenizer=tokenizer).fmeasure
               for p, r in zip(predictions, references)) / len(predictions)
