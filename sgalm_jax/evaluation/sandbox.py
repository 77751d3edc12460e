"""Run untrusted Python programs (generated code + test asserts) in an isolated child process.

Each program runs in its own ``python -I -B`` process (see ``_sandbox_child.py``) with:

* a wall-clock timeout (the whole process group is SIGKILLed when it expires) and a CPU-time
  limit (RLIMIT_CPU);
* an address-space limit (RLIMIT_AS), a file-size limit (RLIMIT_FSIZE, which also caps the
  captured stdout/stderr), an open-files limit, a limit on files opened for writing, no core
  dumps, and RLIMIT_NPROC (no new processes or threads);
* when the evaluator runs as root: a fresh network namespace (no network at all) and an
  unprivileged uid/gid of its own per worker slot (so RLIMIT_NPROC is enforced, the program
  cannot signal the evaluator or touch root's files, and every leftover process of that uid is
  killed after the run); as a normal user, a user+network namespace when the kernel allows it;
* an audit hook that refuses process creation (fork/exec/spawn/subprocess/system), signals,
  sockets, ctypes, subinterpreters, writes outside the fresh temporary working directory,
  reads of /proc and /sys, and frame / garbage-collector introspection;
* a fresh temporary working directory (HOME and TMPDIR point there), removed afterwards.

A run *passes* only if the process exits with status 0 **and** the last line of its stdout is a
random nonce that the bootstrap prints after the program and all asserts completed. A program
that calls ``sys.exit(0)`` / ``os._exit(0)`` early, kills itself, swallows errors at exit or
prints a fake success line therefore fails. See docs/tasks_and_evaluation.md for the limits.
"""

from __future__ import annotations

import json
import os
import pwd
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

_CHILD = Path(__file__).with_name("_sandbox_child.py")

# Lazy imports some standard modules make at call time (they must be preloaded too, because
# after privileges drop the interpreter's own files may be unreadable).
_LAZY_DEPS = {
    "collections": ("copy", "heapq"),  # Counter.most_common, UserDict.copy
    "re": ("unicodedata",),  # \N{...} escapes
    "functools": ("types", "typing", "weakref"),  # singledispatch
    "operator": ("functools",),
    "types": ("functools",),
    "fractions": ("decimal",),
    "datetime": ("_strptime",),
    "time": ("_strptime",),
    "calendar": ("_strptime",),
}


# Only these standard modules (and their submodules) are ever imported *before* the sandbox is
# armed, whatever the program names: importing runs module code, and e.g. ``antigravity`` or
# ``_posixsubprocess`` must only ever be imported under the audit hook.
SAFE_PRELOAD = frozenset({
    "re", "math", "cmath", "collections", "heapq", "itertools", "functools", "operator", "array",
    "bisect", "copy", "copyreg", "datetime", "_strptime", "string", "random", "fractions",
    "decimal", "typing", "json", "struct", "textwrap", "unicodedata", "enum", "numbers",
    "calendar", "time", "io", "contextlib", "types", "keyword", "queue", "abc", "statistics",
    "dataclasses", "difflib", "pprint", "hashlib", "base64", "binascii", "weakref", "reprlib",
    "sys", "os", "locale", "zlib", "html", "csv", "graphlib", "fnmatch", "shlex", "string",
    "collections.abc", "inspect", "ast", "tokenize", "token", "secrets",
})


def imported_modules(*sources: str) -> list[str]:
    """Top-level module names imported anywhere in the sources (``import a.b`` gives ``a.b``).

    Uses the AST; a source that does not parse falls back to a line-based scan.
    """
    import ast
    import re

    names: list[str] = []
    for src in sources:
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            for m in re.finditer(r"^\s*(?:from\s+([\w.]+)\s+import|import\s+([\w., ]+))", src, re.M):
                for part in (m.group(1) or m.group(2)).split(","):
                    part = part.strip().split(" as ")[0].strip()
                    if part:
                        names.append(part)
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.append(node.module)
                names += [f"{node.module}.{a.name}" for a in node.names if a.name != "*"]
    out: list[str] = []
    for n in names:
        for m in (n, *_LAZY_DEPS.get(n.split(".")[0], ())):
            if m not in out:
                out.append(m)
    return out


@dataclass(frozen=True)
class SandboxConfig:
    """Limits of one sandboxed run.

    Attributes:
      timeout_s: wall-clock limit; the process group is killed when it expires.
      cpu_time_s: CPU-seconds limit (default: ceil(timeout_s)).
      memory_mb: address-space limit (RLIMIT_AS).
      file_size_mb: largest file the program may write (also caps captured stdout/stderr).
      open_files: RLIMIT_NOFILE.
      written_files: how many files the program may open for writing.
      processes: RLIMIT_NPROC (1 = no fork, no threads).
      drop_privileges: when root, run as an unprivileged uid (``uid_base`` + worker slot).
      uid_base: first uid tried for worker slots (uids with a passwd entry or live processes are skipped).
      isolate_network: move the child into a new network namespace when possible.
      python: the interpreter (default: this one).
      site_packages: let programs import installed packages (default: standard library only,
        interpreter started with ``-S``).
      preload: modules always imported before privileges drop (the interpreter's own files may
        be unreadable to the sandbox uid afterwards). Only names in ``SAFE_PRELOAD`` are used.
      auto_preload: also preload the modules the program and tests import (found by parsing
        them) when they are in ``SAFE_PRELOAD``; other imports happen under the sandbox's rules
        (and may fail where the interpreter's files are unreadable to the sandbox uid).
      keep_output_chars: how much of stdout/stderr (tail) a result keeps.
    """

    timeout_s: float = 10.0
    cpu_time_s: int | None = None
    memory_mb: int = 1024
    file_size_mb: int = 16
    open_files: int = 64
    written_files: int = 64
    processes: int = 1
    drop_privileges: bool = True
    uid_base: int = 62000
    isolate_network: bool = True
    python: str | None = None
    site_packages: bool = False
    preload: tuple[str, ...] = ()
    auto_preload: bool = True
    keep_output_chars: int = 2000


@dataclass
class SandboxResult:
    """Outcome of one run. ``status`` is ``passed``, ``failed``, ``timeout`` or ``error`` (harness)."""

    passed: bool
    status: str
    returncode: int | None
    duration_s: float
    reason: str
    stdout: str = ""
    stderr: str = ""
    isolation: str = ""
    extra: dict = field(default_factory=dict)


def _uid_in_use(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        pass
    return bool(_pids_of_uid(uid))


def _pids_of_uid(uid: int) -> list[int]:
    """Pids whose real uid is ``uid`` (from /proc)."""
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", encoding="ascii", errors="replace") as f:
                zombie = False
                for line in f:
                    if line.startswith("State:"):
                        zombie = line.split()[1] in ("Z", "X")
                    elif line.startswith("Uid:"):
                        if int(line.split()[1]) == uid and not zombie:
                            out.append(int(name))
                        break
        except (OSError, ValueError, IndexError):
            continue
    return out


def _kill_uid(uid: int) -> int:
    """SIGKILL every process of ``uid`` until none is left (never called with our own uid)."""
    if uid == os.getuid() or uid == 0:
        return 0
    killed = 0
    for _ in range(50):
        pids = _pids_of_uid(uid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    return killed


def _tail(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max(n * 4, 4096)))
            data = f.read()
    except OSError:
        return ""
    return data.decode("utf-8", "replace")[-n:]


class Sandbox:
    """Runs programs with :class:`SandboxConfig` limits; :meth:`run_many` runs them in parallel.

    Args:
      config: the limits.
      max_workers: parallel runs (default: min(8, 2 x CPU count)). As root, each worker slot
        gets its own unprivileged uid.
    """

    def __init__(self, config: SandboxConfig | None = None, *, max_workers: int | None = None):
        self.config = config or SandboxConfig()
        self.max_workers = max_workers or max(1, min(8, 2 * (os.cpu_count() or 1)))
        self.python = self.config.python or sys.executable
        self._root = os.geteuid() == 0
        self._slots: queue.Queue = queue.Queue()
        uids: list[int | None] = []
        self._lock_fds: list[int] = []
        if self._root and self.config.drop_privileges:
            uid = self.config.uid_base
            while len(uids) < self.max_workers and uid < self.config.uid_base + 10_000:
                if not _uid_in_use(uid) and self._claim(uid):
                    uids.append(uid)
                uid += 1
        while len(uids) < self.max_workers:
            uids.append(None)
        for u in uids:
            self._slots.put(u)

    def _claim(self, uid: int) -> bool:
        """Hold an exclusive lock on ``uid`` for this Sandbox's lifetime, so that two sandboxes
        (in this or another process) never share a uid and kill each other's programs."""
        import fcntl

        path = os.path.join(tempfile.gettempdir(), f"sgalm_sandbox_uid_{uid}.lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fds.append(fd)
        return True

    def close(self) -> None:
        """Release the uid locks (also done when the Sandbox is garbage-collected)."""
        for fd in getattr(self, "_lock_fds", []):
            try:
                os.close(fd)
            except OSError:
                pass
        self._lock_fds = []

    def __del__(self) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ run
    def run(self, program: str, tests: str = "") -> SandboxResult:
        """Execute ``program`` then ``tests`` (asserts) in one fresh sandboxed process."""
        uid = self._slots.get()
        try:
            return self._run(program, tests, uid)
        finally:
            self._slots.put(uid)

    def run_many(self, jobs: Sequence[tuple[str, str]], *, progress: bool = False, desc: str = "sandbox") -> list[SandboxResult]:
        """Run ``(program, tests)`` jobs in parallel (``max_workers`` at a time), in input order."""
        results: list[SandboxResult | None] = [None] * len(jobs)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc=desc)
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            futures = {pool.submit(self.run, p, t): i for i, (p, t) in enumerate(jobs)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [r for r in results if r is not None]

    def _run(self, program: str, tests: str, uid: int | None) -> SandboxResult:
        cfg = self.config
        nonce = secrets.token_hex(16)
        iodir = Path(tempfile.mkdtemp(prefix="sgalm_sbx_io_"))  # private (0700): payload, captured output
        workdir = Path(tempfile.mkdtemp(prefix="sgalm_sbx_"))
        gid = uid
        if uid is not None:
            os.chown(workdir, uid, gid)
        payload = {
            "nonce": nonce,
            "program": program,
            "tests": tests,
            "workdir": str(workdir),
            "uid": uid,
            "gid": gid,
            "isolate_network": cfg.isolate_network,
            "preload": [
                m for m in list(cfg.preload) + (imported_modules(program, tests) if cfg.auto_preload else [])
                if m.split(".")[0] in SAFE_PRELOAD
            ],
            "limits": {
                "cpu_s": cfg.cpu_time_s or max(1, int(-(-cfg.timeout_s // 1))),
                "memory_bytes": cfg.memory_mb << 20,
                "file_size_bytes": cfg.file_size_mb << 20,
                "open_files": cfg.open_files,
                "written_files": cfg.written_files,
                "processes": cfg.processes,
            },
        }
        (iodir / "in.json").write_text(json.dumps(payload), encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(workdir), "TMPDIR": str(workdir)}
        t0 = time.monotonic()
        timed_out = False
        proc = None
        rc: int | None = None
        try:
            with open(iodir / "in.json", "rb") as fin, open(iodir / "out", "wb") as fout, open(iodir / "err", "wb") as ferr:
                try:
                    proc = subprocess.Popen(
                        [self.python, "-I", "-B", *([] if cfg.site_packages else ["-S"]), str(_CHILD)],
                        stdin=fin, stdout=fout, stderr=ferr, cwd=workdir, env=env,
                        start_new_session=True, close_fds=True,
                    )
                except OSError as e:
                    return SandboxResult(False, "error", None, 0.0, f"cannot start sandbox: {e}")
                try:
                    rc = proc.wait(timeout=cfg.timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
        finally:
            if proc is not None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole session/group, leftovers included
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    rc = proc.wait(timeout=5)
                except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL did not reap
                    pass
                if uid is not None:
                    _kill_uid(uid)  # anything that left the process group (setsid) dies too
            duration = time.monotonic() - t0
            out = _tail(iodir / "out", cfg.keep_output_chars + 64)
            err = _tail(iodir / "err", cfg.keep_output_chars)
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.rmtree(iodir, ignore_errors=True)
        return self._judge(nonce, rc, timed_out, duration, out, err)

    def _judge(self, nonce: str, rc: int | None, timed_out: bool, duration: float, out: str, err: str) -> SandboxResult:
        isolation = ""
        lines = []
        for line in err.splitlines():
            if line.startswith("[sandbox] isolation: ") and not isolation:
                isolation = line.split(": ", 1)[1].strip()
            else:
                lines.append(line)
        err = "\n".join(lines)
        out_lines = [ln for ln in out.splitlines() if ln.strip()]
        last = out_lines[-1].strip() if out_lines else ""
        stdout = "\n".join(out_lines[:-1] if last == nonce else out_lines)[-self.config.keep_output_chars:]
        if timed_out:
            return SandboxResult(False, "timeout", rc, duration, f"wall-clock timeout ({self.config.timeout_s:g} s)", stdout, err, isolation)
        if rc is not None and rc < 0:
            sig = -rc
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            status = "timeout" if sig in (signal.SIGXCPU, signal.SIGKILL) and duration >= 0.9 * (self.config.cpu_time_s or self.config.timeout_s) else "failed"
            reason = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit"}.get(name, f"killed by {name}")
            return SandboxResult(False, status, rc, duration, reason, stdout, err, isolation)
        if rc == 0 and last == nonce:
            return SandboxResult(True, "passed", rc, duration, "ok", stdout, err, isolation)
        if rc == 0:
            reason = "exited with status 0 before the tests completed (no success nonce)"
        else:
            fails = [ln for ln in lines if ln.startswith("[sandbox] ") and "failed" in ln]
            reason = fails[-1][len("[sandbox] "):] if fails else (lines[-1][-300:] if lines else f"exit status {rc}")
        return SandboxResult(False, "failed", rc, duration, reason, stdout, err, isolation)


def run_program(program: str, tests: str = "", config: SandboxConfig | None = None) -> SandboxResult:
    """Convenience: run one program in a fresh single-worker :class:`Sandbox`."""
    return Sandbox(config, max_workers=1).run(program, tests)
