"""One Flax NNX decoder-only transformer for Qwen2/Qwen2.5, Qwen3 and Llama 3.x.

Module attribute names follow Hugging Face's (``model.layers.N.self_attn.q_proj`` ...), so the
weight mapping in :mod:`sgalm_jax.models.hf` is a short table. Every parameter carries logical axis
names (``embed``, ``heads``, ``kv_heads``, ``mlp``, ``vocab``, ``norm``); :mod:`sgalm_jax.sharding`
maps them to mesh axes. The model itself knows nothing about meshes.

Numerics: weights in ``param_dtype``, activations and matmuls in ``dtype``; RMSNorm, RoPE, the
attention softmax and the output logits are float32.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sgalm_jax.models.attention import self_attention
from sgalm_jax.models.config import ModelConfig
from sgalm_jax.models.lora import layer_scope
from sgalm_jax.models.partitioning import constrain
from sgalm_jax.models.rope import apply_rotary, inverse_frequencies, rotary_cos_sin

_INIT_STD = 0.02
# Logical axes of the activations (pinned on a context mesh, see sgalm_jax.models.partitioning):
# the batch is split over ('data', 'fsdp'), heads and MLP columns over 'tensor'.
ACT_EMBED = ("batch", "length", "embed")
ACT_MLP = ("batch", "length", "mlp")
ACT_HEADS = ("batch", "length", "heads", "head_dim")
ACT_KV_HEADS = ("batch", "length", "kv_heads", "head_dim")
ACT_LOGITS = ("batch", "length", "vocab")


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype) -> jax.Array:
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * _INIT_STD).astype(dtype)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` with kernel [in, out] (the transpose of torch's weight), plus
    ``lora(x)`` when :func:`sgalm_jax.models.lora.add_adapters` gave the layer an adapter."""

    def __init__(self, din: int, dout: int, *, axes: tuple[str, str], use_bias: bool,
                 config: ModelConfig, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_normal(rngs, (din, dout), config.param_dtype), logical_axes=axes)
        self.bias = (
            nnx.Param(jnp.zeros((dout,), config.param_dtype), logical_axes=(axes[1],))
            if use_bias else None
        )
        self.dtype = config.dtype
        self.lora = nnx.data(None)  # a LoraAdapter (sgalm_jax.models.lora) on adapted layers

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.dot(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x)
        return y


class RMSNorm(nnx.Module):
    """Root-mean-square norm computed in float32; the scale is applied after casting back (as HF)."""

    def __init__(self, dim: int, *, eps: float, config: ModelConfig):
        self.weight = nnx.Param(jnp.ones((dim,), config.param_dtype), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * xf.astype(x.dtype)


class Embedding(nnx.Module):
    """Token embedding table [vocab, hidden]."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            _normal(rngs, (config.vocab_size, config.hidden_size), config.param_dtype),
            logical_axes=("vocab", "embed"),
        )
        self.dtype = config.dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output head: x @ embedding.T, accumulated and returned in float32."""
        return jnp.einsum("btd,vd->btv", x, self.embedding[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated keys/values of every layer for incremental decoding.

    All rows of a (left-padded) batch write at the same slot ``index`` (an int32 scalar), or, when
    ``index`` is an int32 vector [B], each row writes at its own slot (rows at different lengths);
    ``valid`` marks the slots that hold real tokens, so padding never receives attention. Slots are
    in time order (a query attends to the valid slots up to its own), unless ``positions`` [B, S]
    is given: then each slot's token position is stored there (written with the keys), and a query
    attends to the valid slots whose position is not after its own, in any slot order. That lets
    rows at different positions share one write slot per step (a ring of slots, as the
    continuous-batching engine keeps them): a contiguous write instead of a per-row scatter.

    Layout: ``k`` and ``v`` are stacked over the layers (:meth:`init` makes them so): the scanned
    decoder carries the whole stack through its layer scan and writes each step's new keys in
    place. Heads-major per layer, the layouts the decode attention's two batched matmuls read
    directly: values [L, B, kv_heads, S, head_dim] (``probs @ v``), keys *transposed*,
    [L, B, kv_heads, head_dim, S] (``q @ k``, with the slots as the matmul's output columns). A
    [B, S, kv_heads, head_dim] cache made XLA transpose the whole cache at every decode step, and
    keys stored like the values made the logits matmul 1.5x slower and the whole decode attention
    1.8x slower on CPU (9.8 -> 5.5 ms per step for 4 layers x 32 rows x 342 slots). A tuple of L
    per-layer arrays ([B, KV, D, S] keys, [B, KV, S, D] values) is accepted as well (the layers
    then run unrolled, and the returned cache is a tuple again).
    """

    k: jax.Array | tuple[jax.Array, ...]  # [L, B, kv_heads, head_dim, S] (or L x [B, KV, D, S])
    v: jax.Array | tuple[jax.Array, ...]  # [L, B, kv_heads, S, head_dim] (or L x [B, KV, S, D])
    valid: jax.Array  # [B, S] bool
    index: jax.Array  # int32 scalar, or [B]: next slot to write (shared or per row)
    positions: jax.Array | None = None  # [B, S] int32: each slot's token position (unordered slots)

    @classmethod
    def init(cls, config: ModelConfig, batch: int, length: int, dtype=None) -> "KVCache":
        dtype = dtype or config.dtype
        lead = (config.num_hidden_layers, batch, config.num_key_value_heads)
        return cls(k=jnp.zeros((*lead, config.head_dim, length), dtype),
                   v=jnp.zeros((*lead, length, config.head_dim), dtype),
                   valid=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32))

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    @property
    def stacked(self) -> bool:
        """True for the [L, B, KV, S, D] layout, False for a tuple of per-layer arrays."""
        return not isinstance(self.k, (tuple, list))


@dataclasses.dataclass
class _LayerKV:
    """One layer's view of the cache inside the layer loop: writes the new keys/values in place.

    ``k``/``v``: the whole stacks ([L, B, KV, D, S] keys, [L, B, KV, S, D] values, see
    :class:`KVCache`) with ``layer`` the index to use (traced inside a scan), or one layer's
    [B, KV, D, S] / [B, KV, S, D] arrays with ``layer=None``.
    """

    k: jax.Array
    v: jax.Array
    layer: jax.Array | int | None
    index: jax.Array

    def write(self, k_new: jax.Array, v_new: jax.Array) -> "_LayerKV":
        """Store k_new, v_new [B, T, KV, D] at slots ``index`` (.. + T) of this layer."""
        b, t = k_new.shape[:2]
        lead = () if self.layer is None else (self.layer,)

        def one(cache, new, transposed):
            new = new.astype(cache.dtype)
            if jnp.ndim(self.index) == 0:  # one write slot for the whole batch
                # [B, KV, D, T] keys, [B, KV, T, D] values
                new = new.transpose(0, 2, 3, 1) if transposed else new.transpose(0, 2, 1, 3)
                if self.layer is not None:
                    new = new[None]
                start = (*lead, 0, 0, 0, self.index) if transposed else (
                    *lead, 0, 0, self.index, 0)
                return jax.lax.dynamic_update_slice(cache, new, start)
            # row i writes its t tokens at slots index[i] ..; the [B, T] index arrays (apart, on
            # either side of a slice) pick a [B, T, KV, D] block in either layout
            rows, cols = jnp.arange(b)[:, None], self.index[:, None] + jnp.arange(t)[None, :]
            at = (rows, slice(None), slice(None), cols) if transposed else (
                rows, slice(None), cols, slice(None))
            return cache.at[(*lead, *at)].set(new, mode="drop")

        return dataclasses.replace(self, k=one(self.k, k_new, True), v=one(self.v, v_new, False))

    def read(self) -> tuple[jax.Array, jax.Array]:
        """This layer's keys [B, KV, D, S] and values [B, KV, S, D]."""
        if self.layer is None:
            return self.k, self.v
        take = lambda a: jax.lax.dynamic_index_in_dim(a, self.layer, 0, keepdims=False)  # noqa
        return take(self.k), take(self.v)


def _cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                      scale: float) -> jax.Array:
    """Grouped-query attention of q [B, T, H, D] over a heads-major cache: keys [B, KV, D, S],
    values [B, KV, S, D] (the :class:`KVCache` layouts).

    mask [B, 1, T, S]. The same numerics as ``jax.nn.dot_product_attention`` (float32 logits and
    softmax, probabilities cast to the value dtype), written as two batched matmuls over (B, KV) so
    the cache is read in place.
    """
    b, t, h, d = q.shape
    kv = k.shape[1]
    g = h // kv
    # [B, T, KV*G, D] -> [B, KV, G*T, D]: both matmuls are then plain batched (B, KV) matmuls
    qg = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    logits = jnp.einsum("bkqd,bkds->bkqs", qg, k,
                        preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
    logits = logits.astype(jnp.float32).reshape(b, kv, g, t, -1) * jnp.float32(scale)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kv, g * t, -1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
    out = out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, h, d)


class Attention(nnx.Module):
    """Grouped-query self-attention with optional q/k/v bias and per-head q/k RMSNorm."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.q_proj = Linear(c.hidden_size, q_dim, axes=("embed", "heads"),
                             use_bias=c.attention_bias, config=c, rngs=rngs)
        self.k_proj = Linear(c.hidden_size, kv_dim, axes=("embed", "kv_heads"),
                             use_bias=c.attention_bias, config=c, rngs=rngs)
        self.v_proj = Linear(c.hidden_size, kv_dim, axes=("embed", "kv_heads"),
                             use_bias=c.attention_bias, config=c, rngs=rngs)
        self.o_proj = Linear(q_dim, c.hidden_size, axes=("heads", "embed"),
                             use_bias=c.o_proj_bias, config=c, rngs=rngs)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, config=c)
            self.k_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, config=c)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        self.sliding_window, self.impl = c.sliding_window, c.attention

    def __call__(self, x, cos, sin, mask, segments, kv: _LayerKV | None = None):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = constrain(q, ACT_HEADS), constrain(k, ACT_KV_HEADS), constrain(v, ACT_KV_HEADS)
        scale = self.head_dim ** -0.5
        if kv is not None:
            kv = kv.write(k, v)
            ck, cv = kv.read()  # [B, kv_heads, head_dim, S], [B, kv_heads, S, head_dim]
            out = _cached_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), mask, scale)
        else:
            out = self_attention(q, k, v, mask=mask, segments=segments, scale=scale,
                                 sliding_window=self.sliding_window, requested=self.impl)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), kv


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, axes=("embed", "mlp"),
                                use_bias=c.mlp_bias, config=c, rngs=rngs)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, axes=("embed", "mlp"),
                              use_bias=c.mlp_bias, config=c, rngs=rngs)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, axes=("mlp", "embed"),
                                use_bias=c.mlp_bias, config=c, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(constrain(h, ACT_MLP))


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, config=config)
        self.self_attn = Attention(config, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                                                config=config)
        self.mlp = MLP(config, rngs)

    def __call__(self, x, cos, sin, mask, segments, kv=None):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, segments, kv)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ACT_EMBED), kv


LAYER_AXIS = "layers"  # logical name of the stacked layers' leading axis (never sharded)


def stacked_layers(config: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """One :class:`DecoderLayer` whose every param has a leading [num_hidden_layers] axis.

    Each layer is initialised from its own split of ``rngs``; the params' logical axes get
    :data:`LAYER_AXIS` in front.
    """
    n = config.num_hidden_layers

    @nnx.split_rngs(splits=n)
    @nnx.vmap(axis_size=n)
    def make(r: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(config, r)

    layers = make(rngs)
    for _, node in nnx.iter_graph(layers):
        if isinstance(node, nnx.Variable):
            axes = node.get_metadata().get("logical_axes")
            if axes is not None:
                node.set_metadata(logical_axes=(LAYER_AXIS, *axes))
    return layers


_REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Token positions [B, T] for a left- or right-padded batch: count of real tokens before each."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


class DecoderModel(nnx.Module):
    """The transformer body (HF's ``model``): embeddings, layers, final norm; returns hidden states.

    ``layers`` is one :class:`DecoderLayer` over stacked weights ([L, ...] params, see
    :func:`stacked_layers`). With ``config.scan_layers`` (the default) the forward is one
    ``lax.scan`` over them, so tracing and compiling cost the same for 4 layers as for 36; with
    ``scan_layers=False`` a Python loop slices layer ``i``'s weights (the same params and
    checkpoints, an unrolled program). Remat (``config.remat``) wraps each layer's step.
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = Embedding(config, rngs)
        self.layers = stacked_layers(config, rngs)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, config=config)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: KVCache | None = None):
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        segments = attention_mask.astype(jnp.int32)  # 0 = padding, k > 0 = packed example k
        attention_mask = segments > 0
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required when decoding with a cache")
            positions = positions_from_mask(attention_mask)
        cos, sin = rotary_cos_sin(positions, inverse_frequencies(self.config))

        # q_slot [1 or B, T] and k_slot [1 or B, S]: where queries and keys sit in time (slot
        # indices of an ordered cache, where slot distance equals token distance within a row)
        key_pos = None
        if cache is None:
            key_valid, q_slot, k_slot = attention_mask, jnp.arange(t)[None], jnp.arange(t)[None]
        elif cache.positions is not None:  # unordered slots: time order from stored positions
            start = (0, cache.index)
            key_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, start)
            key_pos = jax.lax.dynamic_update_slice(cache.positions,
                                                   positions.astype(cache.positions.dtype), start)
            q_slot, k_slot = positions, key_pos
        elif jnp.ndim(cache.index) == 0:
            key_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, cache.index))
            q_slot, k_slot = (cache.index + jnp.arange(t))[None], jnp.arange(cache.length)[None]
        else:  # a write slot per row
            q_slot = cache.index[:, None] + jnp.arange(t)[None, :]  # [B, T]
            key_valid = cache.valid.at[jnp.arange(b)[:, None], q_slot].set(attention_mask,
                                                                           mode="drop")
            k_slot = jnp.arange(cache.length)[None]
        causal = k_slot[:, None, :] <= q_slot[:, :, None]  # [1 or B, T, S]
        if self.config.sliding_window:
            causal = causal & (q_slot[:, :, None] - k_slot[:, None, :]
                               < self.config.sliding_window)
        mask = causal & key_valid[:, None, :]  # [B, T, S]
        if cache is None:  # packed rows: a token attends only within its own example
            mask = mask & (segments[:, :, None] == segments[:, None, :])
        mask = mask[:, None, :, :]  # [B, 1, T, S]

        x = constrain(self.embed_tokens(input_ids), ACT_EMBED)
        x, cache_kv = self._run_layers(x, cos, sin, mask, segments, cache)
        x = self.norm(x)
        if cache is None:
            return x, None
        k, v = cache_kv
        return x, KVCache(k=k, v=v, valid=key_valid, index=cache.index + t, positions=key_pos)

    def _run_layers(self, x, cos, sin, mask, segments, cache: KVCache | None):
        """The layer stack: scanned or unrolled; returns (x, (k, v) of the cache or None)."""
        cfg = self.config
        n = cfg.num_hidden_layers
        graphdef, params = nnx.split(self.layers)

        def layer_step(i, p, x, kv):
            # LoRA dropout masks differ per layer: the (traced, under scan) index is folded into
            # the dropout key (a no-op without dropout).
            with layer_scope(i):
                return nnx.merge(graphdef, p)(x, cos, sin, mask, segments, kv)

        if cfg.remat != "none" and cache is None:
            layer_step = jax.checkpoint(layer_step, policy=_REMAT_POLICIES[cfg.remat],
                                        prevent_cse=not cfg.scan_layers)
        index = None if cache is None else cache.index

        if cache is not None and not cache.stacked:  # per-layer arrays: always unrolled
            ks, vs = [], []
            for i in range(n):
                p = jax.tree.map(lambda a, i=i: a[i], params)
                x, kv = layer_step(i, p, x, _LayerKV(cache.k[i], cache.v[i], None, index))
                ks.append(kv.k)
                vs.append(kv.v)
            return x, (tuple(ks), tuple(vs))

        if not cfg.scan_layers:
            k_all, v_all = (None, None) if cache is None else (cache.k, cache.v)
            for i in range(n):
                p = jax.tree.map(lambda a, i=i: a[i], params)
                kv = None if cache is None else _LayerKV(k_all, v_all, i, index)
                x, kv = layer_step(i, p, x, kv)
                if kv is not None:
                    k_all, v_all = kv.k, kv.v
            return x, (None if cache is None else (k_all, v_all))

        if cache is None:
            def body(x, xs):
                i, p = xs
                return layer_step(i, p, x, None)[0], None

            x, _ = jax.lax.scan(body, x, (jnp.arange(n), params))
            return x, None

        def body_cached(carry, xs):
            x, k_all, v_all = carry
            i, p = xs
            x, kv = layer_step(i, p, x, _LayerKV(k_all, v_all, i, index))
            return (x, kv.k, kv.v), None

        (x, k_all, v_all), _ = jax.lax.scan(body_cached, (x, cache.k, cache.v),
                                            (jnp.arange(n), params))
        return x, (k_all, v_all)


class CausalLM(nnx.Module):
    """Decoder plus language-model head (tied to the embedding or separate), as HF's *ForCausalLM."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = DecoderModel(config, rngs)
        self.lm_head = (
            None if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, axes=("embed", "vocab"),
                        use_bias=False, config=config, rngs=rngs)
        )

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits [B, T, vocab] from final hidden states."""
        if self.lm_head is None:
            return constrain(self.model.embed_tokens.attend(hidden), ACT_LOGITS)
        return constrain(jnp.einsum("btd,dv->btv", hidden,
                                    self.lm_head.kernel[...].astype(hidden.dtype),
                                    preferred_element_type=jnp.float32), ACT_LOGITS)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: KVCache | None = None):
        """Logits [B, T, vocab] in float32; with ``cache``, returns ``(logits, updated_cache)``.

        ``attention_mask`` [B, T] marks real tokens (0 = padding, left or right). Without explicit
        ``positions`` they are derived from the mask, so left-padded rows start at position 0.
        For packed rows, give each example its own positive segment id in ``attention_mask``
        (1, 2, 3, ...) and pass ``positions`` restarting at 0 per example: tokens then attend only
        within their own example.
        """
        hidden, new_cache = self.model(input_ids, attention_mask, positions, cache)
        logits = self.logits_from_hidden(hidden)
        return logits if cache is None else (logits, new_cache)
