"""Model configuration read from a Hugging Face ``config.json``.

One :class:`ModelConfig` describes every supported decoder family (Qwen2/Qwen2.5, Qwen3, Llama 3.x);
the families differ only in the values of its fields (q/k/v bias, q/k RMSNorm, tied head, RoPE
scaling). Both the transformers v4 layout (``rope_theta``, ``rope_scaling``, ``torch_dtype``) and the
v5 layout (``rope_parameters``, ``dtype``) are accepted.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp

from sgalm_jax.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")  # see sgalm_jax.models.attention

_DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
}


def resolve_dtype(name: Any, what: str = "dtype") -> Any:
    """Map a dtype name ('bf16', 'float32', ...) or a numpy/jax dtype to a jnp dtype."""
    if name is None:
        return None
    if isinstance(name, str):
        key = name.lower().replace("torch.", "")
        if key not in _DTYPES:
            raise ConfigError(f"{what}: unsupported dtype {name!r}; use one of {sorted(_DTYPES)}")
        return _DTYPES[key]
    return jnp.dtype(name).type


def dtype_name(dtype: Any) -> str:
    """The HF spelling of a jnp dtype ('float32', 'bfloat16', 'float16')."""
    return jnp.dtype(dtype).name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a decoder-only transformer.

    ``dtype`` is the compute dtype of activations and matmuls; ``param_dtype`` the storage dtype of
    the weights. Norms, softmax and RoPE are always computed in float32.

    ``scan_layers`` runs the decoder's layers as one ``lax.scan`` over their stacked weights (fast
    to compile at any depth); False runs a Python loop over the same stacked weights. ``attention``
    picks the self-attention kernel (:mod:`sgalm_jax.models.attention`). Neither changes the
    params, so both can differ between training and export or between runs of one checkpoint.
    """

    model_type: str = "qwen2"
    vocab_size: int = 1000
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    attention_bias: bool = True  # bias on q/k/v projections
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # attend to at most this many recent tokens (Mistral)
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    scan_layers: bool = True
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope type {self.rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat {self.remat!r} is not one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"attention {self.attention!r} is not one of {ATTENTION_IMPLS}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, "dtype"))
        object.__setattr__(self, "param_dtype", resolve_dtype(self.param_dtype, "param_dtype"))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    # ------------------------------------------------------------------ derived
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """All end-of-sequence ids as a tuple (HF allows an int or a list)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def num_params(self) -> int:
        """Number of parameters (embedding counted once when tied)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        if self.o_proj_bias:
            attn += h
        if self.qk_norm:
            attn += 2 * d
        mlp = 3 * h * self.intermediate_size
        if self.mlp_bias:
            mlp += 2 * self.intermediate_size + h
        layer = attn + mlp + 2 * h
        total = self.num_hidden_layers * layer + self.vocab_size * h + h
        if not self.tie_word_embeddings:
            total += self.vocab_size * h
        return total

    def replace(self, **kwargs: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kwargs)

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> "ModelConfig":
        """Build a config from an HF ``config.json`` path, a model directory, or its parsed dict.

        ``overrides`` replace fields after parsing (e.g. ``dtype="bfloat16"``, ``remat="full"``).
        """
        where = "config"
        if isinstance(source, Mapping):
            hf = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            where = path
            try:
                with open(path, encoding="utf-8") as f:
                    hf = json.load(f)
            except FileNotFoundError:
                raise ConfigError(f"{path}: no config.json found") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            except OSError as e:  # a folder named config.json, permissions, ...
                raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
        if not isinstance(hf, Mapping):
            raise ConfigError(f"{where}: expected a JSON object (a model config), got "
                              f"{type(hf).__name__}")
        try:
            fields = _parse_hf(hf, where)
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError) as e:  # e.g. "hidden_size": "big"
            raise ConfigError(f"{where}: malformed model config ({type(e).__name__}: {e})") from None
        return cls(**{**fields, **overrides})

    def to_hf(self) -> dict[str, Any]:
        """An HF ``config.json`` dict (v4 layout, which transformers v4 and v5 both read)."""
        arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
                "mistral": "MistralForCausalLM"}
        out: dict[str, Any] = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "torch_dtype": dtype_name(self.param_dtype),
            "use_cache": True,
        }
        if self.rope_type != "default":
            scaling: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.rope_factor}
            if self.rope_type == "llama3":
                scaling.update(
                    low_freq_factor=self.rope_low_freq_factor,
                    high_freq_factor=self.rope_high_freq_factor,
                    original_max_position_embeddings=self.rope_original_max_position_embeddings,
                )
            out["rope_scaling"] = scaling
        if self.model_type == "qwen2":
            out["use_sliding_window"] = False
        else:
            out["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out


def _parse_hf(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Translate an HF config dict (v4 or v5 layout) into ModelConfig field values."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
        )

    def need(key: str) -> Any:
        if key not in hf:
            raise ConfigError(f"{where}: required key {key!r} is missing")
        return hf[key]

    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act {act!r} is not supported (only 'silu')")
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{where}: use_sliding_window=true is not supported")

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    head_dim = hf.get("head_dim") or hidden // heads

    # RoPE: v5 nests everything under rope_parameters; v4 has rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    if scaling and rope:
        kind = lambda d: d.get("rope_type", d.get("type", "default"))  # noqa: E731
        if kind(scaling) != kind(rope):
            raise ConfigError(f"{where}: rope_scaling says rope type {kind(scaling)!r} but "
                              f"rope_parameters says {kind(rope)!r}")
    rope = {**scaling, **rope}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{where}: rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )

    if model_type == "qwen2":
        qkv_bias, o_bias, qk_norm = True, False, False
    elif model_type == "mistral":
        qkv_bias, o_bias, qk_norm = False, False, False
    else:
        qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        qk_norm = model_type == "qwen3"

    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        dtype = "float32"
    out = dict(
        model_type=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_hidden_layers=int(need("num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        o_proj_bias=o_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=qk_norm,
        sliding_window=(int(hf["sliding_window"]) if model_type == "mistral"
                        and hf.get("sliding_window") else None),
        rope_theta=float(theta),
        rope_type=rope_type,
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_position_embeddings=int(
            rope.get("original_max_position_embeddings", 8192)
        ),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        dtype=dtype,
        param_dtype=dtype,
    )
    return out
