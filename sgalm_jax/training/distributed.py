"""Multi-host start-up: ``jax.distributed.initialize()`` when the process is one of several.

Every host (or every process on one machine) runs the same command (see ``launch/``). Where the
launch settings come from:

- **Cloud TPU VMs, SLURM job steps, Open MPI**: ``jax.distributed`` detects the coordinator, the
  process count and this process's id itself; nothing needs to be set.
- **Anywhere else** (plain machines, several processes on one machine): the config keys
  ``distributed.coordinator_address`` (``host:port`` of process 0), ``distributed.num_processes``
  and ``distributed.process_id``, or the environment variables ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (a config key wins over its variable). All three
  are needed; a partial setup is a :class:`ConfigError` naming what is missing.

``distributed.coordinator_bind_address`` (or ``JAX_COORDINATOR_BIND_ADDRESS``) is where process 0's
coordinator service listens. By default JAX listens on every interface (``[::]:port``); here a
loopback coordinator address (``127.0.0.1``, ``localhost``, ``::1``) binds to loopback only, so a
one-machine run is not reachable from the network.

``distributed.mode``: ``auto`` initialises when any of the above says this is a multi-process
launch, ``on`` always (JAX auto-detects what is not set), ``off`` never.

It must run before anything touches a JAX backend (device counts, arrays).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
from typing import Any, Mapping

import jax

from sgalm_jax.errors import ConfigError, SgalmError

log = logging.getLogger(__name__)

_initialized = False

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_BIND = "JAX_COORDINATOR_BIND_ADDRESS"
ENV_LOCAL_DEVICES = "JAX_LOCAL_DEVICE_IDS"


def detected_cluster(env: Mapping[str, str] | None = None) -> str | None:
    """The multi-process environment JAX configures itself from (``tpu``, ``slurm``, ``ompi``), or
    None. Only launches of more than one process count (a one-task SLURM step is single-process)."""
    env = dict(os.environ if env is None else env)
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and env.get("SLURM_STEP_ID") is not None:
        return "slurm"
    workers = env.get("TPU_WORKER_HOSTNAMES", "") or env.get("TPU_PROCESS_ADDRESSES", "")
    if workers and len([w for w in workers.split(",") if w.strip()]) > 1:
        return "tpu"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "ompi"
    return None


def launched_multi_process(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment describes a launch of more than one process."""
    env = dict(os.environ if env is None else env)
    if env.get(ENV_ADDRESS) or int(env.get(ENV_NUM_PROCESSES, "1") or 1) > 1:
        return True
    return detected_cluster(env) is not None


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """What :func:`maybe_initialize` passes to ``jax.distributed.initialize`` (None = JAX detects)."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    coordinator_bind_address: str | None
    local_device_ids: tuple[int, ...] | None
    initialization_timeout: int
    cluster: str | None

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"initialization_timeout": self.initialization_timeout}
        for key in ("coordinator_address", "num_processes", "process_id",
                    "coordinator_bind_address"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.local_device_ids is not None:
            out["local_device_ids"] = list(self.local_device_ids)
        return out


def _int_setting(dist: Any, key: str, env: Mapping[str, str], var: str) -> int | None:
    value = int(getattr(dist, key))
    if value >= 0:
        return value
    raw = env.get(var, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"distributed.{key}: ${var}={raw!r} is not an integer") from None


def _split_host_port(address: str, key: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{key}: {address!r} is not host:port")
    return host.strip("[]"), port


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_bind_address(coordinator_address: str) -> str | None:
    """Loopback only for a loopback coordinator (``127.0.0.1:port`` / ``[::1]:port``); None
    (JAX's default, every interface) otherwise."""
    host, port = _split_host_port(coordinator_address, "distributed.coordinator_address")
    if not is_loopback(host):
        return None
    return f"[::1]:{port}" if host == "::1" else f"127.0.0.1:{port}"


def resolve_launch(dist: Any, env: Mapping[str, str] | None = None) -> LaunchSpec | None:
    """The launch settings from the ``distributed`` section and the environment, or None when this
    is a single-process run. Raises ConfigError for a partial or inconsistent setup."""
    env = dict(os.environ if env is None else env)
    mode = dist.mode
    if mode == "off":
        return None
    address = dist.coordinator_address or env.get(ENV_ADDRESS, "").strip() or None
    num = _int_setting(dist, "num_processes", env, ENV_NUM_PROCESSES)
    pid = _int_setting(dist, "process_id", env, ENV_PROCESS_ID)
    cluster = detected_cluster(env)
    explicit = address is not None or num is not None or pid is not None
    if mode == "auto" and not explicit and cluster is None:
        return None
    if explicit and cluster is None:  # nothing for JAX to detect the rest from
        missing = [name for name, value in (("distributed.coordinator_address", address),
                                            ("distributed.num_processes", num),
                                            ("distributed.process_id", pid)) if value is None]
        if missing:
            raise ConfigError(
                f"{missing[0]}: not set; a multi-process launch outside a TPU VM, SLURM or Open MPI "
                f"needs distributed.coordinator_address (${ENV_ADDRESS}), "
                f"distributed.num_processes (${ENV_NUM_PROCESSES}) and distributed.process_id "
                f"(${ENV_PROCESS_ID}); missing: {', '.join(missing)}")
    if num is not None and num < 1:
        raise ConfigError(f"distributed.num_processes: must be >= 1, got {num}")
    if pid is not None and num is not None and not 0 <= pid < num:
        raise ConfigError(f"distributed.process_id: {pid} is not in [0, {num}) "
                          f"(distributed.num_processes={num})")
    bind = dist.coordinator_bind_address or env.get(ENV_BIND, "").strip() or None
    if bind is not None:
        _split_host_port(bind, "distributed.coordinator_bind_address")
    elif address is not None:
        bind = default_bind_address(address)
    if address is not None:
        _split_host_port(address, "distributed.coordinator_address")
    ids_spec = dist.local_device_ids or env.get(ENV_LOCAL_DEVICES, "")
    local_ids = None
    if ids_spec.strip():
        try:
            local_ids = tuple(int(x) for x in ids_spec.split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"distributed.local_device_ids: {ids_spec!r} is not a "
                              "comma-separated list of device ids") from None
    timeout = int(dist.initialization_timeout)
    if timeout < 1:
        raise ConfigError(f"distributed.initialization_timeout: must be >= 1, got {timeout}")
    return LaunchSpec(address, num, pid, bind, local_ids, timeout, cluster)


def maybe_initialize(dist: Any) -> bool:
    """Initialise multi-host JAX per the ``distributed`` config section; True if it did."""
    global _initialized
    if _initialized:
        return True
    spec = resolve_launch(dist)
    if spec is None:
        return False
    kwargs = spec.kwargs()
    log.info("initialising multi-host JAX (%s%s)", kwargs,
             f"; the rest detected from {spec.cluster}" if spec.cluster else "")
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError, TypeError) as e:
        where = (f"coordinator {spec.coordinator_address}" if spec.coordinator_address
                 else f"the {spec.cluster or 'detected'} environment")
        raise SgalmError(
            f"distributed: jax.distributed.initialize failed ({where}, process "
            f"{spec.process_id if spec.process_id is not None else '?'} of "
            f"{spec.num_processes if spec.num_processes is not None else '?'}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Check that every "
            "process was started with the same coordinator address and process count, that "
            "process 0 is running, and that the port is free and reachable "
            "(distributed.initialization_timeout)") from e
    _initialized = True
    log.info("process %d of %d; %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
