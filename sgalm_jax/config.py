"""The base config: every key, its default and a one-line description; validation.

Experiment files under ``configs/`` start from :func:`base_config` and override what they need::

    from sgalm_jax.algorithms import base_config

    def get_config():
        config = base_config()
        config.algorithm = "sft"
        config.model.path = "/models/Qwen2.5-3B-Instruct"
        return config

``python -m sgalm_jax.main --config configs/X.py --config.train.num_steps=100`` loads such a file (this
module itself is the default config file, so ``--config`` may be left out). :func:`validate_config`
runs before anything is compiled and raises :class:`ConfigError` naming the key at fault: unknown
keys, wrong types, impossible values. Checks that need the device count (mesh shape, batch
divisibility) run in :func:`validate_for_devices`.

The base schema (:mod:`sgalm_jax.config_schema`) holds what every algorithm shares (model, data, optimizer, train, checkpoint,
eval, ...). An algorithm declares its own section beside its code with :func:`register_section`
(``sgalm``, ``selfplay``, ``data_engine``, ``grpo`` are registered by their modules in
:mod:`sgalm_jax.algorithms`); one mechanism then gives every key its default, its description in
``--describe``, type checks and unknown-key errors. This module never imports the algorithms:
importing :mod:`sgalm_jax.algorithms` adds a section provider (:func:`add_section_provider`) that
imports the built-in ones, so from then on every built-in section is part of the schema.
Experiment files start from :func:`sgalm_jax.algorithms.base_config`, which guarantees that.

Keys whose description starts with ``(free-form)`` hold dicts whose own keys are not checked (e.g.
``model.hf_config``, HF config fields for a randomly initialised model).
"""

from __future__ import annotations

import difflib
import json
import math
import os
from typing import Any, Callable, Iterator, Mapping

import ml_collections

from sgalm_jax.config_schema import (  # noqa: F401 (re-exported: the choices and presets)
    _SCHEMA, ATTENTION, DISTRIBUTED_MODES, DTYPES, FREE_FORM, MODEL_PRESETS, NONFINITE, ON_CORRUPT,
    OPTIMIZERS, REMAT, SAMPLING_ENGINES, SAMPLING_PLACEMENTS, SCHEDULES, SFT_NORMALIZE)
from sgalm_jax.errors import ConfigError


# ------------------------------------------------------------------------------------ schema walk
def _walk(schema: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    for key, value in schema.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _walk(value, path + ".")
        else:
            yield path, value[0], value[1]


# Views of the schema, updated in place when a section is registered (so that names imported from
# here stay current).
DESCRIPTIONS: dict[str, str] = {}
DEFAULTS: dict[str, Any] = {}
FREE_FORM_KEYS: set[str] = set()
# Registered section name -> the module that declared it.
SECTIONS: dict[str, str] = {}
# Functions that register sections (e.g. by importing the built-in algorithms); called before the
# schema is read. Higher layers add them, so this module never imports them.
_SECTION_PROVIDERS: list[Callable[[], None]] = []
_loading = False


def add_section_provider(provider: Callable[[], None]) -> None:
    """Call ``provider()`` (idempotent) before the schema is read: ``sgalm_jax.algorithms`` adds
    one that imports every built-in algorithm, so whenever that package is imported,
    :func:`base_config`, ``--describe`` and validation see every built-in section."""
    if provider not in _SECTION_PROVIDERS:
        _SECTION_PROVIDERS.append(provider)


def load_sections() -> None:
    """Run the section providers (once each per call; re-entrant calls return at once)."""
    global _loading
    if _loading:
        return
    _loading = True
    try:
        for provider in list(_SECTION_PROVIDERS):
            provider()
    finally:
        _loading = False


def _refresh() -> None:
    DESCRIPTIONS.clear()
    DEFAULTS.clear()
    for path, default, desc in _walk(_SCHEMA):
        DESCRIPTIONS[path] = desc
        DEFAULTS[path] = default
    FREE_FORM_KEYS.clear()
    FREE_FORM_KEYS.update(p for p, d in DESCRIPTIONS.items() if d.startswith(FREE_FORM))


def _check_schema(schema: Mapping[str, Any], prefix: str) -> None:
    for key, value in schema.items():
        path = f"{prefix}.{key}"
        if isinstance(value, dict):
            _check_schema(value, path)
        elif not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str)
                  and value[1].strip()):
            raise ValueError(f"config section key {path}: expected (default, description), got "
                             f"{value!r}")


def register_section(name: str, schema: Mapping[str, Any], *, owner: str = "") -> None:
    """Add an algorithm's own config section ``name`` to the schema.

    ``schema`` has the base schema's form, ``{key: (default, one-line description)}`` (nested dicts
    are subsections), so the section gets what every key gets: a default in
    :func:`base_config`, a line in ``--describe``, type checks and unknown-key errors. An algorithm
    module calls this at import time, beside its code::

        register_section("grpo", {"num_generations": (8, "completions sampled per prompt")},
                         owner=__name__)

    This module never imports algorithms: the section provider that :mod:`sgalm_jax.algorithms`
    adds imports the built-in ones, and a researcher's module registers its section when imported
    (import it before building the config, as ``selfplay.loss_module`` does for losses). Registering
    the same name again from the same owner replaces the section (a reloaded module); a name that
    is already a core section or another owner's is a ValueError.
    """
    if not name or "." in name:
        raise ValueError(f"config section name {name!r}: expected a plain identifier")
    if name in _SCHEMA and SECTIONS.get(name) != owner:
        where = SECTIONS.get(name, "the base schema")
        raise ValueError(f"config section {name!r} is already defined by {where}")
    _check_schema(schema, name)
    _SCHEMA[name] = dict(schema)
    SECTIONS[name] = owner
    _refresh()


_refresh()


def _build(schema: Mapping[str, Any]) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict()
    for key, value in schema.items():
        if isinstance(value, dict):
            out[key] = _build(value)
        else:
            default = value[0]
            out[key] = ml_collections.ConfigDict(dict(default)) if isinstance(default, dict) else default
    return out


def load_config_file(name: str, relative_to: str, *args: str) -> ml_collections.ConfigDict:
    """``get_config(*args)`` of another config file, e.g. a variant that builds on its base
    experiment (``args``: what ``file.py:arg`` would pass, e.g. a GAD stage).

    ``name`` is resolved next to ``relative_to`` (pass ``__file__``)::

        config = load_config_file("qwen3b_gsm8k.py", __file__)
    """
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), name)
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def base_config() -> ml_collections.ConfigDict:
    """A fresh ConfigDict with every key at its default: the base schema and every section
    registered so far (:func:`sgalm_jax.algorithms.base_config` registers the built-in algorithms'
    sections first; experiment files use that one)."""
    load_sections()
    return _build(_SCHEMA)


def get_config() -> ml_collections.ConfigDict:
    """The embedded default config (``algorithm='demo'``), used when ``--config`` is left out."""
    # ml_collections loads this file as a fresh module when it is the --config file; the
    # registered algorithm sections live in the imported sgalm_jax.config, so build from that one.
    import sgalm_jax.config as registered

    return registered.base_config()


def describe() -> str:
    """Every key with its default and description, one per line (``--describe`` prints it)."""
    load_sections()
    width = max(map(len, DESCRIPTIONS))
    return "\n".join(f"{k:<{width}}  {DEFAULTS[k]!r:<12}  {d}" for k, d in DESCRIPTIONS.items())


# ------------------------------------------------------------------------------------ validation
def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, list(DESCRIPTIONS), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_key(key: str) -> None:
    """Raise ConfigError if ``key`` (dotted) is not a config key (``--config.KEY=...`` overrides)."""
    load_sections()
    if key in DESCRIPTIONS:
        return
    if any(key.startswith(f + ".") for f in FREE_FORM_KEYS):
        return
    raise ConfigError(f"{key}: unknown config key{_did_you_mean(key)}")


def _flatten(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    items = config.items() if hasattr(config, "items") else []
    for key, value in items:
        path = f"{prefix}{key}"
        if path in FREE_FORM_KEYS:
            yield path, value
        elif isinstance(value, (ml_collections.ConfigDict, dict)):
            yield from _flatten(value, path + ".")
        else:
            yield path, value


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, dict):
        return isinstance(value, (dict, ml_collections.ConfigDict))
    return True


def _type_name(default: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", dict: "dict"}.get(
        type(default), type(default).__name__)


def _choice(config: Any, key: str, choices: tuple[str, ...]) -> None:
    value = get(config, key)
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")


def check_finite(config: Any) -> None:
    """Every float key (by its default's type) must hold a finite number: NaN and inf pass most
    range checks (``nan < 0`` is False) and would reach the optimizer. Free-form dicts too."""
    for key, value in _flatten(config):
        default = DEFAULTS.get(key)
        if isinstance(default, float) and isinstance(value, (int, float)) and \
                not isinstance(value, bool) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
        if key in FREE_FORM_KEYS and hasattr(value, "items"):
            for sub, v in _walk_plain(value, key + "."):
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"{sub}: must be a finite number, got {v}")


def _walk_plain(d: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        if hasattr(v, "items"):
            yield from _walk_plain(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def get(config: Any, key: str) -> Any:
    """``config`` value at a dotted ``key``."""
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def validate_config(config: Any) -> None:
    """Check keys, types and device-independent values; raise ConfigError naming the key.

    Algorithm-specific checks (model source, data source) are in the algorithm's ``validate``.
    """
    load_sections()
    seen = set()
    for key, value in _flatten(config):
        if key not in DEFAULTS:
            raise ConfigError(f"{key}: unknown config key{_did_you_mean(key)}")
        seen.add(key)
        default = DEFAULTS[key]
        if not _type_ok(value, default):
            raise ConfigError(f"{key}: expected {_type_name(default)}, got {type(value).__name__} "
                              f"{value!r}")
    missing = sorted(set(DEFAULTS) - seen)
    if missing:
        raise ConfigError(f"{missing[0]}: key missing from the config (start experiment files "
                          "from sgalm_jax.algorithms.base_config())")
    check_finite(config)

    for key in ("model.dtype", "model.param_dtype"):
        _choice(config, key, DTYPES)
    if config.train.compute_dtype:
        _choice(config, "train.compute_dtype", DTYPES)
    if config.checkpoint.export_dtype:
        _choice(config, "checkpoint.export_dtype", DTYPES)
    _choice(config, "model.remat", REMAT)
    _choice(config, "model.attention", ATTENTION)
    _choice(config, "optimizer.name", OPTIMIZERS)
    _choice(config, "optimizer.schedule", SCHEDULES)
    _choice(config, "sft.normalize", SFT_NORMALIZE)
    _choice(config, "distributed.mode", DISTRIBUTED_MODES)
    _choice(config, "sampling.engine", SAMPLING_ENGINES)
    _choice(config, "sampling.placement", SAMPLING_PLACEMENTS)
    for axis, size in dict(config.sampling.local_mesh).items():
        if axis not in ("data", "fsdp", "tensor") or not isinstance(size, int) or size < 1:
            raise ConfigError(f"sampling.local_mesh: {axis}={size!r}; expected data/fsdp/tensor "
                              "sizes >= 1")
    _choice(config, "train.nonfinite", NONFINITE)
    _choice(config, "checkpoint.on_corrupt", ON_CORRUPT)
    if config.model.init and config.model.path:
        raise ConfigError("model.init: set either model.path or model.init, not both")
    if config.model.init and config.model.init not in MODEL_PRESETS:
        if not os.path.exists(config.model.init):
            raise ConfigError(f"model.init: {config.model.init!r} is neither a preset "
                              f"({sorted(MODEL_PRESETS)}) nor an existing config.json path")
    if config.model.architecture and config.model.architecture not in MODEL_PRESETS:
        raise ConfigError(f"model.architecture: {config.model.architecture!r} is not a preset "
                          f"({sorted(MODEL_PRESETS)})")
    if config.model.hf_config and not config.model.init:
        raise ConfigError("model.hf_config: only applies with model.init (random init)")

    positive = ["train.num_steps", "train.batch_size", "train.grad_accum_steps", "train.log_every",
                "checkpoint.keep", "data.max_length", "data.min_bucket"]
    for key in positive:
        if get(config, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {get(config, key)}")
    non_negative = ["optimizer.warmup_steps", "optimizer.decay_steps", "optimizer.weight_decay",
                    "optimizer.momentum", "optimizer.max_grad_norm", "optimizer.eps",
                    "checkpoint.every_steps", "data.max_examples", "metrics.peak_tflops",
                    "optimizer.end_lr_factor", "sft.logits_chunk_size", "train.max_skipped_steps",
                    "sampling.num_slots", "sampling.prefill_chunk", "sampling.refill_min",
                    "sampling.min_slots"]
    for key in non_negative:
        if get(config, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {get(config, key)}")
    if not config.optimizer.learning_rate > 0:
        raise ConfigError(f"optimizer.learning_rate: must be > 0, got "
                          f"{config.optimizer.learning_rate}")
    for key in ("optimizer.b1", "optimizer.b2", "optimizer.rmsprop_decay"):
        if not 0 <= get(config, key) < 1:
            raise ConfigError(f"{key}: must be in [0, 1), got {get(config, key)}")
    if not 0 <= config.optimizer.end_lr_factor <= 1:
        raise ConfigError(f"optimizer.end_lr_factor: must be in [0, 1] (a fraction of the peak "
                          f"learning rate), got {config.optimizer.end_lr_factor}")
    if config.train.batch_size % config.train.grad_accum_steps:
        raise ConfigError(f"train.batch_size: {config.train.batch_size} is not divisible by "
                          f"train.grad_accum_steps={config.train.grad_accum_steps}")
    for axis in ("data", "fsdp", "tensor"):
        size = config.mesh[axis]
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis}: {size} is not a positive size or -1")
    fill = [a for a in ("data", "fsdp", "tensor") if config.mesh[a] == -1]
    if len(fill) > 1:
        raise ConfigError(f"mesh.{fill[1]}: only one mesh axis may be -1 (also mesh.{fill[0]})")


def resolve_mesh(config: Any, num_devices: int) -> dict[str, int]:
    """The mesh shape ``{data, fsdp, tensor}`` for ``num_devices``; errors name ``mesh.X``."""
    sizes = {a: int(config.mesh[a]) for a in ("data", "fsdp", "tensor")}
    fill = [a for a, s in sizes.items() if s == -1]
    fixed = {a: s for a, s in sizes.items() if s != -1}
    known = math.prod(fixed.values())
    # Name the axis most likely at fault: the largest fixed one.
    culprit = max(fixed, key=lambda a: fixed[a]) if fixed else "fsdp"
    if fill:
        if num_devices % known:
            raise ConfigError(
                f"mesh.{culprit}: the fixed mesh axes {fixed} multiply to {known}, which does not "
                f"divide the {num_devices} devices (mesh.{fill[0]}=-1 takes the rest)")
        sizes[fill[0]] = num_devices // known
    elif known != num_devices:
        raise ConfigError(
            f"mesh.{culprit}: data*fsdp*tensor = {known} ({sizes}) does not equal the "
            f"{num_devices} devices; set one axis to -1 to take the remaining devices")
    return sizes


def validate_for_devices(config: Any, num_devices: int, num_processes: int = 1) -> dict[str, int]:
    """Checks that need the device count: mesh shape and batch divisibility. Returns the mesh."""
    sizes = resolve_mesh(config, num_devices)
    dp = sizes["data"] * sizes["fsdp"]
    micro = config.train.batch_size // config.train.grad_accum_steps
    if micro % dp:
        raise ConfigError(
            f"train.batch_size: the micro-batch of {micro} sequences (train.batch_size="
            f"{config.train.batch_size} / train.grad_accum_steps={config.train.grad_accum_steps})"
            f" is not divisible by the data-parallel size {dp} (mesh.data*mesh.fsdp)")
    if micro % num_processes:
        raise ConfigError(f"train.batch_size: the micro-batch of {micro} sequences is not "
                          f"divisible by the {num_processes} hosts")
    return sizes


# ------------------------------------------------------------------------------------ I/O
def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict (JSON-serialisable) of ``config``."""
    return json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config)


def save_config(config: Any, path: str) -> None:
    """Write the resolved config as JSON (``workdir/config.json``), atomically."""
    from sgalm_jax.fileio import atomic_write_json

    atomic_write_json(path, to_dict(config), indent=2, sort_keys=True)


def load_config_json(path: str) -> ml_collections.ConfigDict:
    """Read a ``config.json`` written by :func:`save_config` back into a ConfigDict (validated)."""
    with open(path) as f:
        data = json.load(f)
    config = base_config()
    config.update_from_flattened_dict(dict(_flatten_plain(data)))
    validate_config(config)
    return config


def _flatten_plain(d: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in d.items():
        path = f"{prefix}{key}"
        if path in FREE_FORM_KEYS or not isinstance(value, Mapping):
            check_key(path)
            yield path, value
        else:
            yield from _flatten_plain(value, path + ".")
