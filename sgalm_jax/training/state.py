"""The train state (a plain pytree) and helpers that split an NNX model into graph + params.

Functional core: ``graphdef, params = split_model(model)``; the train step differentiates pure
functions of ``params`` (an ``nnx.State`` of ``nnx.Param``, or any pytree such as a pure dict), and a
loss rebuilds the module inside the trace with ``nnx.merge(graphdef, params)``
(:func:`model_loss` does it for you).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from sgalm_jax import sharding as sh


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a train step updates: step count, params, optimizer state, RNG.

    ``rng`` holds raw key data (``uint32[2]``, threefry) so checkpoints store it as a plain array;
    :meth:`key` gives the typed key.
    """

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array

    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (the layout checkpoints use)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)``: the module's structure and its ``nnx.Param`` state.

    Models whose state has non-Param variables need ``nnx.split(model, nnx.Param, ...)`` instead
    (and the rest passed to :func:`merge_model`); :class:`CausalLM` has only params.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("split_model: the model has non-Param state; use nnx.split(model, "
                         "nnx.Param, ...) and pass the rest to merge_model")
    return graphdef, params


def merge_model(graphdef: nnx.GraphDef, params: Any, *rest: Any) -> nnx.Module:
    """The module for ``params`` (works inside jit: nothing is copied)."""
    return nnx.merge(graphdef, params, *rest)


def model_loss(graphdef: nnx.GraphDef,
               fn: Callable[..., tuple[jax.Array, dict[str, Any]]]) -> Callable[..., Any]:
    """Turn ``fn(model, batch, rng, *extra)`` into the ``loss_fn(params, batch, rng, *extra)`` that
    :func:`~sgalm_jax.training.make_train_step` differentiates."""

    def loss_fn(params: Any, batch: Any, rng: jax.Array, *extra: Any):
        return fn(nnx.merge(graphdef, params), batch, rng, *extra)

    return loss_fn


def param_shardings(params: Any, mesh: Mesh, rules: dict[str, Any] | None = None) -> Any:
    """NamedShardings of an ``nnx.State`` of params, from their logical axes."""
    return sh.state_shardings(params, mesh, rules)


def train_state_shardings(state: TrainState, mesh: Mesh, params_shardings: Any) -> TrainState:
    """Shardings of every leaf of ``state`` (real or abstract): params by ``params_shardings``,
    optimizer-state leaves like their params, step and RNG replicated."""
    repl = sh.replicated(mesh)
    return TrainState(
        step=repl,
        params=params_shardings,
        opt_state=sh.shardings_like_params(state.opt_state, state.params, params_shardings, mesh),
        rng=repl,
    )


def create_train_state(params: Any, optimizer: optax.GradientTransformation, *, seed: int = 0,
                       mesh: Mesh | None = None, params_shardings: Any = None
                       ) -> tuple[TrainState, TrainState | None]:
    """A fresh :class:`TrainState` (step 0) and its shardings (None without a mesh).

    The optimizer state is created directly in its sharding (no replicated copy on one device).
    ``params_shardings`` defaults to the logical-axis rules (params must be an ``nnx.State``).
    """
    rng = jax.random.key_data(jax.random.key(seed))
    if mesh is None:
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=optimizer.init(params), rng=rng)
        return state, None
    if params_shardings is None:
        params_shardings = param_shardings(params, mesh)
    params = jax.device_put(params, params_shardings)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                          opt_state=jax.eval_shape(optimizer.init, params), rng=rng)
    shardings = train_state_shardings(abstract, mesh, params_shardings)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
                       params=params, opt_state=opt_state,
                       rng=jax.device_put(rng, shardings.rng))
    return state, shardings


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (with shardings when given): a restore target."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
