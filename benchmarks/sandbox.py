"""Sandbox cost: per-program latency and MBPP gold throughput, jail vs guarded vs peers.

Peers: a bare ``python -I -S`` subprocess per program (no isolation at all: the floor any
process-per-program design pays), and optionally the sandbox of an older git revision
(``--git-ref``, e.g. the in-process-guards design before issue 10)::

    python benchmarks/sandbox.py                          # latency (60 runs) + MBPP gold (974)
    python benchmarks/sandbox.py --git-ref <rev> --runs 100 --workers 4
    python benchmarks/sandbox.py --no-mbpp

Latency: one trivial function and three asserts, run one at a time (best and median of
``--runs``). Throughput: all MBPP reference solutions (``../shared/data/mbpp/mbpp.jsonl``) with
``--workers`` parallel runs, wall time. The machine is shared: compare medians of one invocation.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sgalm_jax.evaluation.sandbox import Sandbox, SandboxConfig  # noqa: E402

PROGRAM = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(1, 2) == 3\nassert add(5, 5) == 10\nassert add(-1, 1) == 0\n"


def _bare(program: str, tests: str, timeout: float = 30.0) -> bool:
    return subprocess.run([sys.executable, "-I", "-S", "-c", program + "\n" + tests], capture_output=True,
                          timeout=timeout).returncode == 0


def _old_sandbox(ref: str):
    """The Sandbox class of ``ref`` (its sandbox.py and _sandbox_child.py, loaded from git)."""
    d = Path(tempfile.mkdtemp(prefix="sgalm_old_sandbox_"))
    for name in ("sandbox.py", "_sandbox_child.py"):
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:sgalm_jax/evaluation/{name}"],
                             capture_output=True, text=True, check=True).stdout
        (d / name).write_text(src)
    spec = importlib.util.spec_from_file_location("old_sandbox", d / "sandbox.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_sandbox"] = mod
    spec.loader.exec_module(mod)
    return mod


def latency(run, runs: int) -> tuple[float, float]:
    run()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        ok = run()
        times.append(time.perf_counter() - t0)
        assert ok
    return min(times), statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--git-ref", default=None, help="also measure the sandbox of this git revision")
    ap.add_argument("--mbpp", default=str(ROOT.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl"))
    ap.add_argument("--no-mbpp", action="store_true")
    args = ap.parse_args()

    contenders: dict[str, tuple] = {}
    for mode in ("bwrap", "guarded"):
        try:
            sb = Sandbox(SandboxConfig(timeout_s=30.0, isolation=mode), max_workers=args.workers)
        except Exception as e:  # noqa: BLE001 - e.g. no bwrap here
            print(f"{mode}: unavailable ({e})")
            continue
        contenders[f"new {mode}"] = (lambda p, t, n=None, sb=sb: sb.run(p, t, n).passed,
                                     lambda jobs, sb=sb: [r.passed for r in sb.run_many(jobs)])
    if args.git_ref:
        old = _old_sandbox(args.git_ref)
        osb = old.Sandbox(old.SandboxConfig(timeout_s=30.0), max_workers=args.workers)
        contenders[f"old ({args.git_ref})"] = (lambda p, t, n=None: osb.run(p, t).passed,
                                              lambda jobs: [r.passed for r in osb.run_many([j[:2] for j in jobs])])
    contenders["bare subprocess (no isolation)"] = (lambda p, t, n=None: _bare(p, t), None)

    rows = []
    for name, (one, _) in contenders.items():
        best, med = latency(lambda one=one: one(PROGRAM, TESTS), args.runs)
        rows.append((name, best * 1e3, med * 1e3))
    print(f"\nPer-program latency ({args.runs} runs, one at a time), ms")
    print("| sandbox | best | median |\n|---|---|---|")
    for name, b, m in rows:
        print(f"| {name} | {b:.1f} | {m:.1f} |")

    if args.no_mbpp or not os.path.exists(args.mbpp):
        return
    from sgalm_jax.data import MBPPTask

    task = MBPPTask(args.mbpp)
    ex = task.load_split("all").examples
    jobs = [(*task.build_program(e, e.answer), task.names_under_test(e)) for e in ex]
    print(f"\nMBPP gold ({len(ex)} reference solutions, {args.workers} workers)")
    print("| sandbox | passed | wall s |\n|---|---|---|")
    for name, (_, many) in contenders.items():
        if many is None:
            continue
        t0 = time.perf_counter()
        ok = many(jobs)
        print(f"| {name} | {sum(ok)}/{len(ok)} | {time.perf_counter() - t0:.1f} |")
    print(json.dumps({"cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
