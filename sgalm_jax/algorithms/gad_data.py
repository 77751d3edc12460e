"""GAD's batches and discriminator passes: the rows the discriminator reads, the teacher rows of the
warmup's SFT step, the group Bradley-Terry loss and the no-grad scoring pass.

The discriminator's batch of a step is ``[P, 1 + G, T]``: for each of the P prompts, prompt +
teacher response first, then prompt + each of the G student responses, every response
end-normalised by the :class:`~sgalm_jax.data.distill_tokens.DistillEncoder` (so that an identical
text is an identical row, whoever wrote it). Micro-batches split the leading (prompt) axis, so a
group never straddles two of them and its teacher is scored once, in the same forward as its
students.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgalm_jax import sharding as sh
from sgalm_jax.algorithms.distill_data import DistillPool, pad_rows
from sgalm_jax.algorithms.grpo_data import Rollout
from sgalm_jax.algorithms.grpo_update import to_global
from sgalm_jax.data.distill_tokens import DistillEncoder
from sgalm_jax.losses.preference import bradley_terry_loss
from sgalm_jax.models.config import resolve_dtype
from sgalm_jax.training import model_loss


def discriminator_rows(pool: DistillPool, encoder: DistillEncoder, rollout: Rollout, *,
                       group: int, pad_id: int, min_bucket: int,
                       max_length: int) -> dict[str, np.ndarray]:
    """The discriminator's ``[P, 1 + G, T]`` rows of ``rollout`` (its rows of one prompt are
    consecutive): prompt + teacher response, then prompt + each student response as the encoder
    ends it (the GRPO update uses the tokens actually sampled)."""
    seqs = []
    for j in range(len(rollout) // group):
        p = int(rollout.prompt_index[j * group])
        prompt = pool.ids[p].tolist()
        seqs.append(prompt + pool.teacher_ids[p].tolist())
        for i in range(j * group, (j + 1) * group):
            seqs.append(encoder.encode_student(prompt, rollout.completion_ids[i]).input_ids)
    rows = pad_rows([np.asarray(s, np.int32) for s in seqs], None, pad_id=pad_id,
                    min_bucket=min_bucket, max_length=max_length)
    return {k: v.reshape(-1, 1 + group, v.shape[-1]) for k, v in rows.items()}


def teacher_sft_rows(pool: DistillPool, prompt_index: Sequence[int], *, pad_id: int,
                     min_bucket: int, max_length: int) -> dict[str, np.ndarray]:
    """Prompt + teacher response of each pool prompt in ``prompt_index``, the loss on the response
    and its end token (the warmup's SFT step; SeqKD's examples are the same pairs)."""
    idx = [int(p) for p in prompt_index]
    return pad_rows([np.concatenate([pool.ids[p], pool.teacher_ids[p]]) for p in idx],
                    [len(pool.ids[p]) for p in idx], pad_id=pad_id, min_bucket=min_bucket,
                    max_length=max_length)


def make_bt_loss(graphdef: Any):
    """``loss_fn(params, batch, rng)``: group Bradley-Terry on ``[P, 1 + G, T]`` rows (row 0 of
    each group is prompt + teacher response, scored once and shared by the G students)."""

    def loss_on_model(model, batch, rng):
        del rng
        p, g1, t = batch["input_ids"].shape
        flat = {k: batch[k].reshape(p * g1, t) for k in ("input_ids", "attention_mask",
                                                         "positions")}
        scores = model(flat["input_ids"], flat["attention_mask"],
                       flat["positions"]).reshape(p, g1)
        loss, m = bradley_terry_loss(scores[:, 0], scores[:, 1:])
        return loss, {"d_loss": m["d_loss"], "d_acc": m["d_acc"],
                      "teacher_score": m["chosen_score"], "student_score": m["rejected_score"],
                      "margin": m["margin"]}

    return model_loss(graphdef, loss_on_model)


class ScorePass:
    """Discriminator scores (no gradient) of ``[N, T]`` rows, ``rows_per_call`` per forward (the
    last call padded with empty rows, which score 0)."""

    def __init__(self, graphdef: Any, mesh: Any, *, rows_per_call: int, compute_dtype: Any = None):
        self.mesh, self.rows = mesh, int(rows_per_call)
        dtype = resolve_dtype(compute_dtype) if compute_dtype else None

        def fn(params, batch):
            if dtype is not None:  # the train step's numerics with train.compute_dtype
                params = jax.tree.map(
                    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                    params)
            return nnx.merge(graphdef, params)(batch["input_ids"], batch["attention_mask"],
                                               batch["positions"])

        self._fn = jax.jit(fn)

    def __call__(self, params: Any, rows: dict[str, np.ndarray]) -> np.ndarray:
        keys = ("input_ids", "attention_mask", "positions")
        n = len(rows["input_ids"])
        out = []
        for start in range(0, n, self.rows):
            chunk = {k: rows[k][start:start + self.rows] for k in keys}
            short = self.rows - len(chunk["input_ids"])
            if short:
                chunk = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)])
                         for k, v in chunk.items()}
            # Batch-sharded over every host's devices: gathered so each process gets every row.
            out.append(sh.to_host(self._fn(params, to_global(chunk, self.mesh))))
        return np.concatenate(out)[:n]


__all__ = ["ScorePass", "discriminator_rows", "make_bt_loss", "teacher_sft_rows"]
