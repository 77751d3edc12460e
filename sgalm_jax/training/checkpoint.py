"""Orbax checkpoints with resume, and preemption (SIGTERM) handling.

A checkpoint holds one pytree (``state``: e.g. ``TrainState.to_dict()``, or a dict of several
roles' states) and a JSON dict (``meta``: step, data-iterator position, anything else a loop needs
to resume). Saves are asynchronous (training continues while the arrays are written) and atomic:
Orbax writes to a temporary directory and renames it when complete, so a run killed mid-save
resumes from the previous complete checkpoint. Only the last ``keep`` are kept.

Preemption: :class:`PreemptionGuard` turns SIGTERM into a flag the loop polls after each step; the
loop then saves (``force=True``), waits for the write and exits cleanly. On several hosts the flag
is agreed at every step boundary (an all-gather of one flag per process, plus JAX's preemption
sync point where the runtime provides one), so a SIGTERM delivered to one host makes every host
save the same step and stop.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

from sgalm_jax.errors import CheckpointError

log = logging.getLogger(__name__)

# Test hook: "sigkill@7" / "sigterm@5" makes the process send itself that signal right after the
# given step (after its checkpoint save was started), to test crash and preemption recovery.
FAULT_ENV = "SGALM_FAULT_INJECT"


class Checkpointer:
    """A thin layer over ``ocp.CheckpointManager`` for ``(state pytree, meta dict)`` checkpoints."""

    def __init__(self, directory: str, *, every_steps: int = 0, keep: int = 2,
                 async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.every_steps = int(every_steps)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,  # the loop decides when (should_save); the manager just saves
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # remove half-written saves of a killed run
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------------ queries
    def latest_step(self) -> int | None:
        """The latest *complete* checkpoint's step (None when there is none), as process 0 sees
        it: every process of a multi-host run resumes from the same step."""
        from sgalm_jax.training.multihost import broadcast_from_main

        step = self.manager.latest_step()
        step = broadcast_from_main(-1 if step is None else int(step))
        return None if step < 0 else step

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether ``step`` (optimizer steps done) is a multiple of ``every_steps``."""
        return self.every_steps > 0 and step > 0 and step % self.every_steps == 0

    # ------------------------------------------------------------------ save / restore
    def save(self, step: int, state: Any, meta: dict[str, Any] | None = None) -> bool:
        """Start saving ``state`` and ``meta`` at ``step`` (returns at once when async)."""
        from sgalm_jax.training.multihost import broadcast_from_main

        meta = dict(meta or {})
        meta.setdefault("step", int(step))
        # Saving is a collective: every process must skip (or not) together, on process 0's view.
        if broadcast_from_main(step in self.manager.all_steps()):
            return False
        saved = self.manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        if saved:
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore ``(state, meta)`` at ``step`` (default: latest) into ``target``'s structure.

        ``target`` is a pytree of ``jax.ShapeDtypeStruct`` (with shardings: arrays are read
        straight into them) or of arrays.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to restore")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                              meta=ocp.args.JsonRestore()))
        except Exception as e:  # structure or shape mismatch, unreadable files, ...
            raise CheckpointError(
                f"{self.directory}/{step}: cannot restore the checkpoint into this run's state "
                f"({type(e).__name__}: {e})") from e
        return restored.state, dict(restored.meta or {})

    def wait(self) -> None:
        """Block until every started save is complete on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PreemptionGuard:
    """Context manager turning SIGTERM into a flag (``requested``) polled at step boundaries."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self._flag = threading.Event()
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        log.warning("received signal %d: saving a checkpoint at the end of this step, then "
                    "exiting", signum)
        self._flag.set()

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def request(self) -> None:
        """Ask for a save-and-exit at the next step boundary (what SIGTERM does)."""
        self._flag.set()

    def should_stop(self, step: int) -> bool:
        """True when this step should be the last (a signal arrived, on any host)."""
        from sgalm_jax.training.multihost import agree_any

        local = self._flag.is_set()
        if jax.process_count() > 1:
            # JAX's preemption service (TPU maintenance events) answers the same on every process.
            try:
                from jax.experimental import multihost_utils

                local = local or bool(multihost_utils.reached_preemption_sync_point(step))
            except Exception:  # no preemption service (e.g. manual multi-process launch)
                pass
        # Every process must stop (and save) at the same step: a signal on one host stops all.
        return agree_any(local)


def inject_fault(step: int) -> None:
    """If ``$SGALM_FAULT_INJECT`` is ``sigkill@N`` or ``sigterm@N`` and ``step == N``, send it."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    try:
        kind, at = spec.split("@")
        at = int(at)
    except ValueError:
        raise CheckpointError(f"${FAULT_ENV}={spec!r}: expected 'sigkill@STEP' or "
                              "'sigterm@STEP'") from None
    if step != at:
        return
    sig = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM}.get(kind.lower())
    if sig is None:
        raise CheckpointError(f"${FAULT_ENV}={spec!r}: unknown signal {kind!r}")
    log.warning("fault injection: sending %s to myself after step %d", kind, step)
    os.kill(os.getpid(), sig)
