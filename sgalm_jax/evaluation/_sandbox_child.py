"""Bootstrap of one sandboxed program run. Executed as ``python -I -B [-S] _sandbox_child.py``.

This file must stay self-contained (standard library only, no sgalm_jax imports): it runs in a
fresh interpreter that will execute untrusted code, possibly inside a bubblewrap jail where
nothing else of the package is visible.

Trust model: everything this bootstrap does *before* the untrusted program starts is trusted and
kernel-enforced where it matters (namespaces from the jail, resource limits, a seccomp filter, no
new privileges). Nothing after that is trusted: the program can rewrite this module, the
encoder, the result channel. The parent (``sandbox.py`` / ``verdict.py``) therefore never asks
this process *whether* a test passed; it only reads the plain values that the program's
expressions evaluated to ("probes"), decodes them strictly (plain built-in types only) and
decides every assert itself.

The parent sends a JSON payload on stdin (a private file, closed after reading):
  ``program``        source of the program under test;
  ``steps``          ``[["exec", src] | ["probe", index, src, "value"|"truth"], ...]`` run in order after the
                     program in the same namespace (test setup statements and the untrusted
                     sub-expressions of the asserts);
  ``result_fd``      an inherited descriptor on which one JSON record per line is written;
  ``limits``, ``seccomp``, ``guarded``...: see ``_main``.

Records: ``{"isolation": ...}`` first, then ``{"probe": i, "value": <encoded>}`` or
``{"probe": i, "error": "..."}`` per probe, ``{"error": {...}}`` when the program or a setup
statement raised (the run stops there), and ``{"done": true}`` last.
"""

import json
import os
import sys

# ------------------------------------------------------------------------------------ encoding
# The value encoding read by ``sgalm_jax.evaluation.plain_values.decode_value``:
#   null / true / false / JSON string / JSON integer (|v| < 2**53)  -> None / bool / str / int
#   ["int", hex] ["float", float.hex] ["complex", re_hex, im_hex] ["bytes", hex] ["bytearray", hex]
#   ["list"|"tuple"|"set"|"frozenset"|"deque"|"iter"|"keys"|"values", [items]]
#   ["dict"|"OrderedDict"|"Counter"|"defaultdict"|"items", [[k, v], ...]]
#   ["Decimal", str] ["Fraction", enc(num), enc(den)] ["range", start, stop, step] ["type", name]
MAX_DEPTH = 100
MAX_NODES = 1_000_000
MAX_ITER = 100_000
MAX_CHARS = 8_000_000


class EncodeError(Exception):
    """A value that is not plain data (custom class, too deep, too large...)."""


_ITER_TYPES = frozenset({
    "generator", "map", "filter", "zip", "enumerate", "reversed", "list_iterator", "tuple_iterator",
    "range_iterator", "str_iterator", "set_iterator", "dict_keyiterator", "dict_valueiterator",
    "dict_itemiterator", "list_reverseiterator", "callable_iterator", "bytes_iterator",
    "accumulate", "chain", "combinations", "combinations_with_replacement", "compress", "count",
    "cycle", "dropwhile", "filterfalse", "groupby", "islice", "pairwise", "permutations", "product",
    "repeat", "starmap", "takewhile", "zip_longest", "batched", "_tee",
})
_TYPE_NAMES = frozenset({"int", "float", "str", "bool", "list", "tuple", "dict", "set", "frozenset",
                         "bytes", "complex", "NoneType", "bytearray", "range"})


def encode(value, _depth=0, _budget=None):
    """``value`` as JSON-able data of the encoding above, or EncodeError.

    Exact types only (``type(v) is int``), so subclasses with custom ``__eq__`` and other
    classes are refused; iterators of the standard library are materialised (at most
    ``MAX_ITER`` items); named tuples become plain tuples (their content is what is compared)."""
    if _budget is None:
        _budget = [MAX_NODES, MAX_CHARS]
    _budget[0] -= 1
    if _budget[0] < 0:
        raise EncodeError("value too large")
    if _depth > MAX_DEPTH:
        raise EncodeError("value nested too deeply")
    t = type(value)
    d = _depth + 1
    if value is None or t is bool:
        return value
    if t is int:
        if -(1 << 53) < value < (1 << 53):
            return value
        h = hex(value)
        _spend(_budget, len(h))
        return ["int", h]
    if t is float:
        return ["float", value.hex()]
    if t is str:
        _spend(_budget, len(value))
        return value
    if t is complex:
        return ["complex", value.real.hex(), value.imag.hex()]
    if t is bytes or t is bytearray:
        _spend(_budget, 2 * len(value))
        return [t.__name__, value.hex()]
    if t is list or t is tuple or t is set or t is frozenset:
        return [t.__name__, [encode(v, d, _budget) for v in value]]
    if t is dict:
        return ["dict", [[encode(k, d, _budget), encode(v, d, _budget)] for k, v in value.items()]]
    if t is range:
        return ["range", value.start, value.stop, value.step]
    if t is type and value.__name__ in _TYPE_NAMES and value.__module__ == "builtins":
        return ["type", value.__name__]
    mod, name = getattr(t, "__module__", ""), getattr(t, "__name__", "")
    if mod == "collections" and name in ("OrderedDict", "Counter", "defaultdict"):
        return [name, [[encode(k, d, _budget), encode(v, d, _budget)] for k, v in dict.items(value)]]
    if mod == "collections" and name == "deque":
        return ["deque", [encode(v, d, _budget) for v in value]]
    if mod == "decimal" and name == "Decimal":
        return ["Decimal", str(value)]
    if mod == "fractions" and name == "Fraction":
        return ["Fraction", encode(value.numerator, d, _budget), encode(value.denominator, d, _budget)]
    if t.__mro__[1:] == (tuple, object) and isinstance(getattr(t, "_fields", None), tuple):
        return ["tuple", [encode(v, d, _budget) for v in tuple.__iter__(value)]]  # a named tuple
    if name in ("dict_keys", "dict_values", "dict_items") and mod == "builtins":
        if name == "dict_items":
            return ["items", [[encode(k, d, _budget), encode(v, d, _budget)] for k, v in value]]
        return [name[5:], [encode(v, d, _budget) for v in value]]
    if name in _ITER_TYPES and mod in ("builtins", "itertools"):
        items = []
        for v in value:
            if len(items) >= MAX_ITER:
                raise EncodeError(f"iterator longer than {MAX_ITER} items")
            items.append(encode(v, d, _budget))
        return ["iter", items]
    raise EncodeError(f"values of type {mod}.{name} are not plain data")


def _spend(budget, n):
    budget[1] -= n
    if budget[1] < 0:
        raise EncodeError("value too large")


# ------------------------------------------------------------------------------------ seccomp
# Syscalls refused with EPERM (numbers for x86_64 and for the generic table used by aarch64).
_DENY = {
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "kcmp": (312, 272), "pidfd_open": (434, 434), "pidfd_getfd": (438, 438),
    "pidfd_send_signal": (424, 424), "socket": (41, 198), "socketpair": (53, 199),
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "chroot": (161, 51), "open_tree": (428, 428), "move_mount": (429, 429),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "mount_setattr": (442, 442), "bpf": (321, 280), "perf_event_open": (298, 241),
    "userfaultfd": (323, 282), "keyctl": (250, 219), "add_key": (248, 217),
    "request_key": (249, 218), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "reboot": (169, 142), "swapon": (167, 224), "swapoff": (168, 225), "acct": (163, 89),
    "quotactl": (179, 60), "syslog": (103, 116), "personality": (135, 92),
    "lookup_dcookie": (212, 18), "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
    "vhangup": (153, 58), "settimeofday": (164, 170), "clock_settime": (227, 112),
    "adjtimex": (159, 171), "clock_adjtime": (305, 266), "memfd_create": (319, 279),
    "memfd_secret": (447, 447), "process_madvise": (440, 440), "setpriority": (141, 140),
    "ioprio_set": (251, 30), "sched_setaffinity": (203, 122), "sched_setscheduler": (144, 119),
    "sched_setparam": (142, 118), "sched_setattr": (314, 274), "migrate_pages": (256, 238),
    "move_pages": (279, 239), "fanotify_init": (300, 262), "execve": (59, 221),
    "execveat": (322, 281), "iopl": (172, None), "ioperm": (173, None), "modify_ldt": (154, None),
    "uselib": (134, None), "fork": (57, None), "vfork": (58, None),
}
# Allowed only when their first argument is 0 or this process (signals to itself, own limits).
_SELF_ONLY = {"kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131),
              "rt_sigqueueinfo": (129, 138), "rt_tgsigqueueinfo": (297, 240), "prlimit64": (302, 261)}
_CLONE, _CLONE3 = (56, 220), (435, 435)
_ARCHES = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}
_CLONE_THREAD = 0x00010000


def seccomp_program(pid: int, allow_threads: bool, machine: str | None = None) -> bytes:
    """A classic-BPF seccomp filter (``struct sock_filter[]``) for this machine's architecture.

    Refuses with EPERM: new processes (fork/vfork, clone without CLONE_THREAD; threads only when
    ``allow_threads``), exec, ptrace and cross-process memory access, sockets, namespaces and
    mounts, signals and prlimit aimed at other processes, kernel-facing calls (bpf, perf,
    io_uring, keyrings, modules, userfaultfd, memfd...). clone3 answers ENOSYS so that libc falls
    back to clone, whose flags a filter can read. Another architecture in the same process
    (e.g. x32 or i386 calls on x86_64) is killed.
    """
    import struct

    machine = machine or os.uname().machine
    if machine not in _ARCHES:
        raise OSError(f"no seccomp syscall table for {machine}")
    arch, col = _ARCHES[machine]
    LD, JEQ, JGE, RET, AND = 0x20, 0x15, 0x35, 0x06, 0x54  # ld w abs, jeq k, jge k, ret k, alu and k
    ALLOW, KILL = 0x7FFF0000, 0x80000000
    EPERM, ENOSYS = 0x00050000 | 1, 0x00050000 | 38
    prog: list[tuple[int, int, int, int]] = []

    def ins(code, k, jt=0, jf=0):
        prog.append((code, jt, jf, k))

    ins(LD, 4)  # seccomp_data.arch
    ins(JEQ, arch, 1, 0)
    ins(RET, KILL)
    ins(LD, 0)  # seccomp_data.nr
    if machine == "x86_64":
        ins(JGE, 0x40000000, 0, 1)  # x32 ABI
        ins(RET, KILL)
    for nums in _DENY.values():
        if nums[col] is not None:
            ins(JEQ, nums[col], 0, 1)
            ins(RET, EPERM)
    ins(JEQ, _CLONE3[col], 0, 1)
    ins(RET, ENOSYS)
    # clone(flags, ...): allowed only with CLONE_THREAD (and only when threads are allowed).
    ins(JEQ, _CLONE[col], 0, 5 if allow_threads else 1)
    if allow_threads:
        ins(LD, 16)  # args[0], low 32 bits
        ins(AND, _CLONE_THREAD)
        ins(JEQ, _CLONE_THREAD, 1, 0)
        ins(RET, EPERM)
        ins(RET, ALLOW)
    else:
        ins(RET, EPERM)
    for nums in _SELF_ONLY.values():
        # nr == n: allowed when args[0] is 0 or this pid (high word 0), else EPERM.
        ins(JEQ, nums[col], 0, 7)
        ins(LD, 20)  # args[0], high 32 bits
        ins(JEQ, 0, 0, 3)
        ins(LD, 16)  # args[0], low 32 bits
        ins(JEQ, 0, 2, 0)
        ins(JEQ, pid, 1, 0)
        ins(RET, EPERM)
        ins(RET, ALLOW)
    ins(RET, ALLOW)
    return b"".join(struct.pack("HBBI", c, jt, jf, k) for c, jt, jf, k in prog)


def install_seccomp(program: bytes) -> None:
    """no_new_privs + the filter (irreversible for this process and anything it could start)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    fprog = SockFprog(len(program) // 8, program)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


# ------------------------------------------------------------------------------------ main
def _write_record(fd: int, record: dict) -> None:
    data = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8", "replace")
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _describe(e: BaseException, probe: bool = False) -> str:
    try:
        if isinstance(e, SystemExit):
            return f"SystemExit: exit status {e.code!r}"
        if probe:
            return f"{type(e).__name__}: {str(e)[:300]}"
        line = None
        tb = e.__traceback__
        lines = []
        while tb is not None:
            lines.append(tb.tb_lineno)
            tb = tb.tb_next
        if len(lines) > 1:
            line = lines[1]
        if isinstance(e, SyntaxError):
            line = e.lineno
        return f"{type(e).__name__}{' line ' + str(line) if line else ''}: {str(e)[:300]}"
    except BaseException:  # noqa: BLE001 - a hostile exception's __str__
        return "exception"


def _main() -> None:
    payload = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    try:
        os.close(0)
    except OSError:
        pass
    sys.stdin = open(os.devnull)  # noqa: SIM115 - lives until exit
    out = int(payload["result_fd"])
    program, steps = payload.pop("program"), payload.pop("steps")
    guarded = payload.get("guarded")
    lim = payload["limits"]
    isolation: list[str] = []

    import resource

    filt, filt_error = None, None
    if payload.get("seccomp", True):
        try:  # built and ctypes loaded now: after a privilege drop the stdlib may be unreadable
            filt = seccomp_program(os.getpid(), allow_threads=int(lim["processes"]) > 1)
            import ctypes  # noqa: F401
        except Exception as e:  # noqa: BLE001
            filt_error = e
    if guarded:
        os.chdir(os.path.realpath(guarded["workdir"]))
        # Pre-import (as the starting user) what programs commonly need: after privileges drop,
        # the interpreter's own files may no longer be readable.
        import importlib

        for mod in guarded.get("preload", []):
            try:
                importlib.import_module(mod)
            except Exception:  # noqa: BLE001 - an optional module may be missing
                pass
        if guarded.get("isolate_network"):
            try:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                flags = 0x40000000  # CLONE_NEWNET
                if os.geteuid() != 0:
                    flags |= 0x10000000  # CLONE_NEWUSER: unprivileged users may create a netns inside it
                if libc.unshare(flags) == 0:
                    isolation.append("netns")
            except Exception:  # noqa: BLE001
                pass
        uid = guarded.get("uid")
        if uid is not None and os.geteuid() == 0:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            isolation.append(f"uid={uid}")

    def setlim(which: int, soft: int, hard: int | None = None) -> None:
        try:
            resource.setrlimit(which, (soft, soft if hard is None else hard))
        except (ValueError, OSError):
            pass

    cpu = int(lim["cpu_s"])
    setlim(resource.RLIMIT_CPU, cpu, cpu + 1)
    setlim(resource.RLIMIT_AS, int(lim["memory_bytes"]))
    setlim(resource.RLIMIT_FSIZE, int(lim["file_size_bytes"]))
    setlim(resource.RLIMIT_NOFILE, int(lim["open_files"]))
    setlim(resource.RLIMIT_CORE, 0)
    setlim(resource.RLIMIT_NPROC, int(lim["processes"]))
    isolation.append("rlimits")
    if payload.get("seccomp", True):
        try:
            if filt is None:
                raise filt_error or OSError("no filter")
            install_seccomp(filt)
            isolation.append("seccomp")
        except Exception as e:  # noqa: BLE001 - reported; the parent decides whether it may run
            isolation.append(f"no-seccomp({e})")
            if payload.get("require_seccomp"):
                _write_record(out, {"isolation": ",".join(isolation)})
                os._exit(3)
    if guarded and guarded.get("audit_hook", True):
        sys.addaudithook(_make_hook(os.getcwd(), int(lim["open_files"])))
        isolation.append("audit-hook")
    _write_record(out, {"isolation": ",".join(isolation)})

    # ---------------------------------------------------------------- untrusted from here on
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(program, "<program>", "exec"), ns)  # noqa: S102 - this is the sandbox
    except BaseException as e:  # noqa: BLE001 - SystemExit / KeyboardInterrupt are failures too
        _write_record(out, {"error": {"phase": "program", "message": _describe(e)}})
        os._exit(1)
    for step in steps:
        if step[0] == "exec":
            try:
                exec(compile(step[1], "<tests>", "exec"), ns)  # noqa: S102
            except BaseException as e:  # noqa: BLE001
                _write_record(out, {"error": {"phase": "tests", "message": _describe(e)}})
                os._exit(1)
            continue
        index, src = step[1], step[2]
        try:
            value = eval(compile(src, "<tests>", "eval"), ns)  # noqa: S307
            if step[3] == "truth":  # only its truth value is asserted
                value = bool(value)
            record = {"probe": index, "value": encode(value)}
        except BaseException as e:  # noqa: BLE001
            record = {"probe": index, "error": _describe(e, probe=True)}
        _write_record(out, record)
    _write_record(out, {"done": True})
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        pass
    os._exit(0)


# ------------------------------------------------------------------- guarded mode audit hook
class SandboxViolation(PermissionError, ValueError):
    """Raised for a refused operation (guarded mode's in-process hook; not a security boundary)."""


_DENY_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
    "os.killpg", "subprocess.Popen", "pty.spawn", "socket.__new__", "socket.connect",
    "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
    "resource.setrlimit", "resource.prlimit", "os.chroot", "os.setxattr", "os.removexattr",
    "cpython.PyInterpreterState_New", "os.startfile", "webbrowser.open", "urllib.Request",
})
_DENY_MODULES = frozenset({"ctypes", "_ctypes", "cffi", "_posixsubprocess", "_xxsubinterpreters",
                           "_testcapi", "_testinternalcapi", "multiprocessing", "_multiprocessing", "pty"})
_PATH_EVENTS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
    "os.symlink": (0, 1), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
    "shutil.rmtree": (0,), "shutil.move": (0, 1), "shutil.copyfile": (1,), "shutil.copytree": (1,),
    "os.mkfifo": (0,), "os.mknod": (0,),
}


def _make_hook(workdir: str, max_written: int):
    """Guarded mode only: refuse casual escapes at the Python level (process creation, sockets,
    writes outside the working directory, /proc and /sys). Hostile code can defeat such a hook;
    the kernel-enforced parts (rlimits, seccomp, uid, netns) are what the guarded mode rests on."""
    realpath, fspath, join, getcwd = os.path.realpath, os.fsdecode, os.path.join, os.getcwd
    prefix = workdir.rstrip("/") + "/"
    state = {"written": 0}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    sys_modules = sys.modules

    def inside(path) -> bool:
        if isinstance(path, int):
            return False  # dir_fd-relative / fd paths: refuse (they escaped the old hook)
        try:
            p = fspath(path)
        except TypeError:
            return False
        if p == "/dev/null":
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
        if event == "os.chdir":
            if not inside(args[0]):
                raise SandboxViolation("sandbox: chdir outside the working directory")
            return
        if event == "open":
            path, mode = args[0], args[1] if len(args) > 1 else None
            flags = args[2] if len(args) > 2 else 0
            if isinstance(path, (str, bytes)):
                p = fspath(path)
                full = realpath(p if p.startswith("/") else join(getcwd(), p))
                if full.startswith(("/proc", "/sys", "/dev/mem", "/dev/kmem", "/dev/port")):
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
            # os.mkdir(path, mode, dir_fd) and friends carry dir_fd last: refuse fd-relative paths.
            if len(args) > 2 and isinstance(args[-1], int) and args[-1] not in (-1,):
                raise SandboxViolation(f"sandbox: {event} relative to a directory descriptor")

    return hook


if __name__ == "__main__":
    _main()
