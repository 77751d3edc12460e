"""Orbax checkpoints with resume, checksums, and preemption (SIGTERM) handling.

A checkpoint holds one pytree (``state``: e.g. ``TrainState.to_dict()``, or a dict of several
roles' states) and a JSON dict (``meta``: step, data-iterator position, anything else a loop needs
to resume). Saves are asynchronous (training continues while the arrays are written) and atomic:
Orbax writes to a temporary directory and renames it when complete, so a run killed mid-save
resumes from the previous complete checkpoint. Only the last ``keep`` are kept.

Integrity: each complete checkpoint carries a SHA-256 manifest (:mod:`.checksums`), written
before Orbax renames it into place (async saves) or right after the save (sync). ``restore``
verifies it first; a corrupt checkpoint raises :class:`CheckpointError` naming the step and file,
or with ``on_corrupt="previous"`` is moved aside (``<step>.corrupt``) and the previous intact one
is restored instead.

Failures: a save is refused up front when the file system has less free space than the state's
size (naming both); a save that fails anyway (disk full, permissions) surfaces as one
:class:`CheckpointError` naming the directory, with the earlier checkpoints untouched (Orbax
deletes old steps only after a new one is complete). :meth:`Checkpointer.close` shuts Orbax's
background threads down even after a failed save, and :func:`close_all` closes every checkpointer
still open (``main`` calls it on every error path), so no thread prints a traceback after the
error message.

Preemption: :class:`PreemptionGuard` turns SIGTERM into a flag the loop polls after each step; the
loop then saves (``force=True``), waits for the write and exits cleanly. On several hosts the flag
is agreed at every step boundary (an all-gather of one flag per process, plus JAX's preemption
sync point where the runtime provides one), so a SIGTERM delivered to one host makes every host
save the same step and stop.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import sys
import threading
import time
import weakref
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sgalm_jax.errors import CheckpointError
from sgalm_jax.fileio import describe_os_error
from sgalm_jax.training import checksums

log = logging.getLogger(__name__)

# Test hook: "sigkill@7" / "sigterm@5" makes the process send itself that signal right after the
# given step (after its checkpoint save was started), to test crash and preemption recovery.
FAULT_ENV = "SGALM_FAULT_INJECT"
ON_CORRUPT = ("error", "previous")
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_OPEN: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()


def _cause(e: BaseException) -> str:
    """The first line of an exception, without Orbax's and tensorstore's long prefixes."""
    if isinstance(e, OSError) and e.errno is not None:
        return describe_os_error(e)
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "No space left on device" in str(e):
        return "no space left on the device"
    if "Read-only file system" in str(e):
        return "read-only file system"
    if "Permission denied" in str(e):
        return "permission denied"
    return f"{type(e).__name__}: {text[:300]}"


def state_nbytes(state: Any) -> int:
    """Bytes of the array leaves of ``state`` (their global sizes)."""
    total = 0
    for x in jax.tree.leaves(state):
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            total += int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    return total


class Checkpointer:
    """A thin layer over ``ocp.CheckpointManager`` for ``(state pytree, meta dict)`` checkpoints.

    ``on_corrupt``: what :meth:`restore` does with a checkpoint whose checksums do not match:
    ``"error"`` (raise, naming it) or ``"previous"`` (move it aside and restore the latest intact
    earlier one). ``checksums=False`` writes and verifies no manifests.
    """

    def __init__(self, directory: str, *, every_steps: int = 0, keep: int = 2,
                 async_save: bool = True, on_corrupt: str = "error", checksums: bool = True):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt={on_corrupt!r} is not one of {list(ON_CORRUPT)}")
        _quiet_orbax_failures()
        self.directory = os.path.abspath(directory)
        self.every_steps = int(every_steps)
        self.on_corrupt = on_corrupt
        self.checksums = bool(checksums)
        self.async_save = bool(async_save)
        self._inflight: int | None = None
        self._closed = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,  # the loop decides when (should_save); the manager just saves
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # remove half-written saves of a killed run
            async_options=(ocp.AsyncOptions(post_finalization_callback=self._seal_inflight)
                           if async_save and checksums else None),
        )
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"{self.directory}: the checkpoint folder is a file")
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise CheckpointError(f"{self.directory}: cannot open the checkpoint folder "
                                  f"({describe_os_error(e)})") from None
        _OPEN.add(self)

    @classmethod
    def from_config(cls, directory: str, checkpoint_cfg: Any) -> "Checkpointer":
        """From the ``checkpoint`` config section (every_steps, keep, async_save, on_corrupt,
        checksums)."""
        return cls(directory, every_steps=checkpoint_cfg.every_steps, keep=checkpoint_cfg.keep,
                   async_save=checkpoint_cfg.async_save, on_corrupt=checkpoint_cfg.on_corrupt,
                   checksums=checkpoint_cfg.checksums)

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

    def complete_steps(self) -> list[int]:
        """Steps whose checkpoint folder is complete on disk (renamed into place), ascending."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return sorted(int(n) for n in names
                      if n.isdigit() and os.path.isdir(os.path.join(self.directory, n)))

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def should_save(self, step: int) -> bool:
        """Whether ``step`` (optimizer steps done) is a multiple of ``every_steps``."""
        return self.every_steps > 0 and step > 0 and step % self.every_steps == 0

    # ------------------------------------------------------------------ save
    def _check_space(self, step: int, state: Any) -> None:
        from sgalm_jax.training.multihost import agree_any

        need = state_nbytes(state)
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            free = None
        # Only a save that cannot fit even compressed is refused here (OCDBT compresses; a
        # write that fails anyway is reported by wait()/save() the same way). Every process
        # refuses when one lacks the space: the save is a collective.
        short = bool(need) and free is not None and free < need // 4
        if agree_any(short):
            latest = self.complete_steps()
            if not short:
                raise CheckpointError(f"{self.directory}: another process of this run has not "
                                      f"enough free space to save step {step} (see its error)")
            raise CheckpointError(
                f"{self.directory}: not enough free space to save step {step}: it needs about "
                f"{need / 2**20:.1f} MiB uncompressed, the file system has {free / 2**20:.1f} MiB free"
                + (f"; the last complete checkpoint (step {latest[-1]}) is intact" if latest
                   else ""))

    def save(self, step: int, state: Any, meta: dict[str, Any] | None = None) -> bool:
        """Start saving ``state`` and ``meta`` at ``step`` (returns at once when async)."""
        from sgalm_jax.training.multihost import broadcast_from_main

        meta = dict(meta or {})
        meta.setdefault("step", int(step))
        self.wait()  # the previous save first (Orbax would wait anyway); errors surface here
        # Saving is a collective: every process must skip (or not) together, on process 0's view.
        if broadcast_from_main(step in self.manager.all_steps()):
            return False
        self._check_space(step, state)
        self._inflight = int(step)
        try:
            saved = self.manager.save(
                int(step),
                args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(meta)),
                force=True,
            )
        except Exception as e:  # noqa: BLE001 - Orbax raises ValueError/OSError/... for I/O
            self._inflight = None
            raise self._save_error(step, e) from None
        if saved:
            log.info("checkpoint: saving step %d to %s", step, self.directory)
            if not self.async_save:
                self._inflight = None
                self._seal(step)
        return saved

    def _save_error(self, step: int | None, e: BaseException) -> CheckpointError:
        latest = [s for s in self.complete_steps() if s != step]
        what = f"step {step}" if step is not None else "a checkpoint"
        return CheckpointError(
            f"{self.directory}: saving {what} failed ({_cause(e)})"
            + (f"; the last complete checkpoint (step {latest[-1]}) is intact" if latest else ""))

    def _seal(self, step: int) -> None:
        """Write the manifest of a complete (renamed) checkpoint, on process 0."""
        if not self.checksums or jax.process_index() != 0:
            return
        folder = self.step_dir(step)
        try:
            checksums.write_manifest(folder)
        except OSError as e:
            raise CheckpointError(f"{folder}: cannot write the checksum manifest "
                                  f"({describe_os_error(e)})") from None

    def _seal_inflight(self) -> None:
        """Orbax's post-finalization callback (background thread): hash the finished files and
        write the manifest into the folder before Orbax renames it into place, so that the
        manifest appears atomically with the checkpoint."""
        step = self._inflight
        if step is None or jax.process_index() != 0:
            return
        final = self.step_dir(step)
        tmp = sorted(glob.glob(glob.escape(final) + _TMP_SUFFIX + "*"))
        folder = tmp[-1] if tmp else final
        checksums.write_manifest(folder)  # an error here fails the save (reported by wait())

    # ------------------------------------------------------------------ restore
    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore ``(state, meta)`` at ``step`` (default: latest) into ``target``'s structure.

        ``target`` is a pytree of ``jax.ShapeDtypeStruct`` (with shardings: arrays are read
        straight into them) or of arrays. The checkpoint's checksums are verified first (see the
        class docstring for ``on_corrupt``); ``meta["step"]`` is the step actually restored.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to restore")
        step = self._verified(int(step))
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                              meta=ocp.args.JsonRestore()))
        except Exception as e:  # structure or shape mismatch, unreadable files, ...
            raise CheckpointError(
                f"{self.directory}/{step}: cannot restore the checkpoint into this run's state "
                f"({type(e).__name__}: {e})") from e
        meta = dict(restored.meta or {})
        meta.setdefault("step", step)
        return restored.state, meta

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of checkpoint ``step`` (default: latest) without reading its arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to read")
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(f"{self.directory}/{step}: cannot read the checkpoint's "
                                  f"metadata ({type(e).__name__}: {e})") from e
        return dict(restored.meta or {})

    def _verified(self, step: int) -> int:
        """``step`` if its checksums match, else (on_corrupt="previous") the latest intact
        earlier step; raises CheckpointError otherwise. On several hosts, process 0 verifies (and
        moves corrupt folders aside) and broadcasts the step every process then restores."""
        if not self.checksums:
            return step
        if jax.process_count() == 1:
            return self._verified_here(step)
        from jax.experimental import multihost_utils

        chosen, error = -1, ""
        if jax.process_index() == 0:
            try:
                chosen = self._verified_here(step)
            except CheckpointError as e:
                error = str(e)
        chosen = int(multihost_utils.broadcast_one_to_all(np.int32(chosen)))
        self.manager.reload()  # process 0 may have moved a corrupt step aside
        if chosen < 0:
            raise CheckpointError(error or f"{self.directory}: no intact checkpoint at or before "
                                  f"step {step} (see process 0's error)")
        return chosen

    def _verified_here(self, step: int) -> int:
        candidates = [s for s in self.complete_steps() if s <= step] or [step]
        for s in reversed(candidates):
            folder = self.step_dir(s)
            if not checksums.has_manifest(folder):
                log.warning("checkpoint %s has no checksum manifest (written by an older version, "
                            "or the run stopped right after saving it): restoring it unverified",
                            folder)
                return s
            problem = checksums.verify_manifest(folder)
            if problem is None:
                if s != step:
                    log.warning("restoring step %d instead of the corrupt step %d "
                                "(checkpoint.on_corrupt='previous')", s, step)
                return s
            msg = f"{folder}: the checkpoint of step {s} is corrupt ({problem})"
            if self.on_corrupt != "previous":
                raise CheckpointError(
                    msg + "; set checkpoint.on_corrupt='previous' to resume from the previous "
                    "complete checkpoint, or move this one away")
            aside = self._move_aside(s)
            log.warning("%s; moved it to %s and trying the previous checkpoint", msg, aside)
        raise CheckpointError(f"{self.directory}: no intact checkpoint at or before step {step} "
                              "(the corrupt ones were moved to <step>.corrupt)")

    def _move_aside(self, step: int) -> str:
        src = self.step_dir(step)
        dst = f"{src}.corrupt"
        if os.path.exists(dst):
            dst = f"{src}.corrupt-{int(time.time())}"
        try:
            os.rename(src, dst)
        except OSError as e:
            raise CheckpointError(f"{src}: corrupt, and cannot be moved aside "
                                  f"({describe_os_error(e)})") from None
        self.manager.reload()
        return dst

    # ------------------------------------------------------------------ lifecycle
    def wait(self) -> None:
        """Block until every started save is complete on disk; CheckpointError if one failed."""
        step = self._inflight
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._inflight = None
            raise self._save_error(step, e) from None
        self._inflight = None

    def close(self) -> None:
        """Wait for pending saves, then stop Orbax's threads (also after a failed save)."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        try:
            self.wait()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        try:
            self.manager.close()
            return
        except Exception:  # noqa: BLE001 - the failed save re-raises; close the parts directly
            pass
        m = self.manager
        for part in ("_checkpointer", "_non_blocking_metadata_store", "_blocking_metadata_store",
                     "_checkpoint_deleter"):
            obj = getattr(m, part, None)
            try:
                if obj is not None:
                    obj.close()
            except Exception:  # noqa: BLE001
                pass

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an error is already on its way: close quietly, never mask it
            self.close()
        except Exception as e:  # noqa: BLE001
            log.debug("closing %s after an error: %s", self.directory, e)


def close_all() -> None:
    """Close every Checkpointer still open, quietly (``main`` calls this on error paths)."""
    for ckpt in list(_OPEN):
        try:
            ckpt.close()
        except Exception as e:  # noqa: BLE001
            log.debug("closing %s: %s", ckpt.directory, e)


# ---------------------------------------------------------------------------- Orbax noise
class _OrbaxErrorFilter(logging.Filter):
    """Orbax logs a failed background save several times, each with a full traceback, before
    :class:`Checkpointer` reports it once as a CheckpointError. Keep those at DEBUG level only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and _from_orbax(record):
            log.debug("orbax: %s", record.getMessage().splitlines()[0][:500])
            return False
        return True


def _from_orbax(record: logging.LogRecord) -> bool:
    """Whether Orbax logged ``record``: by its source file, by a caller on the current stack (the
    filter runs in the logging thread; ``pathname`` is absl's own file when absl's logger was
    created before ``absl.logging`` was imported), or by its message (asyncio's reports)."""
    if "orbax" in record.pathname or "orbax" in str(record.getMessage()):
        return True
    frame = sys._getframe(1)
    while frame is not None:
        if "orbax" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


_QUIET = False


def _quiet_orbax_failures() -> None:
    """Install the filter above (absl and asyncio loggers) and an unraisable hook that drops the
    "Event loop is closed" errors tensorstore callbacks raise after a failed async write (and
    coroutine finalisers at interpreter exit). Other unraisable errors are passed on."""
    global _QUIET
    if _QUIET:
        return
    _QUIET = True
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_OrbaxErrorFilter())
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        text = str(exc)
        if (isinstance(exc, RuntimeError) and "Event loop is closed" in text) or (
                isinstance(exc, ImportError) and "shutting down" in text) or (
                "orbax" in repr(unraisable.object)):
            return
        previous(unraisable)

    sys.unraisablehook = hook


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


def inject_fault(step: int, point: str = "") -> None:
    """If ``$SGALM_FAULT_INJECT`` is ``sigkill@N`` or ``sigterm@N`` and ``step == N``, send it.

    Loops call this at the end of each step; a call with a ``point`` name (e.g. GAD's
    ``after_d``, between its two updates) fires only for ``sigkill@N:point``, so tests can kill a
    run in the middle of a step.
    """
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    try:
        kind, at = spec.split("@")
        at, _, where = at.partition(":")
        at = int(at)
    except ValueError:
        raise CheckpointError(f"${FAULT_ENV}={spec!r}: expected 'sigkill@STEP', "
                              "'sigterm@STEP' or 'sigkill@STEP:POINT'") from None
    if step != at or where != point:
        return
    sig = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM}.get(kind.lower())
    if sig is None:
        raise CheckpointError(f"${FAULT_ENV}={spec!r}: unknown signal {kind!r}")
    log.warning("fault injection: sending %s to myself after step %d%s", kind, step,
                f" ({point})" if point else "")
    os.kill(os.getpid(), sig)
