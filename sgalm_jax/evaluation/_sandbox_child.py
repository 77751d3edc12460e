"""Bootstrap of one sandboxed program run. Executed as ``python -I -B _sandbox_child.py``.

This file must stay self-contained (standard library only, no sgalm_jax imports): it runs in a
fresh interpreter that will execute untrusted code. The parent (``sandbox.py``) gives it a JSON
payload on stdin (a private file, closed after reading) and judges the run by its exit status and
the last line of stdout, which must be the payload's random nonce.

Order of operations (everything before step 6 is trusted code):
  1. read the payload, close stdin;
  2. pre-import the standard modules programs commonly need (after dropping root, the
     interpreter's own files may no longer be readable);
  3. when root: move into a new network namespace (no interfaces but a down loopback), then drop
     to the unprivileged sandbox uid/gid with no supplementary groups;
  4. set resource limits: CPU seconds, address space, file size, open files, processes, no core;
  5. install an audit hook that refuses process creation, signals to other processes, sockets,
     ctypes, subinterpreters, writes outside the working directory, reading /proc and /sys,
     frame/garbage-collector introspection (so the nonce cannot be found), limit changes;
  6. run the program, then the tests, in one fresh namespace;
  7. only if both complete: print the nonce as the last line and ``os._exit(0)``. Any exception,
     ``SystemExit`` included, exits with status 1 without printing it.
"""

import json
import os
import sys


def _main() -> None:
    payload = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    try:
        os.close(0)
    except OSError:
        pass
    sys.stdin = open(os.devnull)  # noqa: SIM115 - lives until exit
    nonce = payload.pop("nonce").encode("ascii")
    program, tests = payload.pop("program"), payload.pop("tests")
    workdir = os.path.realpath(payload["workdir"])
    os.chdir(workdir)

    # 2. Pre-import (as the starting user) so programs can use them after privileges drop.
    import importlib

    for mod in payload.get("preload", []):
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001 - an optional module may be missing
            pass
    import resource
    import signal

    isolation = []
    # 3. Network namespace and privilege drop (only possible as root).
    if payload.get("isolate_network"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            flags = 0x40000000  # CLONE_NEWNET
            if os.geteuid() != 0:
                flags |= 0x10000000  # CLONE_NEWUSER: unprivileged users may create a netns inside it
            if libc.unshare(flags) == 0:
                isolation.append("netns")
            del libc
        except Exception:  # noqa: BLE001
            pass
        sys.modules.pop("ctypes", None)
        sys.modules.pop("_ctypes", None)
    uid, gid = payload.get("uid"), payload.get("gid")
    if uid is not None and os.geteuid() == 0:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        isolation.append(f"uid={uid}")

    # 4. Resource limits.
    lim = payload["limits"]

    def setlim(which: int, value: int) -> None:
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass

    cpu = int(lim["cpu_s"])
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    except (ValueError, OSError):
        pass
    setlim(resource.RLIMIT_AS, int(lim["memory_bytes"]))
    setlim(resource.RLIMIT_FSIZE, int(lim["file_size_bytes"]))
    setlim(resource.RLIMIT_NOFILE, int(lim["open_files"]))
    setlim(resource.RLIMIT_CORE, 0)
    setlim(resource.RLIMIT_NPROC, int(lim["processes"]))
    isolation.append("rlimits")
    # A program must not install signal handlers: a handler receives the interrupted frame.
    blocked_signal = _blocked("signal.signal")
    signal.signal = blocked_signal
    sys.modules["_signal"].signal = blocked_signal
    sys.stderr.write("[sandbox] isolation: " + ",".join(isolation) + "\n")
    sys.stderr.flush()

    # 5. The audit hook (cannot be removed once added).
    sys.addaudithook(_make_hook(workdir, int(lim["written_files"])))

    # 6. Run. Compile first so a syntax error is reported as such.
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    for phase, src in (("program", program), ("tests", tests)):
        try:
            code = compile(src, f"<{phase}>", "exec")
            exec(code, ns)  # noqa: S102 - this is the sandbox
        except BaseException as e:  # noqa: BLE001 - SystemExit / KeyboardInterrupt are failures too
            _fail(phase, e)
    # 7. Success: the nonce is the last line, then exit at once (no atexit handlers, threads).
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001
        pass
    os.write(1, b"\n" + nonce + b"\n")
    os._exit(0)


class SandboxViolation(PermissionError, ValueError):
    """Raised for a refused operation. Also a ValueError, because standard-library code that
    introspects frames (namedtuple, enum, typing) tolerates ValueError and carries on."""


def _blocked(what: str):
    def blocked(*args, **kwargs):
        raise SandboxViolation(f"sandbox: {what} is not allowed")

    return blocked


def _fail(phase: str, e: BaseException) -> None:
    """Report a failure without tracebacks (tb_frame access is refused by the hook) and exit 1."""
    try:
        name = type(e).__name__
        # The traceback's first entry is this bootstrap's exec(); the second is the statement of
        # the program/tests that raised (tb_lineno needs no frame access).
        lines = []
        tb = e.__traceback__
        while tb is not None:
            lines.append(tb.tb_lineno)
            tb = tb.tb_next
        line = lines[1] if len(lines) > 1 else None
        if isinstance(e, SyntaxError):
            line = e.lineno
        msg = str(e)[:300] if not isinstance(e, SystemExit) else f"exit status {e.code!r}"
        os.write(2, f"[sandbox] {phase} failed: {name}{' line ' + str(line) if line else ''}: {msg}\n".encode("utf-8", "replace"))
    except BaseException:  # noqa: BLE001
        os.write(2, f"[sandbox] {phase} failed\n".encode())
    os._exit(1)


_DENY_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
    "os.killpg", "subprocess.Popen", "pty.spawn", "socket.__new__", "socket.connect",
    "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
    "sys._getframe", "sys._current_frames", "sys._current_exceptions", "sys.settrace",
    "sys.setprofile", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "resource.setrlimit", "resource.prlimit", "os.chroot", "os.setxattr", "os.removexattr",
    "cpython.PyInterpreterState_New",
    "os.startfile", "webbrowser.open", "urllib.Request", "ftplib.connect", "smtplib.connect",
    "http.client.connect", "telnetlib.Telnet.open", "imaplib.open", "poplib.connect", "nntplib.connect",
})
_DENY_MODULES = frozenset({
    "ctypes", "_ctypes", "cffi", "_posixsubprocess", "_xxsubinterpreters", "_xxinterpchannels",
    "_testcapi", "_testinternalcapi", "_testmultiphase", "_xxtestfuzz", "multiprocessing",
    "_multiprocessing", "pty",
})
_PATH_EVENTS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
    "os.symlink": (0, 1), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
    "shutil.rmtree": (0,), "shutil.move": (0, 1), "shutil.copyfile": (1,), "shutil.copytree": (1,),
    "os.mkfifo": (0,), "os.mknod": (0,),
}
_FRAME_ATTRS = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back", "gi_yieldfrom", "cr_await"})


def _make_hook(workdir: str, max_written: int):
    """An audit hook enforcing the sandbox rules (see module docstring)."""
    realpath, fspath, join, getcwd = os.path.realpath, os.fsdecode, os.path.join, os.getcwd
    prefix = workdir.rstrip("/") + "/"
    state = {"written": 0}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    sys_modules = sys.modules

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # an already-open descriptor
        try:
            p = fspath(path)
        except TypeError:
            return False
        if p in ("/dev/null",):
            return True
        full = realpath(p if p.startswith("/") else join(getcwd(), p))
        return full == workdir or full.startswith(prefix)

    def hook(event: str, args: tuple) -> None:
        if event in _DENY_EVENTS or event.startswith("ctypes."):
            raise SandboxViolation(f"sandbox: {event} is not allowed")
        if event == "import":
            name = args[0] if args else ""
            if isinstance(name, str) and name.split(".")[0] in _DENY_MODULES and name not in sys_modules:
                raise SandboxViolation(f"sandbox: importing {name} is not allowed")
            return
        if event == "object.__getattr__":
            if len(args) > 1 and args[1] in _FRAME_ATTRS:
                raise SandboxViolation(f"sandbox: access to {args[1]} is not allowed")
            return
        if event == "open":
            path, mode = args[0], args[1] if len(args) > 1 else None
            flags = args[2] if len(args) > 2 else 0
            if isinstance(path, (str, bytes)):
                p = fspath(path)
                if p.startswith(("/proc", "/sys", "/dev/mem", "/dev/kmem", "/dev/port")) and p != "/proc/self/fd":
                    raise SandboxViolation(f"sandbox: reading {p} is not allowed")
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & write_flags
            )
            if writing:
                if not inside(path):
                    raise SandboxViolation(f"sandbox: writing outside the working directory ({path!r})")
                state["written"] += 1
                if state["written"] > max_written:
                    raise SandboxViolation("sandbox: too many files opened for writing")
            return
        idx = _PATH_EVENTS.get(event)
        if idx is not None:
            for i in idx:
                if i < len(args) and args[i] is not None and not inside(args[i]):
                    raise SandboxViolation(f"sandbox: {event} outside the working directory")

    return hook


if __name__ == "__main__":
    _main()
