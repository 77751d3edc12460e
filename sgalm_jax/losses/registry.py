"""Name -> loss-function registry, so configs and user code pick losses by name.

Built-in losses register themselves when ``sgalm_jax.losses`` is imported. A researcher's own loss
registers the same way and is then usable wherever a config names a loss::

    from sgalm_jax.losses import register_loss, get_loss

    @register_loss("my_selfplay", family="selfplay")
    def my_selfplay(policy_real, policy_syn, ref_real, ref_syn, *, real_mask=None, syn_mask=None,
                    beta=0.1):
        ...
        return loss, metrics

    loss_fn = make_loss("my_selfplay", beta=0.2)   # functools.partial, hyper-params checked

The ``family`` tag records which calling convention a loss follows (see ``FAMILIES``) so a training
loop can refuse a loss with the wrong signature before tracing it.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Dict, List, Optional, Tuple

from sgalm_jax.errors import ConfigError

__all__ = ["register_loss", "get_loss", "make_loss", "list_losses", "unregister_loss", "loss_family", "FAMILIES"]

#: Calling conventions of the registered families.
FAMILIES: Dict[str, str] = {
    "selfplay": "fn(policy_real, policy_syn, ref_real, ref_syn, *, real_mask=None, syn_mask=None, **hp)"
    " -> (loss, metrics); per-sequence log-probs [B] (syn may be [B, K])",
    "sft": "fn(logits, targets, mask=None, **hp) -> (loss, metrics)",
    "discriminator": "fn(score_real, score_fake, **hp) -> (loss, metrics)",
    "generator": "fn(gen_logprobs, z_fake, mask=None, **hp) -> (loss, metrics)",
    "preference": "fn(chosen, rejected, **hp) -> (loss, metrics)",
    "policy_gradient": "fn(logprobs, old_logprobs, advantages, mask, **hp) -> (loss, metrics)",
    "other": "any (loss, metrics)-returning pure function",
}

_REGISTRY: Dict[str, Tuple[Callable, str]] = {}


def register_loss(name: str, *, family: str = "other", overwrite: bool = False) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn`` under ``name``. Re-registering a name needs ``overwrite=True``."""
    if family not in FAMILIES:
        raise ConfigError(f"register_loss({name!r}): unknown family {family!r}; known: {sorted(FAMILIES)}")

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY and not overwrite and _REGISTRY[name][0] is not fn:
            raise ConfigError(
                f"register_loss: name {name!r} is already registered to {_REGISTRY[name][0].__qualname__}; "
                "pass overwrite=True to replace it"
            )
        _REGISTRY[name] = (fn, family)
        return fn

    return deco


def unregister_loss(name: str) -> None:
    """Remove ``name`` from the registry (mainly for tests)."""
    _REGISTRY.pop(name, None)


def get_loss(name: str, *, family: Optional[str] = None) -> Callable:
    """Return the loss registered as ``name``; ``family`` (if given) must match its family."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown loss {name!r}; registered losses: {sorted(_REGISTRY)}")
    fn, fam = _REGISTRY[name]
    if family is not None and fam != family:
        raise ConfigError(f"loss {name!r} is of family {fam!r}, but a {family!r} loss is required here")
    return fn


def loss_family(name: str) -> str:
    """The family tag ``name`` was registered with."""
    get_loss(name)
    return _REGISTRY[name][1]


def list_losses(family: Optional[str] = None) -> List[str]:
    """Sorted names of registered losses, optionally only those of one family."""
    return sorted(n for n, (_, f) in _REGISTRY.items() if family is None or f == family)


def make_loss(name: str, *, family: Optional[str] = None, **hparams) -> Callable:
    """``functools.partial(get_loss(name), **hparams)``, rejecting hyper-parameters it doesn't take.

    Use this from configs: a typo in a hyper-parameter name is a ConfigError at build time rather
    than a TypeError deep inside a jitted step.
    """
    fn = get_loss(name, family=family)
    params = inspect.signature(fn).parameters
    accepts_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not accepts_var_kw:
        unknown = sorted(set(hparams) - set(params))
        if unknown:
            raise ConfigError(f"loss {name!r} has no hyper-parameter(s) {unknown}; it accepts {sorted(params)}")
    return functools.partial(fn, **hparams)
