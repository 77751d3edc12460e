"""LoRA: low-rank adapters on the decoder's linear layers, chosen by a regex over module paths.

An adapted :class:`~sgalm_jax.models.transformer.Linear` computes

    y = x @ W (+ b) + scale * dropout(x) @ A @ B,     scale = alpha / rank  (rsLoRA: alpha / sqrt(rank))

with ``A`` [in, rank] drawn like PEFT's (``U(-1/sqrt(in), 1/sqrt(in))``, kaiming-uniform with
a = sqrt(5)) and ``B`` [rank, out] zero, so a fresh adapter leaves the model exactly as it was. The
adapter is a submodule ``lora`` of the linear layer holding two ``nnx.LoRAParam`` (a subclass of
``nnx.Param``): ``.../q_proj/lora/a`` and ``.../q_proj/lora/b``. Everything else in the model is the
*base*; :func:`split_adapters` separates the two, and the roles layer
(:mod:`sgalm_jax.training.roles`) keeps one frozen base shared by several adapter sets.

**One place for the math.** :class:`LoraAdapter` is the only code that computes the adapter's
contribution; the linear layer calls it. It works per layer on ``A`` [in, r] and ``B`` [r, out].
The decoder stores its layers stacked (params with a leading [L] axis, run under ``lax.scan``):
:func:`add_adapters` gives the adapters the same leading axis ([L, in, r], [L, r, out]) and the
layer loop slices them with every other layer param, so the adapter sees [in, r] again.

**Layer names.** A stacked linear layer (``model/layers/self_attn/q_proj``, kernel [L, in, out])
stands for L layers with the names the unrolled decoder (and HF) gives them,
``model/layers/{i}/self_attn/q_proj`` (:func:`layer_names`). ``targets`` regexes and ``paths`` are
matched against the stacked path and against those per-layer names, so ``q_proj$`` adapts every
layer and ``layers/(2[4-9]|3[0-5])/`` the last twelve. When only some layers of a stack are adapted,
the adapter still has the whole [L] axis but the others' ``A`` and ``B`` are zero: they add
nothing, get zero gradients (dA = x^T g B^T scale, dB = (x A)^T g scale), so no optimizer moves
them, and the PEFT export writes only the adapted layers (the adapter's ``layers``, kept in the
params' metadata as ``lora_layers`` so fresh values made from shapes alone zero them too).

**Dropout** (``spec.dropout``) is active only inside :func:`dropout_rng` (the roles layer opens it
around a train step's loss with that step's key); sampling, scoring and evaluation never drop.
Each adapter folds a fixed id (from its path) into the key, and a decoder loop folds the layer
index in with :func:`layer_scope` (a scanned decoder passes the traced index), so no two adapters
share a mask.

Public: :class:`LoraSpec`, :func:`add_adapters`, :func:`init_adapters`, :func:`split_adapters`,
:func:`adapter_modules`, :func:`merge_adapters` (weights with ``scale * A @ B`` folded in),
:func:`merged_kernel` (one kernel, on the host: what the HF export writes).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
import zlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgalm_jax.errors import ConfigError

# Every projection of a decoder layer (attention and MLP): what QLoRA and most LoRA recipes adapt.
TARGETS_ALL = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
TARGETS_ATTENTION = r"(q_proj|k_proj|v_proj|o_proj)$"
# Heads are read through their kernel (tied embedding, chunked log-probs, the scorer's last-token
# read), never through Linear.__call__: an adapter there would be silently ignored.
HEAD_NAMES = ("lm_head", "score")
# Logical name of the adapters' rank axis (see sgalm_jax.sharding.LOGICAL_RULES).
RANK_AXIS = "lora_rank"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Adapter hyperparameters: ``rank``, ``alpha``, ``dropout``, ``targets`` (a regex searched in
    module paths such as ``model/layers/3/self_attn/q_proj``) and ``rslora`` (scale
    ``alpha / sqrt(rank)`` instead of ``alpha / rank``, as PEFT's ``use_rslora``)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = TARGETS_ALL
    rslora: bool = False

    def __post_init__(self):
        if int(self.rank) < 1:
            raise ConfigError(f"lora.rank: must be >= 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"lora.alpha: must be a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ConfigError(f"lora.targets: invalid regex {self.targets!r} ({e})") from None

    @property
    def scale(self) -> float:
        return float(self.alpha) / (math.sqrt(self.rank) if self.rslora else float(self.rank))


# ------------------------------------------------------------------------------------ dropout keys
_DROPOUT_KEY: contextvars.ContextVar = contextvars.ContextVar("lora_dropout_key", default=None)


@contextlib.contextmanager
def dropout_rng(key: jax.Array | None) -> Iterator[None]:
    """Turn adapter dropout on for forward passes traced inside (``key``: a typed or raw key;
    None leaves it off). The roles layer wraps a train step's loss in this."""
    if key is not None and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


@contextlib.contextmanager
def layer_scope(index: int | jax.Array) -> Iterator[None]:
    """Fold a layer index into the dropout key for the forward inside (a no-op when dropout is
    off). The decoder's layer loop calls it; a scanned decoder passes the scan's traced index."""
    key = _DROPOUT_KEY.get()
    if key is None:
        yield
        return
    token = _DROPOUT_KEY.set(jax.random.fold_in(key, index))
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


def _path_id(path: str) -> int:
    return zlib.crc32(path.encode()) & 0x7FFFFFFF


# ------------------------------------------------------------------------------------ the adapter
class LoraAdapter(nnx.Module):
    """``scale * dropout(x) @ a @ b`` for one linear layer (a [.., in, r], b [.., r, out])."""

    def __init__(self, a: jax.Array, b: jax.Array, *, scale: float, dropout: float, uid: int,
                 axes: tuple[Any, ...] | None, layers: tuple[int, ...] | None = None):
        lead = () if axes is None else tuple(axes[:-2])
        in_axis, out_axis = (None, None) if axes is None else axes[-2:]
        # The rank axis has its own logical name: sharded over 'fsdp' where the other axis is not
        # (sgalm_jax.sharding.LOGICAL_RULES), so adapters, their gradients and optimizer state
        # are split like the weights (ZeRO-3) rather than replicated.
        meta = {} if layers is None else {"lora_layers": tuple(layers)}
        self.a = nnx.LoRAParam(a, logical_axes=(*lead, in_axis, RANK_AXIS), **meta)
        self.b = nnx.LoRAParam(b, logical_axes=(*lead, RANK_AXIS, out_axis), **meta)
        self.scale, self.dropout, self.uid = float(scale), float(dropout), int(uid)
        # Adapted rows of a stacked adapter's leading axis (None: all); the others stay zero.
        self.layers = None if layers is None else tuple(int(i) for i in layers)

    @property
    def rank(self) -> int:
        return int(self.a.get_value().shape[-1])

    def __call__(self, x: jax.Array) -> jax.Array:
        """The adapter's contribution for inputs ``x`` [..., in] (already in the compute dtype)."""
        key = _DROPOUT_KEY.get()
        if self.dropout > 0 and key is not None:
            keep = jax.random.bernoulli(jax.random.fold_in(key, self.uid), 1.0 - self.dropout,
                                        x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        h = jnp.dot(x, self.a[...].astype(x.dtype))
        return jnp.dot(h, self.b[...].astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)


def initial_a(path: str, shape: tuple[int, ...], seed: int, dtype: Any,
              layers: tuple[int, ...] | None = None) -> jax.Array:
    """PEFT's A init (kaiming-uniform, a = sqrt(5): ``U(-1/sqrt(in), 1/sqrt(in))``), keyed by the
    adapter's path and ``seed``: the same values eagerly, under jit, sharded or not. ``layers``:
    the adapted rows of a stacked adapter's leading axis; the other rows are zero."""
    bound = 1.0 / math.sqrt(shape[-2])
    key = jax.random.fold_in(jax.random.key(seed), _path_id(path))
    a = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    if layers is not None:
        keep = np.zeros(shape[0], bool)
        keep[list(layers)] = True
        a = jnp.where(jnp.asarray(keep).reshape((-1,) + (1,) * (len(shape) - 1)), a, 0.0)
    return a.astype(dtype)


# ------------------------------------------------------------------------------------ applying
def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


def _is_linear(node: Any) -> bool:
    return isinstance(node, nnx.Module) and hasattr(node, "kernel") and hasattr(node, "lora")


def linear_modules(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """``(path, module)`` of every linear layer LoRA can adapt (heads excluded), in graph order."""
    out = []
    for path, node in nnx.iter_graph(model):
        if _is_linear(node) and path and path[-1] not in HEAD_NAMES:
            out.append((_path_str(path), node))
    return out


def layer_names(path: str, lead: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """``[(name, index into the leading axes)]`` of the layers a linear layer ``path`` holds: the
    path itself for an unstacked kernel, else one name per layer of a leading [L] axis after
    ``layers`` (``model/layers/3/self_attn/q_proj``: the unrolled decoder's and HF's naming)."""
    parts = path.split("/")
    if not lead:
        return [(path, ())]
    if len(lead) != 1 or "layers" not in parts:
        raise ConfigError(f"lora: cannot name the layers of {path} (stacked shape {lead}; "
                          "expected one leading layer axis under 'layers')")
    i = parts.index("layers") + 1
    return [("/".join(parts[:i] + [str(k)] + parts[i:]), (k,)) for k in range(lead[0])]


def _lead(module: nnx.Module) -> tuple[int, ...]:
    return tuple(module.kernel.get_value().shape[:-2])


def adapted_layer_names(model: nnx.Module) -> list[str]:
    """Per-layer names (:func:`layer_names`) of every adapted layer, in graph order."""
    out = []
    for path, module in linear_modules(model):
        lora = module.lora
        if lora is None:
            continue
        for name, idx in layer_names(path, _lead(module)):
            if lora.layers is None or (idx and idx[0] in lora.layers):
                out.append(name)
    return out


def adapter_modules(model: nnx.Module) -> dict[str, LoraAdapter]:
    """``{linear layer path: its LoraAdapter}`` of every adapted layer."""
    return {p: m.lora for p, m in linear_modules(model) if m.lora is not None}


def add_adapters(model: nnx.Module, spec: LoraSpec, *, seed: int = 0,
                 paths: list[str] | None = None) -> list[str]:
    """Give every linear layer whose path matches ``spec.targets`` (or exactly ``paths``) an
    adapter, in place; returns the adapted layers' names (per layer, :func:`layer_names`). Works
    on real and abstract (``nnx.eval_shape``) models; a kernel with leading (stacked-layer) axes
    gets adapters with the same axes. Regexes and ``paths`` match a stacked layer's own path (all
    its layers) or its per-layer names (those layers; see the module docstring). A regex that
    matches no layer is a :class:`ConfigError` listing what there is."""
    layers = linear_modules(model)
    if paths is not None:
        wanted = set(paths)
        match = lambda name: name in wanted  # noqa: E731
    else:
        pattern = re.compile(spec.targets)
        match = lambda name: pattern.search(name) is not None  # noqa: E731
    chosen, seen = [], set()
    for path, module in layers:
        lead = _lead(module)
        named = layer_names(path, lead)
        if match(path):
            rows, names = None, [n for n, _ in named]
            seen.add(path)
        else:
            hits = [(n, idx) for n, idx in named if match(n)]
            if not hits:
                continue
            rows = None if len(hits) == len(named) or not lead else tuple(i[0] for _, i in hits)
            names = [n for n, _ in hits]
        seen.update(names)
        chosen.append((path, module, rows, names))
    if paths is not None:
        missing = sorted(set(paths) - seen)
        if missing:
            raise ConfigError(f"lora: the model has no linear layer {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    elif not chosen:
        names = sorted({p.rsplit("/", 1)[-1] for p, _ in layers})
        example = layer_names(layers[0][0], _lead(layers[0][1]))[0][0]
        raise ConfigError(f"lora.targets: {spec.targets!r} matches no linear layer; layer "
                          f"paths look like {example!r} (names: {names}; heads "
                          f"{list(HEAD_NAMES)} cannot be adapted)")
    out = []
    for path, module, rows, names in chosen:
        if module.lora is not None:
            raise ConfigError(f"lora: {path} already has an adapter")
        kernel = module.kernel
        value = kernel.get_value()
        shape, dtype = tuple(value.shape), value.dtype
        lead, (din, dout) = shape[:-2], shape[-2:]
        a_shape, b_shape = (*lead, din, spec.rank), (*lead, spec.rank, dout)
        if isinstance(value, jax.ShapeDtypeStruct):
            a, b = jax.ShapeDtypeStruct(a_shape, dtype), jax.ShapeDtypeStruct(b_shape, dtype)
        else:
            a = initial_a(path + "/lora/a", a_shape, seed, dtype, rows)
            b = jnp.zeros(b_shape, dtype)
        adapter = LoraAdapter(a, b, scale=spec.scale, dropout=spec.dropout, uid=_path_id(path),
                              axes=kernel.get_metadata().get("logical_axes"), layers=rows)
        module.lora = nnx.data(adapter)
        out += names
    return out


def init_adapters(abstract: nnx.State, seed: int, shardings: Any = None) -> nnx.State:
    """Fresh adapter values (A as :func:`initial_a`, B zero) for an abstract adapter state (from
    :func:`split_adapters` of an ``nnx.eval_shape`` model), created directly in ``shardings``."""
    flat = list(nnx.to_flat_state(abstract))

    def make():
        out = []
        for path, var in flat:
            value = var.get_value()
            if path[-1] == "a":
                new = initial_a(_path_str(path), tuple(value.shape), seed, value.dtype,
                                var.get_metadata().get("lora_layers"))
            else:
                new = jnp.zeros(value.shape, value.dtype)
            out.append((path, var.replace(new)))
        return nnx.from_flat_state(out)

    return jax.jit(make, out_shardings=shardings)()


def split_adapters(state: nnx.State) -> tuple[nnx.State, nnx.State]:
    """``(adapters, rest)`` of a params state: the ``LoRAParam`` leaves and everything else."""
    adapters, rest = nnx.split_state(state, nnx.LoRAParam, ...)
    return adapters, rest


def is_adapter_path(path: tuple[Any, ...]) -> bool:
    """Whether a flat-state path is an adapter's A or B."""
    return len(path) >= 2 and path[-2] == "lora" and path[-1] in ("a", "b")


# ------------------------------------------------------------------------------------ merging
def merged_kernel(kernel: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """``kernel + scale * a @ b`` computed in float32 on the host (any leading stacked axes), in
    the wider of the kernel's and the adapters' dtypes: one tensor at a time, so exporting never
    holds a second model."""
    delta = np.matmul(np.asarray(a, np.float32), np.asarray(b, np.float32)) * np.float32(scale)
    out = np.result_type(kernel.dtype, a.dtype)
    return (np.asarray(kernel, np.float32) + delta).astype(out)


def merge_adapters(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` without adapters whose kernels have ``scale * A @ B`` folded in (float32
    arithmetic, the kernels' dtype). ``model`` is left as it is; unadapted params are shared."""
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state, copy=True)  # new Variables over the same arrays
    for _, module in linear_modules(merged):
        lora = module.lora
        if lora is None:
            continue
        kernel = module.kernel.get_value()
        delta = jnp.matmul(lora.a.get_value().astype(jnp.float32),
                           lora.b.get_value().astype(jnp.float32)) * lora.scale
        module.kernel.set_value((kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
        module.lora = nnx.data(None)
    return merged


def strip_adapters(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with its adapters removed (the base alone; arrays shared)."""
    graphdef, state = nnx.split(model)
    stripped = nnx.merge(graphdef, state, copy=True)
    for _, module in linear_modules(stripped):
        module.lora = nnx.data(None)
    return stripped


def spec_of(model: nnx.Module) -> LoraSpec | None:
    """The :class:`LoraSpec` a model's adapters share (None without adapters); adapters of
    different ranks, scales or dropouts are a :class:`ConfigError`."""
    adapters = adapter_modules(model)
    if not adapters:
        return None
    kinds = {(m.rank, m.scale, m.dropout) for m in adapters.values()}
    if len(kinds) > 1:
        raise ConfigError(f"lora: the model's adapters differ in (rank, scale, dropout): "
                          f"{sorted(kinds)}")
    rank, scale, dropout = kinds.pop()
    names = []  # a whole stack by its own path, a subset of its layers by their names
    for path, module in linear_modules(model):
        lora = module.lora
        if lora is None:
            continue
        names += [path] if lora.layers is None else [
            n for n, idx in layer_names(path, _lead(module)) if idx[0] in lora.layers]
    names = sorted(re.escape(n) for n in names)
    return LoraSpec(rank=rank, alpha=scale * rank, dropout=dropout,
                    targets="^(" + "|".join(names) + ")$")


__all__ = [
    "HEAD_NAMES",
    "LoraAdapter",
    "LoraSpec",
    "TARGETS_ALL",
    "TARGETS_ATTENTION",
    "adapted_layer_names",
    "adapter_modules",
    "add_adapters",
    "dropout_rng",
    "init_adapters",
    "initial_a",
    "is_adapter_path",
    "layer_names",
    "layer_scope",
    "linear_modules",
    "merge_adapters",
    "merged_kernel",
    "spec_of",
    "split_adapters",
    "strip_adapters",
]
