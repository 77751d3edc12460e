"""GAD's setup: the ``gad`` config section, validation, the roles of each stage and the
programs ``--compile-only`` compiles (:mod:`sgalm_jax.algorithms.gad` runs the loop on them).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from sgalm_jax import sharding as sh
from sgalm_jax.algorithms.distill_data import DISTILL_TASKS, validate_distill
from sgalm_jax.algorithms.gad_data import ScorePass, make_bt_loss
from sgalm_jax.algorithms.gad_eval import EVAL_METRICS
from sgalm_jax.algorithms.grpo_update import (
    LOSS_TYPES,
    OLD_LOGPROBS,
    GRPOOptions,
    PolicyUpdate,
    make_grpo_loss,
)
from sgalm_jax.config import FREE_FORM, register_section, resolve_mesh
from sgalm_jax.errors import ConfigError
from sgalm_jax.losses.policy_gradient import ADV_SCALES, KL_ESTIMATORS
from sgalm_jax.training import Roles, make_optimizer, split_model, trainable_mask

STAGES = ("warmup", "gad")

register_section("gad", {
    "stage": ("warmup", "warmup (the discriminator alone for d_only_steps, then SFT of the student "
                        "on the teacher's responses beside BT steps of the discriminator) or gad "
                        "(GRPO of the student on the discriminator's scores, BT steps of the "
                        "discriminator)"),
    "warmup_dir": ("", "gad stage: the warmup run's workdir; both roles start from its checkpoint "
                       "('' = both start fresh: the no-warmup ablation)"),
    "warmup_step": (0, "gad stage: the warmup checkpoint to start from; 0 = its latest"),
    "d_only_steps": (10, "warmup stage: the first this many steps train only the discriminator "
                         "(verl's critic_warmup)"),
    "discriminator_path": ("", "HF checkpoint the discriminator starts from: a causal LM (body "
                               "loaded, LM head dropped, a fresh head from the run seed) or a "
                               "*ForSequenceClassification; '' = model.path (the instruct model)"),
    "d_learning_rate": (0.0, "the discriminator's learning rate; 0 = optimizer.learning_rate (the "
                             "rest of the optimizer section is shared; each role has its own "
                             "optimizer state)"),
    "num_generations": (8, "responses sampled per prompt (the group of the advantage and of the "
                           "discriminator's BT loss)"),
    "temperature": (0.8, "sampling temperature of the student's rollouts (and of the GRPO "
                         "log-probs)"),
    "top_p": (1.0, "nucleus sampling of the rollouts (1 = off)"),
    "top_k": (0, "top-k sampling of the rollouts (0 = off)"),
    "beta": (1e-3, "gad stage: coefficient of the KL to the stage's start model (the frozen "
                   "reference role); 0 = no KL and no reference"),
    "kl_estimator": ("k3", "per-token KL estimator: k1, k2 or k3 (verl's low_var_kl)"),
    "kl_bias_correction": (False, "multiply the per-token KL by pi / pi_old (TRL's "
                                  "use_bias_correction_kl)"),
    "clip_eps": (0.2, "PPO clip of the ratio (inert with one mini-batch: the ratio is 1)"),
    "clip_eps_high": (0.0, "upper clip; 0 = clip_eps"),
    "clip_ratio_c": (0.0, "dual-clip bound (verl: 3.0); 0 = off"),
    "loss_type": ("dapo", "aggregation of the per-token GRPO loss: dapo (token mean over the "
                          "step, verl's token-mean), bnpo, grpo, dr_grpo"),
    "scale_rewards": ("group", "advantage scale: group (z-score in the group), batch or none"),
    "adv_eps": (1e-6, "added to the std of the advantage (verl 1e-6)"),
    "num_minibatches": (1, "student optimizer steps per pass over a rollout (1 = verl's single "
                           "PPO mini-batch; the rollout is train.batch_size x this)"),
    "num_iterations": (1, "passes over each rollout (PPO epochs)"),
    "old_logprobs": ("recompute", "log pi_old with more than one student step per rollout: "
                                  "recompute or sampler (needs temperature 1)"),
    "mask_truncated": (False, "responses cut at distill.max_response_tokens get no GRPO loss"),
    "logprob_chunk_size": (256, "GRPO log-probs from hidden states in chunks of this many "
                                "positions"),
    "d_grad_accum_steps": (0, "micro-batches of the discriminator's step (whole prompt groups: "
                              "the teacher and its G responses) and of the warmup's SFT step; "
                              "0 = train.grad_accum_steps"),
    "rollout_batch_size": (0, "responses per sampler call (bounds the KV cache; whole prompt "
                              "groups); 0 = all of a step's at once"),
    "score_batch_size": (0, "rows per no-grad discriminator forward; 0 = one train micro-batch "
                            "of prompts with their groups"),
    "eval_examples": (64, "checkpoint evaluation: greedy responses to this many held-out prompts "
                          "(0 = no evaluation)"),
    "eval_split": ("test", "split of the data the evaluation prompts come from"),
    "eval_file": ("", "held-out distillation file for the evaluation; '' = gad.eval_split of the "
                      "training data's source"),
    "eval_metric": ("auto", "the checkpoint-selection metric: auto (judge_score with a judge, else "
                            "accuracy on tasks with a checker, else rouge_l), judge_score, "
                            "accuracy, rouge_l"),
    "early_stop_patience": (0, "stop after this many evaluations without a better eval_metric "
                               "(saving and exporting as at the end); 0 = run train.num_steps"),
    "export_best": (True, "export the student of the best evaluated checkpoint to workdir/best"),
    "judge": ({}, f"{FREE_FORM} judge of each checkpoint, for "
                  "sgalm_jax.evaluation.judge.build_judge: {'backend': 'openai', 'base_url', "
                  "'model', ...} or {'backend': 'local', 'path', ...}; {} = no judge"),
    "save_rollouts": (True, "write each step's rollout (prompts, responses, scores, advantages) "
                            "to workdir/rollouts/rollout_NNNNNN.jsonl"),
    "log_samples": (2, "responses per step also written as TensorBoard text"),
}, owner=__name__)


# ------------------------------------------------------------------------------------ validation
def _dp(config: Any) -> int:
    sizes = resolve_mesh(config, jax.device_count())
    return sizes["data"] * sizes["fsdp"]


def prompts_per_step(config: Any) -> int:
    g = config.gad
    return config.train.batch_size * g.num_minibatches // g.num_generations


def d_accum(config: Any) -> int:
    """Micro-batches of the discriminator's (and the warmup SFT's) step."""
    return int(config.gad.d_grad_accum_steps) or int(config.train.grad_accum_steps)


def validate(config: Any) -> None:
    """GAD checks (model, tokenizer, data and devices as SFT; the distill and gad sections)."""
    from sgalm_jax.algorithms import sft
    from sgalm_jax.evaluation.judge import check_judge_config

    sft.validate(config)
    validate_distill(config)
    if config.lora.enabled:
        from sgalm_jax.algorithms import gad_lora

        gad_lora.validate(config)
    g = config.gad
    if g.stage not in STAGES:
        raise ConfigError(f"gad.stage: {g.stage!r} is not one of {list(STAGES)}")
    choices = (("loss_type", tuple(LOSS_TYPES)), ("old_logprobs", OLD_LOGPROBS),
               ("kl_estimator", KL_ESTIMATORS), ("scale_rewards", ADV_SCALES),
               ("eval_metric", ("auto",) + EVAL_METRICS))
    for key, allowed in choices:
        if g[key] not in allowed:
            raise ConfigError(f"gad.{key}: {g[key]!r} is not one of {list(allowed)}")
    for key in ("num_generations", "num_minibatches", "num_iterations", "logprob_chunk_size"):
        if g[key] < 1:
            raise ConfigError(f"gad.{key}: must be >= 1, got {g[key]}")
    if g.num_generations < 2:
        raise ConfigError("gad.num_generations: must be >= 2 (a group of one has no advantage)")
    for key in ("d_only_steps", "warmup_step", "d_learning_rate", "beta", "clip_eps_high",
                "d_grad_accum_steps", "rollout_batch_size",
                "top_k", "adv_eps", "score_batch_size", "eval_examples", "early_stop_patience",
                "log_samples"):
        if g[key] < 0:
            raise ConfigError(f"gad.{key}: must be >= 0, got {g[key]}")
    if not 0 < g.clip_eps < 1:
        raise ConfigError(f"gad.clip_eps: must be in (0, 1), got {g.clip_eps}")
    if g.clip_ratio_c and g.clip_ratio_c <= 1:
        raise ConfigError(f"gad.clip_ratio_c: must be > 1 (or 0 = off), got {g.clip_ratio_c}")
    if not g.temperature > 0:
        raise ConfigError(f"gad.temperature: must be > 0, got {g.temperature}")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"gad.top_p: must be in (0, 1], got {g.top_p}")
    if g.old_logprobs == "sampler" and g.temperature != 1:
        raise ConfigError("gad.old_logprobs: 'sampler' log-probs are the raw model's "
                          "(temperature 1); with gad.temperature != 1 use 'recompute'")
    if g.stage == "warmup" and (g.warmup_dir or g.warmup_step):
        raise ConfigError("gad.warmup_dir: only the gad stage starts from a warmup checkpoint")
    if g.warmup_dir:
        folder = os.path.join(g.warmup_dir, "checkpoints")
        if not os.path.isdir(folder):
            raise ConfigError(f"gad.warmup_dir: {folder!r} does not exist (run the warmup stage "
                              "with --config.workdir set to it first)")
    if g.discriminator_path and not os.path.isfile(os.path.join(g.discriminator_path,
                                                                "config.json")):
        raise ConfigError(f"gad.discriminator_path: no config.json in {g.discriminator_path!r}")
    rollout = config.train.batch_size * g.num_minibatches
    if rollout % g.num_generations:
        raise ConfigError(f"train.batch_size: a rollout of train.batch_size x num_minibatches = "
                          f"{rollout} responses is not a whole number of groups of "
                          f"gad.num_generations={g.num_generations}")
    p, k = prompts_per_step(config), d_accum(config)
    if p % k or (p // k) % _dp(config):
        raise ConfigError(f"gad.d_grad_accum_steps: the {p} prompts of a step (the "
                          f"discriminator's groups, the warmup's SFT rows) in {k} micro-batches "
                          f"(gad.d_grad_accum_steps, 0 = train.grad_accum_steps) do not divide "
                          f"into whole micro-batches divisible by the data-parallel size "
                          f"{_dp(config)}")
    if g.rollout_batch_size % g.num_generations:
        raise ConfigError(f"gad.rollout_batch_size: {g.rollout_batch_size} is not a whole number "
                          f"of groups of gad.num_generations={g.num_generations}")
    if g.judge:
        check_judge_config(g.judge, prefix="gad.judge")
    if g.eval_metric == "judge_score" and not g.judge:
        raise ConfigError("gad.eval_metric: 'judge_score' needs a judge (gad.judge)")
    if g.eval_metric == "accuracy" and (config.data.train_file or config.data.task.strip().lower()
                                        .replace("-", "_") in DISTILL_TASKS):
        raise ConfigError("gad.eval_metric: 'accuracy' needs a task with a checker (data.task, "
                          "e.g. arithmetic or gsm8k); distillation data has none")
    if g.early_stop_patience and not g.eval_examples:
        raise ConfigError("gad.early_stop_patience: needs an evaluation (gad.eval_examples > 0)")


# ------------------------------------------------------------------------------------ roles
def declare_roles(config: Any, mesh: Any, mcfg: Any, d_mcfg: Any, *, stage: str, beta: float,
                  init_student: Any = None, init_discriminator: Any = None
                  ) -> tuple[Roles, Any, Any, Any]:
    """``(roles, lora, student graph, discriminator graph)``, unbuilt: the learners ``student``
    (a causal LM) and ``discriminator`` (a ScoreModel of ``d_mcfg``), and in the GAD stage with
    ``beta > 0`` the frozen ``reference`` (a snapshot of the student). With ``lora.enabled``:
    adapter sets (and D's head) on one frozen base (:mod:`sgalm_jax.algorithms.gad_lora`).
    ``init_student`` / ``init_discriminator`` give the first params of a fresh run."""
    from sgalm_jax.models import CausalLM, ScoreModel

    g = config.gad
    updates = int(config.train.num_steps) * int(g.num_minibatches) * int(g.num_iterations)
    d_opt = ml_collections.ConfigDict(config.optimizer.to_dict())
    d_opt.learning_rate = float(g.d_learning_rate or config.optimizer.learning_rate)
    d_opt.freeze = ""  # optimizer.freeze selects the student's params

    def g_optimizer(params: Any) -> Any:
        return make_optimizer(config.optimizer, num_steps=updates, params=params)

    def d_optimizer(params: Any) -> Any:
        return make_optimizer(d_opt, num_steps=int(config.train.num_steps), params=params)

    reference = stage == "gad" and beta > 0
    if config.lora.enabled:  # adapter sets (and D's head) on one frozen base
        from sgalm_jax.algorithms import gad_lora

        return gad_lora.declare_roles(config, mesh, mcfg, make_g_optimizer=g_optimizer,
                                      make_d_optimizer=d_optimizer, reference=reference)
    g_graphdef, g_params = split_model(nnx.eval_shape(lambda: CausalLM(mcfg, rngs=nnx.Rngs(0))))
    d_graphdef, d_params = split_model(
        nnx.eval_shape(lambda: ScoreModel(d_mcfg, rngs=nnx.Rngs(0))))
    tx_g, lr_g = g_optimizer(g_params)
    tx_d, lr_d = d_optimizer(d_params)
    roles = Roles(mesh)
    roles.learner("student", g_graphdef, g_params, tx_g, schedule=lr_g, seed=config.seed,
                  init=init_student)
    roles.learner("discriminator", d_graphdef, d_params, tx_d, schedule=lr_d,
                  seed=config.seed + 1, init=init_discriminator)
    if reference:
        # The stage's start model, stored with every checkpoint of the stage.
        roles.snapshot("reference", of="student")
    return roles, None, g_graphdef, d_graphdef


def add_steps(roles: Roles, config: Any, g_graphdef: Any, d_graphdef: Any, opts: GRPOOptions,
              stage: str) -> None:
    """The discriminator's ``bt`` step and the student's ``sft`` (warmup) or ``grpo`` step."""
    cfg, g = config, config.gad
    common = dict(compute_dtype=cfg.train.compute_dtype or None,
                  skip_nonfinite=cfg.train.nonfinite == "skip")
    student = roles["student"]
    trainable = (trainable_mask(student.own_params, cfg.optimizer.freeze)
                 if cfg.optimizer.freeze else None)
    roles["discriminator"].add_step("bt", make_bt_loss(d_graphdef),
                                    grad_accum_steps=d_accum(cfg), **common)
    if stage == "warmup":
        from sgalm_jax.algorithms.sft import make_sft_loss

        student.add_step("sft", make_sft_loss(g_graphdef, cfg.sft.normalize,
                                              cfg.sft.logits_chunk_size),
                         accum_weight="num_tokens" if cfg.sft.normalize == "token" else None,
                         grad_accum_steps=d_accum(cfg), trainable=trainable, **common)
    else:
        student.add_step("grpo", make_grpo_loss(g_graphdef, opts),
                         accum_weight=LOSS_TYPES[g.loss_type][1], trainable=trainable,
                         grad_accum_steps=cfg.train.grad_accum_steps, **common)


def programs(config: Any, mesh: Any) -> list[Any]:
    """The programs a GAD stage compiles, at their largest shapes, with abstract arguments
    (``--compile-only``): the discriminator's BT step (``[P, 1 + G, T]`` rows), the student's SFT
    step (warmup) or GRPO step (GAD stage) and its reference log-prob pass, the discriminator's
    score pass (GAD stage) and the sampler's prefill and decode. ``T`` is the widest row the
    ``distill`` limits allow (prompt + response tokens, bucketed, at most ``data.max_length``)."""
    import jax.numpy as jnp

    from sgalm_jax.models import ModelConfig
    from sgalm_jax.sampling import Sampler
    from sgalm_jax.training.aot import Program, abstract_batch, resident
    from sgalm_jax.training.batching import bucket_length
    from sgalm_jax.training.model_setup import model_config
    from sgalm_jax.training.run_setup import sampler_options

    g, d = config.gad, config.distill
    mcfg = model_config(config.model)
    path = g.discriminator_path
    d_mcfg = (ModelConfig.from_hf(path, dtype=config.model.dtype,
                                  param_dtype=config.model.param_dtype, remat=config.model.remat)
              if path else mcfg)
    opts = GRPOOptions.from_section(g, beta=float(g.beta),
                                    max_new_tokens=int(d.max_response_tokens))
    roles, _, g_graphdef, d_graphdef = declare_roles(config, mesh, mcfg, d_mcfg, stage=g.stage,
                                                     beta=opts.beta)
    roles.build_abstract()
    add_steps(roles, config, g_graphdef, d_graphdef, opts, g.stage)
    student, disc = roles["student"], roles["discriminator"]
    p, group = prompts_per_step(config), int(g.num_generations)
    width = bucket_length(int(d.max_prompt_tokens) + int(d.max_response_tokens),
                          int(config.data.min_bucket), int(config.data.max_length))
    i32, f32 = jnp.int32, jnp.float32

    def rows(shape: tuple[int, ...], loss: bool = False) -> dict[str, Any]:
        fields = {"input_ids": (shape, i32), "attention_mask": (shape, i32),
                  "positions": (shape, i32)}
        if loss:
            fields["loss_mask"] = (shape, f32)
        return fields

    def program(name: str, fn: Any, args: Any) -> Program:
        return Program(name, fn, args, resident=resident(roles, args))

    out = [program(f"D step ({p} x {1 + group} x {width})", disc.steps["bt"],
                   disc.step_args(abstract_batch(mesh, rows((p, 1 + group, width)))))]
    b = int(config.train.batch_size)
    if g.stage == "warmup":
        out.append(program(f"student SFT step ({p} x {width})", student.steps["sft"],
                           student.step_args(abstract_batch(mesh, rows((p, width), True)))))
    else:
        fields = {**rows((b, width), True), "advantages": ((b,), f32)}
        if "reference" in roles:
            fields["ref_logprobs"] = ((b, width), f32)
        out.append(program(f"student GRPO step ({b} x {width})", student.steps["grpo"],
                           student.step_args(abstract_batch(mesh, fields))))
        updater = PolicyUpdate(
            roles, "student", g_graphdef, opts, mesh, rows_per_step=b,
            grad_accum_steps=config.train.grad_accum_steps, minibatches=int(g.num_minibatches),
            epochs=int(g.num_iterations), old_logprobs=g.old_logprobs, seed=config.seed, pad_id=0,
            min_bucket=config.data.min_bucket, max_length=config.data.max_length,
            mask_truncated=bool(g.mask_truncated),
            compute_dtype=config.train.compute_dtype or None)
        micro = b // int(config.train.grad_accum_steps)
        if "reference" in roles:
            ref = roles["reference"]
            args = (ref.params, abstract_batch(mesh, rows((micro, width), True)))
            out.append(program(f"reference log-probs ({micro} x {width})",
                               updater.ref_logprobs._fn, args))
        n = int(g.score_batch_size) or p // d_accum(config) * (1 + group)
        n = -(-n // sh.data_parallel_size(mesh)) * sh.data_parallel_size(mesh)
        scorer = ScorePass(d_graphdef, mesh, rows_per_call=n,
                           compute_dtype=config.train.compute_dtype or None)
        args = (disc.params, abstract_batch(mesh, rows((n, width))))
        out.append(program(f"D score pass ({n} x {width})", scorer._fn, args))
    rb = int(g.rollout_batch_size)
    sampler = Sampler(g_graphdef, mcfg, pad_token_id=0, mesh=mesh,
                      min_batch_bucket=rb // group if rb else p,
                      min_prompt_bucket=min(config.data.min_bucket, int(d.max_prompt_tokens)),
                      **sampler_options(config, rb or None))  # as the run builds it
    for name, fn, args in sampler.abstract_programs(
            student.params, rows=p,
            prompt_tokens=int(d.max_prompt_tokens), max_new_tokens=int(d.max_response_tokens),
            num_samples=group, temperature=float(g.temperature), top_k=int(g.top_k) or None,
            top_p=None if g.top_p >= 1 else float(g.top_p)):
        out.append(Program(name, fn, args, resident=resident(roles, (student.params,))))
    return out
