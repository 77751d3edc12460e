"""Run one ``sgalm_jax.main`` command as several processes of one multi-host JAX job on this machine.

    python -m sgalm_jax.tools.launch_local --num-processes 2 --cpu-devices 4 -- \\
        --config configs/sft_tiny.py --config.workdir=/tmp/sft_2x4

Each process gets the documented environment of a launch outside a cluster
(``JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), so
the coordinator binds to loopback only; with ``--cpu-devices N`` each process simulates N CPU
devices (``--xla_force_host_platform_device_count``), and the processes form one global mesh whose
cross-process collectives run over gloo (JAX's CPU default). This is how the CI test runs every
algorithm as 2 processes x 4 devices and compares it with 1 process x 8 devices, and a way to debug
multi-host behaviour without a pod.

Output of process ``i`` is printed with a ``[i]`` prefix (and written to ``--log-dir``/process_i.log).
If one process fails, the others are stopped (they would wait for it forever in their next
collective); SIGTERM / SIGINT to the launcher is forwarded to every process, which then saves a
checkpoint and exits. The exit status is the first non-zero status of a process, else 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Mapping, Sequence


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def process_env(base: Mapping[str, str], *, index: int, count: int, address: str,
                cpu_devices: int = 0) -> dict[str, str]:
    """The environment of process ``index`` of ``count`` (see the module docstring)."""
    env = dict(base)
    env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(count),
               JAX_PROCESS_ID=str(index))
    if cpu_devices:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


def _pump(stream: IO[bytes], prefix: str, sink: IO[str] | None, echo: bool) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace")
        if sink is not None:
            sink.write(line)
            sink.flush()
        if echo:
            sys.stdout.write(prefix + line)
            sys.stdout.flush()
    stream.close()


def launch(args: Sequence[str], *, num_processes: int, cpu_devices: int = 0,
           log_dir: str | None = None, env: Mapping[str, str] | None = None,
           env_per_process: Mapping[int, Mapping[str, str]] | None = None,
           module: str = "sgalm_jax.main", timeout: float | None = None, echo: bool = True,
           host: str = "127.0.0.1", grace: float = 30.0) -> list[int]:
    """Start ``python -m module *args`` as ``num_processes`` processes and wait for all of them.

    ``env_per_process[i]`` adds variables to process ``i`` only (the tests use it to send a
    preemption signal to one process). Returns the exit statuses (a process killed because another
    failed has a negative status); raises TimeoutError when ``timeout`` seconds pass first.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    address = f"{host}:{free_port(host)}"
    base = dict(os.environ if env is None else env)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    sinks: list[IO[str]] = []
    for i in range(num_processes):
        penv = process_env(base, index=i, count=num_processes, address=address,
                           cpu_devices=cpu_devices)
        penv.update((env_per_process or {}).get(i, {}))
        sink = open(os.path.join(log_dir, f"process_{i}.log"), "w") if log_dir else None
        if sink is not None:
            sinks.append(sink)
        p = subprocess.Popen([sys.executable, "-m", module, *args], env=penv,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(p)
        t = threading.Thread(target=_pump, args=(p.stdout, f"[{i}] ", sink, echo), daemon=True)
        t.start()
        pumps.append(t)

    def forward(signum, frame):  # the launcher's SIGTERM / SIGINT: every process saves and exits
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            previous[s] = signal.signal(s, forward)
    deadline = None if timeout is None else time.monotonic() + timeout
    stop_at = None
    timed_out = False
    try:
        while [p.poll() for p in procs].count(None):  # poll every process, each round
            now = time.monotonic()
            failed = any(p.returncode not in (None, 0) for p in procs)
            timed_out = timed_out or (deadline is not None and now > deadline)
            if stop_at is None and (failed or timed_out):
                for p in procs:  # the others would wait for the failed one forever
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                stop_at = now + grace
            elif stop_at is not None and now > stop_at:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for t in pumps:
            t.join(timeout=5)
        for sink in sinks:
            sink.close()
    if timed_out:
        raise TimeoutError(f"launch_local: stopped the {num_processes} processes after {timeout}s "
                           f"(exit statuses {[p.returncode for p in procs]})")
    return [p.returncode for p in procs]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sgalm_jax.tools.launch_local",
        description="Run a sgalm_jax.main command as several processes of one multi-host JAX job "
                    "on this machine (arguments after -- go to sgalm_jax.main).")
    parser.add_argument("--num-processes", "-n", type=int, default=2)
    parser.add_argument("--cpu-devices", "-d", type=int, default=0,
                        help="simulated CPU devices per process (0 = the default backend)")
    parser.add_argument("--log-dir", default=None, help="also write process_i.log files here")
    parser.add_argument("--timeout", type=float, default=None, help="stop every process after "
                        "this many seconds")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    codes = launch(args, num_processes=ns.num_processes, cpu_devices=ns.cpu_devices,
                   log_dir=ns.log_dir, timeout=ns.timeout)
    bad = [c for c in codes if c != 0]
    print(f"launch_local: exit statuses {codes}", file=sys.stderr)
    return (bad[0] if bad[0] > 0 else 1) if bad else 0


if __name__ == "__main__":
    sys.exit(main())
