"""Hugging Face checkpoint import and export (``config.json`` + safetensors, single or sharded).

One declarative table per family maps HF tensor names to our module paths (with a transpose for
linear weights: torch stores ``[out, in]``, our kernels are ``[in, out]``). The same table drives
loading and saving, so the two directions cannot drift apart. The decoder's layers are stacked
(:func:`~sgalm_jax.models.transformer.stacked_layers`): HF's per-layer tensors
``model.layers.{i}.X`` are rows ``i`` of our one ``model.layers.X`` param of shape [L, ...], stacked
on import and sliced on export. The sequence scorer
(:class:`~sgalm_jax.models.score.ScoreModel`, HF's ``*ForSequenceClassification`` with one label)
uses the same table with ``score.weight`` in place of ``lm_head.weight``
(:func:`load_score_model`, :func:`save_score_model`).

Loading streams the checkpoint one param at a time: each param's tensors (one, or L for a stacked
layer param) are read, cast on the host and placed straight into its sharding, so the host never
holds more than one (stacked) param beyond the params.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from sgalm_jax.errors import CheckpointError
from sgalm_jax.fileio import apply_umask, describe_os_error, make_temp_dir
from sgalm_jax.models.config import ModelConfig, dtype_name, resolve_dtype
from sgalm_jax.models.lora import adapter_modules, merged_kernel
from sgalm_jax.models.transformer import CausalLM
from sgalm_jax.models.score import DEFAULT_HEAD_STD, ScoreModel, init_head_kernel

log = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
# Buffers some older checkpoints contain that carry no parameters.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class Rule:
    """HF tensor ``hf`` <-> our param ``ours``, present when ``when(config)``.

    ``{i}`` in ``hf`` is the layer index; such a rule maps every layer's tensor to row ``i`` of the
    stacked param ``ours`` (which has no index).
    """

    hf: str
    ours: str
    transpose: bool = False
    when: Callable[[ModelConfig], bool] = lambda c: True


def _linear(hf_module: str, our_module: str, bias: Callable[[ModelConfig], bool] | None = None):
    rules = [Rule(f"{hf_module}.weight", f"{our_module}.kernel", transpose=True)]
    if bias is not None:
        rules.append(Rule(f"{hf_module}.bias", f"{our_module}.bias", when=bias))
    return rules


def _decoder_rules(qkv_bias, o_bias, mlp_bias, qk_norm: bool) -> tuple[Rule, ...]:
    hf, ours = "model.layers.{i}", "model.layers"  # HF's layer i = row i of our stacked params
    rules = [
        Rule("model.embed_tokens.weight", "model.embed_tokens.embedding"),
        Rule("model.norm.weight", "model.norm.weight"),
        Rule("lm_head.weight", "lm_head.kernel", transpose=True,
             when=lambda c: not c.tie_word_embeddings),
        Rule(f"{hf}.input_layernorm.weight", f"{ours}.input_layernorm.weight"),
        Rule(f"{hf}.post_attention_layernorm.weight", f"{ours}.post_attention_layernorm.weight"),
    ]
    for proj in ("q_proj", "k_proj", "v_proj"):
        rules += _linear(f"{hf}.self_attn.{proj}", f"{ours}.self_attn.{proj}", qkv_bias)
    rules += _linear(f"{hf}.self_attn.o_proj", f"{ours}.self_attn.o_proj", o_bias)
    if qk_norm:
        rules += [Rule(f"{hf}.self_attn.q_norm.weight", f"{ours}.self_attn.q_norm.weight"),
                  Rule(f"{hf}.self_attn.k_norm.weight", f"{ours}.self_attn.k_norm.weight")]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rules += _linear(f"{hf}.mlp.{proj}", f"{ours}.mlp.{proj}", mlp_bias)
    return tuple(rules)


def _attention_bias(c: ModelConfig) -> bool:
    return c.attention_bias


def _o_bias(c: ModelConfig) -> bool:
    return c.o_proj_bias


def _mlp_bias(c: ModelConfig) -> bool:
    return c.mlp_bias


# One table per family. Qwen2 always has q/k/v bias; Llama and Qwen3 have them only with
# attention_bias (which also adds the o_proj bias); Qwen3 adds per-head q/k norms.
FAMILY_TABLES: dict[str, tuple[Rule, ...]] = {
    "qwen2": _decoder_rules(qkv_bias=_attention_bias, o_bias=None, mlp_bias=None, qk_norm=False),
    "qwen3": _decoder_rules(qkv_bias=_attention_bias, o_bias=_o_bias, mlp_bias=None, qk_norm=True),
    "llama": _decoder_rules(qkv_bias=_attention_bias, o_bias=_o_bias, mlp_bias=_mlp_bias,
                            qk_norm=False),
    # Mistral: Llama's tensors, no biases (its difference, the sliding window, has no weights).
    "mistral": _decoder_rules(qkv_bias=None, o_bias=None, mlp_bias=None, qk_norm=False),
}


# The scalar head of HF's *ForSequenceClassification (num_labels=1, no bias); replaces lm_head.
SCORE_RULE = Rule("score.weight", "score.kernel", transpose=True)
HEADS = ("lm_head", "score")


class Entry(NamedTuple):
    """Where one HF tensor lives in our params: ``path`` (a flat-state key), whether it is stored
    transposed, and its row ``layer`` of a stacked [L, ...] param (None: the whole param)."""

    path: tuple[Any, ...]
    transpose: bool
    layer: int | None


def expand_table(config: ModelConfig, head: str = "lm_head") -> dict[str, Entry]:
    """HF tensor name -> :class:`Entry` for every tensor this config has.

    ``head="lm_head"``: a causal LM (:class:`CausalLM`); ``head="score"``: a sequence scorer
    (:class:`ScoreModel`), the same body with ``score.weight`` instead of ``lm_head.weight``.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    rules = [r for r in FAMILY_TABLES[config.model_type]
             if not (head == "score" and r.hf == "lm_head.weight")]
    if head == "score":
        rules.append(SCORE_RULE)
    out: dict[str, Entry] = {}
    for rule in rules:
        if not rule.when(config):
            continue
        path = tuple(rule.ours.split("."))
        layers = range(config.num_hidden_layers) if "{i}" in rule.hf else [None]
        for i in layers:
            out[rule.hf.format(i=i)] = Entry(path, rule.transpose, i)
    return out


def _by_param(table: dict[str, Entry], names: set[str]) -> dict[tuple[Any, ...], list[str]]:
    """The HF names of ``names`` grouped by our param (params in the order of their first HF name,
    so loading is deterministic), layers in order."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name in sorted(names):
        groups.setdefault(table[name].path, []).append(name)
    for group in groups.values():
        group.sort(key=lambda n: -1 if table[n].layer is None else table[n].layer)
    return groups


# ---------------------------------------------------------------------------------------- loading
def _tensor_files(path: str) -> dict[str, str]:
    """HF tensor name -> safetensors file, from the index of a sharded checkpoint or a single file."""
    index_path = os.path.join(path, SAFE_INDEX)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, OSError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index "
                                  f"({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to file "
                                  f"names, got {type(weight_map).__name__}")
        files = {name: os.path.join(path, fname) for name, fname in weight_map.items()}
        for fname in sorted(set(files.values())):
            if not os.path.exists(fname):
                raise CheckpointError(f"{index_path}: shard {os.path.basename(fname)} is missing")
        return files
    single = os.path.join(path, SAFE_SINGLE)
    if not os.path.exists(single):
        raise CheckpointError(f"{path}: neither {SAFE_INDEX} nor {SAFE_SINGLE} found")
    with _open_safetensors(single) as f:
        return {name: single for name in f.keys()}


def _open_safetensors(fname: str):
    try:
        return safe_open(fname, framework="numpy")
    except Exception as e:  # truncated header, wrong format, ...
        raise CheckpointError(f"{fname}: cannot read safetensors file ({e})") from None


def _read_tensor(files: dict[str, str], name: str) -> np.ndarray:
    """One tensor of the checkpoint (its file is opened, memory-mapped, for this read only)."""
    fname = files[name]
    with _open_safetensors(fname) as f:
        if name not in set(f.keys()):
            raise CheckpointError(f"{fname}: tensor {name!r} listed in the index is absent")
        try:
            return f.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{fname}: cannot read tensor {name!r} ({e})") from None


def _resolve_config(path: str, dtype: Any, param_dtype: Any,
                    config_overrides: dict[str, Any]) -> ModelConfig:
    overrides = dict(config_overrides)
    if dtype is not None:
        overrides["dtype"] = resolve_dtype(dtype)
        overrides.setdefault("param_dtype", resolve_dtype(param_dtype or dtype))
    if param_dtype is not None:
        overrides["param_dtype"] = resolve_dtype(param_dtype)
    return ModelConfig.from_hf(path, **overrides)


def _check_names(path: str, config: ModelConfig, wanted: set[str], present: set[str]) -> None:
    """CheckpointError naming the first missing or unexpected tensor."""
    missing = sorted(wanted - present)
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing from the checkpoint"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(present - wanted)
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected tensor {unexpected[0]!r} for a {config.model_type} model"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))


def _load_state(path: str, files: dict[str, str], table: dict[str, Entry], names: set[str],
                abstract: nnx.Module, mesh: Mesh | None,
                rules: dict[str, Any] | None) -> tuple[nnx.GraphDef, dict, dict, dict | None]:
    """Read ``names`` (a subset of ``table``) into the params of ``abstract``, each placed into its
    sharding; returns (graphdef, loaded flat state, abstract flat state, flat shardings or None).

    One param at a time: a stacked layer param's L tensors are read into one host buffer [L, ...],
    cast, placed and dropped before the next param is read.
    """
    graphdef, abstract_state = nnx.split(abstract)
    shardings = None
    if mesh is not None:
        from sgalm_jax.sharding import state_shardings

        shardings = dict(nnx.to_flat_state(state_shardings(abstract_state, mesh, rules)))
    flat = dict(nnx.to_flat_state(abstract_state))

    loaded: dict[tuple[Any, ...], Any] = {}
    for our_path, group in _by_param(table, names).items():
        var = flat[our_path]
        want = var.get_value()
        stacked = table[group[0]].layer is not None
        host = np.empty(want.shape, want.dtype) if stacked else None
        for name in group:
            entry = table[name]
            shape = want.shape[1:] if stacked else want.shape
            expected = tuple(reversed(shape)) if entry.transpose else tuple(shape)
            array = _read_tensor(files, name)
            if tuple(array.shape) != expected:
                raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(array.shape)}, "
                                      f"the model config expects {expected}")
            if entry.transpose:
                array = array.T
            if stacked:
                host[entry.layer] = array  # casts to the param dtype
            else:
                host = array.astype(want.dtype)
            del array
        host = np.ascontiguousarray(host)
        if shardings is not None:
            sharding = shardings[our_path].get_value()
            value = jax.make_array_from_callback(host.shape, sharding, lambda idx, a=host: a[idx])
        else:
            value = jnp.asarray(host)
        loaded[our_path] = var.replace(value)
        del host
    return graphdef, loaded, flat, shardings


def _present(files: dict[str, str]) -> set[str]:
    return {n for n in files if not _IGNORED.search(n)}


def load_pretrained(path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = None,
                    mesh: Mesh | None = None, rules: dict[str, Any] | None = None,
                    **config_overrides: Any) -> CausalLM:
    """Load an HF-format checkpoint directory into a :class:`CausalLM`.

    ``dtype`` is the compute dtype and ``param_dtype`` the storage dtype (both default to the
    checkpoint's own dtype; giving only ``dtype`` sets both). With ``mesh``, each tensor is placed
    directly into its sharding. A missing, unexpected or wrongly shaped tensor raises
    :class:`CheckpointError` naming it. Extra keyword arguments override config fields (e.g.
    ``remat="full"``).
    """
    path = os.fspath(path)
    config = _resolve_config(path, dtype, param_dtype, config_overrides)
    files = _tensor_files(path)
    table = expand_table(config)

    present = _present(files)
    if config.tie_word_embeddings and "lm_head.weight" in present:
        present.discard("lm_head.weight")  # tied: the head is the embedding; a stored copy is unused
    if "score.weight" in present:
        raise CheckpointError(f"{path}: has a 'score.weight' head (a *ForSequenceClassification "
                              "checkpoint); load it with load_score_model")
    _check_names(path, config, set(table), present)

    abstract = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, loaded, _, _ = _load_state(path, files, table, set(table), abstract, mesh, rules)
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def _read_hf_json(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}  # ModelConfig.from_hf has already reported a missing or invalid config.json


def _num_labels(hf: dict[str, Any]) -> int | None:
    if "num_labels" in hf:
        return int(hf["num_labels"])
    if isinstance(hf.get("id2label"), dict):
        return len(hf["id2label"])
    return None


def load_score_model(path: str | os.PathLike, *, seed: int = 0, head_std: float | None = None,
                     dtype: Any = None, param_dtype: Any = None, mesh: Mesh | None = None,
                     rules: dict[str, Any] | None = None, **config_overrides: Any) -> ScoreModel:
    """Load a :class:`ScoreModel` (a discriminator / reward model) from an HF checkpoint.

    Two kinds of checkpoint are accepted, told apart by whether ``score.weight`` is stored:

    * an HF ``*ForSequenceClassification`` checkpoint with ``num_labels=1`` (ours, exported by
      :func:`save_score_model`, or transformers'): every tensor is loaded;
    * an HF causal LM (``*ForCausalLM``): the body is loaded, ``lm_head.weight`` (if any) is dropped,
      and the head is initialised freshly from ``seed``, normal(0, ``head_std``) with ``head_std``
      defaulting to the checkpoint's ``initializer_range`` (0.02), as transformers would.

    Dtypes, ``mesh`` (each tensor placed straight into its sharding; the head's kernel is
    ``('embed', None)``, i.e. sharded like the embedding's hidden dim) and the errors are those of
    :func:`load_pretrained`. A classification checkpoint with ``num_labels != 1`` is a
    :class:`CheckpointError`.
    """
    path = os.fspath(path)
    config = _resolve_config(path, dtype, param_dtype, config_overrides)
    hf = _read_hf_json(path)
    files = _tensor_files(path)
    table = expand_table(config, head="score")
    present = _present(files)
    labels = _num_labels(hf)
    archs = [a for a in hf.get("architectures") or [] if isinstance(a, str)]
    is_classifier = "score.weight" in present or any(a.endswith("ForSequenceClassification")
                                                     for a in archs)
    if is_classifier and "score.weight" in present:
        with _open_safetensors(files["score.weight"]) as f:
            labels = int(f.get_slice("score.weight").get_shape()[0])
    if is_classifier and labels is not None and labels != 1:
        raise CheckpointError(f"{path}: num_labels={labels} ('score.weight' has {labels} rows); "
                              "a scalar scorer needs num_labels=1")
    if not is_classifier:
        present.discard("lm_head.weight")
        present.add("score.weight")  # initialised below
    _check_names(path, config, set(table), present)

    abstract = nnx.eval_shape(lambda: ScoreModel(config, rngs=nnx.Rngs(0)))
    names = set(table) if is_classifier else set(table) - {"score.weight"}
    graphdef, loaded, flat, shardings = _load_state(path, files, table, names, abstract, mesh,
                                                    rules)
    if not is_classifier:
        std = float(head_std if head_std is not None else hf.get("initializer_range")
                    or DEFAULT_HEAD_STD)
        head_path = table["score.weight"].path
        kernel = init_head_kernel(config, seed, std)
        if shardings is not None:
            kernel = jax.device_put(kernel, shardings[head_path].get_value())
        loaded[head_path] = flat[head_path].replace(kernel)
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved next to a checkpoint (``AutoTokenizer`` on the same directory)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(path))


# ---------------------------------------------------------------------------------------- saving
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as '5GB', '500MB', '50KB'."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B)\s*", size.upper())
    if not m:
        raise ValueError(f"cannot parse size {size!r} (use e.g. '5GB' or bytes)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def _host_array(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:  # multi-host: gather the global array on every host
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def save_pretrained(model: CausalLM, path: str | os.PathLike, *, tokenizer: Any = None,
                    dtype: Any = None, max_shard_size: int | str = "5GB") -> None:
    """Write ``config.json`` + safetensors (sharded past ``max_shard_size``) that transformers loads.

    A model with LoRA adapters is written merged (each adapted kernel as ``W + scale * A @ B``,
    computed on the host one tensor at a time); :func:`sgalm_jax.models.peft.save_peft_adapter`
    writes the adapters alone. The files are written to a temporary directory beside ``path`` and moved into place only when
    complete, so an interrupted export never leaves a half-written checkpoint. ``dtype`` casts the
    weights (default: their own dtype). ``tokenizer`` is saved alongside when given.
    """
    _save(model, os.fspath(path), expand_table(model.config), model.config.to_hf(),
          tokenizer=tokenizer, dtype=dtype, max_shard_size=max_shard_size)


_CLASSIFIER_ARCH = {"qwen2": "Qwen2", "qwen3": "Qwen3", "llama": "Llama", "mistral": "Mistral"}


def save_score_model(model: ScoreModel, path: str | os.PathLike, *, tokenizer: Any = None,
                     pad_token_id: int | None = None, dtype: Any = None,
                     max_shard_size: int | str = "5GB") -> None:
    """Export a :class:`ScoreModel` as an HF ``*ForSequenceClassification`` with ``num_labels=1``.

    ``transformers.AutoModelForSequenceClassification.from_pretrained(path)`` loads it and, on the
    same tokens, gives the same scores. transformers pools at the last token that is not
    ``pad_token_id``, and refuses batches of more than one row without one, so ``config.json`` gets
    ``pad_token_id``: the argument, else the model config's, else the tokenizer's; if none is known
    this is a :class:`CheckpointError`. The write is atomic as in :func:`save_pretrained`.
    """
    config: ModelConfig = model.config
    if pad_token_id is None:
        pad_token_id = config.pad_token_id
    if pad_token_id is None and tokenizer is not None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None:
        raise CheckpointError(f"{os.fspath(path)}: no pad_token_id for the exported classifier "
                              "(transformers needs one to find the last token); pass "
                              "pad_token_id= or a tokenizer with a pad token")
    hf_config = config.to_hf()
    hf_config["architectures"] = [_CLASSIFIER_ARCH[config.model_type] + "ForSequenceClassification"]
    hf_config["id2label"] = {"0": "LABEL_0"}
    hf_config["label2id"] = {"LABEL_0": 0}
    hf_config["num_labels"] = 1
    hf_config["pad_token_id"] = int(pad_token_id)
    _save(model, os.fspath(path), expand_table(config, head="score"), hf_config,
          tokenizer=tokenizer, dtype=dtype, max_shard_size=max_shard_size)


def _save(model: nnx.Module, path: str, table: dict[str, Entry], hf_config: dict[str, Any], *,
          tokenizer: Any, dtype: Any, max_shard_size: int | str) -> None:
    config: ModelConfig = model.config
    out_dtype = resolve_dtype(dtype) if dtype is not None else config.param_dtype
    limit = parse_size(max_shard_size)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    # LoRA: adapted kernels are exported merged (the adapters' own leaves are not HF tensors).
    scales = {tuple(int(p) if p.isdigit() else p for p in path.split("/")): m.scale
              for path, m in adapter_modules(model).items()}

    def host_value(our_path: tuple[Any, ...]) -> np.ndarray:
        """One param on the host; an adapted kernel merged (stacked [L, ...] ones whole)."""
        value = _host_array(flat[our_path].get_value())
        module = our_path[:-1]
        if our_path[-1] == "kernel" and module in scales:
            value = merged_kernel(value, _host_array(flat[(*module, "lora", "a")].get_value()),
                                  _host_array(flat[(*module, "lora", "b")].get_value()),
                                  scales[module])
        return value

    def tensor_shape(entry: Entry) -> tuple[int, ...]:
        shape = tuple(flat[entry.path].get_value().shape)
        return shape[1:] if entry.layer is not None else shape

    host: dict[str, Any] = {"path": None, "array": None}  # the one param fetched to the host

    def host_tensor(entry: Entry) -> np.ndarray:
        if host["path"] != entry.path:
            host["path"], host["array"] = entry.path, None
            host["array"] = host_value(entry.path)
        array = host["array"] if entry.layer is None else host["array"][entry.layer]
        array = array.astype(out_dtype)
        return np.ascontiguousarray(array.T if entry.transpose else array)

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(parent, ".export-")  # the umask's mode, not mkdtemp's 0700
    try:
        shards: list[list[str]] = [[]]
        sizes = [0]
        for name, entry in table.items():
            nbytes = int(np.prod(tensor_shape(entry))) * jnp.dtype(out_dtype).itemsize
            if shards[-1] and sizes[-1] + nbytes > limit:
                shards.append([])
                sizes.append(0)
            shards[-1].append(name)
            sizes[-1] += nbytes
        n = len(shards)
        weight_map: dict[str, str] = {}
        for k, names in enumerate(shards):
            fname = SAFE_SINGLE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            tensors = {}
            for name in names:
                tensors[name] = host_tensor(table[name])
                weight_map[name] = fname
            if jax.process_index() == 0:
                save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
            del tensors
        host.clear()
        if jax.process_index() == 0:
            if n > 1:
                with open(os.path.join(tmp, SAFE_INDEX), "w") as f:
                    json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map},
                              f, indent=2)
            hf_config = dict(hf_config)
            hf_config["torch_dtype"] = dtype_name(out_dtype)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(hf_config, f, indent=2)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            apply_umask(tmp)  # safetensors writes 0600: readable as the umask allows instead
            _move_into_place(tmp, path)
    except (OSError, SafetensorError) as e:  # e.g. a full disk: the old export is untouched
        why = describe_os_error(e) if isinstance(e, OSError) else str(e)
        raise CheckpointError(f"{path}: cannot write the export ({why})") from None
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: str, path: str) -> None:
    """Rename the finished export to ``path``; if it exists, replace its weight files atomically."""
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    for stale in os.listdir(path):  # old shards of a different count would confuse loaders
        if stale.endswith(".safetensors") or stale == SAFE_INDEX:
            os.remove(os.path.join(path, stale))
    for fname in os.listdir(tmp):
        os.replace(os.path.join(tmp, fname), os.path.join(path, fname))
