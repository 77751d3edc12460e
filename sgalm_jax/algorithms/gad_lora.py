"""GAD's roles as LoRA adapters on one frozen base (``lora.enabled``; docs/lora.md, docs/gad.md).

The student and the discriminator start from the same checkpoint (``model.path``; the
discriminator's ``gad.discriminator_path`` empty or equal to it), so they share one frozen
``base`` role and each holds only what it trains:

- ``student``: an adapter set on the base (a causal LM);
- ``discriminator``: its own adapter set plus its scalar head, on the same base (a
  :class:`~sgalm_jax.models.ScoreModel` whose body is the base's decoder; the base's ``lm_head``
  is not read);
- ``reference`` (GAD stage with ``gad.beta > 0``): the stage's start model. Without a warmup that is
  the base with the adapters switched off (a view: no weights of its own). From a warmup
  checkpoint the start model is base + the warmup's student adapters, so the reference is a
  snapshot of the student's *adapters* (a few MB; the base is still shared), as the full
  fine-tuning run snapshots the whole student.

Checkpoints hold the two adapter sets, the head (and a reference snapshot's adapters) with their
optimizer states; the base is read again from ``model.path`` on resume.
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx

from sgalm_jax.errors import ConfigError
from sgalm_jax.models import ScoreModel
from sgalm_jax.models.lora import split_adapters
from sgalm_jax.training import Roles


def validate(config: Any) -> None:
    """LoRA checks of a GAD config: the lora section, and one base for both roles."""
    from sgalm_jax.training.lora_setup import validate as validate_lora
    from sgalm_jax.training.model_setup import model_config

    validate_lora(config, model_config(config.model))
    d_path = config.gad.discriminator_path
    if d_path and d_path.rstrip("/") != config.model.path.rstrip("/"):
        raise ConfigError("gad.discriminator_path: with lora.enabled the discriminator is "
                          "adapters + a head on the student's base, so it must start from "
                          f"model.path ({config.model.path!r}), not {d_path!r}; leave it empty")


def discriminator_own_params(lora: Any) -> tuple[Any, Any]:
    """``(graphdef, own abstract params)`` of the adapted discriminator: its adapters and the
    ``score`` head (what its optimizer and checkpoints hold)."""
    graphdef, abstract = lora.adapted(ScoreModel)
    adapters, rest = split_adapters(abstract)
    head = nnx.from_flat_state({p: v for p, v in nnx.to_flat_state(rest) if p[0] == "score"})
    return graphdef, nnx.merge_state(adapters, head)


def declare_roles(config: Any, mesh: Any, model_config: Any, *, make_g_optimizer: Callable,
                  make_d_optimizer: Callable, reference: bool) -> tuple[Roles, Any, Any, Any]:
    """Declare ``base``, ``student``, ``discriminator`` (and ``reference`` when ``reference``)
    on a new :class:`Roles`; returns ``(roles, lora setup, student graphdef, discriminator
    graphdef)``. ``make_*_optimizer(own params)`` give each learner's ``(tx, schedule)``."""
    from sgalm_jax.training.lora_setup import LoraSetup

    lora = LoraSetup(config, mesh, model_config)
    tx_g, lr_g = make_g_optimizer(split_adapters(lora.abstract)[0])
    d_graphdef, d_own = discriminator_own_params(lora)
    tx_d, lr_d = make_d_optimizer(d_own)
    roles = Roles(mesh)
    lora.declare_base(roles)
    lora.learner(roles, "student", tx_g, schedule=lr_g, seed=config.seed)
    lora.scorer(roles, "discriminator", tx_d, schedule=lr_d, seed=config.seed + 1)
    if reference:
        if config.gad.warmup_dir:
            roles.snapshot("reference", of="student")  # base + the warmup's adapters
        else:
            roles.view("reference", of="base")  # adapters off: the start model itself
    return roles, lora, lora.graphdef, d_graphdef


__all__ = ["declare_roles", "discriminator_own_params", "validate"]
