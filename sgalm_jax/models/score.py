"""A sequence scorer: the decoder body plus a bias-free ``Linear(hidden, 1)`` read at the last valid token.

This is GAD's discriminator (and a reward model in general): HF's ``*ForSequenceClassification``
with ``num_labels=1``. It shares :class:`~sgalm_jax.models.transformer.DecoderModel` with
:class:`~sgalm_jax.models.transformer.CausalLM`; the only new parameter is ``score.kernel``
[hidden, 1] (HF's ``score.weight`` [1, hidden], transposed).

**Which token is scored.** The score of a row is the head applied to the final hidden state at the
row's last valid token: the last position whose ``attention_mask`` entry is non-zero. That works
for left and right padding alike. With packed rows (``attention_mask`` holding segment ids 1, 2, ...,
see :class:`~sgalm_jax.models.transformer.CausalLM`), pass ``num_segments`` to get one score per
segment, each read at that segment's last token. transformers instead pools at the last token that
is not ``pad_token_id``; the two agree whenever the pad id never ends a real sequence (keep the pad
id distinct from the end-of-turn id, as Qwen2.5 and Llama 3 do).

A row (or segment) with no valid token scores exactly 0, so dummy rows that pad a batch to a bucket
never produce NaNs in a loss. The head runs in float32 whatever the compute dtype.

Pure-function form for jitted train steps::

    graphdef, params = nnx.split(scorer)
    score_fn = make_score_fn(graphdef)
    scores = score_fn(params, input_ids, attention_mask)   # float32 [B]
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sgalm_jax.models.config import ModelConfig
from sgalm_jax.models.transformer import CausalLM, DecoderModel, Linear

# transformers' default ``initializer_range`` for Qwen2/Qwen3/Llama/Mistral (normal(0, 0.02)).
DEFAULT_HEAD_STD = 0.02


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index [B] of each row's last valid token (mask != 0); -1 for a row with none."""
    t = attention_mask.shape[-1]
    pos = jnp.arange(t, dtype=jnp.int32)
    return jnp.max(jnp.where(attention_mask != 0, pos, -1), axis=-1)


def segment_last_index(segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """Index [B, num_segments] of the last token of segments 1..num_segments; -1 where absent."""
    t = segment_ids.shape[-1]
    pos = jnp.arange(t, dtype=jnp.int32)
    ids = jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)
    hit = segment_ids[:, None, :] == ids[None, :, None]  # [B, S, T]
    return jnp.max(jnp.where(hit, pos, -1), axis=-1)


def init_head_kernel(config: ModelConfig, seed: int, std: float = DEFAULT_HEAD_STD) -> jax.Array:
    """A fresh score kernel [hidden, 1]: normal(0, ``std``) from ``jax.random.key(seed)``, as
    transformers initialises ``score.weight`` (normal(0, initializer_range)); in ``param_dtype``."""
    w = jax.random.normal(jax.random.key(seed), (config.hidden_size, 1), jnp.float32) * std
    return w.astype(config.param_dtype)


class ScoreModel(nnx.Module):
    """Decoder body (HF's ``model``) + ``score`` head, as HF's ``*ForSequenceClassification``
    with ``num_labels=1`` (no bias)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = DecoderModel(config, rngs)
        # The output dim (size 1) has no logical axis name: it is always replicated.
        self.score = Linear(config.hidden_size, 1, axes=("embed", None), use_bias=False,
                            config=config, rngs=rngs)

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      positions: jax.Array | None = None) -> jax.Array:
        """Final hidden states [B, T, hidden] of the body (no head)."""
        hidden, _ = self.model(input_ids, attention_mask, positions)
        return hidden

    def scores_at(self, hidden: jax.Array, index: jax.Array) -> jax.Array:
        """float32 scores at token ``index`` ([B] or [B, S]) of ``hidden`` [B, T, D]; 0 where the
        index is -1 (no valid token)."""
        squeeze = index.ndim == 1
        idx = index[:, None] if squeeze else index
        picked = jnp.take_along_axis(hidden, jnp.maximum(idx, 0)[:, :, None], axis=1)  # [B, S, D]
        kernel = self.score.kernel[...].astype(jnp.float32)
        out = jnp.einsum("bsd,dk->bsk", picked.astype(jnp.float32), kernel)[..., 0]
        out = jnp.where(idx >= 0, out, 0.0)
        return out[:, 0] if squeeze else out

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, *, num_segments: int | None = None
                 ) -> jax.Array:
        """Scores: float32 [B], or [B, num_segments] for packed rows.

        ``attention_mask`` [B, T]: 1 = real token, 0 = padding (left or right); for packed rows,
        segment ids 1, 2, ... with ``positions`` restarting at 0 per segment.
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        hidden = self.hidden_states(input_ids, attention_mask, positions)
        if num_segments is None:
            index = last_token_index(attention_mask)
        else:
            index = segment_last_index(attention_mask.astype(jnp.int32), num_segments)
        return self.scores_at(hidden, index)


def make_score_fn(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
    """``score_fn(params, input_ids, attention_mask, positions=None) -> float32 [B]``: the pure
    function of a :class:`ScoreModel`'s params that jitted train steps differentiate."""

    def score_fn(params: Any, input_ids: jax.Array, attention_mask: jax.Array,
                 positions: jax.Array | None = None) -> jax.Array:
        return nnx.merge(graphdef, params)(input_ids, attention_mask, positions)

    return score_fn


def score_model_from_causal_lm(lm: CausalLM, *, seed: int = 0,
                               head_std: float = DEFAULT_HEAD_STD) -> ScoreModel:
    """A :class:`ScoreModel` whose body is a *copy* of ``lm``'s body and whose head is fresh.

    The copy keeps each param's sharding and never aliases ``lm``'s buffers, so a train step that
    donates the scorer's state cannot invalidate the language model's params (GAD's discriminator
    and student start from the same checkpoint and then diverge). The LM head is dropped.
    """
    config = lm.config
    abstract = nnx.eval_shape(lambda: ScoreModel(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    body = nnx.state(lm.model)
    copied = jax.tree.map(lambda x: jnp.array(x, copy=True), body)
    kernel = init_head_kernel(config, seed, head_std)
    sharding = getattr(lm.model.embed_tokens.embedding[...], "sharding", None)
    if sharding is not None and hasattr(sharding, "mesh"):
        from sgalm_jax.sharding import state_shardings

        head_state = nnx.state(nnx.eval_shape(lambda: ScoreModel(config, rngs=nnx.Rngs(0))).score)
        target = state_shardings(head_state, sharding.mesh)["kernel"].get_value()
        kernel = jax.device_put(kernel, target)
    state["model"] = copied
    state["score"]["kernel"] = state["score"]["kernel"].replace(kernel)
    return nnx.merge(graphdef, state)
