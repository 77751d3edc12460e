"""Algorithms (``config.algorithm``): a registry of run functions that ``sgalm_jax.main`` dispatches to.

An algorithm is a module with ``run(config, workdir)`` (or ``run(config)``) and, optionally,
``validate(config)``: checks that run before anything is compiled and raise ``ConfigError`` naming
the key. Built-in names map to modules that are imported only when chosen. A new algorithm
registers either way::

    # in the algorithm's module
    from sgalm_jax.algorithms import register_algorithm

    def validate(config): ...

    @register_algorithm("my_algo", validate=validate)
    def run(config, workdir): ...

    # or, without editing this package: register_algorithm("my_algo", module="my_pkg.my_algo")

``get_algorithm(name)`` returns an :class:`Algorithm`; calling it runs the algorithm.

An algorithm's own config keys live beside its code: the module calls
:func:`sgalm_jax.config.register_section` at import time. :func:`base_config` is the base config
with every built-in algorithm's section (what experiment files start from); ``sgalm_jax.main``
loads the built-in modules the same way before it reads a config.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable

from sgalm_jax import config as _config
from sgalm_jax.errors import ConfigError

# name -> module, imported on first use (so `import sgalm_jax.main` stays light).
BUILTIN: dict[str, str] = {
    "demo": "sgalm_jax.algorithms.demo",
    "sft": "sgalm_jax.algorithms.sft",
    "sgalm": "sgalm_jax.algorithms.sgalm",
    "data_engine": "sgalm_jax.algorithms.data_engine",
    "selfplay": "sgalm_jax.algorithms.selfplay",
    "gad": "sgalm_jax.algorithms.gad",
    "gad_demo": "sgalm_jax.algorithms.gad_demo",
    "grpo": "sgalm_jax.algorithms.grpo",
    "eval": "sgalm_jax.algorithms.eval",
}


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """A registered algorithm: its run function and optional pre-compile validation."""

    name: str
    run: Callable[..., Any]
    validate: Callable[[Any], None] | None = None

    def __call__(self, config: Any, workdir: str) -> Any:
        """Run it: ``run(config, workdir)``, or ``run(config)`` for one-argument run functions."""
        params = [p for p in inspect.signature(self.run).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        takes_varargs = any(p.kind is p.VAR_POSITIONAL
                            for p in inspect.signature(self.run).parameters.values())
        if len(params) >= 2 or takes_varargs:
            return self.run(config, workdir)
        return self.run(config)


_REGISTRY: dict[str, Algorithm] = {}
_MODULES: dict[str, str] = dict(BUILTIN)


def register_algorithm(name: str, run: Callable[..., Any] | None = None, *,
                       validate: Callable[[Any], None] | None = None,
                       module: str | None = None, overwrite: bool = True):
    """Register ``run`` under ``name`` (usable as a decorator), or a module to import lazily."""
    if module is not None:
        _MODULES[name] = module
        return None

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and not overwrite and _REGISTRY[name].run is not fn:
            raise ValueError(f"algorithm {name!r} is already registered")
        _REGISTRY[name] = Algorithm(name, fn, validate)
        return fn

    return deco(run) if run is not None else deco


def list_algorithms() -> list[str]:
    """Every registered or built-in name (whether or not its module exists yet)."""
    return sorted(set(_REGISTRY) | set(_MODULES))


def get_algorithm(name: str) -> Algorithm:
    """The algorithm ``name``; ConfigError naming ``algorithm`` if unknown or unavailable."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name not in _MODULES:
        raise ConfigError(f"algorithm: unknown algorithm {name!r}; known: {list_algorithms()}")
    module_name = _MODULES[name]
    module = _import_available(module_name)
    if module is None:
        raise ConfigError(f"algorithm: {name!r} is not available yet ({module_name} does not "
                          "exist)")
    if name in _REGISTRY:  # the module registered itself
        return _REGISTRY[name]
    run = getattr(module, "run", None)
    if run is None:
        raise ConfigError(f"algorithm: {module_name} has no run() function")
    algo = Algorithm(name, run, getattr(module, "validate", None))
    _REGISTRY[name] = algo
    return algo


def _import_available(module_name: str) -> Any:
    """The module, or None when it does not exist (an algorithm announced but not built yet)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            return None
        raise


def load_builtin_algorithms() -> None:
    """Import every built-in algorithm module, so that each registers its config section."""
    for module_name in BUILTIN.values():
        _import_available(module_name)


def base_config() -> Any:
    """The base config with every built-in algorithm's section (experiment files start here)."""
    load_builtin_algorithms()
    return _config.base_config()


# Whenever this package is imported, the schema (sgalm_jax.config) sees every built-in section.
_config.add_section_provider(load_builtin_algorithms)

__all__ = ["Algorithm", "BUILTIN", "base_config", "get_algorithm", "list_algorithms",
           "load_builtin_algorithms", "register_algorithm"]
