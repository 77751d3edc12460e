"""Logical axis names -> mesh axes, and the activation sharding constraints the model applies.

The mesh has three axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with weights
sharded, ZeRO-3 style) and ``tensor`` (heads and MLP columns split across devices). Params and
activations carry logical axis names (``batch``, ``embed``, ``heads``, ...); :data:`LOGICAL_RULES`
maps them to mesh axes, each mesh axis used at most once per array, so an activation
[batch, length, embed] is split over ``('data', 'fsdp')`` along the batch while the same ``embed``
name splits a weight's hidden dim over ``fsdp``.

:func:`constrain` pins an activation to its sharding when a mesh is JAX's context mesh
(``jax.set_mesh``; the train steps, scorers and samplers of this library set it). Without the pins,
GSPMD propagates the weights' FSDP sharding of the hidden dim into the activations and keeps the
*batch* whole on every device: a 2-layer Qwen2.5-3B-shaped discriminator step (64 x 1536 tokens,
fsdp=8, v5e, XLA attention) compiled to 10.3 GiB of temporaries per chip that way, mostly
[64, 1536, 11008] MLP activations, against 4.9 GiB with them (docs/benchmarks.md).
:mod:`sgalm_jax.sharding` re-exports the names here.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import PartitionSpec as P

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
    "layers": None,  # the leading axis of the decoder's stacked layer params and KV cache
    # LoRA adapters' rank: over fsdp when the adapter's other axis is not (each mesh axis is used
    # once per array), so A [in, r] and B [r, out] are sharded like the weights, not replicated.
    "lora_rank": "fsdp",
}


def _axis_size(mesh: Any, axis: Any) -> int:
    if axis is None:
        return 1
    if isinstance(axis, (tuple, list)):
        return math.prod(mesh.shape[a] for a in axis)
    return mesh.shape[axis]


def logical_to_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Any,
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


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """``x`` pinned to the sharding of its logical axes on the context mesh (a no-op without one,
    or on a one-device mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))
