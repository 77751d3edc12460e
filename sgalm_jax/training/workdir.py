"""The run directory: checked before anything is written, and locked so that one run at a time
trains into it.

:func:`check_workdir` turns the ways a run directory can be unusable into one
:class:`~sgalm_jax.errors.WorkdirError` naming the path: a file where the folder should be, a
folder that cannot be created or written (read-only file system, permissions), a ``config.json``
that is a folder, a ``checkpoints`` that is a file.

:class:`WorkdirLock` holds ``fcntl.flock`` on ``workdir/run.lock`` for the run's lifetime. The
kernel drops the lock when the process ends however it ends (exception, SIGKILL, OOM kill), so a
crashed run never leaves the directory stuck; a second run started in the same directory fails at
once with the first one's pid and host (written into the lock file). ``flock`` is advisory and
local to one machine's kernel on some network file systems; multi-host runs take it on process 0.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from typing import Any

from sgalm_jax.errors import WorkdirError
from sgalm_jax.fileio import describe_os_error

LOCK_NAME = "run.lock"
# Entries of a run directory that must be folders, and those that must be files.
_FOLDERS = ("checkpoints", "export")
_FILES = ("config.json", "metrics.jsonl")


def check_workdir(workdir: str) -> None:
    """Create ``workdir`` if needed and check it is a writable folder with a sane layout.

    Raises WorkdirError naming the path at fault (nothing is written but the folder itself).
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"{workdir}: the run directory (workdir) is a file, not a folder")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"workdir: cannot create the run directory: "
                           f"{describe_os_error(e)}") from None
    for name in _FOLDERS:
        p = os.path.join(workdir, name)
        if os.path.exists(p) and not os.path.isdir(p):
            raise WorkdirError(f"{p}: expected a folder (the run's {name}), found a file; move it "
                               "away or use another workdir")
    for name in _FILES:
        p = os.path.join(workdir, name)
        if os.path.isdir(p):
            raise WorkdirError(f"{p}: expected a file (the run's {name}), found a folder; move it "
                               "away or use another workdir")


class WorkdirLock:
    """An exclusive, non-blocking ``flock`` on ``workdir/run.lock`` (context manager).

    ``acquire`` raises WorkdirError when another process holds it (naming its pid and host) or
    when the directory is not writable (naming the path and the reason).
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        try:
            # No O_TRUNC: the holder's pid/host must survive a failed attempt to read them.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise WorkdirError(f"workdir: the run directory is not writable: "
                               f"{describe_os_error(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = holder or "holder unknown"
                raise WorkdirError(
                    f"{self.workdir}: another run is using this workdir ({holder}); wait for it "
                    f"to finish or choose another workdir (lock file {self.path})") from None
            raise WorkdirError(f"{self.path}: cannot lock the run directory "
                               f"({describe_os_error(e)})") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (f"pid {os.getpid()} on host {socket.gethostname()}, since "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode(), 0)
        except OSError as e:  # e.g. a full disk: the lock itself holds, report it anyway
            os.close(fd)
            raise WorkdirError(f"workdir: cannot write the lock file: "
                               f"{describe_os_error(e)}") from None
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays: deleting it would race with a run taking it)."""
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


__all__ = ["LOCK_NAME", "WorkdirLock", "check_workdir"]
