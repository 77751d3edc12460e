"""Abstract arguments for ahead-of-time compilation: the pieces algorithms use to list their programs.

An algorithm's ``programs(config, mesh)`` returns :class:`Program` s whose arguments are
``jax.ShapeDtypeStruct`` s with shardings (:func:`abstract_tree`, :func:`abstract_train_state`,
:func:`abstract_batch`), so :mod:`sgalm_jax.compile_only` can compile them for a device mesh that
does not exist here (a TPU topology) and read their memory figures.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sgalm_jax import sharding as sh
from sgalm_jax.training.state import TrainState, train_state_shardings


@dataclasses.dataclass
class Program:
    """One program to compile: ``fn`` a jitted function (or :class:`sgalm_jax.sharding.OnMesh`);
    ``args`` its abstract arguments, or a function of the program compiled just before it (its
    ``jax.stages.Compiled``: e.g. a decode placed by its prefill's output shardings) returning
    them; ``resident`` abstract arrays alive during the program that are not among its
    arguments."""

    name: str
    fn: Any
    args: Sequence[Any] | Callable[[Any], Sequence[Any]]
    resident: Any = None


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of (abstract) arrays with shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = tuple(leaf.shape)
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            shape = sharding.shard_shape(shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def abstract_tree(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves with the given shardings (a matching tree)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


def abstract_train_state(params: Any, optimizer: optax.GradientTransformation, mesh: Mesh
                         ) -> tuple[TrainState, TrainState]:
    """An abstract :class:`TrainState` over abstract ``params`` (sharded by their logical axes)
    and its shardings, as ``create_train_state`` would lay it out."""
    pshard = sh.state_shardings(params, mesh)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                       opt_state=jax.eval_shape(optimizer.init, params),
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    shardings = train_state_shardings(state, mesh, pshard)
    return abstract_tree(state, shardings), shardings


def abstract_batch(mesh: Mesh, fields: Mapping[str, tuple[tuple[int, ...], Any]]) -> dict:
    """``{name: ShapeDtypeStruct(shape, dtype)}`` with the leading dim over the batch axes."""
    out = {}
    for name, (shape, dtype) in fields.items():
        spec = P(sh.BATCH_AXES, *([None] * (len(shape) - 1)))
        out[name] = jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, spec))
    return out


def rows_fields(rows: int, width: int, *, prefix: str = "", loss_mask: bool = False
                ) -> dict[str, tuple[tuple[int, ...], Any]]:
    """The fields of right-padded token rows (``pad_rows``'s layout) for :func:`abstract_batch`."""
    out = {"input_ids": ((rows, width), jnp.int32), "attention_mask": ((rows, width), jnp.int32),
           "positions": ((rows, width), jnp.int32), "last": ((rows,), jnp.int32),
           "row_mask": ((rows,), jnp.float32)}
    if loss_mask:
        out["loss_mask"] = ((rows, width), jnp.float32)
    return {prefix + k: v for k, v in out.items()}


def resident(roles: Any, args: Any) -> list[Any]:
    """The persistent state of ``roles`` (a :class:`~sgalm_jax.training.roles.Roles` built with
    ``build_abstract``: learners' states, frozen params) that is not among a program's ``args``:
    what stays allocated on the devices while that program runs."""
    held = {id(x) for x in jax.tree.leaves(args)}
    out = []
    for role in roles:
        tree = role.state if role.is_learner else role.frozen_params
        out += [x for x in jax.tree.leaves(tree) if id(x) not in held]
    return out

