"""Compile every program of a config for a target without its hardware, and print what each needs.

    python -m sgalm_jax.main --config configs/qwen3b_gsm8k.py --compile-only=v5e-8
    python -m sgalm_jax.main --config configs/sgalm_tiny.py --compile-only=cpu-8

Each algorithm lists its programs (``programs(config, mesh)`` in its module: the train steps of
each role, the scorers, the sampler's prefill and decode at the largest shapes the config can
produce); each is lowered with abstract arguments (``jax.ShapeDtypeStruct`` with shardings: no
weights are read, nothing is allocated) and compiled for the target's devices. The report gives per
device: arguments, outputs, the outputs that alias (donated) arguments, temporaries, the persistent
state that lives during the program without being one of its arguments (the optimizer state while
sampling, the other role's state), and their sum, the peak. A program whose peak exceeds the
device's memory fails the check (exit status 1, naming the program).

Targets (:data:`TARGETS`): TPU slices (``v5e-8``, ``v4-8``, ``v5p-8``, ``v6e-8``, ...), compiled
with libtpu's topology descriptions (``jax.experimental.topologies``), which works on a CPU-only
machine once libtpu is installed (``pip install 'sgalm_jax[tpu]'``, i.e. ``jax[tpu]`` of the same
version as jax); and ``cpu-N``, N host CPU devices (XLA's own CPU compiler: no extra install; the
device count is set before JAX starts, and there is no memory limit to check). GPU targets are not
offered: compiling for a GPU needs the CUDA plugin and a GPU (or its target description), which
these development machines lack.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Sequence

from sgalm_jax.errors import ConfigError, SgalmError
from sgalm_jax.training.aot import Program, per_device_bytes

log = logging.getLogger(__name__)

GiB = 2 ** 30


class CompileCheckError(SgalmError):
    """A program does not fit the target's device memory, or cannot be compiled for it."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target: ``platform`` 'tpu' or 'cpu', a topology name for TPUs, the device count
    and the memory of one device (None: not checked)."""

    name: str
    platform: str
    topology: str | None
    num_devices: int
    memory: int | None
    description: str


# HBM per chip (the published capacities).
_TPU = {"v4": (32 * GiB, "TPU v4", 2), "v5e": (16 * GiB, "TPU v5e", 1),
        "v5p": (95 * GiB, "TPU v5p", 2), "v6e": (32 * GiB, "TPU v6e (Trillium)", 1)}
# Slices by chip count: the topology string libtpu knows (v4/v5p names count TensorCores, 2 per chip).
_TPU_TOPOLOGIES = {
    "v4": {4: "2x2x1", 8: "2x2x2", 16: "2x2x4"},
    "v5p": {4: "2x2x1", 8: "2x2x2", 16: "2x2x4"},
    "v5e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8"},
    "v6e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8"},
}


def _size(n: float) -> str:
    """Bytes as '15.8 GiB' or '10.9 MiB'."""
    return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / 2 ** 20:.2f} MiB"


def parse_target(name: str) -> Target:
    """``v5e-8`` (a slice; v4/v5p counts are TensorCores, 2 per chip, as Google names them) or
    ``cpu-N``; ConfigError naming ``--compile-only`` otherwise."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name.strip().lower())
    if m:
        gen, n = m.group(1), int(m.group(2))
        memory, desc, cores_per_chip = _TPU[gen]
        chips = n // cores_per_chip
        topo = _TPU_TOPOLOGIES[gen].get(chips)
        if topo is None or n % cores_per_chip:
            raise ConfigError(f"--compile-only: no {gen} slice named {name!r}; known: "
                              + ", ".join(f"{gen}-{c * cores_per_chip}"
                                          for c in _TPU_TOPOLOGIES[gen]))
        return Target(name, "tpu", f"{gen}:{topo}", chips, memory,
                      f"{chips} x {desc}, {memory / GiB:.0f} GiB HBM each")
    m = re.fullmatch(r"cpu(?:-(\d+))?", name.strip().lower())
    if m:
        n = int(m.group(1) or 1)
        return Target(name, "cpu", None, n, None, f"{n} host CPU device(s)")
    raise ConfigError(f"--compile-only: unknown target {name!r}; use a TPU slice (v5e-8, v4-8, "
                      "v5p-8, v6e-8, ...) or cpu-N")


def prepare_environment(target: Target) -> None:
    """For ``cpu-N``: ask XLA for N host devices (only effective before JAX starts its backend)."""
    if target.platform == "cpu" and target.num_devices > 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count="
                                       f"{target.num_devices}").strip()
    if target.platform == "tpu":  # libtpu probes the host for TPU workers; there are none here
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def target_devices(target: Target) -> list[Any]:
    """The target's devices: from libtpu's topology description, or the host's CPU devices."""
    import jax

    if target.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < target.num_devices:
            raise ConfigError(f"--compile-only={target.name}: only {len(devices)} CPU devices "
                              "(XLA_FLAGS=--xla_force_host_platform_device_count must be set "
                              "before JAX starts)")
        return devices[:target.num_devices]
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(target.topology, "tpu")
    except Exception as e:  # noqa: BLE001 - libtpu missing or too old: say how to get it
        raise ConfigError(
            f"--compile-only={target.name}: cannot describe the TPU topology {target.topology!r} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); compiling for TPUs needs "
            "libtpu: pip install 'jax[tpu]==<your jax version>' (or sgalm_jax[tpu])") from None
    return list(topo.devices)


@dataclasses.dataclass
class Report:
    name: str
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    resident: int
    code: int

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.resident


def compile_programs(programs: Sequence[Program]) -> list[Report]:
    """Lower and compile each program in order; their per-device memory."""
    exe = None
    reports = []
    for prog in programs:
        args = prog.args(exe) if callable(prog.args) else prog.args
        try:
            exe = prog.fn.lower(*args).compile()
        except Exception as e:  # noqa: BLE001 - report which program and why, in one line
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise CompileCheckError(f"{prog.name}: does not compile for the target "
                                    f"({type(e).__name__}: {first})") from e
        m = exe.memory_analysis()
        reports.append(Report(prog.name, int(m.argument_size_in_bytes),
                              int(m.output_size_in_bytes), int(m.alias_size_in_bytes),
                              int(m.temp_size_in_bytes), per_device_bytes(prog.resident),
                              int(m.generated_code_size_in_bytes)))
        log.info("compiled %s", prog.name)
    return reports


def format_reports(reports: Sequence[Report], target: Target, mesh_shape: dict[str, int]) -> str:
    """The table ``--compile-only`` prints (GiB per device)."""
    mesh = " ".join(f"{k}={v}" for k, v in mesh_shape.items())
    unit, div = ("GiB", GiB) if max(r.peak for r in reports) >= GiB / 4 else ("MiB", 2 ** 20)
    lines = [f"target {target.name}: {target.description}; mesh {mesh}",
             f"per device, {unit}: args + outputs - aliased (donated) + temporaries + resident "
             "(persistent state not among the args) = peak"]
    width = max(len(r.name) for r in reports)
    head = f"{'program':<{width}}  {'args':>6} {'out':>6} {'alias':>6} {'temp':>6} " \
           f"{'resid':>6} {'peak':>6}"
    lines += [head, "-" * len(head)]
    for r in reports:
        g = lambda x: f"{x / div:6.2f}"  # noqa: E731
        fits = "" if target.memory is None else (
            "  ok" if r.peak <= target.memory else "  DOES NOT FIT")
        lines.append(f"{r.name:<{width}}  {g(r.arguments)} {g(r.outputs)} {g(r.aliased)} "
                     f"{g(r.temporaries)} {g(r.resident)} {g(r.peak)}{fits}")
    if target.memory is not None:
        worst = max(reports, key=lambda r: r.peak)
        lines.append(f"largest: {worst.name}, {_size(worst.peak)} of {_size(target.memory)} "
                     f"({100 * worst.peak / target.memory:.0f}%)")
    return "\n".join(lines)


def run_compile_only(config: Any, algorithm: Any, target: Target) -> list[Report]:
    """Build the algorithm's programs on the target's mesh, compile them, print the table; raises
    :class:`CompileCheckError` when one does not fit."""
    from sgalm_jax import sharding as sh
    from sgalm_jax.config import validate_for_devices

    if algorithm.programs is None:
        raise ConfigError(f"--compile-only: algorithm {algorithm.name!r} does not list its "
                          "programs (it has no programs(config, mesh) function)")
    devices = target_devices(target)
    sizes = validate_for_devices(config, len(devices), 1)
    mesh = sh.make_mesh(sizes, devices)
    programs = algorithm.programs(config, mesh)
    reports = compile_programs(programs)
    print(format_reports(reports, target, sizes), flush=True)
    if target.memory is not None:
        over = [r for r in reports if r.peak > target.memory]
        if over:
            raise CompileCheckError(
                f"--compile-only={target.name}: {over[0].name} needs {_size(over[0].peak)} per "
                f"device, more than the {_size(target.memory)} of a {target.name} device"
                + (f" (and {len(over) - 1} more programs)" if len(over) > 1 else ""))
    return reports
