"""Hostile programs: none may pass, and the jail contains what it claims to contain.

Two families, run in the bubblewrap jail and in the guarded fallback:

* VERDICT_ATTACKS: a wrong ``add`` tries to get the asserts counted as passed by attacking the
  protocol (the issue's bootstrap tricks, forged records, objects equal to everything, patched
  builtins, oversized/deep/infinite values...). The verdict is the parent's, so all must fail in
  both modes.
* ESCAPES: ``add`` is right only if an escape worked (exec, fork, /proc, sockets, ptrace...), so
  a pass would mean an escape; side effects (files written on the host, connections made) are
  checked on the host after the batch. The guarded fallback is run on the escapes its
  kernel-enforced parts (seccomp, uid, netns) cover; reading host files and writing
  world-writable host directories through fd-relative calls are documented as not contained there.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

import pytest

from sgalm_jax.evaluation.sandbox import Sandbox, SandboxConfig, _pids_of_uid

TIMEOUT = 2.0
IS_ROOT = os.geteuid() == 0
TAG = uuid.uuid4().hex[:12]
MARK = f"/tmp/sgalm_sbx_escape_{TAG}"
TESTS = "assert add(1, 2) == 3\nassert add(5, 5) == 10\nassert add(-1, 1) == 0"
NAMES = frozenset({"add"})
WRONG = "\ndef add(a, b):\n    return a - b\n"

# --------------------------------------------------------------------------- verdict attacks
_FORGE = """
import os, stat
for fd in range(3, 64):
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.write(fd, {records!r})
    except OSError:
        pass
"""
VERDICT_ATTACKS = [
    # The attacks on the old in-process guards.
    ("empty audit tables via __main__", "import sys\nm = sys.modules['__main__']\nfor k in ('_DENY_EVENTS', '_DENY_MODULES'):\n"
     "    setattr(m, k, frozenset())\nm._PATH_EVENTS = {}\n" + WRONG),
    ("replace failure/record functions", "import sys\nm = sys.modules['__main__']\nm._fail = m._describe = lambda *a, **k: None\n"
     "orig = m._write_record\nm._write_record = lambda fd, rec: orig(fd, {'done': True})\n" + WRONG),
    ("nonce from a frame", "import sys, os\nf = sys._getframe(0)\nwhile f is not None:\n    print(sorted(f.f_locals)[:20])\n"
     "    f = f.f_back\nprint('ok')\nos._exit(0)\n"),
    ("replace compile/exec/eval", "import builtins\nbuiltins.eval = lambda *a, **k: True\nbuiltins.exec = lambda *a, **k: None\n"
     "builtins.compile = lambda *a, **k: None\n" + WRONG),
    ("os._exit no-op then fail", "import os\nos._exit = lambda code: None\nraise ValueError('after patching os._exit')\n"),
    ("sys.exit(0) early", "import sys\nsys.exit(0)\n"),
    ("os._exit(0) early", "import os\nos._exit(0)\n"),
    ("os._exit(0) inside the call", "def add(a, b):\n    import os\n    os._exit(0)\n"),
    ("read the payload", "import os, sys\nfor p in ('/proc/self/fd/0', '/dev/stdin', 'in.json', '../in.json'):\n"
     "    try:\n        print(open(p).read()[:200])\n    except Exception as e:\n        print(e)\n" + WRONG),
    ("object equal to everything", "class A:\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\n"
     "    __hash__ = object.__hash__\n    def __bool__(self): return True\ndef add(a, b):\n    return A()\n"),
    ("int subclass equal to everything", "class I(int):\n    def __eq__(self, o): return True\n    __hash__ = int.__hash__\n"
     "def add(a, b):\n    return I(0)\n"),
    ("str subclass / __reduce__", "class S(str):\n    def __eq__(self, o): return True\n    def __reduce__(self): return (int, ('3',))\n"
     "def add(a, b):\n    return S('x')\n"),
    # Attacks on the new design.
    ("fake records on stdout", "print('{\"probe\": 0, \"value\": 3}')\nprint('{\"done\": true}')\nprint('passed')\n" + WRONG),
    ("fake verdict on the result fd", _FORGE.format(records=b'{"passed": true}\n{"verdict": "pass"}\n{"done": true}\n') + WRONG),
    ("fake done without values", _FORGE.format(records=b'{"done": true}\n') + "import os\nos._exit(0)\n"),
    ("duplicate probe records", _FORGE.format(records=b'{"probe": 0, "value": 3}\n{"probe": 1, "value": 10}\n') + WRONG),
    ("garbage on the result fd", _FORGE.format(records=b'\x00\xff{not json\n') + "def add(a, b):\n    return a + b\n"),
    ("deep JSON on the result fd", _FORGE.format(records=b'{"probe": 0, "value": ' + b'[' * 100000 + b']' * 100000 + b'}\n') + WRONG),
    ("hijack the encoder", "import sys\nm = sys.modules['__main__']\nm.encode = lambda v, *a: ['tuple', [3]]\n" + WRONG),
    ("hijack json.dumps", "import json\njson.dumps = lambda *a, **k: '{\"probe\": 0, \"value\": 3}'\n" + WRONG),
    ("claim a constant for every probe", "import sys\nm = sys.modules['__main__']\norig = m._write_record\n"
     "m._write_record = lambda fd, rec: orig(fd, dict(rec, value=3) if 'probe' in rec else rec)\n" + WRONG),
    ("shadow the judge's builtins", "import builtins, math\nbuiltins.set = lambda *a: {3}\nbuiltins.sorted = lambda *a, **k: [3]\n"
     "math.isclose = lambda *a, **k: True\nset = sorted = len = lambda *a, **k: 3\n" + WRONG),
    ("infinite generator", "import itertools\ndef add(a, b):\n    return itertools.count()\n"),
    ("endless generator function", "def add(a, b):\n    while True:\n        yield a\n"),
    ("deeply nested value", "def add(a, b):\n    v = []\n    for _ in range(100000):\n        v = [v]\n    return v\n"),
    ("huge value", "def add(a, b):\n    return list(range(5_000_000))\n"),
    ("huge output", "import sys\nwhile True:\n    sys.stdout.write('x' * 1_000_000)\n"),
    ("exception with a hostile __str__", "class E(Exception):\n    def __str__(self):\n        print('{\"done\": true}')\n"
     "        raise SystemExit(0)\ndef add(a, b):\n    raise E()\n"),
    ("recursion limit breaks the encoder", "import sys\nsys.setrecursionlimit(5)\n" + WRONG),
    ("close and reopen stdout/stderr", "import os\nos.close(1)\nos.close(2)\nos.open('/dev/null', os.O_WRONLY)\n" + WRONG),
    ("sleep past the timeout holding the pipes", "import os, time\nos.close(1)\ntime.sleep(1000)\n" + WRONG),
    ("KeyboardInterrupt in the call", "def add(a, b):\n    raise KeyboardInterrupt\n"),
    ("named tuple equal to everything", "class T(tuple):\n    _fields = ('a',)\n    def __eq__(self, o): return True\n"
     "    __hash__ = tuple.__hash__\ndef add(a, b):\n    return T((99,))\n"),
]

# --------------------------------------------------------------------------------- escapes
_ESCAPE = """
def attempt():
{body}
try:
    ESCAPED = bool(attempt())
except BaseException as e:
    print('contained:', type(e).__name__, e)
    ESCAPED = False
def add(a, b):
    return a + b if ESCAPED else None
"""


def _indent(body: str) -> str:
    return "\n".join("    " + line for line in body.strip("\n").splitlines())


# (name, body, contained in guarded mode too). A body returns True when the escape worked.
ESCAPES = [
    ("fork", "import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\nreturn True", True),
    ("fork bomb", "import os\nwhile True:\n    os.fork()", True),
    ("thread", "import threading\nthreading.Thread(target=lambda: None).start()\nreturn True", True),
    ("subprocess", "import subprocess\nreturn subprocess.run(['true']).returncode == 0", True),
    ("exec /bin/sh", f"import os\nos.execv('/bin/sh', ['sh', '-c', 'touch {MARK}_exec'])", True),
    ("posix_spawn", f"import os\nos.posix_spawn('/bin/sh', ['sh', '-c', 'touch {MARK}_spawn'], {{}})\nreturn True", True),
    ("setuid binary", "import os\nfor b in ('/usr/bin/su', '/usr/bin/passwd', '/bin/mount'):\n    if os.path.exists(b):\n"
     "        os.execv(b, [b, '--help'])\nreturn False", True),
    ("tcp to a host service", "import socket\ns = socket.create_connection(('127.0.0.1', PORT), timeout=1)\nreturn True", True),
    ("world-writable unix socket", "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(UNIX_PATH)\nreturn True", True),
    ("abstract unix socket", "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(ABSTRACT)\nreturn True", True),
    ("kill the evaluator", "import os, signal\nos.kill(PARENT_PID, 0)\nreturn True", True),
    ("kill everything", "import os\nos.kill(-1, 0)\nreturn True", True),
    ("ptrace", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nreturn libc.ptrace(16, 1, 0, 0) == 0 or libc.ptrace(0, 0, 0, 0) == 0", True),
    ("new user namespace", "import ctypes\nreturn ctypes.CDLL(None).unshare(0x10000000) == 0", True),
    ("mount", "import ctypes\nreturn ctypes.CDLL(None).mount(b'none', b'/tmp', b'tmpfs', 0, None) == 0", True),
    ("memfd", "import os\nos.memfd_create('x')\nreturn True", True),
    ("raise the CPU limit", "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (10000, 10000))\nreturn True", True),
    ("parent's environment", "import os\nreturn 'PYTEST_CURRENT_TEST' in os.environ or 'PYTHONPATH' in os.environ", True),
    # Filesystem: the jail hides the host (the guarded fallback does not).
    ("relative /proc after chdir('/')", "import os\nos.chdir('/')\nreturn len(open('proc/self/status').read()) > 0", False),
    ("/proc/self/root", "import os\nreturn len(os.listdir('/proc/self/root')) > 0", False),
    ("/proc/1/cmdline", "return len(open('/proc/1/cmdline', 'rb').read()) >= 0", False),
    ("/sys", "import os\nreturn len(os.listdir('/sys')) > 0", False),
    ("read host files", "import os\nreturn bool(set(os.listdir('/etc')) - {'ld.so.cache'}) or bool(open('/etc/passwd').read())", False),
    ("read the repository", f"return len(open({__file__!r}).read()) > 0", False),
    ("list /, /root, /home, /work", "import os, sys\nseen = set(sys.base_prefix.split('/')) | {'usr', 'bin', 'sbin', 'lib', 'lib64', "
     "'lib32', 'libx32', 'dev', 'scratch', 'tmp', 'sandbox', 'etc', 'root'}\nfor d in ('/', '/root', '/home', '/work'):\n"
     "    if os.path.isdir(d) and set(os.listdir(d)) - seen:\n        return True\nreturn False", False),
]
# Side effects: the program always fails the asserts; the host is checked afterwards.
SIDE_EFFECTS = [
    ("write /tmp", f"open({MARK!r}, 'w').write('x')", False),
    ("dir_fd-relative open", f"import os\nfd = os.open('/tmp', os.O_RDONLY)\nos.close(os.open({os.path.basename(MARK) + '_dirfd'!r}, "
     "os.O_CREAT | os.O_WRONLY, dir_fd=fd))", False),
    ("dir_fd-relative mkdir", f"import os\nfd = os.open('/tmp', os.O_RDONLY)\nos.mkdir({os.path.basename(MARK) + '_mkdir'!r}, dir_fd=fd)", False),
    ("symlink out of scratch", f"import os\nos.symlink('/tmp', 'out')\nopen('out/' + {os.path.basename(MARK) + '_sym'!r}, 'w').write('x')", False),
    ("write /usr and the interpreter", "import os, sys\nfor d in ('/usr', sys.prefix, os.path.dirname(os.__file__)):\n"
     f"    try:\n        open(os.path.join(d, {'sgalm_' + TAG!r}), 'w').write('x')\n    except OSError:\n        pass", True),
    ("fill scratch", "i = 0\nwhile True:\n    with open(f'fill{i}', 'wb') as f:\n        f.write(b'0' * (8 << 20))\n    i += 1", True),
    ("write /dev/shm", f"open('/dev/shm/sgalm_{TAG}', 'w').write('x')", False),
]


# The first attack: empty the guarded mode's audit-hook tables, so that only the
# kernel-enforced parts (seccomp, uid, network namespace, rlimits) stand in the way.
NEUTRALIZE = ("import sys\n_m = sys.modules['__main__']\n_m._DENY_EVENTS = frozenset()\n_m._DENY_MODULES = frozenset()\n"
              "_m._PATH_EVENTS = {}\n")


class _Listener:
    """Host services a program must not reach: TCP on 127.0.0.1, a 0777 unix socket, an abstract one."""

    def __init__(self):
        self.hits: list[str] = []
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.port = self.tcp.getsockname()[1]
        self.unix_path = f"/tmp/sgalm_sock_{TAG}"
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        os.chmod(self.unix_path, 0o777)
        self.unix.listen()
        self.abstract_name = f"\0sgalm_{TAG}"
        self.abstract = socket.socket(socket.AF_UNIX)
        self.abstract.bind(self.abstract_name)
        self.abstract.listen()
        self._stop = False
        self.threads = [threading.Thread(target=self._serve, args=(s, n), daemon=True)
                        for s, n in ((self.tcp, "tcp"), (self.unix, "unix"), (self.abstract, "abstract"))]
        for t in self.threads:
            t.start()

    def _serve(self, s: socket.socket, name: str) -> None:
        s.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = s.accept()
                self.hits.append(name)
                conn.close()
            except (TimeoutError, OSError):
                continue

    def close(self) -> None:
        self._stop = True
        for t in self.threads:
            t.join(timeout=2)
        for s in (self.tcp, self.unix, self.abstract):
            s.close()
        if os.path.exists(self.unix_path):
            os.unlink(self.unix_path)

    def program(self, body: str, neutralize: bool = False) -> str:
        consts = f"PORT = {self.port}\nUNIX_PATH = {self.unix_path!r}\nABSTRACT = {self.abstract_name!r}\nPARENT_PID = {os.getpid()}\n"
        return (NEUTRALIZE if neutralize else "") + consts + _ESCAPE.format(body=_indent(body))


def _leftover_sandbox_processes() -> list[int]:
    from sgalm_jax.evaluation import sandbox as sbx

    child = str(sbx._CHILD).encode()
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if child in f.read():
                        out.append(int(name))
            except OSError:
                pass
    return out


def _host_marks() -> list[str]:
    base = os.path.basename(MARK)
    return [p for p in os.listdir("/tmp") if p.startswith(base)] + [
        p for p in ("/dev/shm/sgalm_" + TAG, "/usr/sgalm_" + TAG) if os.path.exists(p)]


def _run_batch(sb: Sandbox, guarded: bool) -> None:
    listener = _Listener()
    try:
        escapes = [(n, b) for n, b, g in ESCAPES if g or not guarded]
        effects = [(n, b) for n, b, g in SIDE_EFFECTS if g or not guarded]
        jobs = [(p, TESTS, NAMES) for _, p in VERDICT_ATTACKS]
        jobs += [(listener.program(b, neutralize=guarded), TESTS, NAMES) for _, b in escapes]
        jobs += [(b + "\n" + WRONG, TESTS, NAMES) for _, b in effects]
        names = [n for n, _ in VERDICT_ATTACKS] + [n for n, _ in escapes] + [n for n, _ in effects]
        t0 = time.monotonic()
        results = sb.run_many(jobs)
        wall = time.monotonic() - t0
        time.sleep(0.3)  # let the listeners see any late connection
    finally:
        listener.close()
    for name, r in zip(names, results):
        assert not r.passed, f"{name}: PASSED ({r.isolation}): {r.reason}"
        assert r.status in ("failed", "timeout"), f"{name}: {r.status} {r.reason}"
        assert r.duration_s < TIMEOUT + 3, f"{name}: took {r.duration_s:.1f} s"
        assert r.isolation.startswith(sb.isolation) and "seccomp" in r.isolation, (name, r.isolation)
    by = dict(zip(names, results))
    assert by["sleep past the timeout holding the pipes"].status == "timeout"
    assert "not plain data" in by["object equal to everything"].reason
    assert "SystemExit" in by["sys.exit(0) early"].reason
    assert "got None" in by["fork"].reason  # the run completed and the escape attempt failed
    assert listener.hits == [], f"host services were reached: {listener.hits}"
    assert _host_marks() == [], f"files written on the host: {_host_marks()}"
    assert _leftover_sandbox_processes() == []
    if guarded and IS_ROOT:
        for uid in range(sb.config.uid_base, sb.config.uid_base + 50):
            assert _pids_of_uid(uid) == [], f"leftover processes of sandbox uid {uid}"
    assert wall < 6 * (TIMEOUT + 3)


def test_hostile_programs_in_the_jail(jail_sandbox_factory):
    sb = jail_sandbox_factory(SandboxConfig(timeout_s=TIMEOUT, scratch_mb=32), max_workers=6)
    _run_batch(sb, guarded=False)


def test_hostile_programs_in_the_guarded_fallback():
    sb = Sandbox(SandboxConfig(timeout_s=TIMEOUT, isolation="guarded"), max_workers=6)
    assert sb.isolation == "guarded"
    _run_batch(sb, guarded=True)


def test_correct_program_passes_next_to_the_attacks(jail_sandbox_factory):
    """The harness is not merely failing everything: the same tests pass for a right ``add``."""
    for sb in (jail_sandbox_factory(SandboxConfig(timeout_s=TIMEOUT)), Sandbox(SandboxConfig(timeout_s=TIMEOUT, isolation="guarded"))):
        r = sb.run("def add(a, b):\n    return a + b\n", TESTS, NAMES)
        assert r.passed, (sb.isolation, r.reason)


# Escapes whose detector is safe to run unconfined: each must report success outside a sandbox,
# so the batches above test containment, not a typo.
_UNCONFINED_OK = ["thread", "tcp to a host service", "world-writable unix socket", "abstract unix socket",
                  "kill the evaluator", "memfd", "parent's environment", "relative /proc after chdir('/')",
                  "/proc/self/root", "/proc/1/cmdline", "/sys", "read host files", "read the repository"]


def test_escape_detectors_detect_outside_the_sandbox():
    import subprocess
    import sys

    listener = _Listener()
    try:
        bodies = {n: b for n, b, _ in ESCAPES}
        for name in _UNCONFINED_OK:
            src = listener.program(bodies[name]) + "\nprint('ESCAPED', ESCAPED)\n"
            out = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=30,
                                 env={**os.environ, "PYTEST_CURRENT_TEST": "x"})
            assert "ESCAPED True" in out.stdout, (name, out.stdout, out.stderr)
    finally:
        listener.close()
    assert sorted(set(listener.hits)) == ["abstract", "tcp", "unix"]
