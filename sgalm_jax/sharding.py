"""Device meshes and the logical-axis rules that place params, optimizer state and batches.

The mesh has three axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with weights
sharded, ZeRO-3 style) and ``tensor`` (heads and MLP columns split across devices). Model params carry
logical axis names (``embed``, ``heads``, ...); :data:`LOGICAL_RULES` maps them to mesh axes. The same
code path runs on one CPU, on 8 simulated CPU devices, on a GPU and on a multi-host TPU pod: nothing
here turns into a no-op on one device, a one-device mesh simply has axes of size 1.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sgalm_jax.errors import ShardingError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or axes, or None for replicated).
LOGICAL_RULES: dict[str, Any] = {
    "batch": BATCH_AXES,
    "length": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "head_dim": None,
    # LoRA adapters' rank: over fsdp when the adapter's other axis is not (each mesh axis is used
    # once per array), so A [in, r] and B [r, out] are sharded like the weights, not replicated.
    "lora_rank": "fsdp",
}


def resolve_mesh_shape(shape: Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
    """Fill a ``-1`` entry and check the product equals the device count.

    The default (``None``) puts every device on ``fsdp``.
    """
    shape = dict(shape or {"data": 1, "fsdp": -1, "tensor": 1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ShardingError(f"mesh: unknown axes {sorted(unknown)}; the axes are {MESH_AXES}")
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ShardingError(f"mesh.{bad[0]}: size {sizes[bad[0]]} is not a positive size or -1")
    if len(fill) > 1:
        raise ShardingError(f"mesh: only one axis may be -1, got {fill}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % known:
            raise ShardingError(
                f"mesh: the fixed axes {sizes} multiply to {known}, which does not divide the "
                f"{num_devices} available devices")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ShardingError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes.values())} ({sizes}) does not equal the "
            f"{num_devices} available devices")
    return sizes


def make_mesh(shape: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over ``devices`` (default: all devices, all hosts)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(shape, len(devices))
    dims = tuple(sizes[a] for a in MESH_AXES)
    try:
        device_array = jax.experimental.mesh_utils.create_device_mesh(dims, devices=devices)
    except Exception:  # irregular device sets (e.g. CPU subsets) fall back to the given order
        device_array = np.asarray(devices).reshape(dims)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _axis_size(mesh: Mesh, axis: Any) -> int:
    if axis is None:
        return 1
    if isinstance(axis, (tuple, list)):
        return math.prod(mesh.shape[a] for a in axis)
    return mesh.shape[axis]


def logical_to_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, Any] | None = None) -> P:
    """The PartitionSpec for an array of ``shape`` with the given logical axis names.

    A dimension whose size the mesh axis does not divide (e.g. 2 KV heads on a tensor axis of 4) is
    replicated instead, and each mesh axis is used at most once per array.
    """
    rules = LOGICAL_RULES if rules is None else rules
    if not logical_axes:
        return P()
    if len(logical_axes) != len(shape):
        raise ShardingError(f"logical axes {logical_axes} do not match array shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        axis = rules.get(name) if name is not None else None
        names = tuple(axis) if isinstance(axis, (tuple, list)) else ((axis,) if axis else ())
        if not names or used & set(names) or dim % _axis_size(mesh, names):
            if names and dim % _axis_size(mesh, names):
                log.debug("replicating dim %s (size %d) of %s: not divisible by mesh axes %s",
                          name, dim, logical_axes, names)
            spec.append(None)
            continue
        used |= set(names)
        spec.append(names if len(names) > 1 else names[0])
    return P(*spec)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh, rules: Mapping[str, Any] | None = None) -> Any:
    """NamedShardings for every leaf of an ``nnx.State`` (real or abstract), from its logical axes.

    Variables without ``logical_axes`` metadata (counters, RNG state) are replicated.
    """

    def one(var: Any) -> Any:
        if _is_variable(var):
            value = var.get_value()
            axes = var.get_metadata().get("logical_axes")
            spec = logical_to_spec(axes, value.shape, mesh, rules) if axes else P()
            return var.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=_is_variable)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping[str, Any] | None = None) -> nnx.Module:
    """Place every param of ``model`` into its sharding on ``mesh`` (in place) and return it."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a batch array: the leading dim over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch shards (data x fsdp)."""
    return _axis_size(mesh, BATCH_AXES)


# ------------------------------------------------------------------------------- training helpers
def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on ``mesh`` (scalars, step counters, metrics)."""
    return NamedSharding(mesh, P())


def shardings_like_params(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for ``tree`` (e.g. an optimizer state) whose param-shaped leaves follow the params.

    A leaf of ``tree`` whose key path ends with the full key path of a param and has that param's
    shape gets the param's sharding (Adam's ``mu``/``nu``, RMSProp's ``nu``, momentum traces, in
    whatever optax wrapper: chain, masked, multi_transform); every other leaf (step counts, ...) is
    replicated. This relies only on key paths, not on optax internals.
    """
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_shardings = jax.tree.leaves(param_shardings,
                                     is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if len(flat_params) != len(flat_shardings):
        raise ShardingError(f"param_shardings has {len(flat_shardings)} leaves, params has "
                            f"{len(flat_params)}")
    table = {tuple(path): (tuple(np.shape(leaf)), s)
             for (path, leaf), s in zip(flat_params, flat_shardings)}
    lengths = sorted({len(p) for p in table}, reverse=True)
    repl = replicated(mesh)

    def one(path: tuple, leaf: Any) -> Any:
        shape = tuple(np.shape(leaf))
        for n in lengths:
            if n <= len(path):
                hit = table.get(tuple(path[-n:]))
                if hit is not None and hit[0] == shape:
                    return hit[1]
        return repl

    return jax.tree_util.tree_map_with_path(one, tree)


def to_host(tree: Any) -> Any:
    """Numpy copies of every array leaf of ``tree``, complete on every process.

    ``jax.device_get`` can only read the shards of this process's devices, so on several hosts it
    fails for a batch-sharded global array (the sampler's tokens, a scorer's per-row results). Here
    an array this process holds entirely (one host, or replicated) is read locally, and the others
    are all-gathered in one collective (``multihost_utils.process_allgather``), which every process
    must call with the same tree, as with any collective. One process: exactly ``jax.device_get``.
    """
    leaves, treedef = jax.tree.flatten(tree)
    out: list[Any] = list(leaves)
    remote = []
    for i, x in enumerate(leaves):
        if not isinstance(x, jax.Array):
            out[i] = np.asarray(x)
        elif x.is_fully_addressable:
            out[i] = np.asarray(jax.device_get(x))
        elif x.sharding.is_fully_replicated:
            out[i] = np.asarray(x.addressable_data(0))
        else:
            remote.append(i)
    if remote:
        from jax.experimental import multihost_utils

        gathered = multihost_utils.process_allgather([leaves[i] for i in remote], tiled=True)
        for i, g in zip(remote, gathered):
            out[i] = np.asarray(g)
    return jax.tree.unflatten(treedef, out)


def global_batch_from_local(local: Any, mesh: Mesh) -> Any:
    """Assemble global batch arrays from this host's rows (leading dim) of each leaf.

    On one host this is a ``device_put`` into :func:`batch_sharding`; on several, each host passes
    its own contiguous slice of the global batch (rows ``[p * B / P, (p + 1) * B / P)``).
    """
    def one(x: Any) -> jax.Array:
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(one, local)
