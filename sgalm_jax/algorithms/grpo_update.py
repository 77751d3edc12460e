"""The GRPO policy update, shared by GRPO (a reward function) and GAD (a discriminator's score).

One rollout of a policy role goes through the same four pieces in both algorithms:

1. :func:`sample_rollout`: ``G`` completions of each prompt of a pool, from the current policy;
2. :func:`set_advantages`: the group z-scores of a reward vector (``scale``: group, batch or none)
   written into the rollout, with the reward and length metrics every GRPO run logs;
3. :meth:`PolicyUpdate.rows`: the padded rows of the actual sampled tokens, plus ``log pi_old``
   (when a rollout gets more than one optimizer step) and ``log pi_ref`` (when a ``reference`` role
   exists) from no-grad passes;
4. :meth:`PolicyUpdate.update`: ``num_iterations`` passes of ``num_minibatches`` optimizer steps of
   the clipped surrogate plus ``beta`` KL (:func:`make_grpo_loss`), on the policy role's step
   ``"grpo"``.

Everything here is a function of its arguments and of the rollout index: prompts, sampling keys
and mini-batch orders never depend on wall-clock or on how many times a run was resumed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgalm_jax import sharding as sh
from sgalm_jax.algorithms.grpo_data import PromptPool, Rollout, build_rows
from sgalm_jax.losses.common import (
    masked_mean,
    shift_targets,
    token_logprobs_and_entropy_from_hidden,
)
from sgalm_jax.losses.policy_gradient import group_advantages, grpo_loss
from sgalm_jax.models.config import resolve_dtype
from sgalm_jax.training import model_loss

# TRL's loss types -> (losses.aggregate_token_loss mode, micro-batch weight of the train step).
LOSS_TYPES: dict[str, tuple[str, str | None]] = {
    "dapo": ("token_mean", "num_tokens"),  # token mean over the whole optimizer step
    "bnpo": ("token_mean", None),  # token mean per micro-batch, micro-batches averaged
    "grpo": ("seq_mean_token_mean", None),  # mean over sequences of their token means
    "dr_grpo": ("seq_mean_token_sum_norm", None),  # token sum / (rows * max_new_tokens)
}
OLD_LOGPROBS = ("recompute", "sampler")


@dataclasses.dataclass(frozen=True)
class GRPOOptions:
    """The loss options (the ``grpo`` section, or GAD's generator keys)."""

    temperature: float = 1.0
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    clip_ratio_c: float | None = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    kl_bias_correction: bool = False
    loss_agg: str = "token_mean"
    max_new_tokens: int = 256
    chunk_size: int = 256

    @classmethod
    def from_config(cls, config: Any) -> "GRPOOptions":
        """From ``config.grpo``."""
        g = config.grpo
        return cls.from_section(g, beta=float(g.beta), max_new_tokens=int(g.max_new_tokens))

    @classmethod
    def from_section(cls, s: Any, *, beta: float, max_new_tokens: int) -> "GRPOOptions":
        """From a section holding ``temperature``, ``clip_eps``, ``clip_eps_high``,
        ``clip_ratio_c``, ``kl_estimator``, ``kl_bias_correction``, ``loss_type`` and
        ``logprob_chunk_size`` (the grpo section; GAD's gad section)."""
        return cls(temperature=float(s.temperature), clip_eps=float(s.clip_eps),
                   clip_eps_high=float(s.clip_eps_high) or None,
                   clip_ratio_c=float(s.clip_ratio_c) or None, beta=float(beta),
                   kl_estimator=s.kl_estimator, kl_bias_correction=bool(s.kl_bias_correction),
                   loss_agg=LOSS_TYPES[s.loss_type][0], max_new_tokens=int(max_new_tokens),
                   chunk_size=int(s.logprob_chunk_size))


# ------------------------------------------------------------------------------------ the loss
def _policy_logprobs(model: Any, batch: dict[str, jax.Array], chunk_size: int,
                     temperature: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log-probs, entropies, mask) [B, T] of the completion tokens, aligned with the logits."""
    hidden, _ = model.model(batch["input_ids"], batch["attention_mask"], batch["positions"])
    targets, mask = shift_targets(batch["input_ids"], batch["loss_mask"])
    lp, ent = token_logprobs_and_entropy_from_hidden(
        hidden, model.logits_from_hidden, targets, chunk_size=chunk_size, temperature=temperature)
    return lp, ent, mask


def make_grpo_loss(graphdef: Any, opts: GRPOOptions) -> Callable[..., Any]:
    """``loss_fn(params, batch, rng)``: the clipped surrogate (+ beta KL) on a mini-batch.

    ``batch``: the rows of :func:`~sgalm_jax.algorithms.grpo_data.build_rows` with
    ``advantages`` [B] and, when used, ``old_logprobs`` / ``ref_logprobs`` [B, T] (detached
    inputs, aligned with the logits). Metrics add ``entropy`` and ``num_tokens``.
    """

    def loss_on_model(model, batch, rng):
        del rng  # deterministic (no dropout)
        lp, ent, mask = _policy_logprobs(model, batch, opts.chunk_size, opts.temperature)
        loss, metrics = grpo_loss(
            lp, batch.get("old_logprobs"), batch["advantages"], mask,
            ref_logprobs=batch.get("ref_logprobs"), clip_eps=opts.clip_eps,
            clip_eps_high=opts.clip_eps_high, clip_ratio_c=opts.clip_ratio_c, kl_coef=opts.beta,
            kl_estimator=opts.kl_estimator, loss_agg=opts.loss_agg,
            max_response_len=opts.max_new_tokens, kl_bias_correction=opts.kl_bias_correction)
        metrics = dict(metrics)
        metrics["entropy"] = masked_mean(ent, mask)
        metrics["num_tokens"] = jnp.sum(mask)
        return loss, metrics

    return model_loss(graphdef, loss_on_model)


def to_global(batch: dict[str, np.ndarray], mesh: Any) -> Any:
    """Global arrays from rows every host holds whole (each host gives its contiguous block)."""
    n = jax.process_count()
    if n > 1:
        p = jax.process_index()
        batch = {k: v[p * (len(v) // n):(p + 1) * (len(v) // n)] for k, v in batch.items()}
    return sh.global_batch_from_local(batch, mesh)


class LogprobPass:
    """Per-token log-probs [N, T] (at the sampling temperature, no gradient) of a rollout's rows
    under a params pytree, ``rows_per_call`` rows per forward: the old and reference passes."""

    def __init__(self, graphdef: Any, opts: GRPOOptions, mesh: Any, *, rows_per_call: int,
                 compute_dtype: Any = None):
        self.mesh, self.rows = mesh, int(rows_per_call)
        dtype = resolve_dtype(compute_dtype) if compute_dtype else None

        def fn(params, batch):
            if dtype is not None:  # the train step's numerics with train.compute_dtype
                params = jax.tree.map(
                    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                    params)
            lp, _, mask = _policy_logprobs(nnx.merge(graphdef, params), batch, opts.chunk_size,
                                           opts.temperature)
            return lp * mask

        self._fn = jax.jit(fn)

    def __call__(self, params: Any, rows: dict[str, np.ndarray]) -> np.ndarray:
        keys = ("input_ids", "attention_mask", "positions", "loss_mask")
        out = []
        for start in range(0, len(rows["input_ids"]), self.rows):
            chunk = {k: rows[k][start:start + self.rows] for k in keys}
            # Batch-sharded over every host's devices: gathered so each process gets every row.
            out.append(sh.to_host(self._fn(params, to_global(chunk, self.mesh))))
        return np.concatenate(out)


# ------------------------------------------------------------------------------------ 1. sample
def sample_rollout(sampler: Any, params: Any, pool: PromptPool, prompt_index: np.ndarray, *,
                   group: int, rng: jax.Array, max_new_tokens: int, temperature: float,
                   top_k: int = 0, top_p: float = 1.0, stop_token_ids: Sequence[int] = (),
                   tokenizer: Any = None) -> Rollout:
    """``group`` completions of each pool prompt in ``prompt_index`` (row ``i`` continues prompt
    ``i // group``), with their sampler log-probs; decoded texts when ``tokenizer`` is given."""
    gen = sampler.generate(
        params, [pool.ids[i] for i in prompt_index], max_new_tokens=int(max_new_tokens),
        temperature=float(temperature), top_k=int(top_k) or None,
        top_p=None if top_p >= 1 else float(top_p), num_samples=int(group),
        stop_token_ids=tuple(stop_token_ids), rng=rng)
    comps = [np.asarray(row[:n], np.int32) for row, n in zip(gen.tokens, gen.lengths)]
    rollout = Rollout(prompt_index=np.repeat(prompt_index, group), completion_ids=comps,
                      finished=np.asarray(gen.finished, bool),
                      sampler_logprobs=[row[:n] for row, n in zip(gen.logprobs, gen.lengths)])
    if tokenizer is not None:
        rollout.texts = tokenizer.batch_decode([c.tolist() for c in comps],
                                               skip_special_tokens=True)
    return rollout


# ------------------------------------------------------------------------------------ 2. advantages
def set_advantages(rollout: Rollout, total: np.ndarray, *, group: int, scale: str,
                   eps: float) -> dict[str, float]:
    """Write ``total`` (NaN = not scored) and its group advantages into ``rollout``; returns the
    reward metrics (mean, std, unscored share, share of zero-spread groups)."""
    total = np.asarray(total, np.float64)
    rollout.reward = total
    valid = np.isfinite(total)
    adv = group_advantages(jnp.asarray(np.nan_to_num(total), jnp.float32), group_size=group,
                           scale=scale, eps=float(eps), mask=jnp.asarray(valid, jnp.float32))
    rollout.advantages = np.asarray(jax.device_get(adv), np.float64)
    grouped = np.where(valid, total, np.nan).reshape(-1, group)
    with np.errstate(invalid="ignore"):
        zero_std = np.nanstd(grouped, axis=1) == 0
    return {"reward_mean": float(np.nanmean(total)) if valid.any() else float("nan"),
            "reward_std": float(np.nanstd(total)) if valid.any() else float("nan"),
            "reward_unscored": float(1.0 - valid.mean()),
            "frac_reward_zero_std": float(np.mean(zero_std))}


def length_metrics(rollout: Rollout) -> dict[str, float]:
    """Completion length mean/max (tokens, stop token included) and the truncation rate: the
    reward-hacking signal of learned rewards."""
    lengths = np.asarray([len(c) for c in rollout.completion_ids])
    return {"completion_length_mean": float(lengths.mean()),
            "completion_length_max": float(lengths.max()),
            "truncated": float(1.0 - rollout.finished.mean())}


# ------------------------------------------------------------------------------------ 3-4. update
class PolicyUpdate:
    """Log-prob passes and optimizer steps of one rollout for a policy learner.

    Args:
      roles: the run's :class:`~sgalm_jax.training.Roles` (built); ``policy`` names the learner
        (its train step ``"grpo"`` must exist), and a role named ``reference``, if any, is the KL
        reference (with LoRA a view of the frozen base: its own graph, adapters off).
      graphdef, opts: the policy's graph and loss options (for the no-grad passes).
      rows_per_step: completions per optimizer step (``train.batch_size``).
      minibatches, epochs: optimizer steps per pass over a rollout, and passes.
      old_logprobs: ``recompute`` or ``sampler`` (used only with more than one step per rollout,
        or always with ``sampler``).
      seed: mini-batch orders are functions of ``(seed, rollout, epoch)``.
    """

    def __init__(self, roles: Any, policy: str, graphdef: Any, opts: GRPOOptions, mesh: Any, *,
                 rows_per_step: int, grad_accum_steps: int, minibatches: int, epochs: int,
                 old_logprobs: str, seed: int, pad_id: int, min_bucket: int, max_length: int,
                 mask_truncated: bool, compute_dtype: Any = None):
        self.roles, self.policy, self.mesh = roles, policy, mesh
        self.rows_per_step, self.minibatches, self.epochs = rows_per_step, minibatches, epochs
        self.rows_per_rollout = rows_per_step * minibatches
        self.steps_per_rollout = minibatches * epochs
        self.old_mode = old_logprobs
        self.use_old = self.steps_per_rollout > 1 or old_logprobs == "sampler"
        self.seed = seed
        self.row_args = dict(pad_id=pad_id, min_bucket=min_bucket, max_length=max_length,
                             mask_truncated=mask_truncated)
        # Rows per no-grad forward: one micro-batch, the train step's activation footprint.
        self.logprobs = LogprobPass(graphdef, opts, mesh,
                                    rows_per_call=rows_per_step // grad_accum_steps,
                                    compute_dtype=compute_dtype)
        self.ref_logprobs = self.logprobs
        if "reference" in roles and roles["reference"].graphdef != graphdef:
            self.ref_logprobs = LogprobPass(  # LoRA: the base's own graph (adapters off)
                roles["reference"].graphdef, opts, mesh,
                rows_per_call=rows_per_step // grad_accum_steps, compute_dtype=compute_dtype)

    def rows(self, pool: PromptPool, rollout: Rollout) -> dict[str, np.ndarray]:
        """Rows of the sampled tokens with advantages, old and reference log-probs."""
        rows = build_rows(pool, rollout, **self.row_args)
        sampler_lp = rows.pop("sampler_logprobs")
        if self.use_old:
            rows["old_logprobs"] = (sampler_lp if self.old_mode == "sampler"
                                    else self.logprobs(self.roles[self.policy].params, rows))
        if "reference" in self.roles:
            rows["ref_logprobs"] = self.ref_logprobs(self.roles["reference"].params, rows)
        return rows

    def minibatch_order(self, r: int, epoch: int) -> np.ndarray:
        """Row order of pass ``epoch`` over rollout ``r`` (shuffled when split in several)."""
        if self.minibatches == 1:
            return np.arange(self.rows_per_rollout)
        return np.random.default_rng([self.seed, 31, r, epoch]).permutation(
            self.rows_per_rollout)

    def update(self, r: int, rows: dict[str, np.ndarray]) -> list[dict[str, float]]:
        """Every optimizer step of rollout ``r``; their metrics on the host."""
        policy, b = self.roles[self.policy], self.rows_per_step
        out = []
        for epoch in range(self.epochs):
            order = self.minibatch_order(r, epoch)
            for k in range(self.minibatches):
                idx = order[k * b:(k + 1) * b]
                batch = to_global({key: v[idx] for key, v in rows.items()}, self.mesh)
                out.append({n: float(v) for n, v in
                            sh.to_host(policy.step("grpo", batch)).items()})
        return out


def mean_metrics(steps: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over a rollout's optimizer steps (the last learning rate)."""
    keys = steps[0].keys()
    out = {k: float(np.mean([s[k] for s in steps])) for k in keys if k != "num_tokens"}
    out["learning_rate"] = steps[-1].get("learning_rate", float("nan"))
    return out


__all__ = ["GRPOOptions", "LOSS_TYPES", "LogprobPass", "OLD_LOGPROBS", "PolicyUpdate",
           "length_metrics", "make_grpo_loss", "mean_metrics", "sample_rollout",
           "set_advantages", "to_global"]
