"""The static sampler's device programs (prefill, and a ``lax.while_loop`` decode of one batch until
its longest row ends), and the helpers both engines share: buckets, cache shardings, stop tests,
the output head.

:mod:`sgalm_jax.sampling` describes how a call runs and drives them from :class:`Sampler`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sgalm_jax.models.config import ModelConfig
from sgalm_jax.models.transformer import CausalLM, KVCache, positions_from_mask
from sgalm_jax.sampling_ops import _Mode, _select_with_logprobs
from sgalm_jax.sharding import BATCH_AXES, LOGICAL_RULES, logical_to_spec


# ------------------------------------------------------------------------------------ programs
def bucket_size(n: int, minimum: int = 1, multiple: int = 1) -> int:
    """The next power of two >= ``n`` (at least ``minimum``), rounded up to a multiple of ``multiple``."""
    b = max(int(minimum), 1 << max(int(n) - 1, 0).bit_length())
    return -(-b // multiple) * multiple


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _DecodeState:
    """The loop carry of the decode program (donated into it, so the cache is updated in place)."""

    cache: KVCache
    tokens: jax.Array  # [N, max_new] int32
    logprobs: jax.Array  # [N, max_new] float32
    last: jax.Array  # [N] int32: the token to feed next
    position: jax.Array  # [N] int32: its position
    done: jax.Array  # [N] bool
    lengths: jax.Array  # [N] int32
    limit: jax.Array  # [N] int32: the row's maximum new tokens
    step: jax.Array  # int32 scalar: tokens generated so far
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class _Program:
    """Everything static about one (batch bucket, prompt bucket, ...) compilation."""

    batch: int  # prompt rows (bucketed)
    prompt_len: int
    num_samples: int
    max_new: int
    mode: _Mode
    stop_ids: tuple[int, ...]
    pad_id: int
    cache_dtype: Any
    head_nn: bool = False  # decode with a [hidden, vocab] copy of a tied head (faster on CPU)


def _constrain(x: jax.Array, mesh: Mesh | None, spec: P) -> jax.Array:
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _cache_spec(config: ModelConfig, mesh: Mesh | None, batch: int, length: int) -> P:
    """Sharding of the stacked KV cache's values [L, B, kv_heads, S, head_dim], and of its keys
    [L, B, kv_heads, head_dim, S] (the KVCache layouts: the same spec, since neither the length nor
    head_dim axis is sharded)."""
    if mesh is None:
        return P()
    shape = (config.num_hidden_layers, batch, config.num_key_value_heads, length, config.head_dim)
    return logical_to_spec(("layers", "batch", "kv_heads", "length", "head_dim"), shape, mesh,
                           LOGICAL_RULES)


def _stopped(tokens: jax.Array, stop_ids: tuple[int, ...]) -> jax.Array:
    if not stop_ids:
        return jnp.zeros(tokens.shape, bool)
    return (tokens[:, None] == jnp.asarray(stop_ids, jnp.int32)[None, :]).any(-1)


def _prefill(graphdef, config: ModelConfig, prog: _Program, mesh: Mesh | None,
             state, ids, mask, limit, key, temperature, top_p) -> _DecodeState:
    model: CausalLM = nnx.merge(graphdef, state)
    b, t = ids.shape
    n = prog.num_samples
    rows = b * n
    cache_len = t + prog.max_new
    batch_spec = P(BATCH_AXES) if mesh is not None else P()
    cache = KVCache.init(config, b, cache_len, prog.cache_dtype)
    cache_spec = _cache_spec(config, mesh, b, cache_len)
    cache = dataclasses.replace(cache, k=_constrain(cache.k, mesh, cache_spec),
                                v=_constrain(cache.v, mesh, cache_spec))
    hidden, cache = model.model(ids, mask, positions_from_mask(mask), cache)
    logits = model.logits_from_hidden(hidden[:, -1:])[:, 0]  # left-padded: last slot is real

    if n > 1:  # one prefill per prompt, then n copies of its cache and logits
        rep = functools.partial(jnp.repeat, repeats=n, axis=0, total_repeat_length=rows)
        rep_kv = functools.partial(jnp.repeat, repeats=n, axis=1, total_repeat_length=rows)
        spec = _cache_spec(config, mesh, rows, cache_len)
        cache = KVCache(k=_constrain(rep_kv(cache.k), mesh, spec),
                        v=_constrain(rep_kv(cache.v), mesh, spec),
                        valid=rep(cache.valid), index=cache.index)
        logits, mask = rep(logits), rep(mask)
    logits = _constrain(logits, mesh, batch_spec)

    key, sub = jax.random.split(key)
    first, first_lp = _select_with_logprobs(sub, logits, prog.mode, temperature, top_p)
    real_row = mask[:, -1]  # dummy rows added for bucketing have no real token
    done = _stopped(first, prog.stop_ids) | ~real_row | (limit <= 1)
    tokens = jnp.full((rows, prog.max_new), prog.pad_id, jnp.int32).at[:, 0].set(first)
    logprobs = jnp.zeros((rows, prog.max_new), jnp.float32).at[:, 0].set(first_lp)
    return _DecodeState(cache=cache, tokens=tokens, logprobs=logprobs, last=first,
                        position=mask.sum(-1).astype(jnp.int32), done=done,
                        lengths=real_row.astype(jnp.int32), limit=limit,
                        step=jnp.ones((), jnp.int32), key=key)


def _head_kernel(model: CausalLM) -> jax.Array:
    """The output head as a [hidden, vocab] matrix (a transposed copy when tied to the embedding)."""
    if model.lm_head is None:
        return model.model.embed_tokens.embedding[...].T
    return model.lm_head.kernel[...]


def _decode(graphdef, prog: _Program, state, ds: _DecodeState, temperature, top_p):
    model: CausalLM = nnx.merge(graphdef, state)
    rows = ds.tokens.shape[0]
    ones = jnp.ones((rows, 1), bool)
    head = _head_kernel(model) if prog.head_nn else None

    def cond(s: _DecodeState):
        return (s.step < prog.max_new) & ~jnp.all(s.done)

    def body(s: _DecodeState) -> _DecodeState:
        if head is None:
            logits, cache = model(s.last[:, None], ones, s.position[:, None], s.cache)
            logits = logits[:, 0]
        else:
            hidden, cache = model.model(s.last[:, None], ones, s.position[:, None], s.cache)
            logits = jnp.dot(hidden[:, 0], head.astype(hidden.dtype),
                             preferred_element_type=jnp.float32)
        key, sub = jax.random.split(s.key)
        tok, lp = _select_with_logprobs(sub, logits, prog.mode, temperature, top_p)
        tok = jnp.where(s.done, prog.pad_id, tok)
        lp = jnp.where(s.done, 0.0, lp)
        lengths = s.lengths + (~s.done).astype(jnp.int32)
        return _DecodeState(
            cache=cache,
            tokens=jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.step)),
            logprobs=jax.lax.dynamic_update_slice(s.logprobs, lp[:, None], (0, s.step)),
            last=tok, position=s.position + 1,
            done=s.done | _stopped(tok, prog.stop_ids) | (lengths >= s.limit),
            lengths=lengths, limit=s.limit, step=s.step + 1, key=key)

    # The whole carry is returned so that every donated input buffer (the cache above all) aliases
    # an output: the loop then runs in place on the prefill's cache instead of on a copy.
    return jax.lax.while_loop(cond, body, ds)
