"""Multi-host start-up: ``jax.distributed.initialize()`` when the process is one of several.

Every host runs the same command (see ``launch/``). ``distributed.mode``:

- ``auto``: initialise when the environment says this is a multi-process launch: an explicit
  ``distributed.coordinator_address`` / ``$JAX_COORDINATOR_ADDRESS``, a SLURM job step with more
  than one task, a Cloud TPU VM slice with more than one worker, or an Open MPI launch;
- ``on``: always initialise (JAX auto-detects the cluster unless the keys are set);
- ``off``: never (single process).

It must run before anything touches a JAX backend (device counts, arrays).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

from sgalm_jax.errors import ConfigError

log = logging.getLogger(__name__)

_initialized = False


def launched_multi_process(env: dict[str, str] | None = None) -> bool:
    """Whether the environment describes a launch of more than one process."""
    env = dict(os.environ if env is None else env)
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and env.get("SLURM_STEP_ID") is not None:
        return True
    workers = env.get("TPU_WORKER_HOSTNAMES", "")
    if workers and len([w for w in workers.split(",") if w.strip()]) > 1:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    return False


def maybe_initialize(dist: Any) -> bool:
    """Initialise multi-host JAX per the ``distributed`` config section; True if it did."""
    global _initialized
    if _initialized:
        return True
    mode = dist.mode
    if mode == "off" or (mode == "auto" and not dist.coordinator_address
                         and not launched_multi_process()):
        return False
    kwargs: dict[str, Any] = {}
    if dist.coordinator_address:
        kwargs["coordinator_address"] = dist.coordinator_address
    if dist.num_processes >= 0:
        kwargs["num_processes"] = dist.num_processes
    if dist.process_id >= 0:
        kwargs["process_id"] = dist.process_id
    if ("num_processes" in kwargs) != ("process_id" in kwargs):
        raise ConfigError("distributed.num_processes: set both distributed.num_processes and "
                          "distributed.process_id, or neither")
    log.info("initialising multi-host JAX (%s)", kwargs or "auto-detected")
    jax.distributed.initialize(**kwargs)
    _initialized = True
    log.info("process %d of %d; %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
