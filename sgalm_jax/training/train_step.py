"""A generic jitted train step: differentiate any pure loss, update with optax.

``loss_fn(params, batch, rng, *extra) -> (loss, metrics)`` is any pure function: this is where
researchers plug in their objectives. ``extra`` are further pytrees the step passes through
unchanged and does not differentiate (a frozen reference model's params, say); passing them as
arguments rather than closing over them keeps them sharded and out of the compiled program's
constants (closing over them also works, but jit then embeds them as constants).

The step:

1. splits ``state.rng``; the per-step key goes to ``loss_fn`` (folded with the micro-batch index);
2. casts floating params to ``compute_dtype`` inside the differentiated function (bf16 compute
   with fp32 master weights: gradients come back in the params' dtype);
3. stops gradients of frozen params (``trainable`` mask), so XLA skips their backward;
4. with ``grad_accum_steps = k``, splits each batch leaf's leading dim into k micro-batches and
   accumulates gradients in fp32 in a ``lax.scan`` (one compiled micro-step, constant memory);
   micro-batches are weighted by the metric named ``accum_weight`` (e.g. ``num_tokens``, which makes
   k micro-batches of a token-mean loss equal the full batch exactly) or equally;
5. applies the optimizer, increments ``step`` and returns metrics (+ ``grad_norm``,
   ``learning_rate``), replicated;
6. with ``skip_nonfinite``, keeps the previous params and optimizer state when the loss or the
   gradient norm is NaN/inf (metric ``skipped`` = 1), like ``optax.apply_if_finite``; the loop's
   :class:`~sgalm_jax.training.finite.FiniteGuard` reports it (``train.nonfinite = "skip"``).

It is jitted with explicit ``in_shardings``/``out_shardings``, donates the state, and runs with
the mesh as JAX's context mesh (:func:`sgalm_jax.sharding.jit_on_mesh`), so the model pins its
activations to their shardings (batch over ``('data', 'fsdp')``) and can run Pallas kernels.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sgalm_jax import sharding as sh
from sgalm_jax.models.config import resolve_dtype
from sgalm_jax.training.state import TrainState

LossFn = Callable[..., tuple[jax.Array, dict[str, Any]]]


def _cast_floating(tree: Any, dtype: Any) -> Any:
    def one(x):
        if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            return x.astype(dtype)
        return x

    return jax.tree.map(one, tree)


def _stop_frozen(params: Any, trainable: Any) -> Any:
    # Frozen params get no gradient: stop_gradient lets XLA drop their part of the backward pass.
    return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh,
    state_shardings: TrainState,
    batch_shardings: Any = None,
    extra_shardings: Sequence[Any] = (),
    grad_accum_steps: int = 1,
    accum_weight: str | None = None,
    compute_dtype: Any = None,
    trainable: Any = None,
    learning_rate: Callable[[Any], Any] | float | None = None,
    donate: bool = True,
    skip_nonfinite: bool = False,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted ``step(state, batch, *extra) -> (state, metrics)``.

    Args:
      loss_fn: ``loss_fn(params, batch, rng, *extra) -> (scalar loss, dict of scalar metrics)``.
      optimizer: the optax transformation whose state is ``state.opt_state``.
      mesh: the device mesh.
      state_shardings: a :class:`TrainState` of shardings (from ``create_train_state``).
      batch_shardings: shardings of the batch pytree (a prefix is fine); default: every leaf's
        leading dim over the ('data', 'fsdp') axes.
      extra_shardings: shardings of each ``extra`` argument (e.g. reference params).
      grad_accum_steps: micro-batches per step; each batch leaf's leading dim must divide by it.
      accum_weight: name of a metric weighting each micro-batch (summed, not averaged, in the
        returned metrics); None = equal weights.
      compute_dtype: dtype the floating params are cast to for the loss (None = no cast).
      trainable: bool tree like the params; False leaves get no gradient.
      learning_rate: schedule (or constant) reported as the ``learning_rate`` metric.
      donate: donate the input state's buffers to the output.
      skip_nonfinite: do not apply a step whose loss or gradient norm is not finite (its
        ``skipped`` metric is 1; step and RNG still advance).
    """
    k = int(grad_accum_steps)
    if k < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {k}")
    compute_dtype = resolve_dtype(compute_dtype) if compute_dtype else None
    repl = sh.replicated(mesh)
    if batch_shardings is None:
        batch_shardings = NamedSharding(mesh, P(sh.BATCH_AXES))

    def grad_fn(params, batch, rng, extra):
        def compute(p):
            if trainable is not None:
                p = _stop_frozen(p, trainable)
            if compute_dtype is not None:
                p = _cast_floating(p, compute_dtype)
            loss, metrics = loss_fn(p, batch, rng, *extra)
            return loss, metrics

        (loss, metrics), grads = jax.value_and_grad(compute, has_aux=True)(params)
        metrics = dict(metrics)
        metrics["loss"] = loss
        return grads, metrics

    def accumulate(params, batch, rng, extra):
        def split(x):
            if x.shape[0] % k:
                raise ValueError(f"batch leaf of shape {x.shape}: leading dim not divisible by "
                                 f"grad_accum_steps={k}")
            # Micro-batch j takes rows j, j+k, j+2k, ...: each device's contiguous block of rows
            # feeds every micro-batch, so splitting needs no communication.
            x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(
                x, NamedSharding(mesh, P(None, sh.BATCH_AXES, *([None] * (x.ndim - 2)))))

        micro = jax.tree.map(split, batch)
        grads_shape, metrics_shape = jax.eval_shape(
            grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng, extra)
        zeros_g = jax.tree.map(lambda g: jnp.zeros(g.shape, jnp.float32), grads_shape)
        zeros_g = jax.lax.with_sharding_constraint(zeros_g, state_shardings.params)
        zeros_m = jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.float32), metrics_shape)

        def body(carry, xs):
            acc_g, acc_m, total_w = carry
            i, mb = xs
            g, m = grad_fn(params, mb, jax.random.fold_in(rng, i), extra)
            w = (m[accum_weight].astype(jnp.float32) if accum_weight else jnp.float32(1.0))
            acc_g = jax.tree.map(lambda a, b: a + w * b.astype(jnp.float32), acc_g, g)
            acc_m = {n: acc_m[n] + (v.astype(jnp.float32) if n == accum_weight
                                    else w * v.astype(jnp.float32)) for n, v in m.items()}
            return (acc_g, acc_m, total_w + w), None

        (acc_g, acc_m, total_w), _ = jax.lax.scan(
            body, (zeros_g, zeros_m, jnp.float32(0.0)), (jnp.arange(k), micro))
        denom = jnp.maximum(total_w, 1e-12)
        grads = jax.tree.map(lambda a, g: (a / denom).astype(g.dtype), acc_g, grads_shape)
        metrics = {n: (v if n == accum_weight else v / denom) for n, v in acc_m.items()}
        return grads, metrics

    def step(state: TrainState, batch: Any, *extra: Any):
        rng, step_rng = jax.random.split(state.key())
        if k == 1:
            grads, metrics = grad_fn(state.params, batch, step_rng, extra)
        else:
            grads, metrics = accumulate(state.params, batch, step_rng, extra)
        grads = jax.lax.with_sharding_constraint(grads, state_shardings.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        if skip_nonfinite:
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
            params = jax.tree.map(keep, params, state.params)
            opt_state = jax.tree.map(keep, opt_state, state.opt_state)
            metrics["skipped"] = jnp.logical_not(ok).astype(jnp.int32)
        if learning_rate is not None:
            lr = learning_rate(state.step) if callable(learning_rate) else learning_rate
            metrics["learning_rate"] = jnp.asarray(lr, jnp.float32)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               rng=jax.random.key_data(rng))
        return new_state, metrics

    return sh.jit_on_mesh(
        step,
        mesh,
        in_shardings=(state_shardings, batch_shardings, *extra_shardings),
        out_shardings=(state_shardings, repl),
        donate_argnums=(0,) if donate else (),
    )
