"""Host-local sampling: a copy of the params on every host, each host sampling its own prompts.

Sampling on the training mesh runs every decode step across all hosts: with FSDP-sharded weights each
step gathers the weights over the data-centre network. When the model fits on one host it is much
faster to give each host its own copy, laid out for decoding on the host's local devices, and let each
host decode its share of the prompts without talking to the others (Levanter measured ~4.9x over
sampling on the global mesh for an 8B model on a v5p-32; refresh-2026-11.md §3.2). The results are
then gathered so that every host returns the whole batch, in prompt order.

Pieces, used by :class:`sgalm_jax.sampling.Sampler` with ``placement="host_local"``:

* :func:`local_mesh`: a (data, fsdp, tensor) mesh over this host's devices (default: ``data`` over
  all of them, i.e. the params replicated on each local device and the slots split among them).
* :func:`host_local_params`: the params resharded so that every host holds a full copy, laid out on
  its local mesh (each leaf keeps the mesh axes of its training sharding that the local mesh can
  split), then viewed as arrays over the local devices only. One reshard per call: the training
  params are not touched.
* :func:`host_share`: the contiguous block of prompts a host samples.
* :func:`gather_host_rows`: every host's rows, concatenated in host (= prompt) order.

The continuous engine seeds each row from its global row index, so a host-local run gives exactly
the rows a single-host run gives, whatever the number of hosts.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sgalm_jax.sharding import make_mesh

__all__ = ["local_mesh", "host_local_params", "host_share", "gather_host_rows", "run_host_local"]


def local_mesh(shape: Mapping[str, int] | None = None, process_index: int | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over one process's devices (default: this one's).

    ``shape`` defaults to ``{"data": local device count}``: each device holds the whole model and
    decodes its own slots. For a model too large for one device use e.g. ``{"data": 2, "tensor": 4}``.
    """
    p = jax.process_index() if process_index is None else process_index
    devices = [d for d in jax.devices() if d.process_index == p]
    return make_mesh(dict(shape) if shape else {"data": len(devices)}, devices)


def _local_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """``spec`` restricted to the axes of ``mesh`` that evenly split each dimension."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    out = []
    for dim, entry in zip(shape, entries):
        axes = entry if isinstance(entry, tuple) else (() if entry is None else (entry,))
        keep = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
        if keep and dim % math.prod(mesh.shape[a] for a in keep) == 0:
            out.append(keep if len(keep) > 1 else keep[0])
        else:
            out.append(None)
    return P(*out)


def _host_mesh(mesh: Mesh) -> Mesh:
    """All hosts' local meshes (each built like ``mesh``) stacked on a leading ``host`` axis."""
    shape = dict(mesh.shape)
    arrays = [local_mesh(shape, p).devices for p in range(jax.process_count())]
    return Mesh(np.stack(arrays), ("host",) + tuple(mesh.axis_names))


def host_local_params(state: Any, mesh: Mesh) -> Any:
    """``state`` (params on any mesh, any number of hosts) as arrays on this host's ``mesh``.

    Each leaf is first resharded on the global device set so that it is replicated across hosts and
    split within each host as on ``mesh``; this host's shards then form the local array (no further
    copy). In a single process this is one reshard onto the local mesh.
    """
    host_mesh = _host_mesh(mesh)

    def one(x: Any) -> Any:
        if not isinstance(x, jax.Array):
            return x
        spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else P()
        spec = _local_spec(spec, x.shape, mesh)
        y = jax.device_put(x, NamedSharding(host_mesh, spec))  # replicated over 'host'
        local = NamedSharding(mesh, spec)
        return jax.make_array_from_single_device_arrays(
            x.shape, local, [s.data for s in y.addressable_shards])

    return jax.tree.map(one, state)


def host_share(num: int, process_index: int | None = None,
               process_count: int | None = None) -> tuple[int, int]:
    """``[start, stop)``: the contiguous block of ``num`` prompts host ``process_index`` samples
    (sizes differ by at most one, earlier hosts take the extra)."""
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    base, extra = divmod(num, n)
    start = p * base + min(p, extra)
    return start, start + base + (1 if p < extra else 0)


def gather_host_rows(arrays: Mapping[str, np.ndarray], counts: list[int]) -> dict[str, np.ndarray]:
    """Every host's ``arrays`` (leading dim: that host's ``counts[p]`` rows), concatenated in host
    order on every host. In a single process it returns ``arrays`` unchanged."""
    if jax.process_count() == 1:
        return dict(arrays)
    from jax.experimental import multihost_utils

    most = max(counts)
    padded = {k: np.pad(v, [(0, most - v.shape[0])] + [(0, 0)] * (v.ndim - 1))
              for k, v in arrays.items()}
    gathered = multihost_utils.process_allgather(padded, tiled=False)  # [hosts, most, ...]
    return {k: np.concatenate([np.asarray(gathered[k][p, :c]) for p, c in enumerate(counts)])
            for k in arrays}


def run_host_local(engine: Any, state: Any, prompts: list[np.ndarray], limits: np.ndarray, *,
                   mesh: Mesh, num_samples: int, process_index: int | None = None,
                   process_count: int | None = None, gather: bool = True,
                   **kwargs: Any) -> dict[str, np.ndarray]:
    """Sample this host's share of ``prompts`` with ``engine`` (a
    :class:`~sgalm_jax.sampling_engine.ContinuousEngine`) on its own copy of ``state`` laid out on
    ``mesh``; return every host's rows in prompt order (only this host's when ``gather=False``).

    ``process_index`` / ``process_count`` default to JAX's; tests pass them to play several hosts in
    one process (with ``gather=False``). Other keyword arguments go to ``engine.run``.
    """
    p = jax.process_index() if process_index is None else process_index
    hosts = jax.process_count() if process_count is None else process_count
    start, stop = host_share(len(prompts), p, hosts)
    n = num_samples
    res = engine.run(host_local_params(state, mesh), prompts[start:stop],
                     limits[start * n:stop * n], mesh=mesh, num_samples=n, row_offset=start * n,
                     **kwargs)
    rows = dict(tokens=res.tokens, logprobs=res.logprobs, lengths=res.lengths,
                finished=res.finished)
    if not gather:
        return rows
    counts = [(b - a) * n for a, b in (host_share(len(prompts), q, hosts) for q in range(hosts))]
    return gather_host_rows(rows, counts)
