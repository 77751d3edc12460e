"""Divergence detection: stop (or skip) when a loss or gradient norm is NaN or infinite.

A loop hands every step's metrics to :class:`FiniteGuard` (``guard.add(step, metrics)``: no device
sync, the scalars stay on the device) and calls ``guard.check()`` where it already syncs (at log
steps) and always **before a checkpoint save or an export**. ``check`` fetches the pending
scalars at once and, for the first step whose ``loss`` or ``grad_norm`` is not finite:

* ``train.nonfinite = "error"`` (default): raises :class:`~sgalm_jax.errors.NonFiniteError` naming
  the step, the value and the last complete checkpoint. The diverged state was never saved, so
  the run directory keeps the last good checkpoint and no NaN export is written; ``main`` exits 1.
* ``train.nonfinite = "skip"``: the train step (``make_train_step(skip_nonfinite=True)``) has
  already kept the previous params and optimizer state for that step (its ``skipped`` metric is
  1); the guard logs it and raises only after ``train.max_skipped_steps`` consecutive skips (a
  run that skips everything must not end "successfully" with an untrained model).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import jax
import numpy as np

from sgalm_jax.errors import NonFiniteError

log = logging.getLogger(__name__)

NONFINITE_MODES = ("error", "skip")
WATCHED = ("loss", "grad_norm")


def _value(x: Any) -> float:
    return float(np.asarray(x).reshape(-1)[0])


class FiniteGuard:
    """Watches ``loss`` and ``grad_norm`` of each step; see the module docstring.

    Args:
      mode: ``"error"`` or ``"skip"`` (``train.nonfinite``).
      max_skipped: with ``"skip"``, the most consecutive skipped steps tolerated.
      checkpointer: optional; its latest complete step is named in the error.
    """

    def __init__(self, mode: str = "error", *, max_skipped: int = 10, checkpointer: Any = None):
        if mode not in NONFINITE_MODES:
            raise ValueError(f"nonfinite mode {mode!r} is not one of {list(NONFINITE_MODES)}")
        self.mode = mode
        self.max_skipped = int(max_skipped)
        self.checkpointer = checkpointer
        self.consecutive_skips = 0
        self.total_skips = 0
        self._pending: list[tuple[int, str, dict[str, Any]]] = []

    @classmethod
    def from_config(cls, config: Any, checkpointer: Any = None) -> "FiniteGuard":
        """From ``config.train.nonfinite`` and ``config.train.max_skipped_steps``."""
        return cls(config.train.nonfinite, max_skipped=config.train.max_skipped_steps,
                   checkpointer=checkpointer)

    @property
    def skip(self) -> bool:
        """Whether train steps should be built with ``skip_nonfinite=True``."""
        return self.mode == "skip"

    def add(self, step: int, metrics: Mapping[str, Any], *, role: str = "") -> None:
        """Remember ``step``'s watched metrics (device or host scalars); no sync here."""
        watched = {k: metrics[k] for k in (*WATCHED, "skipped") if k in metrics}
        if watched:
            self._pending.append((int(step), role, watched))

    def check(self) -> None:
        """Fetch the pending metrics; raise NonFiniteError for a diverged step (see module doc)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        fetched = jax.device_get([w for _, _, w in pending])
        for (step, role, _), values in zip(pending, fetched):
            bad = {k: _value(values[k]) for k in WATCHED
                   if k in values and not math.isfinite(_value(values[k]))}
            skipped = "skipped" in values and _value(values["skipped"]) > 0
            if not bad and not skipped:
                self.consecutive_skips = 0
                continue
            what = ", ".join(f"{k} = {v}" for k, v in bad.items()) or "a non-finite value"
            who = f" ({role})" if role else ""
            if self.mode == "skip" and skipped:
                self.consecutive_skips += 1
                self.total_skips += 1
                log.warning("step %d%s: %s; the update was skipped (train.nonfinite='skip', %d "
                            "in a row)", step, who, what, self.consecutive_skips)
                if self.consecutive_skips > self.max_skipped:
                    raise NonFiniteError(
                        f"step {step}{who}: {what}; {self.consecutive_skips} consecutive steps "
                        f"were skipped (more than train.max_skipped_steps={self.max_skipped}): "
                        f"the run diverged{self._last_checkpoint()}")
                continue
            raise NonFiniteError(
                f"step {step}{who}: {what}: the run diverged and stopped before saving or "
                f"exporting this state{self._last_checkpoint()}. Lower optimizer.learning_rate, "
                "set optimizer.max_grad_norm, or set train.nonfinite='skip' to skip such steps")

    def _last_checkpoint(self) -> str:
        if self.checkpointer is None:
            return ""
        try:
            self.checkpointer.wait()
        except Exception:  # noqa: BLE001 - the divergence is the error to report
            pass
        steps = self.checkpointer.complete_steps()
        if not steps:
            return " (no checkpoint was saved yet)"
        return (f"; the last complete checkpoint is step {steps[-1]} in "
                f"{self.checkpointer.directory}")


__all__ = ["FiniteGuard", "NONFINITE_MODES"]
