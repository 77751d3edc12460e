"""The MBPP execution sandbox: isolation modes, resource limits, verdicts; gold MBPP solutions pass.

Hostile programs are in test_sandbox_hostile.py, the parent-side judge in test_sandbox_verdict.py.
"""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
import time

import pytest

from sgalm_jax.data import MBPPTask
from sgalm_jax.evaluation import _sandbox_child as child
from sgalm_jax.evaluation import jail
from sgalm_jax.evaluation import sandbox as sbx
from sgalm_jax.evaluation.sandbox import Sandbox, SandboxConfig, SandboxUnavailable, imported_modules, run_program

TIMEOUT = 3.0

# Resource exhaustion and plain failures: every one must fail within the timeout.
RESOURCE = [
    ("infinite loop", "while True:\n    pass", ""),
    ("sleep forever", "import time\ntime.sleep(1000)", ""),
    ("huge allocation", "x = bytearray(8 * 1024 ** 3)\nx[-1] = 1", ""),
    ("huge list", "x = [0] * (10 ** 10)", ""),
    ("stdout flood", "while True:\n    print('x' * 100000)", ""),
    ("big file", "open('big', 'wb').write(b'0' * (64 << 20))", ""),
    ("many open files", "fs = [open(f'f{i}', 'w') for i in range(1000)]", ""),
    ("deep recursion", "def f():\n    return f()\nf()", ""),
    ("syntax error", "def f(:\n    pass", ""),
    ("failing assert", "def f(x):\n    return x", "assert f(9) == 3"),
    ("exception in the call", "def f(x):\n    return 1 / 0", "assert f(9) == 3"),
    ("missing function", "x = 1", "assert f(9) == 3"),
    ("setup fails", "def f(x):\n    return x", "y = undefined_name\nassert f(1) == 1"),
]


def _check_resource_batch(sb: Sandbox) -> None:
    results = sb.run_many([(p, t) for _, p, t in RESOURCE])
    for (name, _, _), r in zip(RESOURCE, results):
        assert not r.passed, f"{name}: counted as passed"
        assert r.status in ("failed", "timeout"), f"{name}: {r.status} {r.reason}"
        assert r.duration_s < TIMEOUT + 3, f"{name}: took {r.duration_s:.1f} s"
    by = {name: r for (name, _, _), r in zip(RESOURCE, results)}
    assert by["infinite loop"].status == "timeout" and by["sleep forever"].status == "timeout"
    assert "SyntaxError" in by["syntax error"].reason
    assert "got 9" in by["failing assert"].reason
    assert "ZeroDivisionError" in by["exception in the call"].reason
    assert "NameError" in by["setup fails"].reason and "tests failed" in by["setup fails"].reason


def test_resource_limits_in_the_jail(jail_sandbox_factory):
    _check_resource_batch(jail_sandbox_factory(SandboxConfig(timeout_s=TIMEOUT), max_workers=6))


def test_resource_limits_in_the_guarded_fallback():
    _check_resource_batch(Sandbox(SandboxConfig(timeout_s=TIMEOUT, isolation="guarded"), max_workers=6))


def test_correct_and_incorrect_programs(jail_sandbox_factory):
    cfg = SandboxConfig(timeout_s=TIMEOUT)
    for sb in (jail_sandbox_factory(cfg), Sandbox(SandboxConfig(timeout_s=TIMEOUT, isolation="guarded"), max_workers=1)):
        ok = sb.run("import math\ndef f(x):\n    return math.sqrt(x)", "assert f(9) == 3\nassert f(16) == 4")
        assert ok.passed and ok.status == "passed" and ok.extra["asserts"] == 2, ok.reason
        bad = sb.run("def f(x):\n    return x", "assert f(9) == 3")
        assert not bad.passed and bad.status == "failed" and "assert 1 (line 1) failed" in bad.reason
        out = sb.run("print('hello')\nimport collections\nprint(collections.Counter('aab').most_common(1))")
        assert out.passed and out.stdout.splitlines() == ["hello", "[('a', 2)]"], out
        dt = sb.run("import datetime\nd = datetime.datetime.strptime('2020-01-02', '%Y-%m-%d')\ndef day():\n    return d.day", "assert day() == 2")
        assert dt.passed, dt.reason
        # scratch is writable, tempfile works, and a file written there can be read back
        io = sb.run("import tempfile, os\ndef roundtrip(s):\n    with tempfile.NamedTemporaryFile('w+', delete=False) as f:\n"
                    "        f.write(s)\n    return open(f.name).read() + os.path.basename(os.getcwd())", "assert roundtrip('ab')[:2] == 'ab'")
        assert io.passed, io.reason
        # re.Match truthiness (MBPP sanitized 737 and friends)
        m = sb.run("import re\ndef check(s):\n    return re.search('a', s)", "assert check('cat')\nassert not check('dog')")
        assert m.passed, m.reason


def test_run_program_default_names_and_reference_names(jail_sandbox_factory):
    cfg = SandboxConfig(timeout_s=TIMEOUT)
    # Without a reference, what the program defines is program-side, shadowed builtins included (Python's rules).
    r = run_program("def sum(a, b):\n    return a * b", "assert sum(2, 3) == 6", cfg)
    assert r.passed, r.reason
    # With a reference naming only ``f``, ``set`` stays the judge's whatever the program does.
    r = run_program("def f():\n    return [2]\nset = lambda *a: {1}", "assert set(f()) == set([1])", cfg, names_under_test={"f"})
    assert not r.passed and "got [2]" in r.reason
    r = run_program("def f():\n    return [1, 1]", "assert set(f()) == set([1])", cfg, names_under_test={"f"})
    assert r.passed, r.reason
    r = run_program("def f(x):\n    return x", "for i in range(3):\n    assert f(i) == i", cfg)
    assert not r.passed and "cannot be judged" in r.reason


# ------------------------------------------------------------------------------ isolation modes
def test_jail_available_in_ci():
    """CI installs bubblewrap (.ci/run): there, the jail must work and ``auto`` must choose it."""
    ok, why = jail.jail_status(sys.executable)
    if not os.environ.get("CI"):
        pytest.skip(f"not CI (jail: {why})")
    assert ok, why
    assert Sandbox(SandboxConfig()).isolation == "bwrap"


def test_jail_hides_the_host(jail_sandbox_factory):
    sb = jail_sandbox_factory(SandboxConfig(timeout_s=TIMEOUT))
    prog = ("import os, sys\nprint((os.getuid(), sorted(os.listdir('/')), os.path.exists('/proc'), os.path.exists('/sys'),\n"
            "       os.getcwd(), os.getpid(), sorted(os.environ), os.uname().nodename))")
    r = sb.run(prog)
    assert r.passed, r.reason
    uid, root, proc, sys_, cwd, pid, env, host = ast.literal_eval(r.stdout)
    assert uid == 65534 and not proc and not sys_ and cwd == "/scratch" and pid <= 3 and host == "sandbox"
    assert set(root) <= {"usr", "bin", "sbin", "lib", "lib64", "lib32", "libx32", "etc", "dev", "scratch", "tmp", "sandbox", "root", "opt", "home", "work"}
    assert env == ["HOME", "LANG", "LC_ALL", "PATH", "PWD", "TMPDIR"]  # PWD: set by bwrap
    assert r.isolation == "bwrap:rlimits,seccomp"


def test_auto_falls_back_to_guarded_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(sbx, "jail_status", lambda python, site=False: (False, "test: bwrap missing"))
    monkeypatch.delenv(sbx.ENV_ISOLATION, raising=False)
    sbx._warned.discard("test: bwrap missing")
    with caplog.at_level(logging.WARNING, logger="sgalm_jax.evaluation.sandbox"):
        sb = Sandbox(SandboxConfig(timeout_s=TIMEOUT), max_workers=1)
    assert sb.isolation == "guarded" and "weaker guarded isolation" in caplog.text
    r = sb.run("def f():\n    return 1", "assert f() == 1")
    assert r.passed and r.isolation.startswith("guarded:") and "seccomp" in r.isolation and "audit-hook" in r.isolation
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        Sandbox(SandboxConfig(isolation="bwrap"))
    monkeypatch.setenv(sbx.ENV_ISOLATION, "bwrap")
    with pytest.raises(SandboxUnavailable):
        Sandbox(SandboxConfig())
    monkeypatch.setenv(sbx.ENV_ISOLATION, "nonsense")
    with pytest.raises(SandboxUnavailable, match="must be one of"):
        Sandbox(SandboxConfig())
    with pytest.raises(SandboxUnavailable, match="must be one of"):
        Sandbox(SandboxConfig(isolation="chroot"))


def test_env_selects_guarded(monkeypatch):
    monkeypatch.setenv(sbx.ENV_ISOLATION, "guarded")
    assert Sandbox(SandboxConfig(), max_workers=1).isolation == "guarded"


def test_jail_status_without_bwrap(monkeypatch):
    monkeypatch.setattr(jail, "bwrap_path", lambda: None)
    jail.jail_status.cache_clear()
    try:
        ok, why = jail.jail_status(sys.executable)
        assert not ok and "not installed" in why
    finally:
        jail.jail_status.cache_clear()


def test_seccomp_filter_in_a_plain_process():
    """The filter refuses process creation, exec, sockets and signals to others; allows the rest."""
    code = (
        "import os, sys, socket, resource\n"
        f"sys.path.insert(0, {os.path.dirname(child.__file__)!r})\n"
        "import _sandbox_child as c\n"
        "c.install_seccomp(c.seccomp_program(os.getpid(), allow_threads=False))\n"
        "def t(f):\n    try:\n        f()\n        return 'ok'\n    except (OSError, RuntimeError):\n        return 'denied'\n"
        "print(t(os.fork), t(lambda: os.execv('/bin/true', ['true'])), t(socket.socket), t(lambda: os.kill(os.getppid(), 0)),\n"
        "      t(lambda: os.kill(os.getpid(), 0)), t(lambda: resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE)),\n"
        "      t(lambda: open(os.devnull).read()), t(lambda: os.memfd_create('x')))\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["denied", "denied", "denied", "denied", "ok", "denied", "ok", "denied"], out.stderr
    with pytest.raises(OSError, match="no seccomp syscall table"):
        child.seccomp_program(1, False, machine="riscv64")
    assert len(child.seccomp_program(1, True, machine="aarch64")) % 8 == 0


def test_imported_modules():
    src = "import re, os.path as p\nfrom math import sqrt\ndef f():\n    import heapq\n"
    mods = imported_modules(src, "from datetime import date")
    for m in ("re", "os.path", "math", "heapq", "datetime", "_strptime"):
        assert m in mods
    assert "re" in imported_modules("import re\ndef f(:")  # unparsable source: line scan


# ------------------------------------------------------------------------------ MBPP gold
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
    assert all(s.details["isolation"].startswith(mbpp.sandbox().isolation) for s in scores)
    wrong = mbpp.score_batch(ex[:4], ["def nothing():\n    pass"] * 4)
    assert not any(s.correct for s in wrong)
    # the setup-code tasks (binary trees built by test_setup_code with the program's Node class)
    trees = [e for e in mbpp.load_split("all").examples if e.fields["test_setup_code"]]
    assert len(trees) == 2 and all(s.correct for s in mbpp.score_batch(trees, [e.answer for e in trees]))


@pytest.mark.slow
@pytest.mark.parametrize("file, n", [("mbpp.jsonl", 974), ("sanitized-mbpp.json", 427)])
def test_gold_solutions_all(shared_data, capsys, file, n):
    """Every reference solution passes, challenge tests included (timeout 30 s: task 123 is
    O(n^2) on n=9999). Measured on 2 cores: 974/974 in ~30 s, 427/427 in ~15 s (bwrap)."""
    path = shared_data / "mbpp" / file
    if not path.exists():
        pytest.skip(f"{path} not present")
    task = MBPPTask(str(path), sanitized=file.startswith("sanitized"), include_challenge_tests=True,
                    sandbox_config=SandboxConfig(timeout_s=30.0), max_workers=4)
    ex = task.load_split("all").examples
    assert len(ex) == n
    t0 = time.monotonic()
    scores = task.score_batch(ex, [e.answer for e in ex])
    failed = [(e.id, s.details["status"], s.details["reason"]) for e, s in zip(ex, scores) if not s.correct]
    with capsys.disabled():
        print(f"\n{file} gold: {n - len(failed)}/{n} in {time.monotonic() - t0:.0f} s, isolation "
              f"{task.sandbox().isolation}; failed: {failed}")
    assert failed == []


def test_a_sandbox_that_cannot_start_is_a_harness_error(tmp_path):
    """A broken interpreter is reported as status ``error``, not as the program's failure."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    r = Sandbox(SandboxConfig(timeout_s=TIMEOUT, isolation="guarded", python=str(fake)), max_workers=1).run("x = 1")
    assert not r.passed and r.status == "error" and "cannot start" in r.reason
