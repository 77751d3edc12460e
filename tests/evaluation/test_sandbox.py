"""The MBPP execution sandbox: malicious programs are contained; gold MBPP solutions pass."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from sgalm_jax.data import MBPPTask
from sgalm_jax.evaluation.sandbox import Sandbox, SandboxConfig, _pids_of_uid, imported_modules, run_program

TIMEOUT = 3.0
IS_ROOT = os.geteuid() == 0
MARK = f"/tmp/sgalm_sandbox_escape_{uuid.uuid4().hex}"

# (name, program, tests). Every one must fail, within the timeout, without side effects.
MALICIOUS = [
    ("infinite loop", "while True:\n    pass", ""),
    ("sleep forever", "import time\ntime.sleep(1000)", ""),
    ("fork bomb", "import os\nwhile True:\n    os.fork()", ""),
    ("subprocess", "import subprocess\nsubprocess.Popen(['sleep', '100'])", ""),
    ("posixsubprocess", "import _posixsubprocess", ""),
    ("os.system", "import os\nos.system('sleep 100 &')", ""),
    ("posix_spawn", "import os\nos.posix_spawn('/bin/sleep', ['sleep', '100'], {})", ""),
    ("multiprocessing", "import multiprocessing", ""),
    ("huge allocation", "x = bytearray(8 * 1024 ** 3)\nx[-1] = 1", ""),
    ("huge list", "x = [0] * (10 ** 10)", ""),
    ("write /tmp", f"open({MARK!r}, 'w').write('escaped')", ""),
    ("write relative escape", f"import os\nopen(os.path.join('..', {os.path.basename(MARK) + '_rel'!r}), 'w').write('x')", ""),
    ("mkdir outside", f"import os\nos.mkdir({MARK + '_dir'!r})", ""),
    ("remove outside", "import os\nos.remove('/etc/hostname')", ""),
    ("socket", "import socket\ns = socket.socket()\ns.connect(('1.1.1.1', 53))", ""),
    ("urllib", "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)", ""),
    ("kill parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", ""),
    ("killpg parent", "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)", ""),
    ("sys.exit(0) early", "import sys\nsys.exit(0)", "assert False"),
    ("raise SystemExit(0)", "raise SystemExit(0)", "assert False"),
    ("os._exit(0) early", "import os\nos._exit(0)", "assert False"),
    ("os._exit(0) inside tests", "def f():\n    import os\n    os._exit(0)", "assert f() == 1"),
    ("atexit trick", "import atexit, os\natexit.register(os._exit, 0)", "assert False"),
    ("fake success line", "print('passed')\nprint('0' * 32)\nimport os\nos._exit(0)", "assert False"),
    ("frame introspection", "import sys\nprint(sys._getframe(1).f_locals)\nimport os\nos._exit(0)", "assert False"),
    ("traceback frames", "try:\n    1 / 0\nexcept Exception as e:\n    print(e.__traceback__.tb_frame.f_back.f_locals)\nimport os\nos._exit(0)", "assert False"),
    ("gc scan", "import gc\nprint([o for o in gc.get_objects() if isinstance(o, bytes)])\nimport os\nos._exit(0)", "assert False"),
    ("signal handler frame", "import signal\nsignal.signal(signal.SIGALRM, lambda s, f: print(f.f_back.f_locals))\nsignal.alarm(1)", "assert False"),
    ("read /proc/self/mem", "open('/proc/self/mem', 'rb')", ""),
    ("ctypes", "import ctypes\nctypes.CDLL(None).fork()", ""),
    ("settrace", "import sys\nsys.settrace(lambda *a: None)", ""),
    ("stdout flood", "while True:\n    print('x' * 100000)", ""),
    ("big file", "open('big', 'wb').write(b'0' * (64 << 20))", ""),
    ("many files", "for i in range(1000):\n    open(f'f{i}', 'w').close()", ""),
    ("deep recursion", "def f():\n    return f()\nf()", ""),
    ("raise rlimit", "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))", ""),
    ("syntax error", "def f(:\n    pass", ""),
]
if IS_ROOT:  # as the unprivileged sandbox uid this can only ever hit the sandbox's own processes
    MALICIOUS.append(("kill everything", "import os\nos.kill(-1, 9)", ""))


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxConfig(timeout_s=TIMEOUT), max_workers=8)


def test_malicious_programs_are_contained(sandbox):
    t0 = time.monotonic()
    results = sandbox.run_many([(p, t) for _, p, t in MALICIOUS])
    wall = time.monotonic() - t0
    for (name, _, _), r in zip(MALICIOUS, results):
        assert not r.passed, f"{name}: counted as passed"
        assert r.status in ("failed", "timeout"), f"{name}: {r.status} {r.reason}"
        assert r.duration_s < TIMEOUT + 3, f"{name}: took {r.duration_s:.1f} s"
    by_name = {name: r for (name, _, _), r in zip(MALICIOUS, results)}
    assert by_name["infinite loop"].status == "timeout" and by_name["sleep forever"].status == "timeout"
    assert "not allowed" in by_name["fork bomb"].reason
    assert "SystemExit" in by_name["sys.exit(0) early"].reason
    assert "no success nonce" in by_name["os._exit(0) early"].reason
    for suffix in ("", "_dir"):
        assert not os.path.exists(MARK + suffix)
    assert not os.path.exists(os.path.join("/tmp", os.path.basename(MARK) + "_rel"))
    assert os.path.exists("/etc/hostname") or not IS_ROOT
    if IS_ROOT:
        assert all("netns" in r.isolation and "uid=" in r.isolation for r in results if r.isolation)
        for uid in range(sandbox.config.uid_base, sandbox.config.uid_base + 50):
            assert _pids_of_uid(uid) == [], f"leftover processes of sandbox uid {uid}"
    assert wall < 4 * (TIMEOUT + 3)  # 8 workers: the whole batch is a few timeouts long


def test_hook_alone_without_privilege_drop():
    """The in-process guards hold even where no uid/namespace isolation is possible."""
    sb = Sandbox(SandboxConfig(timeout_s=TIMEOUT, drop_privileges=False, isolate_network=False), max_workers=4)
    jobs = [(p, t) for name, p, t in MALICIOUS if name in (
        "fork bomb", "subprocess", "os.system", "write /tmp", "socket", "kill parent",
        "sys.exit(0) early", "frame introspection", "ctypes", "read /proc/self/mem")]
    results = sb.run_many(jobs)
    assert not any(r.passed for r in results)
    assert all("not allowed" in r.reason or "SystemExit" in r.reason or "outside" in r.reason for r in results), [r.reason for r in results]
    assert not os.path.exists(MARK)
    ok = sb.run("import socket\ndef f(x):\n    return x * 2", "assert f(2) == 4")
    assert ok.passed, ok.reason


def test_correct_and_incorrect_programs():
    ok = run_program("import math\ndef f(x):\n    return math.sqrt(x)", "assert f(9) == 3\nassert f(16) == 4", SandboxConfig(timeout_s=TIMEOUT))
    assert ok.passed and ok.status == "passed"
    bad = run_program("def f(x):\n    return x", "assert f(9) == 3", SandboxConfig(timeout_s=TIMEOUT))
    assert not bad.passed and "AssertionError" in bad.reason
    out = run_program("print('hello')\nimport collections\nprint(collections.Counter('aab').most_common(1))", "", SandboxConfig(timeout_s=TIMEOUT))
    assert out.passed and out.stdout.splitlines() == ["hello", "[('a', 2)]"]
    dt = run_program("import datetime\nd = datetime.datetime.strptime('2020-01-02', '%Y-%m-%d')", "assert d.day == 2", SandboxConfig(timeout_s=TIMEOUT))
    assert dt.passed, dt.reason


def test_imported_modules():
    src = "import re, os.path as p\nfrom math import sqrt\ndef f():\n    import heapq\n"
    mods = imported_modules(src, "from datetime import date")
    for m in ("re", "os.path", "math", "heapq", "datetime", "_strptime"):
        assert m in mods
    assert "re" in imported_modules("import re\ndef f(:")  # unparsable source: line scan


@pytest.fixture(scope="module")
def mbpp(shared_data):
    path = shared_data / "mbpp" / "mbpp.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return MBPPTask(str(path))


def test_gold_solutions_subset_pass(mbpp):
    ex = mbpp.load("test")[:24]
    scores = mbpp.score_batch(ex, [e.answer for e in ex])
    assert all(s.correct for s in scores), [(e.id, s.details) for e, s in zip(ex, scores) if not s.correct]
    wrong = mbpp.score_batch(ex[:4], ["def nothing():\n    pass"] * 4)
    assert not any(s.correct for s in wrong)


@pytest.mark.slow
def test_gold_solutions_all_974(mbpp, capsys):
    """All 974 reference solutions of mbpp.jsonl (timeout 30 s: task 123 is O(n^2) on n=9999)."""
    task = MBPPTask(mbpp.source, sandbox_config=SandboxConfig(timeout_s=30.0), max_workers=8)
    ex = task.load_split("all").examples
    assert len(ex) == 974
    t0 = time.monotonic()
    scores = task.score_batch(ex, [e.answer for e in ex])
    failed = [(e.id, s.details["status"], s.details["reason"]) for e, s in zip(ex, scores) if not s.correct]
    rate = 1 - len(failed) / len(ex)
    with capsys.disabled():
        print(f"\nMBPP gold pass rate: {len(ex) - len(failed)}/{len(ex)} = {rate:.4f} in {time.monotonic() - t0:.0f} s; failed: {failed}")
    assert rate >= 0.995, failed
