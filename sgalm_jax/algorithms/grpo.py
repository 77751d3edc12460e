"""GRPO: on-policy RL with a reward function, on the roles layer.

    python -m sgalm_jax.main --config configs/grpo_qwen3b_gsm8k.py \
        --config.model.path=/models/Qwen2.5-3B-Instruct --config.workdir=runs/grpo_gsm8k

Roles: ``policy`` (the learner) and, when ``grpo.beta > 0``, ``reference``: a frozen snapshot of
the start model for the KL term (rebuilt from ``model.path`` on resume rather than stored in every
checkpoint). Each rollout ``r``:

1. **Sample**: ``P = train.batch_size * grpo.num_minibatches / grpo.num_generations`` prompts
   (consecutive slices of a seeded permutation per epoch), ``G = grpo.num_generations``
   completions each from the current policy (``grpo.temperature`` / ``top_p`` / ``top_k``, up to
   ``grpo.max_new_tokens``, stopping at EOS). Row ``i`` belongs to prompt ``i // G``.
2. **Score**: every ``grpo.reward`` function (the task's checker, or any registered or importable
   function, :mod:`sgalm_jax.evaluation.rewards`), weighted and summed; advantages are the group
   z-scores (``grpo.scale_rewards``: group, batch or none), constant over a completion's tokens.
3. **Log-probs**: with more than one update per rollout, ``log pi_old`` from one no-grad pass
   (``grpo.old_logprobs = recompute``) or the sampler's own (``sampler``); with ``beta > 0`` the
   reference's ``log pi_ref`` from one no-grad pass. One update per rollout needs neither old
   pass: pi_old = stop_gradient(pi), the ratio is 1 and the gradient is the policy gradient.
4. **Update**: ``grpo.num_iterations`` passes over the rollout, each in ``grpo.num_minibatches``
   shuffled mini-batches of ``train.batch_size`` completions: one optimizer step each with the
   clipped surrogate plus ``beta * KL`` (:func:`sgalm_jax.losses.grpo_loss`), aggregated as
   ``grpo.loss_type``. Log-probs use ``logits / temperature``, as TRL and verl do.
5. **Log** reward mean/std, completion length mean/max and truncation rate, KL, entropy, clip
   fraction, and the time split rollout / reward / log-probs / update; **checkpoint** (every role,
   one Orbax checkpoint) at rollout boundaries.

``train.num_steps`` counts optimizer steps (``num_minibatches * num_iterations`` per rollout).
Resume: the checkpoint says how many rollouts are done; prompts and sampling keys are functions
of the rollout index, so a killed run rerun with the same command ends bit-identical.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from sgalm_jax.algorithms.grpo_data import (
    PromptPool,
    Rollout,
    load_prompt_pool,
    rollout_prompts,
    save_rollout,
)
from sgalm_jax.algorithms.grpo_update import (  # noqa: F401 - re-exported (grpo.GRPOOptions, ...)
    LOSS_TYPES,
    OLD_LOGPROBS,
    GRPOOptions,
    LogprobPass,
    PolicyUpdate,
    length_metrics,
    make_grpo_loss,
    mean_metrics,
    sample_rollout,
    set_advantages,
    to_global,
)
from sgalm_jax.config import register_section
from sgalm_jax.errors import ConfigError
from sgalm_jax.evaluation.rewards import call_reward, get_reward
from sgalm_jax.losses.policy_gradient import ADV_SCALES, KL_ESTIMATORS
from sgalm_jax.models.lora import split_adapters
from sgalm_jax.training import (
    Checkpointer,
    MetricsWriter,
    PreemptionGuard,
    Roles,
    inject_fault,
    make_optimizer,
    split_model,
    trainable_mask,
)
from sgalm_jax.training.finite import FiniteGuard
from sgalm_jax.training.run_setup import setup_run

log = logging.getLogger(__name__)

register_section("grpo", {
    "reward": ("correct", "reward function(s), comma-separated: built-in (correct: the task's "
                          "checker, e.g. GSM8K exact match or MBPP tests in the sandbox; valid: "
                          "every step of a GSM8K-format answer checks), registered with "
                          "sgalm_jax.evaluation.rewards.register_reward, or 'module:function'"),
    "reward_weights": ("", "comma-separated weights of the reward functions (summed); '' = 1 "
                           "each"),
    "reward_module": ("", "Python module imported first, so that its register_reward calls run "
                          "(e.g. my_project.rewards)"),
    "num_generations": (8, "completions sampled per prompt (G, the group of the advantage)"),
    "num_minibatches": (1, "optimizer steps per pass over a rollout; a rollout is "
                           "train.batch_size x num_minibatches completions"),
    "num_iterations": (1, "passes over each rollout (PPO epochs; TRL's num_iterations, mu)"),
    "old_logprobs": ("recompute", "log pi_old when a rollout gets more than one update: recompute "
                                  "(a no-grad pass before the updates) or sampler (the sampler's "
                                  "log-probs; needs temperature 1)"),
    "loss_type": ("dapo", "aggregation of the per-token loss: dapo (token mean over the step), "
                          "bnpo (token mean per micro-batch), grpo (mean of per-sequence token "
                          "means), dr_grpo (token sum / (rows x max_new_tokens))"),
    "clip_eps": (0.2, "the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high]"),
    "clip_eps_high": (0.0, "upper clip (DAPO's clip-higher uses 0.28); 0 = clip_eps"),
    "clip_ratio_c": (0.0, "dual-clip bound of the loss for negative advantages (verl: 3.0); "
                          "0 = off"),
    "beta": (0.0, "coefficient of the KL to the start model (a frozen reference role); 0 = no "
                  "KL and no reference"),
    "kl_estimator": ("k3", "per-token KL estimator: k1, k2 or k3 (low variance, verl's "
                           "low_var_kl)"),
    "kl_bias_correction": (False, "multiply the per-token KL by the ratio pi / pi_old (TRL's "
                                  "use_bias_correction_kl)"),
    "scale_rewards": ("group", "advantage scale: group (the group's std), batch (the rollout's "
                               "std) or none (Dr.GRPO: reward minus group mean)"),
    "adv_eps": (1e-6, "added to the std of the advantage (verl 1e-6, TRL 1e-4)"),
    "mask_truncated": (False, "completions cut at max_new_tokens get no loss (TRL's "
                              "mask_truncated_completions)"),
    "temperature": (1.0, "sampling temperature; the log-probs of the loss use logits / "
                         "temperature"),
    "top_p": (1.0, "nucleus sampling (1 = off)"),
    "top_k": (0, "top-k sampling (0 = off)"),
    "max_new_tokens": (256, "longest completion in tokens"),
    "max_prompt_length": (256, "prompts are cut from the left to this many tokens"),
    "logprob_chunk_size": (256, "log-probs from hidden states in chunks of this many positions "
                                "(no [B, T, vocab] logits)"),
    "save_rollouts": (True, "write each rollout (prompts, completions, rewards, advantages) to "
                            "workdir/rollouts/rollout_NNNNNN.jsonl"),
    "log_samples": (2, "completions per rollout also written as TensorBoard text"),
}, owner=__name__)


def resolve_rewards(config: Any) -> list[tuple[str, Callable[..., Any], float]]:
    """``[(name, function, weight)]`` of ``grpo.reward``; ConfigError naming the key."""
    g = config.grpo
    if g.reward_module:
        try:
            importlib.import_module(g.reward_module)
        except ImportError as e:
            raise ConfigError(f"grpo.reward_module: cannot import {g.reward_module!r} ({e})") from None
    names = [n.strip() for n in g.reward.split(",") if n.strip()]
    if not names:
        raise ConfigError("grpo.reward: no reward function given")
    fns = []
    for name in names:
        try:
            fns.append(get_reward(name))
        except ConfigError as e:
            raise ConfigError(f"grpo.reward: {e}") from None
    weights = [1.0] * len(names)
    if g.reward_weights.strip():
        try:
            weights = [float(w) for w in g.reward_weights.split(",")]
        except ValueError:
            raise ConfigError(f"grpo.reward_weights: {g.reward_weights!r} is not a "
                              "comma-separated list of numbers") from None
        if len(weights) != len(names):
            raise ConfigError(f"grpo.reward_weights: {len(weights)} weights for {len(names)} "
                              f"reward functions ({names})")
    return list(zip(names, fns, weights))


# ------------------------------------------------------------------------------------ validation
def validate(config: Any) -> None:
    """GRPO checks (model, tokenizer, data and devices as SFT; the grpo section)."""
    from sgalm_jax.algorithms import sft

    sft.validate(config)
    if config.lora.enabled:
        from sgalm_jax.training.lora_setup import validate as validate_lora
        from sgalm_jax.training.model_setup import model_config

        validate_lora(config, model_config(config.model))
    g = config.grpo
    if config.data.packing:
        raise ConfigError("data.packing: not supported by grpo (rows are prompt + completion)")
    for key in ("num_generations", "num_minibatches", "num_iterations", "max_new_tokens",
                "max_prompt_length", "logprob_chunk_size"):
        if g[key] < 1:
            raise ConfigError(f"grpo.{key}: must be >= 1, got {g[key]}")
    for key in ("clip_eps_high", "beta", "top_k", "log_samples", "adv_eps"):
        if g[key] < 0:
            raise ConfigError(f"grpo.{key}: must be >= 0, got {g[key]}")
    choices = (("loss_type", tuple(LOSS_TYPES)), ("old_logprobs", OLD_LOGPROBS),
               ("kl_estimator", KL_ESTIMATORS), ("scale_rewards", ADV_SCALES))
    for key, allowed in choices:
        if g[key] not in allowed:
            raise ConfigError(f"grpo.{key}: {g[key]!r} is not one of {list(allowed)}")
    if not 0 < g.clip_eps < 1:
        raise ConfigError(f"grpo.clip_eps: must be in (0, 1), got {g.clip_eps}")
    if g.clip_ratio_c and g.clip_ratio_c <= 1:
        raise ConfigError(f"grpo.clip_ratio_c: must be > 1 (or 0 = off), got {g.clip_ratio_c}")
    if not g.temperature > 0:
        raise ConfigError(f"grpo.temperature: must be > 0 (a group of greedy completions has no "
                          f"spread), got {g.temperature}")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"grpo.top_p: must be in (0, 1], got {g.top_p}")
    if g.old_logprobs == "sampler" and g.temperature != 1:
        raise ConfigError("grpo.old_logprobs: 'sampler' log-probs are the raw model's "
                          "(temperature 1); with grpo.temperature != 1 use 'recompute'")
    if g.max_prompt_length + g.max_new_tokens > config.data.max_length:
        raise ConfigError(f"grpo.max_new_tokens: max_prompt_length ({g.max_prompt_length}) + "
                          f"max_new_tokens ({g.max_new_tokens}) exceeds data.max_length "
                          f"({config.data.max_length})")
    rollout = config.train.batch_size * g.num_minibatches
    if rollout % g.num_generations:
        raise ConfigError(f"train.batch_size: a rollout of train.batch_size x num_minibatches = "
                          f"{rollout} completions is not a whole number of groups of "
                          f"grpo.num_generations={g.num_generations}")
    per_rollout = g.num_minibatches * g.num_iterations
    if config.train.num_steps % per_rollout:
        raise ConfigError(f"train.num_steps: {config.train.num_steps} optimizer steps is not a "
                          f"whole number of rollouts of num_minibatches x num_iterations = "
                          f"{per_rollout} steps")
    rewards = resolve_rewards(config)
    if not config.data.task and any(n in ("correct", "valid") for n, _, _ in rewards):
        raise ConfigError("grpo.reward: 'correct' and 'valid' check answers with a task's "
                          "checker; set data.task (or name your own reward function)")


# ------------------------------------------------------------------------------------ the run
class GRPO:
    """One GRPO run's pieces: data, rewards, roles, sampler and steps; :func:`run` drives it."""

    def __init__(self, config: Any, workdir: str):
        self.config, self.workdir = config, workdir
        g = config.grpo
        setup = setup_run(config, workdir)
        self.mesh, self.is_main, self.tokenizer = setup.mesh, setup.is_main, setup.tokenizer
        self.mcfg, self.eos, self.pad = setup.model_config, setup.eos_id, setup.pad_id
        self.pool: PromptPool = load_prompt_pool(config, self.tokenizer,
                                                 vocab_size=self.mcfg.vocab_size)
        self.rewards = resolve_rewards(config)
        self.opts = GRPOOptions.from_config(config)
        self.group = int(g.num_generations)
        self.minibatches, self.epochs = int(g.num_minibatches), int(g.num_iterations)
        self.rows_per_step = int(config.train.batch_size)
        self.rows_per_rollout = self.rows_per_step * self.minibatches
        self.prompts_per_rollout = self.rows_per_rollout // self.group
        self.updates_per_rollout = self.minibatches * self.epochs
        self.num_rollouts = int(config.train.num_steps) // self.updates_per_rollout
        log.info("GRPO: %d rollouts of %d prompts x %d completions, %d optimizer steps each; "
                 "%d prompts; rewards %s", self.num_rollouts, self.prompts_per_rollout,
                 self.group, self.updates_per_rollout, len(self.pool),
                 [(n, w) for n, _, w in self.rewards])

    # ---------------------------------------------------------------- roles and steps
    def build_roles(self, ckpt: Checkpointer, resume_step: int | None) -> dict[str, Any]:
        """``policy`` (learner) and, with beta > 0, ``reference`` (the start model, frozen).

        With ``lora.enabled``: a frozen ``base``, the policy as adapters on it, and the reference
        a view of the base (the adapters switched off: the start model, no weights of its own).
        """
        from sgalm_jax.models import CausalLM
        from sgalm_jax.training.model_setup import build_model

        cfg = self.config
        self.roles = Roles(self.mesh)
        self.lora = None
        if cfg.lora.enabled:
            from sgalm_jax.training.lora_setup import LoraSetup

            self.lora = LoraSetup(cfg, self.mesh, self.mcfg)
            self.graphdef = self.lora.graphdef
            own, _ = split_adapters(self.lora.abstract)
            tx, self.schedule = make_optimizer(cfg.optimizer, num_steps=cfg.train.num_steps,
                                               params=own)
            self.lora.declare_base(self.roles)
            self.lora.learner(self.roles, "policy", tx, schedule=self.schedule, seed=cfg.seed)
            if self.opts.beta > 0:
                self.roles.view("reference", of="base")
            return self._finish_roles(ckpt, resume_step)

        def start_model() -> Any:
            return split_model(build_model(cfg.model, mesh=self.mesh, seed=cfg.seed))

        if resume_step is None:
            self.graphdef, params = start_model()
        else:
            self.graphdef, params = split_model(
                nnx.eval_shape(lambda: CausalLM(self.mcfg, rngs=nnx.Rngs(0))))
        tx, self.schedule = make_optimizer(cfg.optimizer, num_steps=cfg.train.num_steps,
                                           params=params)
        self.roles.learner("policy", self.graphdef, params, tx, schedule=self.schedule,
                           seed=cfg.seed)
        if self.opts.beta > 0:
            # Not stored in checkpoints: on resume it is the start model again, read from
            # model.path (or re-initialised from the seed), bit-identical to the first time.
            self.roles.snapshot("reference", of="policy", saved=False,
                                rebuild=lambda: start_model()[1])
        return self._finish_roles(ckpt, resume_step)

    def _finish_roles(self, ckpt: Checkpointer, resume_step: int | None) -> dict[str, Any]:
        """Build (or restore) the roles; the policy's train step, the sampler, the log-prob
        passes."""
        cfg = self.config
        meta = self.roles.build(ckpt, resume_step)
        policy = self.roles["policy"]
        trainable = (trainable_mask(policy.own_params, cfg.optimizer.freeze)
                     if cfg.optimizer.freeze else None)
        policy.add_step("grpo", make_grpo_loss(self.graphdef, self.opts),
                        grad_accum_steps=cfg.train.grad_accum_steps,
                        accum_weight=LOSS_TYPES[cfg.grpo.loss_type][1],
                        compute_dtype=cfg.train.compute_dtype or None, trainable=trainable,
                        skip_nonfinite=cfg.train.nonfinite == "skip")
        from sgalm_jax.sampling import Sampler

        self.sampler = Sampler(self.graphdef, self.mcfg, pad_token_id=self.pad, mesh=self.mesh,
                               min_batch_bucket=self.prompts_per_rollout,
                               min_prompt_bucket=min(cfg.data.min_bucket, cfg.grpo.max_prompt_length))
        g = cfg.grpo
        self.updater = PolicyUpdate(
            self.roles, "policy", self.graphdef, self.opts, self.mesh,
            rows_per_step=self.rows_per_step, grad_accum_steps=cfg.train.grad_accum_steps,
            minibatches=self.minibatches, epochs=self.epochs, old_logprobs=g.old_logprobs,
            seed=cfg.seed, pad_id=self.pad, min_bucket=cfg.data.min_bucket,
            max_length=cfg.data.max_length, mask_truncated=bool(g.mask_truncated),
            compute_dtype=cfg.train.compute_dtype or None)
        return meta

    # ---------------------------------------------------------------- 1. sample
    def sample(self, r: int) -> Rollout:
        g = self.config.grpo
        idx = rollout_prompts(len(self.pool), r, self.prompts_per_rollout, seed=self.config.seed,
                              shuffle=self.config.data.shuffle)
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), 11), r)
        return sample_rollout(self.sampler, self.roles["policy"].params, self.pool, idx,
                              group=self.group, rng=rng, max_new_tokens=int(g.max_new_tokens),
                              temperature=float(g.temperature), top_k=int(g.top_k),
                              top_p=float(g.top_p), stop_token_ids=(self.eos,),
                              tokenizer=self.tokenizer)

    # ---------------------------------------------------------------- 2. score
    def score(self, rollout: Rollout) -> dict[str, float]:
        """Rewards, their weighted sum and the advantages (in place); returns reward metrics."""
        g = self.config.grpo
        prompts = [self.pool.texts[i] for i in rollout.prompt_index]
        context = dict(examples=[self.pool.examples[i] for i in rollout.prompt_index],
                       task=self.pool.task, completion_ids=rollout.completion_ids,
                       finished=rollout.finished)
        parts = []
        for name, fn, w in self.rewards:
            values = call_reward(fn, prompts, rollout.texts, name=name, **context)
            rollout.rewards[name] = values
            parts.append(w * values)
        stacked = np.stack(parts)
        total = np.where(np.isnan(stacked).all(0), np.nan, np.nansum(stacked, axis=0))
        out = set_advantages(rollout, total, group=self.group, scale=g.scale_rewards,
                             eps=float(g.adv_eps))
        if len(self.rewards) > 1:
            out.update({f"reward/{n}": float(np.nanmean(v)) for n, v in rollout.rewards.items()})
        out.update(length_metrics(rollout))
        return out

    # ---------------------------------------------------------------- 3. log-probs, 4. update
    def rows(self, rollout: Rollout) -> dict[str, np.ndarray]:
        return self.updater.rows(self.pool, rollout)

    def minibatch_order(self, r: int, epoch: int) -> np.ndarray:
        return self.updater.minibatch_order(r, epoch)

    def update(self, r: int, rows: dict[str, np.ndarray]) -> list[dict[str, float]]:
        return self.updater.update(r, rows)


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Train; returns the last logged metrics (and ``preempted`` / ``export`` entries)."""
    algo = GRPO(config, workdir)
    g = config.grpo
    ckpt = Checkpointer.from_config(os.path.join(workdir, "checkpoints"), config.checkpoint)
    algo.finite = finite = FiniteGuard.from_config(config, ckpt)
    resume_step = ckpt.latest_step() if config.checkpoint.resume else None
    meta = algo.build_roles(ckpt, resume_step)
    r0 = int(meta.get("rollout", 0))
    u = r0 * algo.updates_per_rollout
    if resume_step is not None:
        log.info("resumed from %s at step %d (rollout %d of %d)", ckpt.directory, resume_step,
                 r0, algo.num_rollouts)
    every = int(config.checkpoint.every_steps)
    last: dict[str, Any] = {}
    preempted = False
    with ckpt, PreemptionGuard() as guard, MetricsWriter(
            workdir, total_steps=int(config.train.num_steps), initial_step=u,
            tensorboard=config.metrics.tensorboard, progress_bar=config.metrics.progress_bar,
            bar_keys=("reward_mean", "kl", "completion_length_mean")) as writer:
        for r in range(r0, algo.num_rollouts):
            t0 = time.perf_counter()
            rollout = algo.sample(r)
            t1 = time.perf_counter()
            record = algo.score(rollout)
            t2 = time.perf_counter()
            rows = algo.rows(rollout)
            t3 = time.perf_counter()
            steps = algo.update(r, rows)
            t4 = time.perf_counter()
            for k, m in enumerate(steps):
                finite.add(u + k + 1, m)
            prev, u = u, u + algo.updates_per_rollout
            record.update(mean_metrics(steps))
            record.update({"rollout": r, "time/rollout": t1 - t0, "time/reward": t2 - t1,
                           "time/logprobs": t3 - t2, "time/update": t4 - t3})
            last = writer.write(u, record)
            finite.check()  # before any save: never checkpoint or export a diverged state
            if algo.is_main and g.save_rollouts:
                order = np.argsort(algo.minibatch_order(r, 0), kind="stable")
                save_rollout(os.path.join(workdir, "rollouts", f"rollout_{r:06d}.jsonl"),
                             algo.pool, rollout, step=u,
                             minibatch=order // algo.rows_per_step)
            for i in range(min(int(g.log_samples), len(rollout))):
                writer.write_text(u, "samples/completion",
                                  f"{algo.pool.texts[rollout.prompt_index[i]]}{rollout.texts[i]}"
                                  f"\n\n[reward {rollout.reward[i]:.3f}]")
            stop = guard.should_stop(u)
            crossed = every > 0 and u // every > prev // every
            if crossed or stop or r + 1 == algo.num_rollouts:
                algo.roles.save(ckpt, u, {"rollout": r + 1, "time": time.time()})
            inject_fault(u)
            if stop:
                preempted = True
                break
        ckpt.wait()
        ckpt.close()
        writer.flush()
    if preempted:
        log.warning("preempted: checkpoint of step %d saved to %s; rerun the same command to "
                    "resume", u, ckpt.directory)
        return {**last, "preempted": True, "step": u}
    out = {**last, "preempted": False, "step": u}
    if config.checkpoint.export:  # every process: the export gathers the sharded weights
        from sgalm_jax.models import save_pretrained

        export_dir = os.path.join(workdir, "export")
        policy = algo.roles["policy"].model()
        save_pretrained(policy, export_dir, tokenizer=algo.tokenizer,  # LoRA: merged weights
                        dtype=config.checkpoint.export_dtype or None)
        log.info("exported the policy in HF format to %s", export_dir)
        out["export"] = export_dir
        if algo.lora is not None:
            out["export_adapter"] = algo.lora.export_adapter(
                policy, os.path.join(workdir, "export_adapter"))
    return out
