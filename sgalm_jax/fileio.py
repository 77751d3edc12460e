"""Safe file writes shared by every layer: atomic replacement, permissions from the umask, and
one-line descriptions of OS errors.

A leaf module like :mod:`sgalm_jax.errors` (it imports nothing from the package), so the model
export in :mod:`sgalm_jax.models.hf` and the training loops use the same helpers.

Why the mode fix: ``tempfile.mkstemp``/``mkdtemp`` (and some writers such as safetensors) create
files ``0600`` and folders ``0700`` whatever the umask, so an export renamed into place from a
temporary folder would be unreadable for a group sharing a cluster volume. :func:`apply_umask`
gives a finished file or tree the mode a plain ``open``/``mkdir`` would have given it.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import threading
from typing import Any

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # the portable way: set and restore (racy only against other threads)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything below it) the mode a plain ``open`` or
    ``mkdir`` would have: files ``0666 & ~umask``, folders ``0777 & ~umask``."""
    mask = current_umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    path = os.fspath(path)
    if not os.path.isdir(path):
        os.chmod(path, file_mode)
        return
    for root, dirs, files in os.walk(path):
        os.chmod(root, dir_mode)
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                os.chmod(full, file_mode)


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> str:
    """A fresh folder in ``parent`` (for write-then-rename), with the umask's mode, not 0700."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir=os.fspath(parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def atomic_write(path: str | os.PathLike, data: str | bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` all or nothing: a temporary file in the same folder, flushed
    (and fsynced), given the umask's mode, then renamed over ``path``.

    A crash or a full disk leaves the old file (or none), never a truncated one.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> None:
    """:func:`atomic_write` of ``json.dumps(obj, **dump_kwargs)`` plus a final newline."""
    atomic_write(path, json.dumps(obj, **dump_kwargs) + "\n")


def describe_os_error(e: OSError) -> str:
    """``"PATH: reason"`` for an OS error (``"PATH -> PATH2: reason"`` for a rename)."""
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        reason = "no space left on the device"
    elif e.errno == errno.EROFS:
        reason = "read-only file system"
    elif e.errno in (errno.EACCES, errno.EPERM):
        reason = "permission denied"
    elif e.errno == errno.ENOTDIR:
        reason = "a path component is a file, not a folder"
    elif e.errno == errno.EISDIR:
        reason = "is a folder, not a file"
    if e.filename is None:
        return reason
    where = os.fspath(e.filename)
    if e.filename2 is not None:
        where = f"{where} -> {os.fspath(e.filename2)}"
    return f"{where}: {reason}"


__all__ = ["apply_umask", "atomic_write", "atomic_write_json", "current_umask",
           "describe_os_error", "make_temp_dir"]
