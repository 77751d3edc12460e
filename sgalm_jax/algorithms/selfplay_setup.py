"""Self-play's setup: the ``selfplay`` config section, the loss (a registered self-play loss on
the policy and its reference), the per-iteration schedules (learning rate, rows, alpha),
validation, the programs ``--compile-only`` compiles and the roles
(:mod:`sgalm_jax.algorithms.selfplay` runs the loop)."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sgalm_jax import sharding as sh
from sgalm_jax.algorithms.scoring import SequenceScorer
from sgalm_jax.config import FREE_FORM, register_section
from sgalm_jax.errors import ConfigError
from sgalm_jax.losses.common import causal_lm_logprobs, sequence_logprobs_from_hidden, shift_targets
from sgalm_jax.training.aot import Program, abstract_batch
from sgalm_jax.training import Roles, make_optimizer, model_loss, split_model, trainable_mask

GAP_ESTIMATORS = ("likelihood", "logratio")

# This algorithm's config section (``--describe`` lists it; see sgalm_jax.config).
register_section("selfplay", {
    "loss": ("spin", "self-play loss by registry name (spin, iris, space, spif, dpo, or one "
                     "registered with family='selfplay')"),
    "loss_module": ("", "Python module imported before the loss lookup, so that its "
                        "register_loss calls run (e.g. my_project.losses)"),
    "beta": (0.0, "the loss's beta (reward scale); 0 = the loss's own default (SPIN 0.1, "
                  "IRIS/SPACE 1.0)"),
    "loss_kwargs": ({}, f"{FREE_FORM} further keyword arguments of the loss, e.g. "
                        "{'loss_type': 'hinge'} or {'mu': 3.0}; set in a config file"),
    "iterations": (3, "self-play iterations: each generates, scores and trains once"),
    "epochs_per_iteration": (2.0, "passes over the iteration's pairs (sets the steps when "
                                  "selfplay.steps_per_iteration is 0)"),
    "steps_per_iteration": (0, "optimizer steps per iteration; 0 = from "
                               "epochs_per_iteration (train.num_steps is not used)"),
    "lr_per_iteration": ("", "comma-separated peak learning rates, one per iteration (the "
                             "last repeats), e.g. '5e-7,5e-7,1e-7,1e-7'; '' = "
                             "optimizer.learning_rate"),
    "mix_previous": (True, "SPIN's protocol: from iteration 1 on, also train on the previous "
                           "iteration's synthetic responses (re-scored under the new "
                           "reference)"),
    "num_samples": (1, "synthetic responses per prompt (K)"),
    "max_new_tokens": (256, "longest synthetic response in tokens"),
    "max_prompt_length": (256, "prompts are cut from the left to this many tokens (generation "
                               "and training); responses get data.max_length minus the "
                               "prompt"),
    "temperature": (1.0, "sampling temperature of synthetic responses (0 = greedy)"),
    "top_p": (1.0, "nucleus sampling of synthetic responses (1 = off)"),
    "top_k": (0, "top-k sampling of synthetic responses (0 = off)"),
    "generation_batch_size": (256, "prompts per generation chunk; each chunk is saved, so a "
                                   "killed run resumes generation at the next chunk"),
    "ref_batch_size": (64, "sequences per forward of the once-per-iteration reference "
                           "log-prob pass"),
    "logprob_chunk_size": (256, "training forward: log-probs from hidden states in chunks "
                                "of this many positions (no [B, T, vocab] logits); 0 = "
                                "full logits"),
    "first_turn": (True, "chat records: use the first user turn and the first assistant "
                         "reply (SPIN's UltraChat pairs)"),
    "subset_size": (0, "train on this many records drawn at random (seeded by "
                       "selfplay.subset_seed) from those loaded; 0 = all"),
    "subset_seed": (0, "seed of the selfplay.subset_size draw"),
    "alpha_schedule": ("constant", "IRIS order alpha per iteration: constant, linear, cosine "
                                   "(alpha_start -> alpha_end over the iterations) or "
                                   "adaptive (from the measured gap)"),
    "alpha": (1.0, "alpha of the constant schedule"),
    "alpha_start": (2.0, "alpha at iteration 0 (linear, cosine)"),
    "alpha_end": (0.5, "alpha at the last iteration (linear, cosine)"),
    "alpha_min": (0.5, "adaptive: alpha when the gap is 0"),
    "alpha_max": (2.0, "adaptive: alpha as the gap grows"),
    "gap_scale": (1.0, "adaptive: alpha = min + (max - min) * tanh(gap / gap_scale)"),
    "gap": ("likelihood", "adaptive gap estimate: likelihood (reference per-token log-prob "
                          "of synthetic minus real; free) or logratio (per-token log-ratio "
                          "margin of the previous iteration's pairs)"),
    "eval_every": (1, "run the eval section's tasks after every this many iterations (and "
                      "after the last); 0 = never"),
    "eval_at_start": (False, "also evaluate the initial model before iteration 0"),
    "export_iterations": (False, "also export each iteration's model in HF format to "
                                 "workdir/iterations/iter_NNN"),
}, owner=__name__)


# ------------------------------------------------------------------------------------ the loss
def resolve_loss(config: Any) -> tuple[Callable[..., Any], bool]:
    """``(loss_fn, takes_alpha)``: the registry's ``selfplay.loss`` with its hyper-parameters bound.

    Imports ``selfplay.loss_module`` first (so a researcher's ``register_loss`` runs). ``alpha`` is
    not bound: the loop passes α_t each step when the loss takes it.
    """
    from sgalm_jax.losses import get_loss, make_loss

    sp = config.selfplay
    if sp.loss_module:
        try:
            importlib.import_module(sp.loss_module)
        except ImportError as e:
            raise ConfigError(f"selfplay.loss_module: cannot import {sp.loss_module!r} ({e})") from None
    try:
        fn = get_loss(sp.loss, family="selfplay")
    except ConfigError as e:
        raise ConfigError(f"selfplay.loss: {e}") from None
    params = inspect.signature(fn).parameters
    takes_alpha = "alpha" in params
    kwargs = dict(sp.loss_kwargs.to_dict() if hasattr(sp.loss_kwargs, "to_dict") else sp.loss_kwargs)
    if "alpha" in kwargs:
        raise ConfigError("selfplay.loss_kwargs: set alpha through selfplay.alpha / "
                          "selfplay.alpha_schedule, not loss_kwargs")
    if sp.beta:
        kwargs["beta"] = float(sp.beta)
    try:
        bound = make_loss(sp.loss, family="selfplay", **kwargs)
    except ConfigError as e:
        raise ConfigError(f"selfplay.loss_kwargs: {e}") from None
    return bound, takes_alpha


def make_selfplay_loss(graphdef: Any, loss_fn: Callable[..., Any], *, takes_alpha: bool,
                       chunk_size: int = 256):
    """``loss_fn(params, batch, rng, alpha)`` for :func:`make_train_step` from a self-play loss.

    ``batch``: ``input_ids`` / ``attention_mask`` / ``loss_mask`` ``[B, 1+K, T]`` (slot 0 the real
    response, 1..K synthetic; right-padded), ``ref_logprobs`` ``[B, 1+K]`` (precomputed under θ_t).
    Real and synthetic rows go through the model in one forward; per-sequence log-probs are
    summed over response tokens (SPIN's ``average_log_prob=False``).
    """

    def loss_on_model(model, batch, rng, alpha):
        del rng  # deterministic (no dropout)
        ids = batch["input_ids"]
        b, s, t = ids.shape
        ids = ids.reshape(b * s, t)
        attn = batch["attention_mask"].reshape(b * s, t)
        positions = jnp.maximum(jnp.cumsum(attn, axis=-1) - 1, 0).astype(jnp.int32)
        loss_mask = batch["loss_mask"].reshape(b * s, t)
        hidden, _ = model.model(ids, attn, positions)
        if chunk_size:
            targets, mask = shift_targets(ids, loss_mask)
            lp = sequence_logprobs_from_hidden(hidden, model.logits_from_hidden, targets, mask,
                                               chunk_size=chunk_size)
        else:
            lp = causal_lm_logprobs(model.logits_from_hidden(hidden), ids, loss_mask)
        seq = lp.sequence_sum.reshape(b, s)
        ref = batch["ref_logprobs"]
        syn, ref_syn = (seq[:, 1], ref[:, 1]) if s == 2 else (seq[:, 1:], ref[:, 1:])
        kw = {"alpha": alpha} if takes_alpha else {}
        loss, metrics = loss_fn(seq[:, 0], syn, ref[:, 0], ref_syn, **kw)
        metrics = dict(metrics)
        metrics["num_tokens"] = jnp.sum(lp.num_tokens)
        return loss, metrics

    return model_loss(graphdef, loss_on_model)


# ------------------------------------------------------------------------------------ schedules
def parse_learning_rates(spec: str) -> list[float]:
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        try:
            lr = float(part)
        except ValueError:
            raise ConfigError(f"selfplay.lr_per_iteration: {part!r} is not a number") from None
        if not 0 < lr < float("inf"):
            raise ConfigError(f"selfplay.lr_per_iteration: {lr} must be a finite number > 0")
        out.append(lr)
    return out


def learning_rate(config: Any, t: int) -> float:
    lrs = parse_learning_rates(config.selfplay.lr_per_iteration)
    if not lrs:
        return float(config.optimizer.learning_rate)
    return lrs[min(t, len(lrs) - 1)]


def num_rows(n_prompts: int, config: Any, t: int) -> int:
    """Training rows of iteration t: one per prompt, twice that with SPIN's mixing (t >= 1)."""
    return n_prompts * (2 if config.selfplay.mix_previous and t > 0 else 1)


def steps_per_iteration(n_prompts: int, config: Any, t: int) -> int:
    sp = config.selfplay
    if sp.steps_per_iteration:
        return int(sp.steps_per_iteration)
    per_epoch = num_rows(n_prompts, config, t) // config.train.batch_size
    return max(1, int(round(sp.epochs_per_iteration * per_epoch)))


def alpha_for_iteration(config: Any, t: int, gap: float | None) -> float:
    """α_t of the configured schedule (the adaptive one from ``gap``)."""
    from sgalm_jax.losses.selfplay import make_alpha_schedule

    sp = config.selfplay
    kind = sp.alpha_schedule
    if kind == "constant":
        kwargs = dict(alpha=sp.alpha)
    elif kind in ("linear", "cosine"):
        kwargs = dict(start=sp.alpha_start, end=sp.alpha_end, num_steps=max(sp.iterations - 1, 1))
    else:
        kwargs = dict(alpha_min=sp.alpha_min, alpha_max=sp.alpha_max, gap_scale=sp.gap_scale)
    return float(make_alpha_schedule(kind, **kwargs)(t, gap=gap))


# ------------------------------------------------------------------------------------ validation
def validate(config: Any) -> None:
    """Self-play checks (model, tokenizer, data and devices as SFT; the selfplay section)."""
    from sgalm_jax.algorithms import sft
    from sgalm_jax.losses.selfplay import ALPHA_SCHEDULES

    sft.validate(config)
    if config.lora.enabled:
        from sgalm_jax.training.lora_setup import validate as validate_lora
        from sgalm_jax.training.model_setup import model_config

        validate_lora(config, model_config(config.model))
    sp = config.selfplay
    resolve_loss(config)
    if config.data.packing:
        raise ConfigError("data.packing: not supported by selfplay (rows are prompt + response)")
    for key in ("iterations", "num_samples", "max_new_tokens", "max_prompt_length",
                "generation_batch_size", "ref_batch_size"):
        if sp[key] < 1:
            raise ConfigError(f"selfplay.{key}: must be >= 1, got {sp[key]}")
    for key in ("steps_per_iteration", "top_k", "logprob_chunk_size", "subset_size", "eval_every"):
        if sp[key] < 0:
            raise ConfigError(f"selfplay.{key}: must be >= 0, got {sp[key]}")
    if not sp.steps_per_iteration and not sp.epochs_per_iteration > 0:
        raise ConfigError("selfplay.epochs_per_iteration: must be > 0 (or set "
                          "selfplay.steps_per_iteration)")
    if sp.max_prompt_length + sp.max_new_tokens > config.data.max_length:
        raise ConfigError(f"selfplay.max_new_tokens: max_prompt_length ({sp.max_prompt_length}) + "
                          f"max_new_tokens ({sp.max_new_tokens}) exceeds data.max_length "
                          f"({config.data.max_length})")
    if sp.temperature < 0:
        raise ConfigError(f"selfplay.temperature: must be >= 0, got {sp.temperature}")
    if not 0 < sp.top_p <= 1:
        raise ConfigError(f"selfplay.top_p: must be in (0, 1], got {sp.top_p}")
    if sp.alpha_schedule not in ALPHA_SCHEDULES:
        raise ConfigError(f"selfplay.alpha_schedule: {sp.alpha_schedule!r} is not one of "
                          f"{list(ALPHA_SCHEDULES)}")
    if sp.gap not in GAP_ESTIMATORS:
        raise ConfigError(f"selfplay.gap: {sp.gap!r} is not one of {list(GAP_ESTIMATORS)}")
    for key in ("alpha", "alpha_start", "alpha_end", "alpha_min", "alpha_max", "gap_scale"):
        if not sp[key] > 0:
            raise ConfigError(f"selfplay.{key}: must be > 0, got {sp[key]}")
    if sp.alpha_min > sp.alpha_max:
        raise ConfigError(f"selfplay.alpha_min: {sp.alpha_min} is above alpha_max={sp.alpha_max}")
    parse_learning_rates(sp.lr_per_iteration)
    if sp.eval_every or sp.eval_at_start:
        from sgalm_jax.algorithms.eval import validate_eval_section

        validate_eval_section(config)


# ------------------------------------------------------------------------------------ AOT
def programs(config: Any, mesh: Any) -> list[Any]:
    """The programs a run compiles, at their largest shapes, with abstract arguments
    (``--compile-only``): the train step (``train.batch_size`` prompts x (1 real + K synthetic)
    rows of ``data.max_length``), the reference scorer and the sampler's prefill and decode
    (``generation_batch_size`` prompts of ``max_prompt_length`` tokens, K samples each). The roles
    are the run's own (:func:`declare_roles`, LoRA included), built abstract."""
    from sgalm_jax.sampling import Sampler
    from sgalm_jax.training.aot import resident
    from sgalm_jax.training.model_setup import model_config
    from sgalm_jax.training.run_setup import sampler_options

    sp, b, t = config.selfplay, int(config.train.batch_size), int(config.data.max_length)
    k = int(sp.num_samples)
    mcfg = model_config(config.model)
    roles, graphdef, _ = declare_roles(
        config, mesh, mcfg, load=False,
        optimizer=lambda params: make_optimizer(config.optimizer, num_steps=1000, params=params))
    roles.build_abstract()
    policy = roles["policy"]
    loss_fn, takes_alpha = resolve_loss(config)
    step = add_train_step(policy, "step", config, graphdef, loss_fn, takes_alpha, mesh,
                          skip_nonfinite=config.train.nonfinite == "skip")
    batch = abstract_batch(mesh, {"input_ids": ((b, 1 + k, t), jnp.int32),
                                  "attention_mask": ((b, 1 + k, t), jnp.int32),
                                  "loss_mask": ((b, 1 + k, t), jnp.float32),
                                  "ref_logprobs": ((b, 1 + k), jnp.float32)})
    alpha = jax.ShapeDtypeStruct((), jnp.float32, sharding=sh.replicated(mesh))
    args = policy.step_args(batch, alpha)
    out = [Program(f"train step ({b} x {1 + k} x {t})", step, args,
                   resident=resident(roles, args))]
    scorer = SequenceScorer(graphdef, mesh=mesh, batch_size=sp.ref_batch_size,
                            min_bucket=config.data.min_bucket, max_length=t,
                            chunk_size=sp.logprob_chunk_size,
                            compute_dtype=config.train.compute_dtype or None)
    rows = scorer.batch_size
    fields = {"ids": ((rows, t), jnp.int32), "attn": ((rows, t), jnp.int32),
              "loss_mask": ((rows, t), jnp.float32)}
    scored = abstract_batch(mesh, fields)
    args = (policy.params, scored["ids"], scored["attn"], scored["loss_mask"])
    out.append(Program(f"reference scorer ({rows} x {t})", scorer._fn, args,
                       resident=resident(roles, args)))
    options = sampler_options(config, 2 * int(config.train.batch_size))  # as the run does
    per_call = max(1, int(options["max_batch_size"]) // k)
    sampler = Sampler(graphdef, mcfg, pad_token_id=0, mesh=mesh,
                      min_batch_bucket=min(int(sp.generation_batch_size), per_call), **options)
    for name, fn, args in sampler.abstract_programs(
            policy.params, rows=int(sp.generation_batch_size),
            prompt_tokens=int(sp.max_prompt_length), max_new_tokens=int(sp.max_new_tokens),
            num_samples=k, temperature=float(sp.temperature), top_k=int(sp.top_k) or None,
            top_p=None if sp.top_p >= 1 else float(sp.top_p)):
        out.append(Program(name, fn, args, resident=resident(roles, (policy.params,))))
    return out


# ------------------------------------------------------------------------------------ roles
def declare_roles(config: Any, mesh: Any, mcfg: Any, *, load: bool,
                  optimizer: Callable[[Any], Any]) -> tuple[Roles, Any, Any]:
    """``(roles, graphdef, lora)``: the ``policy`` learner (θ_t while iteration t trains) and its
    ``reference`` view: the policy as it is when an iteration starts, scored once before any
    step of that iteration (no second copy on the devices). With ``lora.enabled`` the policy is
    adapters on a frozen ``base`` (its view reads both; ``lora`` is the ``LoraSetup``).
    ``optimizer(params)`` gives ``(tx, schedule)``; ``load``: read the start weights now (a fresh
    run) rather than their shapes."""
    from flax import nnx

    from sgalm_jax.models import CausalLM
    from sgalm_jax.training.model_setup import build_model

    roles = Roles(mesh)
    if config.lora.enabled:
        from sgalm_jax.models.lora import split_adapters
        from sgalm_jax.training.lora_setup import LoraSetup

        lora = LoraSetup(config, mesh, mcfg)
        tx, schedule = optimizer(split_adapters(lora.abstract)[0])
        lora.declare_base(roles)
        lora.learner(roles, "policy", tx, schedule=schedule, seed=config.seed)
        roles.view("reference", of="policy")
        return roles, lora.graphdef, lora
    if load:
        model = build_model(config.model, mesh=mesh, seed=config.seed)
    else:
        model = nnx.eval_shape(lambda: CausalLM(mcfg, rngs=nnx.Rngs(0)))
    graphdef, params = split_model(model)
    del model
    # The optimizer's state has the same structure in every iteration (only the LR differs).
    tx, schedule = optimizer(params)
    roles.learner("policy", graphdef, params, tx, schedule=schedule, seed=config.seed)
    roles.view("reference", of="policy")
    return roles, graphdef, None


def add_train_step(policy: Any, name: str, config: Any, graphdef: Any, loss_fn: Any,
                   takes_alpha: bool, mesh: Any, *, skip_nonfinite: bool) -> Any:
    """The policy's self-play train step ``name`` (``step(state, batch, alpha)``)."""
    cfg = config
    return policy.add_step(
        name, make_selfplay_loss(graphdef, loss_fn, takes_alpha=takes_alpha,
                                 chunk_size=cfg.selfplay.logprob_chunk_size),
        extra_shardings=(sh.replicated(mesh),),
        grad_accum_steps=cfg.train.grad_accum_steps,
        compute_dtype=cfg.train.compute_dtype or None,
        trainable=trainable_mask(policy.own_params, cfg.optimizer.freeze)
        if cfg.optimizer.freeze else None, skip_nonfinite=skip_nonfinite)
