"""What a loop needs to run the same way on every process of a multi-host run.

Multi-host JAX runs one Python program per host (or per process on one machine), each driving its
own devices of one global mesh. Every process must take the same branches, because a jitted
computation on global arrays is a collective that all of them join: a process that skips one (say,
because it alone saw a file or a signal) leaves the others waiting forever. So:

- **decisions** read from the local world (a file exists, a signal arrived) are agreed first:
  :func:`exists` and :func:`broadcast_from_main` take process 0's answer, :func:`agree_any` is
  True on every process when it is True on one (a SIGTERM on one host stops all);
- **files** are written once, by process 0 (:func:`is_main`); :func:`write_once` also waits until
  the file is there before any process goes on to read it;
- **host copies** of global arrays come from :func:`sgalm_jax.sharding.to_host`.

The workdir must be on storage every host sees (NFS, Filestore, a gcsfuse mount): process 0 writes
samples and metadata there that the others read back. On one process every helper is a plain local
operation (no collective, no compile).
"""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import jax
import numpy as np

T = TypeVar("T")


def is_main() -> bool:
    """Whether this is process 0, the one that writes files and logs."""
    return jax.process_index() == 0


def agree_any(flag: bool) -> bool:
    """True on every process if ``flag`` is True on any (e.g. a preemption signal on one host)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(bool(flag)))
    return bool(np.max(np.asarray(flags)))


def allgather(x: np.ndarray) -> np.ndarray:
    """Every process's ``x`` (same shape and dtype everywhere), stacked: ``[process_count, ...]``."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x))


def broadcast_from_main(value: T) -> T:
    """Process 0's ``value`` (a bool, or an int that fits in int32: JAX's default integer) on
    every process."""
    kind = type(value)
    if kind not in (bool, int):
        raise TypeError(f"broadcast_from_main: expected a bool or an int, got {kind.__name__}")
    if kind is int and not -2**31 <= value < 2**31:
        raise ValueError(f"broadcast_from_main: {value} does not fit in int32")
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    out = np.asarray(multihost_utils.broadcast_one_to_all(np.int32(value))).item()
    return kind(out)


def exists(path: str) -> bool:
    """``os.path.exists(path)`` as process 0 sees it, on every process (one agreed decision, even
    while a slow shared filesystem shows the file to some hosts and not yet to others)."""
    return broadcast_from_main(os.path.exists(path))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier called ``name``."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def write_once(fn: Callable[..., Any], *args: Any, name: str = "write_once", **kwargs: Any) -> None:
    """Run ``fn(*args, **kwargs)`` (which writes files) on process 0 only, then wait at a barrier,
    so that every process may read what it wrote as soon as this returns."""
    if is_main():
        fn(*args, **kwargs)
    barrier(name)
