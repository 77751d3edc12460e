"""LoRA adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

What ``peft.PeftModel.from_pretrained(hf_base, path)`` loads onto the HF base model, and what
``PeftModel.save_pretrained`` writes: tensors named like
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` ([rank, in], torch layout) and
``...lora_B.weight`` ([out, rank]); PEFT's forward adds ``lora_B(lora_A(x)) * lora_alpha / r``
(``/ sqrt(r)`` with ``use_rslora``), the same as :class:`~sgalm_jax.models.lora.LoraAdapter`. Our
module paths are HF's module names with ``/`` for ``.``, so the mapping is mechanical; a decoder
with stacked layer weights ([L, ...], the scanned layout) is written one layer at a time.

A :class:`~sgalm_jax.models.score.ScoreModel` (GAD's discriminator) is written as a ``SEQ_CLS``
adapter with its head in ``modules_to_save`` (``base_model.model.score.weight``), as PEFT does for
``*ForSequenceClassification``.

Supported on import: plain LoRA (``peft_type: LORA``) with one rank and alpha for every module,
``use_rslora``, ``bias: none``. DoRA, ``rank_pattern``/``alpha_pattern``, LoRA biases and
``fan_in_fan_out`` are a :class:`~sgalm_jax.errors.CheckpointError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from sgalm_jax.errors import CheckpointError, ConfigError
from sgalm_jax.fileio import apply_umask, describe_os_error, make_temp_dir
from sgalm_jax.models.lora import (
    LoraSpec,
    adapter_modules,
    add_adapters,
    layer_names,
    linear_modules,
    spec_of,
)
from sgalm_jax.models.score import ScoreModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_UNSUPPORTED = (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D layers)"),
                ("lora_bias", "LoRA biases"))


def _as_path(path: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in path.split("/"))


def hf_module_names(path: str, lead: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """``[(HF module name, index into the leading axes)]`` for our linear layer ``path``: one
    name, or one per layer for stacked weights (a leading [L] axis after ``layers``)."""
    try:
        return [(name.replace("/", "."), idx) for name, idx in layer_names(path, lead)]
    except ConfigError as e:
        raise CheckpointError(f"{path}: cannot name its weights in PEFT's format ({e})") from None


def _adapted_hf_names(path: str, module: nnx.Module) -> list[tuple[str, tuple[int, ...]]]:
    """The HF names (and stacked indices) of the layers of ``module`` its adapter adapts."""
    rows = module.lora.layers
    named = hf_module_names(path, tuple(module.kernel.get_value().shape[:-2]))
    return named if rows is None else [(n, i) for n, i in named if i[0] in rows]


def _host(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _target_modules(model: nnx.Module, adapted: set[str]) -> list[str] | str:
    """PEFT's ``target_modules``: the layer names when every layer of those names is adapted,
    else a regex that PEFT full-matches against exactly the adapted module names."""
    layers = linear_modules(model)
    every = [n for path, module in layers
             for n, _ in hf_module_names(path, tuple(module.kernel.get_value().shape[:-2]))]
    dotted = [n for path, module in layers if path in adapted
              for n, _ in _adapted_hf_names(path, module)]
    names = {n.rsplit(".", 1)[-1] for n in dotted}
    if {n for n in every if n.rsplit(".", 1)[-1] in names} == set(dotted):
        return sorted(names)
    return "(" + "|".join(re.escape(n) for n in dotted) + ")"


def save_peft_adapter(model: nnx.Module, path: str | os.PathLike, *,
                      base_model_name_or_path: str = "", dtype: Any = None) -> None:
    """Write ``model``'s adapters (and a :class:`ScoreModel`'s head) in PEFT's format to ``path``.

    ``base_model_name_or_path`` goes into ``adapter_config.json`` (PEFT reads it when no base is
    given). ``dtype`` casts the tensors (default: their own). The folder is written beside
    ``path`` and moved into place when complete, as :func:`~sgalm_jax.models.save_pretrained`.
    """
    from sgalm_jax.models.hf import _move_into_place  # the export's atomic replace

    path = os.fspath(path)
    adapters = adapter_modules(model)
    if not adapters:
        raise CheckpointError(f"{path}: the model has no LoRA adapters to export")
    spec = spec_of(model)
    tensors: dict[str, np.ndarray] = {}
    modules = dict(linear_modules(model))
    for mpath, adapter in adapters.items():
        a, b = _host(adapter.a.get_value()), _host(adapter.b.get_value())
        for name, idx in _adapted_hf_names(mpath, modules[mpath]):
            tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a[idx].T)
            tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b[idx].T)
    scorer = isinstance(model, ScoreModel)
    if scorer:
        tensors[f"{PREFIX}score.weight"] = np.ascontiguousarray(
            _host(model.score.kernel.get_value()).T)
    if dtype is not None:
        from sgalm_jax.models.config import resolve_dtype

        out = jnp.dtype(resolve_dtype(dtype))
        tensors = {k: v.astype(out) for k, v in tensors.items()}
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if scorer else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": _target_modules(model, set(adapters)),
        "modules_to_save": ["score"] if scorer else None,
        "bias": "none",
        "use_rslora": False,  # spec.alpha already gives the scale alpha / r
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(parent, ".export-")
    try:
        if jax.process_index() == 0:
            save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
            with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
                json.dump(config, f, indent=2)
            apply_umask(tmp)
            _move_into_place(tmp, path)
    except (OSError, SafetensorError) as e:
        why = describe_os_error(e) if isinstance(e, OSError) else str(e)
        raise CheckpointError(f"{path}: cannot write the adapter ({why})") from None
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------ import
@dataclasses.dataclass
class PeftAdapter:
    """An adapter read from PEFT's files, mapped onto a model's module paths.

    ``spec``: rank, alpha, dropout (targets: exactly the adapted layers); ``paths``: our linear
    layers that get adapters; ``values``: ``{flat param path: array}`` for every ``lora/a`` and
    ``lora/b`` ([.., in, r] and [.., r, out], our layout); ``head``: a scorer's ``score.kernel``
    [hidden, 1] when the file has one.
    """

    spec: LoraSpec
    paths: list[str]
    values: dict[tuple[Any, ...], np.ndarray]
    head: np.ndarray | None
    config: dict[str, Any]


def _read_config(path: str) -> dict[str, Any]:
    fname = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(fname):
        raise CheckpointError(f"{path}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    try:
        with open(fname, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{fname}: not a valid JSON file ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{fname}: expected a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{fname}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, what in _UNSUPPORTED:
        if cfg.get(key):
            raise CheckpointError(f"{fname}: {key}: {what} is not supported")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{fname}: bias: {cfg['bias']!r} is not supported (only 'none')")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise CheckpointError(f"{fname}: {key}: per-module ranks or alphas are not "
                                  "supported (one r and lora_alpha for every module)")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool):
            raise CheckpointError(f"{fname}: {key}: expected a number, got {cfg.get(key)!r}")
    return cfg


def read_peft_adapter(path: str | os.PathLike, model: nnx.Module) -> PeftAdapter:
    """Read a PEFT LoRA adapter and map it onto ``model`` (real or abstract; used for its layer
    paths and shapes). Missing, unexpected or misshapen tensors are a :class:`CheckpointError`
    naming the tensor."""
    path = os.fspath(path)
    cfg = _read_config(path)
    fname = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(fname):
        other = os.path.join(path, "adapter_model.bin")
        hint = (" (only adapter_model.bin: save it with safe_serialization=True)"
                if os.path.exists(other) else "")
        raise CheckpointError(f"{path}: no {ADAPTER_WEIGHTS}{hint}")
    try:
        with safe_open(fname, framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated header, bf16 via numpy, ...
        if isinstance(e, CheckpointError):
            raise
        tensors = _read_flax(fname, e)

    # HF module name -> (our path, index into stacked axes, kernel shape)
    names: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {}
    for mpath, module in linear_modules(model):
        shape = tuple(module.kernel.get_value().shape)
        for name, idx in hf_module_names(mpath, shape[:-2]):
            names[name] = (mpath, idx, shape)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    head = None
    lora_key = re.compile(r"(.+)\.lora_([AB])(?:\.default)?\.weight$")
    for key, value in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = lora_key.fullmatch(name)
        if m and m.group(1) in names:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
        elif name in ("score.weight", "score.modules_to_save.weight") and isinstance(
                model, ScoreModel):
            head = np.ascontiguousarray(value.T)
        else:
            raise CheckpointError(f"{fname}: unexpected tensor {key!r} for this "
                                  f"{type(model).__name__} (no such adapted layer or head)")
    if not pairs:
        raise CheckpointError(f"{fname}: holds no LoRA tensors")
    rank = int(cfg["r"])
    spec = LoraSpec(rank=rank, alpha=float(cfg["lora_alpha"]),
                    dropout=float(cfg.get("lora_dropout") or 0.0),
                    rslora=bool(cfg.get("use_rslora")))
    values: dict[tuple[Any, ...], np.ndarray] = {}
    for name in sorted(pairs):
        mpath, idx, kshape = names[name]
        ab = pairs[name]
        for part in ("A", "B"):
            if part not in ab:
                raise CheckpointError(f"{fname}: tensor {PREFIX}{name}.lora_{part}.weight is "
                                      "missing")
        din, dout = kshape[-2:]
        for part, want in (("A", (rank, din)), ("B", (dout, rank))):
            if tuple(ab[part].shape) != want:
                raise CheckpointError(f"{fname}: tensor {PREFIX}{name}.lora_{part}.weight has "
                                      f"shape {tuple(ab[part].shape)}, expected {want} (r={rank})")
        lead = kshape[:-2]
        ka, kb = (*_as_path(mpath), "lora", "a"), (*_as_path(mpath), "lora", "b")
        if ka not in values:  # stacked layers the file does not adapt stay zero (no change)
            dtype = np.result_type(ab["A"].dtype, np.float32)
            values[ka] = np.zeros((*lead, din, rank), dtype)
            values[kb] = np.zeros((*lead, rank, dout), dtype)
        values[ka][idx] = ab["A"].T
        values[kb][idx] = ab["B"].T
    # per-layer names (model/layers/1/self_attn/q_proj): add_adapters adapts exactly those layers
    paths = sorted(n.replace(".", "/") for n in pairs)
    spec = dataclasses.replace(spec, targets="^(" + "|".join(map(re.escape, paths)) + ")$")
    return PeftAdapter(spec=spec, paths=paths, values=values, head=head, config=cfg)


def _read_flax(fname: str, first_error: Exception) -> dict[str, np.ndarray]:
    """bf16 tensors cannot be read through numpy: read them as jax arrays, keep them as float32."""
    try:
        with safe_open(fname, framework="flax") as f:
            return {k: np.asarray(f.get_tensor(k).astype(jnp.float32)) for k in f.keys()}
    except Exception:
        raise CheckpointError(f"{fname}: cannot read safetensors file ({first_error})") from None


def load_peft_adapter(model: nnx.Module, path: str | os.PathLike) -> LoraSpec:
    """Give ``model`` (a real :class:`~sgalm_jax.models.CausalLM` or :class:`ScoreModel` without
    adapters) the adapters of a PEFT folder, in place, and return their :class:`LoraSpec`. The
    adapters keep the dtype of the model's kernels; a scorer's head is replaced when the file has
    one."""
    adapter = read_peft_adapter(path, model)
    if adapter_modules(model):
        raise ConfigError(f"{os.fspath(path)}: the model already has adapters")
    add_adapters(model, adapter.spec, paths=adapter.paths)
    state = nnx.state(model, nnx.LoRAParam)
    flat = []
    for key, var in nnx.to_flat_state(state):
        old = var.get_value()
        value = jnp.asarray(adapter.values[key], old.dtype)
        sharding = getattr(old, "sharding", None)
        flat.append((key, var.replace(jax.device_put(value, sharding) if sharding else value)))
    nnx.update(model, nnx.from_flat_state(flat))
    if adapter.head is not None:
        kernel = model.score.kernel.get_value()
        if tuple(adapter.head.shape) != tuple(kernel.shape):
            raise CheckpointError(f"{os.fspath(path)}: score.weight has shape "
                                  f"{tuple(adapter.head.T.shape)}, expected "
                                  f"{tuple(kernel.T.shape)}")
        model.score.kernel.set_value(jnp.asarray(adapter.head, kernel.dtype))
    return adapter.spec


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PeftAdapter", "hf_module_names",
           "load_peft_adapter", "read_peft_adapter", "save_peft_adapter"]
