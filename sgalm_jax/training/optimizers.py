"""Optimizers and learning-rate schedules from config, built from optax pieces.

- ``rmsprop`` matches ``torch.optim.RMSprop`` (the self-play papers' optimizer): ``v = a v + (1-a) g^2``
  from ``v = 0``, update ``g / (sqrt(v) + eps)`` (eps *outside* the square root; optax's default puts
  it inside), optional momentum buffer, L2 weight decay added to the gradient.
- ``adamw`` is ``optax.adamw`` (decoupled decay, applied to matrices only, as HF's Trainer does).
- ``sgd`` matches ``torch.optim.SGD`` (momentum without dampening, L2 added to the gradient).

Every optimizer is preceded by global-norm clipping (when ``max_grad_norm > 0``) and wrapped in a
trainable mask: params matched by the ``freeze`` regex get zero updates and no optimizer state.
Gradient accumulation is done inside the train step (see :mod:`.train_step`), not here.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from sgalm_jax.errors import ConfigError

Schedule = Callable[[Any], jax.Array]


def make_schedule(learning_rate: float, *, schedule: str = "constant", warmup_steps: int = 0,
                  decay_steps: int = 0, end_lr_factor: float = 0.0,
                  num_steps: int = 0) -> Schedule:
    """Linear warmup from 0 (step 0 has lr 0, as HF/torch warmup) then constant/linear/cosine.

    ``decay_steps = 0`` decays over the rest of the run (``num_steps - warmup_steps``).
    """
    decay = decay_steps or max(num_steps - warmup_steps, 1)
    end = learning_rate * end_lr_factor
    if schedule == "constant":
        main = optax.constant_schedule(learning_rate)
    elif schedule == "linear":
        main = optax.linear_schedule(learning_rate, end, decay)
    elif schedule == "cosine":
        main = optax.cosine_decay_schedule(learning_rate, decay, alpha=end_lr_factor)
    else:
        raise ConfigError(f"optimizer.schedule: unknown schedule {schedule!r}")
    if warmup_steps <= 0:
        return main
    warm = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warm, main], [warmup_steps])


def torch_rmsprop(learning_rate: float | Schedule, *, decay: float = 0.99, eps: float = 1e-8,
                  momentum: float = 0.0, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """``torch.optim.RMSprop(lr, alpha=decay, eps, momentum, weight_decay)``, centered=False."""
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))  # torch: g += wd * p (L2)
    parts.append(optax.scale_by_rms(decay=decay, eps=eps, initial_scale=0.0, eps_in_sqrt=False))
    if momentum:
        parts.append(optax.trace(decay=momentum, nesterov=False))  # buf = m * buf + g / avg
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def torch_sgd(learning_rate: float | Schedule, *, momentum: float = 0.0,
              weight_decay: float = 0.0) -> optax.GradientTransformation:
    """``torch.optim.SGD(lr, momentum, weight_decay)`` with dampening 0, nesterov False."""
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    if momentum:
        parts.append(optax.trace(decay=momentum, nesterov=False))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def _is_leaf(x: Any) -> bool:
    return isinstance(x, jax.Array) or hasattr(x, "shape")


def param_paths(params: Any) -> Any:
    """A tree like ``params`` whose leaves are ``'model/layers/mlp/up_proj/kernel'`` strings.

    The decoder's layers are stacked ([L, ...] params), so one path names a tensor of every layer.
    """

    def name(path: tuple) -> str:
        parts = []
        for key in path:
            for attr in ("key", "name", "idx"):
                if hasattr(key, attr):
                    parts.append(str(getattr(key, attr)))
                    break
        if parts and parts[-1] == "value":  # nnx.Variable's own node
            parts.pop()
        return "/".join(parts)

    return jax.tree_util.tree_map_with_path(lambda p, _: name(p), params)


def _no_decay(path: str) -> bool:
    """A bias or a norm's scale (``.../input_layernorm/weight``, ``.../q_norm/weight``)."""
    parts = path.split("/")
    return parts[-1] == "bias" or (parts[-1] == "weight" and len(parts) > 1
                                   and "norm" in parts[-2])


def _decay_mask(params: Any) -> Any:
    """AdamW's weight-decay mask: matrices (rank >= 2) except biases and norm scales.

    Names as well as rank: the stacked layers' norm scales and biases are [L, D] matrices too.
    """
    return jax.tree.map(lambda x, p: x.ndim >= 2 and not _no_decay(p), params,
                        param_paths(params))


def trainable_mask(params: Any, freeze: str = "") -> Any:
    """A bool tree like ``params``: False where the param path matches the ``freeze`` regex."""
    if not freeze:
        return jax.tree.map(lambda _: True, params)
    try:
        pattern = re.compile(freeze)
    except re.error as e:
        raise ConfigError(f"optimizer.freeze: invalid regex {freeze!r} ({e})") from None
    mask = jax.tree.map(lambda p: not pattern.search(p), param_paths(params))
    if all(jax.tree.leaves(mask)):
        raise ConfigError(f"optimizer.freeze: {freeze!r} matches no param path (paths look like "
                          f"{jax.tree.leaves(param_paths(params))[0]!r})")
    if not any(jax.tree.leaves(mask)):
        raise ConfigError(f"optimizer.freeze: {freeze!r} freezes every param")
    return mask


def make_optimizer(opt: Any, *, num_steps: int, params: Any = None
                   ) -> tuple[optax.GradientTransformation, Schedule]:
    """``(optimizer, lr_schedule)`` from an ``optimizer`` config section.

    ``params`` (real or abstract) is needed for ``freeze`` and AdamW's decay mask.
    """
    schedule = make_schedule(opt.learning_rate, schedule=opt.schedule,
                             warmup_steps=opt.warmup_steps, decay_steps=opt.decay_steps,
                             end_lr_factor=opt.end_lr_factor, num_steps=num_steps)
    if opt.name == "adamw":
        decay_mask = _decay_mask  # no decay on norms/biases
        tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                         weight_decay=opt.weight_decay, mask=decay_mask)
    elif opt.name == "rmsprop":
        tx = torch_rmsprop(schedule, decay=opt.rmsprop_decay, eps=opt.eps, momentum=opt.momentum,
                           weight_decay=opt.weight_decay)
    elif opt.name == "sgd":
        tx = torch_sgd(schedule, momentum=opt.momentum, weight_decay=opt.weight_decay)
    else:
        raise ConfigError(f"optimizer.name: unknown optimizer {opt.name!r}")
    if opt.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(opt.max_grad_norm), tx)
    if opt.freeze:
        if params is None:
            raise ConfigError("optimizer.freeze: needs the params to build the mask")
        tx = freeze_params(tx, trainable_mask(params, opt.freeze))
    return tx, schedule


def freeze_params(tx: optax.GradientTransformation, trainable: Any) -> optax.GradientTransformation:
    """Apply ``tx`` to params where ``trainable`` is True; zero updates (and no state) elsewhere."""
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def learning_rate_at(schedule: Schedule | float, step: Any) -> jax.Array:
    """The learning rate a schedule (or constant) gives at ``step``."""
    return jnp.asarray(schedule(step) if callable(schedule) else schedule, jnp.float32)
