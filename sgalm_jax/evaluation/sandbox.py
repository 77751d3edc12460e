"""Run untrusted Python programs (generated code + test asserts) and judge them outside the program.

Two layers, each independent of the untrusted process's cooperation:

1. **Isolation** (:mod:`sgalm_jax.evaluation.jail`). By default (``isolation="auto"``) each
   program runs in its own bubblewrap jail: new user/PID/network/IPC/UTS namespaces, an empty
   read-only root with only the interpreter and ``/usr`` bound read-only, no ``/proc`` or
   ``/sys``, a size-limited tmpfs scratch directory as the only writable place, no network, no
   capabilities. Inside, before the program starts, the bootstrap (``_sandbox_child.py``) sets
   resource limits (CPU seconds, address space, file size, open files) and a seccomp filter
   (no new processes or threads, no exec, no ptrace, no sockets, no signals to other processes,
   no namespace/mount/bpf/io_uring/keyring calls). Where bubblewrap is missing or cannot start,
   the **guarded** fallback runs the bootstrap directly: the same rlimits and seccomp filter, a
   fresh network namespace and an unprivileged uid per worker slot when root, and a Python audit
   hook against casual writes outside the working directory and reads of /proc and /sys; it
   does not hide the host's files from reading (weaker, and labelled so in every result).
2. **Verdicts** (:mod:`sgalm_jax.evaluation.verdict`). The tests are parsed here; the program and
   the test setup run in the sandbox, which returns only the plain values of the sub-expressions
   that need the program (each assert's ``f(args)``). Every comparison, ``set()``/``sorted()``/
   ``math.isclose`` and the truth of every assert is computed in this process, on freshly decoded
   built-in values. Nothing the program prints, patches or exits with can turn a failing assert
   into a pass.

``SandboxResult.isolation`` says which isolation was in force (``"bwrap:..."`` or
``"guarded:..."``); ``Sandbox.isolation`` is the mode. See docs/tasks_and_evaluation.md for the
threat model.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgalm_jax.evaluation.jail import SandboxUnavailable, jail_command, jail_status
from sgalm_jax.evaluation.verdict import (UnsupportedTest, VerdictError, decode_value, defined_names,
                                         judge, parse_source, plan_tests)

__all__ = ["ISOLATION_MODES", "Sandbox", "SandboxConfig", "SandboxResult", "SandboxUnavailable", "run_program"]

log = logging.getLogger(__name__)
ISOLATION_MODES = ("auto", "bwrap", "guarded")
ENV_ISOLATION = "SGALM_SANDBOX_ISOLATION"

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
    "collections.abc", "inspect", "ast", "tokenize", "token", "secrets", "tempfile",
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
            tree = parse_source(src)
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
    """Limits and isolation of one sandboxed run.

    Attributes:
      timeout_s: wall-clock limit; the jail (or process group) is killed when it expires.
      cpu_time_s: CPU-seconds limit (default: ceil(timeout_s)).
      memory_mb: address-space limit (RLIMIT_AS).
      file_size_mb: largest file the program may write (also caps captured stdout/stderr and
        the result channel).
      open_files: RLIMIT_NOFILE (guarded mode: also how many files may be opened for writing).
      written_files: guarded mode's audit hook: files the program may open for writing.
      processes: 1 = no threads; > 1 allows threads (new processes and exec are always refused
        by the seccomp filter). Also RLIMIT_NPROC.
      isolation: ``"auto"`` (bubblewrap when it works here, else the guarded fallback with a
        warning), ``"bwrap"`` (the jail or SandboxUnavailable) or ``"guarded"``. With ``"auto"``
        the environment variable ``SGALM_SANDBOX_ISOLATION`` may name the mode.
      scratch_mb: size of the jail's writable tmpfs.
      seccomp: install the seccomp filter (on by default; x86_64 and aarch64).
      drop_privileges: guarded mode as root: run as an unprivileged uid (``uid_base`` + slot).
      uid_base: first uid tried for worker slots (uids with a passwd entry or live processes are skipped).
      isolate_network: guarded mode: move the child into a new network namespace when possible.
      python: the interpreter (default: this one).
      site_packages: let programs import installed packages (default: standard library only,
        interpreter started with ``-S``).
      preload: guarded mode: modules imported before privileges drop (the interpreter's own
        files may be unreadable to the sandbox uid afterwards). Only names in ``SAFE_PRELOAD``.
      auto_preload: guarded mode: also preload the ``SAFE_PRELOAD`` modules the sources import.
      keep_output_chars: how much of stdout/stderr (tail) a result keeps.
    """

    timeout_s: float = 10.0
    cpu_time_s: int | None = None
    memory_mb: int = 1024
    file_size_mb: int = 16
    open_files: int = 64
    written_files: int = 64
    processes: int = 1
    isolation: str = "auto"
    scratch_mb: int = 64
    seccomp: bool = True
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
    """Outcome of one run. ``status`` is ``passed``, ``failed``, ``timeout`` or ``error`` (harness).

    ``passed`` is decided by the parent (:func:`sgalm_jax.evaluation.verdict.judge`);
    ``isolation`` names the mode in force and what the bootstrap set up, e.g.
    ``"bwrap:rlimits,seccomp"`` or ``"guarded:netns,uid=62000,rlimits,seccomp,audit-hook"``."""

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


def resolve_isolation(config: SandboxConfig) -> tuple[str, str]:
    """``(mode, why)``: the isolation a Sandbox with ``config`` uses here (``bwrap`` or ``guarded``).

    Raises SandboxUnavailable when ``bwrap`` is demanded (by the config or, with ``auto``, by
    ``SGALM_SANDBOX_ISOLATION=bwrap``) and cannot start."""
    want = config.isolation
    if want not in ISOLATION_MODES:
        raise SandboxUnavailable(f"SandboxConfig.isolation must be one of {ISOLATION_MODES}, not {want!r}")
    if want == "auto":
        env = os.environ.get(ENV_ISOLATION, "").strip().lower() or "auto"
        if env not in ISOLATION_MODES:
            raise SandboxUnavailable(f"{ENV_ISOLATION}={env!r}: must be one of {ISOLATION_MODES}")
        want = env
    if want == "guarded":
        return "guarded", "guarded mode requested"
    ok, why = jail_status(config.python or sys.executable, config.site_packages)
    if ok:
        return "bwrap", why
    if want == "bwrap":
        raise SandboxUnavailable(
            f"the bubblewrap jail was requested but {why}. Install bubblewrap (apt-get install bubblewrap; "
            "dnf install bubblewrap; conda install -c conda-forge bubblewrap) on a kernel with user namespaces, "
            f"or set isolation='guarded' / {ENV_ISOLATION}=guarded to accept the weaker fallback.")
    return "guarded", why


_warned: set[str] = set()


class Sandbox:
    """Runs programs with :class:`SandboxConfig` limits; :meth:`run_many` runs them in parallel.

    Args:
      config: the limits and isolation mode.
      max_workers: parallel runs (default: min(8, 2 x CPU count)). In guarded mode as root, each
        worker slot gets its own unprivileged uid.

    Attributes:
      isolation: ``"bwrap"`` or ``"guarded"``, the mode in force; ``isolation_reason`` says why.
    """

    def __init__(self, config: SandboxConfig | None = None, *, max_workers: int | None = None):
        self.config = config or SandboxConfig()
        self.max_workers = max_workers or max(1, min(8, 2 * (os.cpu_count() or 1)))
        self.python = self.config.python or sys.executable
        self.isolation, self.isolation_reason = resolve_isolation(self.config)
        if self.isolation == "guarded" and self.config.isolation == "auto" and self.isolation_reason not in _warned:
            _warned.add(self.isolation_reason)
            log.warning("sandbox: using the weaker guarded isolation (%s); programs can read the host's "
                        "files. Install bubblewrap for the jail (see docs/tasks_and_evaluation.md).", self.isolation_reason)
        self._root = os.geteuid() == 0
        self._slots: queue.Queue = queue.Queue()
        uids: list[int | None] = []
        self._lock_fds: list[int] = []
        if self.isolation == "guarded" and self._root and self.config.drop_privileges:
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
    def run(self, program: str, tests: str = "", names_under_test: Iterable[str] | None = None) -> SandboxResult:
        """Execute ``program``, then judge ``tests`` (setup statements and asserts).

        ``names_under_test``: the names that belong to the program side of the asserts (for a
        benchmark, those the *reference* solution defines); default: the names ``program``
        defines at top level. See :mod:`sgalm_jax.evaluation.verdict`."""
        uid = self._slots.get()
        try:
            for attempt in range(3):
                result = self._run(program, tests, uid, names_under_test)
                # "error": the bootstrap never reached the program (e.g. a transient failure to
                # create namespaces), so running it again is safe.
                if result.status != "error":
                    break
                time.sleep(0.05 * (attempt + 1))
            return result
        finally:
            self._slots.put(uid)

    def run_many(self, jobs: Sequence[tuple], *, progress: bool = False, desc: str = "sandbox") -> list[SandboxResult]:
        """Run ``(program, tests)`` or ``(program, tests, names_under_test)`` jobs in parallel
        (``max_workers`` at a time); results in input order."""
        results: list[SandboxResult | None] = [None] * len(jobs)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc=desc)
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            futures = {pool.submit(self.run, *job): i for i, job in enumerate(jobs)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [r for r in results if r is not None]

    def _payload(self, program: str, steps: list, tests: str, workdir: Path | None, uid: int | None, result_fd: int) -> dict:
        cfg = self.config
        payload: dict[str, Any] = {
            "program": program,
            "steps": steps,
            "result_fd": result_fd,
            "seccomp": cfg.seccomp,
            "limits": {
                "cpu_s": cfg.cpu_time_s or max(1, int(-(-cfg.timeout_s // 1))),
                "memory_bytes": cfg.memory_mb << 20,
                "file_size_bytes": cfg.file_size_mb << 20,
                "open_files": cfg.open_files,
                "processes": cfg.processes,
            },
        }
        if self.isolation == "guarded":
            payload["guarded"] = {
                "workdir": str(workdir),
                "uid": uid,
                "isolate_network": cfg.isolate_network,
                "audit_hook": True,
                "written_files": cfg.written_files,
                "preload": [
                    m for m in list(cfg.preload) + (imported_modules(program, tests) if cfg.auto_preload else [])
                    if m.split(".")[0] in SAFE_PRELOAD
                ],
            }
        return payload

    def _run(self, program: str, tests: str, uid: int | None, names_under_test: Iterable[str] | None) -> SandboxResult:
        cfg = self.config
        try:
            plan = plan_tests(tests, defined_names(program) if names_under_test is None else names_under_test)
        except UnsupportedTest as e:
            return SandboxResult(False, "failed", None, 0.0, f"tests cannot be judged: {e}", isolation=self.isolation)
        iodir = Path(tempfile.mkdtemp(prefix="sgalm_sbx_io_"))  # private (0700): payload, output, results
        workdir = None
        if self.isolation == "guarded":
            workdir = Path(tempfile.mkdtemp(prefix="sgalm_sbx_"))
            if uid is not None:
                os.chown(workdir, uid, uid)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        t0 = time.monotonic()
        timed_out = False
        proc = None
        rc: int | None = None
        try:
            rfd = os.open(iodir / "result", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
            try:
                payload = self._payload(program, plan.steps, tests, workdir, uid, rfd)
                (iodir / "in.json").write_text(json.dumps(payload), encoding="utf-8")
                if self.isolation == "bwrap":
                    cmd = jail_command(self.python, site_packages=cfg.site_packages, scratch_mb=cfg.scratch_mb, child=_CHILD)
                    cwd = str(iodir)
                else:
                    cmd = [self.python, "-I", "-B", *([] if cfg.site_packages else ["-S"]), str(_CHILD)]
                    env.update(HOME=str(workdir), TMPDIR=str(workdir))
                    cwd = str(workdir)
                with open(iodir / "in.json", "rb") as fin, open(iodir / "out", "wb") as fout, open(iodir / "err", "wb") as ferr:
                    try:
                        proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr, cwd=cwd, env=env,
                                                start_new_session=True, close_fds=True, pass_fds=(rfd,))
                    except OSError as e:
                        return SandboxResult(False, "error", None, 0.0, f"cannot start sandbox: {e}", isolation=self.isolation)
            finally:
                os.close(rfd)
            try:
                rc = proc.wait(timeout=cfg.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
        finally:
            if proc is not None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # bwrap (its PID namespace dies with it) or the process group
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    rc = proc.wait(timeout=5)
                except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL did not reap
                    pass
                if uid is not None:
                    _kill_uid(uid)  # guarded root mode: anything that left the process group dies too
            duration = time.monotonic() - t0
            out = _tail(iodir / "out", cfg.keep_output_chars)
            err = _tail(iodir / "err", cfg.keep_output_chars)
            records, malformed = _read_records(iodir / "result", (cfg.file_size_mb << 20) + (1 << 20))
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            shutil.rmtree(iodir, ignore_errors=True)
        return self._judge(plan, records, malformed, rc, timed_out, duration, out, err)

    def _judge(self, plan, records: list[dict], malformed: bool, rc: int | None, timed_out: bool, duration: float, out: str, err: str) -> SandboxResult:
        """The verdict, from the exit status and the probes' values only (see verdict.judge)."""
        cfg = self.config
        isolation = self.isolation
        values: dict[int, Any] = {}
        errors: dict[int, str] = {}
        failure = "malformed result channel" if malformed else None
        done = False
        for rec in records:
            if "isolation" in rec and isolation == self.isolation and isinstance(rec["isolation"], str):
                isolation = f"{self.isolation}:{rec['isolation'][:200]}"  # the first record, written before the program ran
            elif "probe" in rec:
                i = rec["probe"]
                if type(i) is not int or i not in plan.probe_sources or i in values or i in errors:
                    failure = failure or "malformed result channel (unknown or repeated probe)"
                    continue
                if "value" in rec:
                    try:
                        values[i] = decode_value(rec["value"])
                    except VerdictError as e:
                        errors[i] = f"{plan.probe_sources[i][:80]} is not plain data ({e})"
                    except RecursionError:
                        errors[i] = f"{plan.probe_sources[i][:80]} is nested too deeply"
                else:
                    errors[i] = f"{plan.probe_sources[i][:80]} raised {str(rec.get('error'))[:300]}"
            elif "error" in rec and failure is None:
                e = rec["error"]
                failure = f"{e.get('phase', '?')} failed: {str(e.get('message'))[:300]}" if isinstance(e, dict) else "failed"
            elif rec.get("done") is True:
                done = True
        if isolation == self.isolation and not timed_out:
            # No header: the bootstrap never reached the program (bwrap or the interpreter failed
            # to start). A harness error, not the program's failure.
            tail = err.strip().splitlines()[-1][-300:] if err.strip() else f"exit status {rc}"
            return SandboxResult(False, "error", rc, duration, f"sandbox did not start: {tail}", out, err, isolation)
        if timed_out:
            return SandboxResult(False, "timeout", rc, duration, f"wall-clock timeout ({cfg.timeout_s:g} s)", out, err, isolation)
        if rc is not None and rc < 0:
            sig = -rc
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            status = "timeout" if sig in (signal.SIGXCPU, signal.SIGKILL) and duration >= 0.9 * (cfg.cpu_time_s or cfg.timeout_s) else "failed"
            reason = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit"}.get(name, f"killed by {name}")
            return SandboxResult(False, status, rc, duration, reason, out, err, isolation)
        if failure is not None:
            return SandboxResult(False, "failed", rc, duration, failure, out, err, isolation)
        if rc != 0 or not done:
            why = f"exit status {rc}" if rc != 0 else "exited before the tests completed"
            tail = err.strip().splitlines()[-1][-300:] if err.strip() else ""
            return SandboxResult(False, "failed", rc, duration, f"{why}{': ' + tail if tail else ''}", out, err, isolation)
        passed, reason = judge(plan, values, errors)
        return SandboxResult(passed, "passed" if passed else "failed", rc, duration, reason, out, err, isolation,
                             extra={"asserts": len(plan.asserts)})


def _read_records(path: Path, cap: int) -> tuple[list[dict], bool]:
    """The result channel's JSON records and whether anything on it was malformed (a line that
    is not a JSON object, or more than ``cap`` bytes in all)."""
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except OSError:
        return [], False
    bad = len(data) > cap
    out = []
    for line in data[:cap].split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            bad = True
            continue
        if isinstance(rec, dict):
            out.append(rec)
        else:
            bad = True
    return out, bad


def run_program(program: str, tests: str = "", config: SandboxConfig | None = None,
                names_under_test: Iterable[str] | None = None) -> SandboxResult:
    """Convenience: run one program in a fresh single-worker :class:`Sandbox`."""
    return Sandbox(config, max_workers=1).run(program, tests, names_under_test)
