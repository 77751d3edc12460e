"""Evaluation results: a JSON summary and a per-example JSONL file in a run directory."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EvalResult:
    """Metrics of one evaluation and its per-example records.

    ``records`` are dicts with at least ``id``, ``prompt``, ``output``, ``extracted`` and
    ``correct``; tasks add their own keys (choices and log-likelihoods for ARC, sandbox status
    for MBPP). ``paths`` holds the files written by :meth:`write`.
    """

    name: str
    metrics: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)

    def write(self, out_dir: str | os.PathLike) -> dict[str, str]:
        """Write ``{name}_summary.json`` and ``{name}_examples.jsonl`` into ``out_dir``."""
        self.paths = write_results(out_dir, self.name, self.metrics, self.records)
        return self.paths


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "item"):  # numpy / jax scalars
        try:
            return _jsonable(x.item())
        except (TypeError, ValueError):
            pass
    return str(x)


def write_results(
    out_dir: str | os.PathLike,
    name: str,
    metrics: Mapping[str, Any],
    records: Iterable[Mapping[str, Any]],
) -> dict[str, str]:
    """Write the summary (metrics) and the per-example records; returns their paths.

    Files are written to a temporary name and renamed, so a crash never leaves half a summary. In
    a multi-host run only process 0 writes (every process computed the same results); the others
    return the paths.
    """
    d = Path(out_dir)
    summary = d / f"{name}_summary.json"
    examples = d / f"{name}_examples.jsonl"
    paths = {"summary": str(summary), "examples": str(examples)}
    from sgalm_jax.training.multihost import is_main  # (lazy: this package needs no jax otherwise)

    if not is_main():
        return paths
    d.mkdir(parents=True, exist_ok=True)
    tmp = examples.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(_jsonable(r), ensure_ascii=False) + "\n")
    os.replace(tmp, examples)
    tmp = summary.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(dict(metrics)), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, summary)
    return paths


def mean(xs: Sequence[float]) -> float:
    """Arithmetic mean (0.0 for an empty sequence)."""
    return float(sum(xs)) / len(xs) if xs else 0.0


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar, or a no-op object when disabled."""
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc)

    class _Null:
        def update(self, n: int = 1) -> None:
            pass

        def close(self) -> None:
            pass

    return _Null()
