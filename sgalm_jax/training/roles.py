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

**Roles on a shared frozen base** (LoRA, :mod:`sgalm_jax.models.lora`). A learner or frozen role
declared with ``base="base"`` (a frozen role) stores and trains only its *own* params: those of its
graph that the base does not hold (LoRA adapters, a scorer's head). Its model is the base's arrays
(the paths its graph shares with the base, e.g. a scorer's body from a causal LM base) joined with
its own, without a copy: inside a train step the base goes in as a non-differentiated argument, so
gradients and optimizer state exist for the own params alone. Several roles on one base hold the
base once: SGALM's ``two_models`` as two adapter sets, GAD's discriminator as adapters plus a head,
a KL reference as a view of the base itself (the adapters switched off). A snapshot of such a role
copies its own params only.

A run declares its roles, then :meth:`Roles.build` either initialises them (each role's ``init``
function gives its first params, in declaration order, so one role may start as a copy of
another) or restores every saved role from one Orbax checkpoint. :meth:`Roles.save` writes every
saved role into one checkpoint, atomically, with the loop's metadata and a manifest of the roles
(``meta["roles"]``); a checkpoint whose roles differ from the run's is a
:class:`~sgalm_jax.errors.CheckpointError` naming them. A frozen role declared with
``saved=False`` is rebuilt by its ``init`` on resume instead (e.g. a KL reference that is exactly
``model.path``, which the run reads anyway).

Checkpoint layout: ``{role name: TrainState.to_dict()}`` for learners and ``{role name: {"params":
...}}`` for saved frozen roles; aliases and views are not stored; a role on a base stores its own
params only (a base read from ``model.path`` is declared ``saved=False`` and read again on resume).

Typical use (what ``sgalm_jax.algorithms.grpo`` does)::

    roles = Roles(mesh)
    roles.learner("policy", graphdef, params, tx, schedule=lr, seed=seed)
    roles.snapshot("reference", of="policy", saved=False, rebuild=load_start_params)
    meta = roles.build(ckpt, ckpt.latest_step())          # init, or restore every role
    roles["policy"].add_step("grpo", loss_fn, grad_accum_steps=2, extra_shardings=...)
    metrics = roles["policy"].step("grpo", batch)          # updates the policy's state in place
    roles.save(ckpt, step, {"rollout": r})                 # one checkpoint for every role

With LoRA (what the algorithms do when ``lora.enabled``)::

    roles.frozen("base", base_graphdef, base_params, saved=False, init=load_base)
    roles.learner("policy", lora_graphdef, lora_params, tx, base="base", init=fresh_adapters)
    roles.view("reference", of="base")                     # the base alone: adapters off
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
from sgalm_jax.models.lora import dropout_rng
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


def _flat(state: Any) -> dict[tuple[Any, ...], Any]:
    return dict(nnx.to_flat_state(state))


def join_params(base: Any, own: Any, base_paths: Sequence[tuple[Any, ...]]) -> nnx.State:
    """One params state from a base's ``base_paths`` and a role's own params (no copy; works on
    arrays, tracers and shardings alike)."""
    flat = _flat(base)
    return nnx.from_flat_state({**{p: flat[p] for p in base_paths}, **_flat(own)})


def base_part(base: Any, base_paths: Sequence[tuple[Any, ...]]) -> nnx.State:
    """The part of a base's params (or shardings) that a role on it reads."""
    flat = _flat(base)
    return nnx.from_flat_state({p: flat[p] for p in base_paths})


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
      base, base_paths: the frozen role whose params this role's model reads at ``base_paths``
        (roles on a shared base, e.g. LoRA adapters); None for a self-contained role.
      abstract_params, params_shardings: shapes and shardings of the role's own params (what it
        trains or holds; with a base, only the paths the base does not hold).
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
    base: "Role | None" = None
    base_paths: tuple[tuple[Any, ...], ...] = ()
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
        """The current params of the role's model (what :meth:`model` merges): a learner's
        ``state.params`` or a frozen role's, joined with its base's when it has one; a view's
        source's."""
        if self.kind == VIEW:
            return self.source.params
        own = self.own_params
        if self.base is None:
            return own
        return join_params(self.base.params, own, self.base_paths)

    @property
    def own_params(self) -> Any:
        """What this role trains or holds itself: a learner's ``state.params``, a frozen role's
        params (without its base's). Train-step options such as ``trainable`` masks follow it."""
        if self.kind == VIEW:
            return self.source.own_params
        if self.kind == LEARNER:
            if self.state is None:
                raise CheckpointError(f"role {self.name!r}: not built yet (call Roles.build)")
            return self.state.params
        return self.frozen_params

    def model_shardings(self) -> Any:
        """Shardings of :attr:`params` (e.g. ``extra_shardings`` of a step that reads this
        role's model)."""
        if self.kind == VIEW:
            return self.source.model_shardings()
        if self.base is None:
            return self.params_shardings
        return join_params(self.base.params_shardings, self.params_shardings, self.base_paths)

    def _base_part(self) -> Any:
        return base_part(self.base.params, self.base_paths)

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
        state, shardings = create_train_state(self.own_params, optimizer, seed=self.seed,
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

        ``loss_fn`` always receives the params of the role's whole model (:attr:`params`). For a
        role on a base, the step differentiates only the own params: the base's part is passed
        in as the step's first extra argument (not differentiated, not donated) and joined
        inside the trace. LoRA dropout is on inside the loss (keyed by the step's ``rng``);
        ``trainable`` and ``compute_dtype`` apply to the own params.
        """
        self._require_learner("train steps")
        if name in self.steps and not replace:
            return self.steps[name]
        if self.state is None:
            raise CheckpointError(f"role {self.name!r}: build the roles before adding steps")
        options.setdefault("learning_rate", self.schedule)
        if self.base is None:
            def with_dropout(params, batch, rng, *extra):
                with dropout_rng(jax.random.fold_in(rng, _DROPOUT_STREAM)):
                    return loss_fn(params, batch, rng, *extra)
        else:
            paths = self.base_paths
            options["extra_shardings"] = (base_part(self.base.params_shardings, paths),
                                          *options.get("extra_shardings", ()))

            def with_dropout(own, batch, rng, base, *extra):
                params = join_params(base, own, paths)
                with dropout_rng(jax.random.fold_in(rng, _DROPOUT_STREAM)):
                    return loss_fn(params, batch, rng, *extra)
        self.steps[name] = make_train_step(with_dropout, self.optimizer, mesh=self.mesh,
                                           state_shardings=self.shardings, **options)
        return self.steps[name]

    def step(self, name: str, batch: Any, *extra: Any) -> dict[str, jax.Array]:
        """Run train step ``name`` on ``batch``; this role's state becomes the new one (the old
        buffers are donated). Returns the step's metrics (on device)."""
        self._require_learner("train steps")
        self.state, metrics = self.steps[name](*self.step_args(batch, *extra))
        return metrics

    def step_args(self, batch: Any, *extra: Any) -> tuple[Any, ...]:
        """The arguments :meth:`step` calls a jitted step with: the state, ``batch``, the base's
        part (a role on a base) and ``extra``. With abstract roles
        (:meth:`Roles.build_abstract`) and an abstract batch: what ``--compile-only`` lowers."""
        if self.base is not None:
            extra = (self._base_part(), *extra)
        return (self.state, batch, *extra)

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
        if self.base is not None:
            params = self._own_of(params)
        if self.is_learner:
            state, shardings = create_train_state(params, self.optimizer, seed=self.seed,
                                                  mesh=self.mesh,
                                                  params_shardings=self.params_shardings)
            self.state, self.shardings = state, shardings
        else:
            if self.mesh is not None:
                params = jax.device_put(params, self.params_shardings)
            self.frozen_params = params

    def _own_of(self, params: Any) -> Any:
        """The own part of ``params`` (an init may return the whole model's params)."""
        want = _flat(self.abstract_params)
        flat = _flat(params)
        missing = sorted(set(want) - set(flat))
        if missing:
            raise CheckpointError(f"role {self.name!r}: its init gave no "
                                  f"{'/'.join(map(str, missing[0]))}")
        if len(flat) == len(want):
            return params
        return nnx.from_flat_state({p: flat[p] for p in want})


# Folded into a step's key for LoRA dropout, so its masks are independent of the loss's own draws.
_DROPOUT_STREAM = 0x10A


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

    def _on_base(self, name: str, base: str | None, params: Any
                 ) -> tuple[Any, Role | None, tuple[tuple[Any, ...], ...]]:
        """(own params, base role, base paths) of a role declared with ``base``."""
        if base is None:
            return params, None, ()
        b = self[base]
        if b.kind != FROZEN or b.base is not None:
            raise ValueError(f"role {name!r}: base {base!r} must be a frozen role without a "
                             "base of its own")
        full, held = _flat(params), _flat(b.abstract_params)
        paths = tuple(p for p in full if p in held)
        for p in paths:
            if tuple(full[p].shape) != tuple(held[p].shape):
                raise ValueError(f"role {name!r}: {'/'.join(map(str, p))} has shape "
                                 f"{tuple(full[p].shape)}, base {base!r} holds "
                                 f"{tuple(held[p].shape)}")
        own = {p: v for p, v in full.items() if p not in held}
        if not paths or not own:
            raise ValueError(f"role {name!r}: its params share {len(paths)} paths with base "
                             f"{base!r} and have {len(own)} of their own; a role on a base "
                             "needs both (e.g. the base's body plus LoRA adapters)")
        return nnx.from_flat_state(own), b, paths

    def learner(self, name: str, graphdef: Any, params: Any,
                optimizer: optax.GradientTransformation, *,
                schedule: Callable[[Any], Any] | float | None = None, seed: int = 0,
                init: Callable[[], Any] | None = None, params_shardings: Any = None,
                base: str | None = None) -> Role:
        """Declare a learner. ``params``: its params or only their shapes (``ShapeDtypeStruct``
        leaves, e.g. from ``nnx.eval_shape``); ``init()`` gives the first params when the run
        does not resume (default: ``params`` themselves).

        ``base``: a frozen role this learner's model shares. ``params`` are then the whole
        model's (real or abstract); the paths the base holds come from the base, the rest (e.g.
        LoRA adapters, a head) are the learner's own: trained, with optimizer state, and saved.
        ``init()`` may return the own params or the whole model's; ``params_shardings`` are the
        own params' shardings.
        """
        own, b, paths = self._on_base(name, base, params)
        return self._add(Role(
            name=name, kind=LEARNER, graphdef=graphdef, mesh=self.mesh,
            abstract_params=_abstract(own),
            params_shardings=self._shardings(own, params_shardings), optimizer=optimizer,
            schedule=schedule, seed=int(seed), init=init if init is not None else (lambda: own),
            base=b, base_paths=paths))

    def frozen(self, name: str, graphdef: Any, params: Any, *, saved: bool = True,
               init: Callable[[], Any] | None = None, rebuild: Callable[[], Any] | None = None,
               params_shardings: Any = None, base: str | None = None) -> Role:
        """Declare a frozen model (no optimizer state, no steps). ``saved=False``: not stored in
        checkpoints; a resumed run calls ``rebuild`` (default ``init``) for it. ``base``: as for
        :meth:`learner` (e.g. frozen adapters on a shared base)."""
        own, b, paths = self._on_base(name, base, params)
        return self._add(Role(
            name=name, kind=FROZEN, graphdef=graphdef, mesh=self.mesh,
            abstract_params=_abstract(own),
            params_shardings=self._shardings(own, params_shardings), saved=bool(saved),
            init=init if init is not None else (lambda: own), rebuild=rebuild, base=b,
            base_paths=paths))

    def snapshot(self, name: str, of: str, *, saved: bool = True,
                 rebuild: Callable[[], Any] | None = None) -> Role:
        """Declare a frozen copy of role ``of``'s params as they are when the roles are built
        (declare it after ``of``): e.g. a KL reference that is the stage's start model. A saved
        snapshot is restored with the other roles; an unsaved one (``saved=False``) needs
        ``rebuild`` to make it again on resume, since ``of`` has moved on by then (e.g. reload
        the start checkpoint). A snapshot of a role on a base copies only its own params (LoRA
        adapters, a head) and reads the same base."""
        src = self[of]
        if not saved and rebuild is None:
            raise ValueError(f"role {name!r}: an unsaved snapshot needs rebuild= for resuming")
        if src.kind == VIEW:
            raise ValueError(f"role {name!r}: snapshot the role {src.source.name!r} itself, "
                             f"not its view {of!r}")
        role = self.frozen(name, src.graphdef, src.abstract_params, saved=saved,
                           params_shardings=src.params_shardings, rebuild=rebuild,
                           init=lambda: copy_params(self[of].own_params, src.params_shardings))
        role.base, role.base_paths = src.base, src.base_paths
        return role

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
        """``{name: {"kind": ..., "step": ...[, "base": ...]}}`` of the saved roles (stored in
        ``meta``)."""
        out = {}
        for r in self.saved_roles():
            out[r.name] = {"kind": r.kind, "step": r.step_count}
            if r.base is not None:
                out[r.name]["base"] = r.base.name
        return out

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

    def build_abstract(self) -> None:
        """Give every role abstract params and state (``jax.ShapeDtypeStruct`` leaves with their
        shardings) instead of values: nothing is read or allocated, and :meth:`Role.add_step`,
        :attr:`Role.params` and the shardings work as after :meth:`build`. What ``--compile-only``
        (:mod:`sgalm_jax.compile_only`) lowers a run's steps with; needs a mesh."""
        if self.mesh is None:
            raise ValueError("Roles.build_abstract needs a mesh (the shardings of the state)")
        for role in self._roles.values():
            if role.kind != VIEW:
                role.install_restored(role.restore_target())

    def checkpoint_state(self) -> dict[str, Any]:
        """The pytree one checkpoint holds: every saved role's state, by name."""
        return {r.name: r.checkpoint_state() for r in self.saved_roles()}

    def save(self, ckpt: Checkpointer, step: int, meta: dict[str, Any] | None = None) -> bool:
        """Start saving every saved role and ``meta`` (plus the role manifest) as checkpoint
        ``step``: one Orbax checkpoint, written atomically."""
        meta = dict(meta or {})
        meta["roles"] = self.manifest()
        return ckpt.save(step, self.checkpoint_state(), meta)


__all__ = ["FROZEN", "LEARNER", "Role", "Roles", "VIEW", "base_part", "copy_params", "join_params"]
