"""The training core shared by every algorithm: optimizers, train state, a generic jitted train
step, Orbax checkpoints with resume, checksums and preemption handling, divergence detection
(:class:`FiniteGuard`), the run directory's checks and lock, metric writers, multi-host start-up.

Typical use (what ``sgalm_jax.algorithms.sft`` does)::

    graphdef, params = split_model(model)
    tx, schedule = make_optimizer(config.optimizer, num_steps=N, params=params)
    state, shardings = create_train_state(params, tx, seed=0, mesh=mesh)
    step = make_train_step(model_loss(graphdef, my_loss), tx, mesh=mesh,
                           state_shardings=shardings, learning_rate=schedule)
    state, metrics = step(state, batch)

Algorithms with several models (a generator and a discriminator, a policy and its KL reference)
declare them as :class:`Roles` (``training/roles.py``): named learners and frozen models, their
train steps, and one checkpoint for all of them. With ``lora.enabled`` the roles are LoRA adapter
sets on one shared frozen base (``training/lora_setup.py``, docs/lora.md).
"""

from sgalm_jax.training.checkpoint import Checkpointer, PreemptionGuard, inject_fault
from sgalm_jax.training.finite import FiniteGuard
from sgalm_jax.training.metrics import MetricsWriter, StepTimer, mfu, peak_flops_per_device
from sgalm_jax.training.optimizers import (
    freeze_params,
    make_optimizer,
    make_schedule,
    param_paths,
    torch_rmsprop,
    torch_sgd,
    trainable_mask,
)
from sgalm_jax.training.roles import Role, Roles, copy_params
from sgalm_jax.training import lora_setup  # noqa: F401  (registers the `lora` config section)
from sgalm_jax.training.state import (
    TrainState,
    abstract_like,
    create_train_state,
    merge_model,
    model_loss,
    param_shardings,
    split_model,
    train_state_shardings,
)
from sgalm_jax.training.train_step import make_train_step
from sgalm_jax.training.workdir import WorkdirLock, check_workdir

__all__ = [
    "Checkpointer",
    "FiniteGuard",
    "MetricsWriter",
    "PreemptionGuard",
    "Role",
    "Roles",
    "StepTimer",
    "TrainState",
    "WorkdirLock",
    "abstract_like",
    "check_workdir",
    "copy_params",
    "create_train_state",
    "freeze_params",
    "inject_fault",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "merge_model",
    "mfu",
    "model_loss",
    "param_paths",
    "param_shardings",
    "peak_flops_per_device",
    "split_model",
    "torch_rmsprop",
    "torch_sgd",
    "train_state_shardings",
    "trainable_mask",
]
