"""Roles: the named models of a run, their train steps, and one checkpoint that holds all of them.

A *role* is a learner or a frozen model with a name (``policy``, ``reference``, ``generator``,
``discriminator``, ``student``, ``teacher``, ...):

- a **learner** has a graph (``nnx.GraphDef``), a :class:`~sgalm_jax.training.TrainState` (params,
  optimizer state, step, RNG), the shardings of that state, its optimizer and schedule, and any
  number of named jitted train steps (:meth:`Role.add_step`), each a loss differentiated by
  :func:`~sgalm_jax.training.make_train_step` on this role's state;
- a **frozen** role has a graph and params only (a KL reference, a teacher): no optimizer state,
  no steps; :meth:`Roles.snapshot` makes one as a copy of another role's current params;
- a **view** reads another role's current params without copying them (self-play's reference is
  the policy as it is when an iteration starts, scored once before any step of that iteration).

Roles may share params: :meth:`Roles.alias` gives one role a second name, so SGALM's single model
is ``model``, reached as ``generator`` and ``discriminator``, with one optimizer state and two train
steps; its ``two_models`` variant declares two learners of the same graph instead. Roles may have
different graphs: GAD's discriminator is a backbone plus a scalar head, its student a causal LM.

A run declares its roles, then :meth:`Roles.build` either initialises them (each role's ``init``
function gives its first params, in declaration order, so one role may start as a copy of
another) or restores every saved role from one Orbax checkpoint. :meth:`Roles.save` writes every
saved role into one checkpoint, atomically, with the loop's metadata and a manifest of the roles
(``meta["roles"]``); a checkpoint whose roles differ from the run's is a
:class:`~sgalm_jax.errors.CheckpointError` naming them. A frozen role declared with
``saved=False`` is rebuilt by its ``init`` on resume instead (e.g. a KL reference that is exactly
``model.path``, which the run reads anyway).

Checkpoint layout: ``{role name: TrainState.to_dict()}`` for learners and ``{role name: {"params":
...}}`` for saved frozen roles; aliases and views are not stored.

Typical use (what ``sgalm_jax.algorithms.grpo`` does)::

    roles = Roles(mesh)
    roles.learner("policy", graphdef, params, tx, schedule=lr, seed=seed)
    roles.snapshot("reference", of="policy", saved=False, rebuild=load_start_params)
    meta = roles.build(ckpt, ckpt.latest_step())          # init, or restore every role
    roles["policy"].add_step("grpo", loss_fn, grad_accum_steps=2, extra_shardings=...)
    metrics = roles["policy"].step("grpo", batch)          # updates the policy's state in place
    roles.save(ckpt, step, {"rollout": r})                 # one checkpoint for every role
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from sgalm_jax import sharding as sh
from sgalm_jax.errors import CheckpointError
from sgalm_jax.training.checkpoint import Checkpointer
from sgalm_jax.training.state import (
    TrainState,
    abstract_like,
    create_train_state,
    train_state_shardings,
)
from sgalm_jax.training.train_step import LossFn, make_train_step

log = logging.getLogger(__name__)

LEARNER, FROZEN, VIEW = "learner", "frozen", "view"


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def copy_params(params: Any, shardings: Any = None) -> Any:
    """A copy of ``params`` in new buffers (a snapshot that a donating train step cannot clobber)."""
    return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(params)


@dataclasses.dataclass(eq=False)
class Role:
    """One named learner, frozen model or view (see the module docstring).

    Attributes:
      name: the role's name (the checkpoint key).
      kind: ``learner``, ``frozen`` or ``view``.
      graphdef: the model's graph; :meth:`model` merges it with the current params.
      mesh: the device mesh the state lives on.
      optimizer, schedule: the learner's optax transformation and learning-rate schedule.
      seed: seed of the learner's RNG (its train state's ``rng``).
      saved: whether :meth:`Roles.save` stores this role (views never are).
      state: the learner's :class:`TrainState` (None before :meth:`Roles.build`, and for others).
      shardings: the learner's TrainState of shardings; a frozen role's params shardings.
    """

    name: str
    kind: str
    graphdef: Any
    mesh: Mesh | None
    abstract_params: Any = None
    params_shardings: Any = None
    optimizer: optax.GradientTransformation | None = None
    schedule: Callable[[Any], Any] | float | None = None
    seed: int = 0
    saved: bool = True
    init: Callable[[], Any] | None = None
    rebuild: Callable[[], Any] | None = None
    source: "Role | None" = None
    state: TrainState | None = None
    shardings: Any = None
    frozen_params: Any = None
    steps: dict[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)

    # ---------------------------------------------------------------- reading
    @property
    def is_learner(self) -> bool:
        return self.kind == LEARNER

    @property
    def params(self) -> Any:
        """The current params (a learner's ``state.params``; a view's source's)."""
        if self.kind == VIEW:
            return self.source.params
        if self.kind == LEARNER:
            if self.state is None:
                raise CheckpointError(f"role {self.name!r}: not built yet (call Roles.build)")
            return self.state.params
        return self.frozen_params

    @property
    def step_count(self) -> int:
        """Optimizer steps this learner has taken (0 for frozen roles)."""
        return int(jax.device_get(self.state.step)) if self.is_learner and self.state else 0

    def model(self) -> nnx.Module:
        """The module for the current params (works inside jit: nothing is copied)."""
        return nnx.merge(self.graphdef, self.params)

    # ---------------------------------------------------------------- learners
    def _require_learner(self, what: str) -> None:
        if not self.is_learner:
            raise ValueError(f"role {self.name!r} is {self.kind}: it has no {what}")

    def set_state(self, state: TrainState) -> None:
        """Install ``state`` (e.g. a fresh one) and the shardings of its layout."""
        self._require_learner("train state")
        self.state = state
        self.shardings = train_state_shardings(state, self.mesh, self.params_shardings)

    def set_optimizer(self, optimizer: optax.GradientTransformation,
                      schedule: Callable[[Any], Any] | float | None = None) -> None:
        """Use ``optimizer`` (same state structure, e.g. another learning rate) for steps added
        from now on; the current optimizer state is kept (a run resumed mid-iteration)."""
        self._require_learner("optimizer")
        self.optimizer, self.schedule = optimizer, schedule

    def reset_optimizer(self, optimizer: optax.GradientTransformation,
                        schedule: Callable[[Any], Any] | float | None = None, *,
                        seed: int | None = None) -> None:
        """A fresh optimizer state (step 0, RNG from ``seed``) for the current params: what a
        new self-play iteration does. Train steps already added keep their optimizer; add new
        ones under new names for a different optimizer."""
        self.set_optimizer(optimizer, schedule)
        if seed is not None:
            self.seed = int(seed)
        state, shardings = create_train_state(self.params, optimizer, seed=self.seed,
                                              mesh=self.mesh,
                                              params_shardings=self.params_shardings)
        self.state, self.shardings = state, shardings

    def add_step(self, name: str, loss_fn: LossFn, *, replace: bool = False,
                 **options: Any) -> Callable[..., Any]:
        """Compile a train step ``name`` for ``loss_fn(params, batch, rng, *extra)``.

        ``options`` are :func:`make_train_step`'s (``grad_accum_steps``, ``accum_weight``,
        ``compute_dtype``, ``trainable``, ``extra_shardings``, ``batch_shardings``, ...); the
        optimizer, mesh, state shardings and learning-rate metric are this role's. An existing
        step of that name is kept (``replace=False``), so loops may call this every iteration.
        """
        self._require_learner("train steps")
        if name in self.steps and not replace:
            return self.steps[name]
        if self.state is None:
            raise CheckpointError(f"role {self.name!r}: build the roles before adding steps")
        options.setdefault("learning_rate", self.schedule)
        self.steps[name] = make_train_step(loss_fn, self.optimizer, mesh=self.mesh,
                                           state_shardings=self.shardings, **options)
        return self.steps[name]

    def step(self, name: str, batch: Any, *extra: Any) -> dict[str, jax.Array]:
        """Run train step ``name`` on ``batch``; this role's state becomes the new one (the old
        buffers are donated). Returns the step's metrics (on device)."""
        self._require_learner("train steps")
        self.state, metrics = self.steps[name](self.state, batch, *extra)
        return metrics

    # ---------------------------------------------------------------- checkpoint pieces
    def checkpoint_state(self) -> dict[str, Any]:
        if self.is_learner:
            return self.state.to_dict()
        return {"params": self.frozen_params}

    def restore_target(self) -> dict[str, Any]:
        """Shapes, dtypes and shardings to restore this role's checkpoint entry into."""
        abstract = self.abstract_params
        if self.is_learner:
            st = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract,
                            opt_state=jax.eval_shape(self.optimizer.init, abstract),
                            rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
            shardings = train_state_shardings(st, self.mesh, self.params_shardings)
            return abstract_like(st.to_dict(), shardings.to_dict())
        return {"params": abstract_like(abstract, self.params_shardings)}

    def install_restored(self, entry: dict[str, Any]) -> None:
        if self.is_learner:
            self.set_state(TrainState.from_dict(entry))
        else:
            self.frozen_params = entry["params"]

    def initialize(self, resuming: bool = False) -> None:
        """First params from ``init`` (or, for an unsaved role of a resumed run, ``rebuild``),
        placed in this role's shardings."""
        fn = self.rebuild if resuming and self.rebuild is not None else self.init
        if fn is None:
            raise CheckpointError(f"role {self.name!r}: no init function and nothing to restore")
        params = fn()
        if self.is_learner:
            state, shardings = create_train_state(params, self.optimizer, seed=self.seed,
                                                  mesh=self.mesh,
                                                  params_shardings=self.params_shardings)
            self.state, self.shardings = state, shardings
        else:
            if self.mesh is not None:
                params = jax.device_put(params, self.params_shardings)
            self.frozen_params = params


def _check_manifest(ckpt: Checkpointer, step: int, stored: Any, names: list[str]) -> None:
    if stored is not None and sorted(stored) != names:
        raise CheckpointError(
            f"{ckpt.directory}/{step}: the checkpoint holds roles {sorted(stored)}, this run "
            f"restores {names} (a different algorithm, variant or stage wrote it; use a new "
            "workdir)")


class Roles:
    """The roles of one run, by name (see the module docstring)."""

    def __init__(self, mesh: Mesh | None):
        self.mesh = mesh
        self._roles: dict[str, Role] = {}
        self._aliases: dict[str, str] = {}

    # ---------------------------------------------------------------- declaring
    def _add(self, role: Role) -> Role:
        if role.name in self._roles or role.name in self._aliases:
            raise ValueError(f"role {role.name!r} is already declared")
        self._roles[role.name] = role
        return role

    def _shardings(self, params: Any, given: Any) -> Any:
        if given is not None or self.mesh is None:
            return given
        return sh.state_shardings(params, self.mesh)

    def learner(self, name: str, graphdef: Any, params: Any,
                optimizer: optax.GradientTransformation, *,
                schedule: Callable[[Any], Any] | float | None = None, seed: int = 0,
                init: Callable[[], Any] | None = None, params_shardings: Any = None) -> Role:
        """Declare a learner. ``params``: its params or only their shapes (``ShapeDtypeStruct``
        leaves, e.g. from ``nnx.eval_shape``); ``init()`` gives the first params when the run
        does not resume (default: ``params`` themselves)."""
        return self._add(Role(
            name=name, kind=LEARNER, graphdef=graphdef, mesh=self.mesh,
            abstract_params=_abstract(params),
            params_shardings=self._shardings(params, params_shardings), optimizer=optimizer,
            schedule=schedule, seed=int(seed), init=init if init is not None else (lambda: params)))

    def frozen(self, name: str, graphdef: Any, params: Any, *, saved: bool = True,
               init: Callable[[], Any] | None = None, rebuild: Callable[[], Any] | None = None,
               params_shardings: Any = None) -> Role:
        """Declare a frozen model (no optimizer state, no steps). ``saved=False``: not stored in
        checkpoints; a resumed run calls ``rebuild`` (default ``init``) for it."""
        return self._add(Role(
            name=name, kind=FROZEN, graphdef=graphdef, mesh=self.mesh,
            abstract_params=_abstract(params),
            params_shardings=self._shardings(params, params_shardings), saved=bool(saved),
            init=init if init is not None else (lambda: params), rebuild=rebuild))

    def snapshot(self, name: str, of: str, *, saved: bool = True,
                 rebuild: Callable[[], Any] | None = None) -> Role:
        """Declare a frozen copy of role ``of``'s params as they are when the roles are built
        (declare it after ``of``): e.g. a KL reference that is the stage's start model. A saved
        snapshot is restored with the other roles; an unsaved one (``saved=False``) needs
        ``rebuild`` to make it again on resume, since ``of`` has moved on by then (e.g. reload
        the start checkpoint)."""
        src = self[of]
        if not saved and rebuild is None:
            raise ValueError(f"role {name!r}: an unsaved snapshot needs rebuild= for resuming")
        return self.frozen(name, src.graphdef, src.abstract_params, saved=saved,
                           params_shardings=src.params_shardings, rebuild=rebuild,
                           init=lambda: copy_params(self[of].params, src.params_shardings))

    def view(self, name: str, of: str) -> Role:
        """Declare ``name`` as a read-only view of role ``of``'s current params (no copy; never
        saved). A learner's steps donate its old params, so read a view before the next step."""
        src = self[of]
        return self._add(Role(name=name, kind=VIEW, graphdef=src.graphdef, mesh=self.mesh,
                              abstract_params=src.abstract_params,
                              params_shardings=src.params_shardings, saved=False, source=src))

    def alias(self, name: str, of: str) -> None:
        """Give role ``of`` a second name (shared params, optimizer state and steps)."""
        if name in self._roles or name in self._aliases:
            raise ValueError(f"role {name!r} is already declared")
        self[of]  # exists
        self._aliases[name] = of

    # ---------------------------------------------------------------- access
    def __getitem__(self, name: str) -> Role:
        key = self._aliases.get(name, name)
        if key not in self._roles:
            raise KeyError(f"no role {name!r}; roles: {self.names()}")
        return self._roles[key]

    def __contains__(self, name: str) -> bool:
        return name in self._roles or name in self._aliases

    def __iter__(self) -> Iterator[Role]:
        return iter(self._roles.values())

    def names(self) -> list[str]:
        """Declared role names (aliases not included)."""
        return list(self._roles)

    def same(self, a: str, b: str) -> bool:
        """Whether two names reach one role (shared params)."""
        return self[a] is self[b]

    def saved_roles(self) -> list[Role]:
        return [r for r in self._roles.values() if r.saved and r.kind != VIEW]

    # ---------------------------------------------------------------- build / save
    def manifest(self) -> dict[str, dict[str, Any]]:
        """``{name: {"kind": ..., "step": ...}}`` of the saved roles (stored in ``meta``)."""
        return {r.name: {"kind": r.kind, "step": r.step_count} for r in self.saved_roles()}

    def build(self, ckpt: Checkpointer | None = None, step: int | None = None, *,
              only: Sequence[str] | None = None) -> dict[str, Any]:
        """Initialise every role (``step`` None), or restore every saved role from checkpoint
        ``step`` of ``ckpt`` and rebuild the unsaved frozen ones. Returns the checkpoint's
        metadata (``{}`` on a fresh start). Roles are built in declaration order.

        ``only``: start a new stage from another run's checkpoint (e.g. GAD's adversarial stage
        from its warmup): restore exactly these roles, which must be the ones that checkpoint
        holds, and initialise the others (``init``, e.g. a snapshot of a restored role).
        """
        if step is None:
            for role in self._roles.values():
                if role.kind != VIEW:
                    role.initialize()
            return {}
        restore = self.saved_roles() if only is None else [self[n] for n in only]
        names = sorted(r.name for r in restore)
        try:  # the manifest first, for a clear error before any array is read
            stored = ckpt.read_meta(step).get("roles")
        except CheckpointError:  # unreadable metadata: restore() verifies the checksums and
            stored = None        # names the corrupt checkpoint (or falls back to an earlier one)
        _check_manifest(ckpt, step, stored, names)
        target = {r.name: r.restore_target() for r in restore}
        try:
            restored, meta = ckpt.restore(target, step)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; roles restored: {names}") from e
        step = int(meta.get("step", step))  # checkpoint.on_corrupt='previous' may pick another
        _check_manifest(ckpt, step, meta.get("roles"), names)
        for role in self._roles.values():
            if role.kind == VIEW:
                continue
            if role.name in restored:
                role.install_restored(restored[role.name])
            else:  # unsaved (rebuilt on resume), or not part of the stage we start from
                role.initialize(resuming=only is None)
        log.info("restored roles %s from %s at step %d", sorted(target), ckpt.directory, step)
        return meta

    def checkpoint_state(self) -> dict[str, Any]:
        """The pytree one checkpoint holds: every saved role's state, by name."""
        return {r.name: r.checkpoint_state() for r in self.saved_roles()}

    def save(self, ckpt: Checkpointer, step: int, meta: dict[str, Any] | None = None) -> bool:
        """Start saving every saved role and ``meta`` (plus the role manifest) as checkpoint
        ``step``: one Orbax checkpoint, written atomically."""
        meta = dict(meta or {})
        meta["roles"] = self.manifest()
        return ckpt.save(step, self.checkpoint_state(), meta)


__all__ = ["FROZEN", "LEARNER", "Role", "Roles", "VIEW", "copy_params"]
