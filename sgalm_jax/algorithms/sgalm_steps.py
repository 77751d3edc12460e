"""SGALM's model functions: the discriminator's and the generator's losses on one model
(:mod:`sgalm_jax.losses.sgalm` on its logits), and the discriminator's no-grad scorer."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgalm_jax import sharding as sh
from sgalm_jax.algorithms.sgalm_data import pad_rows
from sgalm_jax.losses.common import sequence_logprobs_from_hidden, shift_targets
from sgalm_jax.losses.sgalm import discriminator_loss, discriminator_score_logits, generator_loss
from sgalm_jax.training.tokenizer import LabelTokenIds


# ------------------------------------------------------------------------------------ losses
def discriminator_logits(model: Any, batch: dict[str, jax.Array], labels: LabelTokenIds,
                         prefix: str = "") -> jax.Array:
    """``z = z_Real - z_Fake`` [B] of the discriminator prompts in ``batch`` (right-padded rows;
    ``last`` = the answer position). Only the answer position goes through the LM head."""
    hidden, _ = model.model(batch[prefix + "input_ids"], batch[prefix + "attention_mask"],
                            batch[prefix + "positions"])
    idx = batch[prefix + "last"].astype(jnp.int32)[:, None, None]
    h = jnp.take_along_axis(hidden, idx, axis=1)  # [B, 1, H]
    logits = model.logits_from_hidden(h)[:, 0]  # [B, V] float32
    return discriminator_score_logits(logits, labels.real_id, labels.fake_id)


def make_d_loss(graphdef: Any, labels: LabelTokenIds) -> Callable[..., Any]:
    """``loss_fn(params, batch, rng)``: the discriminator's BCE on real (``is_real`` = 1) and
    generated rows of one batch."""

    def loss_fn(params, batch, rng):
        del rng
        z = discriminator_logits(nnx.merge(graphdef, params), batch, labels)
        valid = batch["row_mask"]
        return discriminator_loss(z, z, real_mask=batch["is_real"] * valid,
                                  fake_mask=(1.0 - batch["is_real"]) * valid)

    return loss_fn


@dataclasses.dataclass(frozen=True)
class GeneratorOptions:
    """The generator objective's options (``sgalm`` section)."""

    reward: str = "log_d"
    form: str = "score_function"
    advantage: str = "standardize"
    tau: float = 1.0
    length_normalize: bool = False
    anchor_weight: float = 0.0
    weight: float = 1.0
    chunk_size: int = 256
    reward_source: str = "shared"  # shared (current params), separate (a D model), snapshot

    @classmethod
    def from_config(cls, config: Any) -> "GeneratorOptions":
        s = config.sgalm
        if s.variant == "g_only" or s.reward_params == "snapshot":
            source = "snapshot"
        else:
            source = "separate" if s.variant == "two_models" else "shared"
        return cls(reward=s.reward, form=s.generator_loss, advantage=s.advantage, tau=s.tau,
                   length_normalize=s.length_normalize, anchor_weight=float(s.anchor_weight),
                   weight=float(s.g_loss_weight), chunk_size=int(s.logprob_chunk_size),
                   reward_source=source)


def _sequence_logprobs(model, ids, attn, pos, loss_mask, chunk_size):
    hidden, _ = model.model(ids, attn, pos)
    targets, mask = shift_targets(ids, loss_mask)
    return sequence_logprobs_from_hidden(hidden, model.logits_from_hidden, targets, mask,
                                         chunk_size=chunk_size)


def make_g_loss(graphdef: Any, labels: LabelTokenIds, opts: GeneratorOptions
                ) -> Callable[..., Any]:
    """``loss_fn(params, batch, rng[, d_params])``: the generator's objective on generated rows.

    The log-prob of each sample under its generator prompt carries the gradient; the reward
    ``log D(s)`` does not (see the comments below).
    """

    def loss_fn(params, batch, rng, *extra):
        del rng
        model = nnx.merge(graphdef, params)
        lp = _sequence_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                batch["positions"], batch["loss_mask"], opts.chunk_size)
        gen_lp = lp.sequence_mean if opts.length_normalize else lp.sequence_sum
        if opts.reward_source == "snapshot":
            z = batch["z_snapshot"]  # computed once per iteration by the frozen snapshot
        else:
            d_params = params if opts.reward_source == "shared" else extra[0]
            # Detached: the reward is a constant weight on the generator's likelihood. With
            # shared weights a gradient through D's logits would only train the classifier to
            # call fakes real (and sabotage D); it must not reach the params from this loss.
            d_model = nnx.merge(graphdef, jax.lax.stop_gradient(d_params))
            z = discriminator_logits(d_model, batch, labels, prefix="d_")
        anchor = {}
        if opts.anchor_weight > 0:
            alp = _sequence_logprobs(model, batch["a_input_ids"], batch["a_attention_mask"],
                                     batch["a_positions"], batch["a_loss_mask"], opts.chunk_size)
            anchor = dict(anchor_logprobs=alp.sequence_mean if opts.length_normalize
                          else alp.sequence_sum, anchor_mask=batch["a_row_mask"],
                          anchor_weight=opts.anchor_weight)
        loss, metrics = generator_loss(gen_lp, z, batch["row_mask"], reward=opts.reward,
                                       form=opts.form, advantage=opts.advantage, tau=opts.tau,
                                       **anchor)
        return opts.weight * loss, metrics

    return loss_fn


# ------------------------------------------------------------------------------------ scoring
class DScorer:
    """Discriminator logits of many prompts under a params pytree (no gradient), batched."""

    def __init__(self, graphdef: Any, labels: LabelTokenIds, mesh: Any, *, batch_size: int,
                 bucket: int, pad_id: int):
        dp = sh.data_parallel_size(mesh)
        self.batch_size = -(-int(batch_size) // dp) * dp
        self.bucket, self.pad_id, self.mesh = int(bucket), int(pad_id), mesh

        def z_fn(params, batch):
            return discriminator_logits(nnx.merge(graphdef, params), batch, labels)

        self._fn = sh.jit_on_mesh(z_fn, mesh)

    def __call__(self, params: Any, rows: list[list[int]]) -> np.ndarray:
        out = np.zeros(len(rows), np.float32)
        order = np.argsort([len(r) for r in rows], kind="stable")  # similar lengths together
        for start in range(0, len(rows), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = pad_rows([rows[i] for i in idx], bucket=self.bucket, pad_id=self.pad_id,
                             num_rows=self.batch_size)
            z = self._fn(params, to_global(batch, self.mesh))
            out[idx] = sh.to_host(z)[:len(idx)]  # every host's rows
        return out


def balanced_accuracy(z_real: np.ndarray, z_fake: np.ndarray) -> float:
    """Mean of D's accuracy on real (z > 0) and on generated (z < 0) samples: 0.5 for a D that
    calls everything one class, whatever the class sizes."""
    parts = [float(np.mean(np.asarray(z_real) > 0))] if len(z_real) else []
    parts += [float(np.mean(np.asarray(z_fake) < 0))] if len(z_fake) else []
    return float(np.mean(parts)) if parts else float("nan")


def to_global(batch: dict[str, np.ndarray], mesh: Any) -> Any:
    """Global arrays from a batch every host built whole: each host contributes its own
    contiguous block of rows (``global_batch_from_local``'s contract)."""
    n = jax.process_count()
    if n > 1:
        p = jax.process_index()
        batch = {k: v[p * (len(v) // n):(p + 1) * (len(v) // n)] for k, v in batch.items()}
    return sh.global_batch_from_local(batch, mesh)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))
