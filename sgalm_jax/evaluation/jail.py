"""The OS-level jail of sandboxed runs: bubblewrap (``bwrap``), found on PATH and probed once.

Each program runs inside ``bwrap`` with

* new user, PID, network, IPC, UTS (and cgroup, where possible) namespaces, nested user
  namespaces disabled (bwrap >= 0.8), all capabilities dropped, ``no_new_privs``, a new session
  (no terminal injection), killed with its parent;
* a filesystem that is an empty read-only root holding only read-only binds of ``/usr`` (and
  ``/lib*``/``/bin`` as on the host), the interpreter's installation and the bootstrap script, a
  minimal read-only ``/dev`` (null, zero, urandom...) and a size-limited tmpfs ``/scratch`` (the
  working directory, HOME and TMPDIR; ``/tmp`` points there) that vanishes with the jail. There
  is **no** ``/proc`` and **no** ``/sys``, no host ``/etc``, ``/home``, ``/root``, ``/tmp``, no
  sockets of the host (the network namespace has only a down loopback, and abstract unix sockets
  are per network namespace);
* environment cleared (HOME/TMPDIR/PATH/LANG only).

Inside, the bootstrap (``_sandbox_child.py``) adds resource limits and a seccomp filter before
the program runs (no new processes or exec, no ptrace, no sockets, no signals to others...).

Installing bubblewrap: ``apt-get install bubblewrap`` (Debian/Ubuntu), ``dnf install bubblewrap``,
``conda install -c conda-forge bubblewrap``; it needs unprivileged user namespaces
(``/proc/sys/user/max_user_namespaces`` > 0; on Ubuntu >= 23.10 AppArmor must allow them for
bwrap, which Ubuntu's own bwrap package does) or root.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

from sgalm_jax.errors import SgalmError

SCRATCH = "/scratch"
CHILD_IN_JAIL = "/sandbox/child.py"
_HOST_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")


class SandboxUnavailable(SgalmError):
    """The requested isolation cannot be had on this machine (the message says how to get it)."""


def bwrap_path() -> str | None:
    """The bubblewrap executable, or None."""
    return shutil.which("bwrap") or next((p for p in ("/usr/bin/bwrap", "/usr/local/bin/bwrap") if os.access(p, os.X_OK)), None)


@functools.lru_cache(maxsize=8)
def _bwrap_features(bwrap: str) -> frozenset[str]:
    try:
        text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(f for f in ("--disable-userns", "--size", "--unshare-cgroup-try", "--remount-ro") if f in text)


@functools.lru_cache(maxsize=8)
def interpreter_paths(python: str) -> tuple[str, str, str]:
    """``(base_prefix, prefix, executable)`` of ``python``, real paths."""
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        return (os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix), python)
    out = subprocess.run(
        [python, "-I", "-S", "-c", "import os, sys; print(os.path.realpath(sys.base_prefix)); print(os.path.realpath(sys.prefix))"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.split("\n")
    return (out[0], out[1], python)


def _covered(path: str, binds: list[str]) -> bool:
    return any(path == b or path.startswith(b.rstrip("/") + "/") for b in binds)


def jail_command(
    python: str, *, site_packages: bool = False, scratch_mb: int = 64, child: str | os.PathLike | None = None,
    command: list[str] | None = None,
) -> list[str]:
    """The ``bwrap`` argv that runs the bootstrap (or ``command``) in the jail described above."""
    bwrap = bwrap_path()
    if bwrap is None:
        raise SandboxUnavailable("bubblewrap (bwrap) is not installed")
    feats = _bwrap_features(bwrap)
    base, prefix, exe = interpreter_paths(python)
    args = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
    if "--unshare-cgroup-try" in feats:
        args.append("--unshare-cgroup-try")
    if "--disable-userns" in feats:
        args.append("--disable-userns")
    args += ["--die-with-parent", "--new-session", "--uid", "65534", "--gid", "65534", "--hostname", "sandbox"]
    if os.geteuid() == 0:
        args += ["--cap-drop", "ALL"]
    binds: list[str] = []
    for d in _HOST_DIRS:
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
            binds.append(d)
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for p in (base, prefix if site_packages else None):
        if p and not _covered(p, binds):
            args += ["--ro-bind", p, p]
            binds.append(p)
    exe_real = os.path.realpath(exe)
    if not _covered(exe_real, binds):
        args += ["--ro-bind", exe_real, exe_real]
    run = exe if site_packages else exe_real  # a venv's python only matters for its site-packages
    args += ["--dev", "/dev"]
    if "--size" in feats:
        args += ["--size", str(int(scratch_mb) << 20)]
    args += ["--tmpfs", SCRATCH, "--symlink", SCRATCH, "/tmp", "--chdir", SCRATCH]
    if child is not None:
        args += ["--ro-bind", str(child), CHILD_IN_JAIL]
    if "--remount-ro" in feats:
        args += ["--remount-ro", "/", "--remount-ro", "/dev"]
    args += ["--clearenv", "--setenv", "HOME", SCRATCH, "--setenv", "TMPDIR", SCRATCH, "--setenv", "PATH", "/usr/bin:/bin",
             "--setenv", "LANG", "C.UTF-8", "--setenv", "LC_ALL", "C.UTF-8", "--"]
    if command is not None:
        return args + command
    return args + [run, "-I", "-B", *([] if site_packages else ["-S"]), CHILD_IN_JAIL]


@functools.lru_cache(maxsize=8)
def jail_status(python: str, site_packages: bool = False) -> tuple[bool, str]:
    """``(usable, reason)``: whether the jail starts here (probed once per interpreter)."""
    if not sys.platform.startswith("linux"):
        return False, "bubblewrap jails need Linux"
    if bwrap_path() is None:
        return False, "bubblewrap (bwrap) is not installed (apt-get install bubblewrap)"
    try:
        base, _, exe = interpreter_paths(python)
        cmd = jail_command(python, site_packages=site_packages, command=[
            exe if site_packages else os.path.realpath(exe), "-I", "-S", "-c",
            "import os, sys; sys.exit(0 if not os.path.exists('/proc/self') and os.getcwd() == '/scratch' else 7)"])
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError, SandboxUnavailable) as e:
        return False, f"bubblewrap cannot start: {e}"
    if p.returncode != 0:
        msg = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        return False, f"bubblewrap cannot start a jail here: {msg}"
    return True, f"bubblewrap {Path(bwrap_path() or '').name} ok"
