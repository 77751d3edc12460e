"""Build the model a config asks for, directly in its sharding on the mesh.

``model.path`` loads an HF checkpoint; ``model.init`` initialises randomly from a preset
architecture (:data:`sgalm_jax.config.MODEL_PRESETS`) or an HF ``config.json``, with
``model.hf_config`` overrides. Random init runs under ``jit`` with the params' out-shardings, so no
device ever holds the full model; threefry keys are partitionable, so the values do not depend on
the mesh (tested).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from sgalm_jax import sharding as sh
from sgalm_jax.config import MODEL_PRESETS
from sgalm_jax.errors import ConfigError
from sgalm_jax.models import CausalLM, ModelConfig, load_pretrained


def _plain(d: Any) -> dict[str, Any]:
    return json.loads(d.to_json()) if hasattr(d, "to_json") else dict(d)


def model_config(model_cfg: Any) -> ModelConfig:
    """The :class:`ModelConfig` of ``config.model`` (reads config.json for ``model.path``)."""
    overrides = dict(dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype,
                     remat=model_cfg.remat, scan_layers=bool(model_cfg.scan_layers),
                     attention=model_cfg.attention)
    if model_cfg.path:
        if not os.path.exists(os.path.join(model_cfg.path, "config.json")):
            raise ConfigError(f"model.path: no config.json in {model_cfg.path!r}")
        try:
            return ModelConfig.from_hf(model_cfg.path, **overrides)
        except ConfigError as e:
            raise ConfigError(f"model.path: {e}") from None
    if not model_cfg.init:
        raise ConfigError("model.path: no model given; set model.path (an HF checkpoint "
                          "directory) or model.init (a preset such as 'tiny-qwen2')")
    if model_cfg.init in MODEL_PRESETS:
        hf = dict(MODEL_PRESETS[model_cfg.init])
    else:
        try:
            with open(model_cfg.init, encoding="utf-8") as f:
                hf = json.load(f)
        except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
            raise ConfigError(f"model.init: cannot read {model_cfg.init!r} ({e})") from None
        if not isinstance(hf, dict):
            raise ConfigError(f"model.init: {model_cfg.init!r} holds a JSON "
                              f"{type(hf).__name__}, not an object (an HF config.json)")
    hf.update(_plain(model_cfg.hf_config))
    try:
        return ModelConfig.from_hf(hf, **overrides)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"model.hf_config: {e}") from None


def init_model(config: ModelConfig, *, mesh: Mesh | None, seed: int = 0) -> CausalLM:
    """A randomly initialised :class:`CausalLM`, created directly in its sharding."""
    abstract = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = None if mesh is None else sh.state_shardings(abstract_state, mesh)

    def make():
        return nnx.state(CausalLM(config, rngs=nnx.Rngs(seed)))

    # Always jitted, so the values are the same with or without a mesh (eager differs in ulps).
    state = jax.jit(make, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def build_model(model_cfg: Any, *, mesh: Mesh | None, seed: int = 0) -> CausalLM:
    """Load ``model.path`` or initialise ``model.init``, sharded on ``mesh``."""
    config = model_config(model_cfg)
    if model_cfg.path:
        return load_pretrained(model_cfg.path, dtype=config.dtype, param_dtype=config.param_dtype,
                               mesh=mesh, remat=config.remat, scan_layers=config.scan_layers,
                               attention=config.attention)
    return init_model(config, mesh=mesh, seed=seed)
