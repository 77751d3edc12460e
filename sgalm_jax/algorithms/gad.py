"""GAD: generative adversarial distillation of a black-box teacher (arXiv 2511.10643), on roles.

    # stage 1: warmup                       # stage 2: GAD, from the warmup's last checkpoint
    python -m sgalm_jax.main \\              python -m sgalm_jax.main \\
      --config configs/gad_qwen3b_lmsys.py \\   --config configs/gad_qwen3b_lmsys.py \\
      --config.workdir=runs/gad_warmup         --config.gad.stage=gad \\
                                               --config.gad.warmup_dir=runs/gad_warmup \\
                                               --config.workdir=runs/gad

Roles (:mod:`sgalm_jax.training.roles`): the learner ``student`` (a causal LM, the optimizer
section: AdamW, lr 1e-6, weight decay 0.01, constant LR, clip 0.2 in the GAD configs); the learner
``discriminator`` (a :class:`~sgalm_jax.models.ScoreModel`: the *instruct* checkpoint's body, LM
head dropped, a fresh ``Linear(hidden, 1)`` from the run seed; its own AdamW with the same
settings); and, in the GAD stage with ``gad.beta > 0``, the frozen ``reference``: a snapshot of the
student as the stage starts (the warmup's student), the k3 KL's anchor.

Every step ``s`` takes ``P = train.batch_size * num_minibatches / num_generations`` prompts and
samples ``G = gad.num_generations`` responses to each from the current student (temperature 0.8).
The discriminator reads prompt + response, with teacher and student responses ending the same way
(:class:`~sgalm_jax.data.distill_tokens.DistillEncoder`: the end token after the content, or a cut
at ``distill.max_response_tokens``), at the last valid token. Then:

- **warmup stage** (``gad.stage = "warmup"``): one group Bradley-Terry step of the discriminator
  (teacher preferred over each of the G student responses; the teacher's score computed once per
  prompt and shared by its group); after the first ``gad.d_only_steps`` steps (in which the student
  is untouched, bit for bit), also one cross-entropy SFT step of the student on the P teacher
  responses;
- **GAD stage** (``gad.stage = "gad"``, both roles restored from the warmup's checkpoint): the
  current discriminator scores the G responses (the raw score is the reward: no sigmoid, no teacher
  difference) and the teachers; the discriminator takes its BT step; then the student takes GRPO
  steps (:mod:`sgalm_jax.algorithms.grpo_update`: group z-score advantages, token-mean, k3 KL 1e-3
  to the reference, clip 0.2; one mini-batch, so the ratio is 1) on the scores from *before* the
  discriminator's step, with the tokens the student actually sampled.

Logged per step: ``d_loss``, ``d_acc``, ``teacher_score``, ``student_score`` (means), the response
length (mean / max: the reward-hacking signal), ``kl``, GRPO's metrics and the time of each part.
Checkpoints (every role, one Orbax checkpoint) every ``checkpoint.every_steps`` (50 in the GAD
configs); each is evaluated (:mod:`sgalm_jax.algorithms.gad_eval`: ROUGE-L against the teacher,
the task's checker on built-in tasks, the judge when ``gad.judge`` is set), and the evaluation is
the stopping criterion (``gad.early_stop_patience``; the reward oscillates around 0 by design).
Prompts and sampling keys are functions of the step, so a killed run rerun with the same command
ends bit-identical.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from sgalm_jax import sharding as sh
from sgalm_jax.algorithms.distill_data import (
    DISTILL_TASKS,
    load_distill_pool,
    make_encoder,
    validate_distill,
)
from sgalm_jax.algorithms.gad_data import (
    ScorePass,
    discriminator_rows,
    make_bt_loss,
    teacher_sft_rows,
)
from sgalm_jax.algorithms.gad_eval import EVAL_METRICS, CheckpointEval
from sgalm_jax.algorithms.grpo_data import Rollout, rollout_prompts, save_rollout
from sgalm_jax.algorithms.grpo_update import (
    LOSS_TYPES,
    OLD_LOGPROBS,
    GRPOOptions,
    PolicyUpdate,
    length_metrics,
    make_grpo_loss,
    mean_metrics,
    sample_rollout,
    set_advantages,
    to_global,
)
from sgalm_jax.config import FREE_FORM, register_section, resolve_mesh
from sgalm_jax.errors import CheckpointError, ConfigError
from sgalm_jax.losses.policy_gradient import ADV_SCALES, KL_ESTIMATORS
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
from sgalm_jax.training import multihost as mh
from sgalm_jax.training.finite import FiniteGuard
from sgalm_jax.training.lora_setup import mark_supported
from sgalm_jax.training.run_setup import setup_run

log = logging.getLogger(__name__)
mark_supported("gad")  # lora.enabled: roles built with LoraSetup (gad_lora)

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


# ------------------------------------------------------------------------------------ the run
class GAD:
    """One GAD stage's pieces: data, roles, sampler, steps; :func:`run` drives :meth:`step`."""

    def __init__(self, config: Any, workdir: str):
        self.config, self.workdir = config, workdir
        g = config.gad
        self.stage = g.stage
        setup = setup_run(config, workdir)
        self.mesh, self.is_main, self.tokenizer = setup.mesh, setup.is_main, setup.tokenizer
        self.mcfg, self.eos, self.pad = setup.model_config, setup.eos_id, setup.pad_id
        self.encoder = make_encoder(config, self.tokenizer, end_token_id=self.eos,
                                    stop_token_ids=self.mcfg.eos_token_ids)
        self.pool = load_distill_pool(config, self.tokenizer, self.encoder,
                                      split=config.data.split,
                                      limit=config.data.max_examples or None,
                                      vocab_size=self.mcfg.vocab_size)
        self.group = int(g.num_generations)
        self.prompts = prompts_per_step(config)
        self.num_steps = int(config.train.num_steps)
        self.opts = GRPOOptions.from_section(g, beta=float(g.beta),
                                             max_new_tokens=self.encoder.max_response_tokens)
        self.prompt_offset = 0
        log.info("GAD %s stage: %d steps of %d prompts x %d responses; %d prompts with teacher "
                 "responses", self.stage, self.num_steps, self.prompts, self.group,
                 len(self.pool))

    # ---------------------------------------------------------------- roles and steps
    def _d_config(self) -> tuple[Any, str]:
        """The discriminator's model config and the checkpoint it starts from ('' = model.init)."""
        from sgalm_jax.models import ModelConfig

        cfg = self.config
        path = cfg.gad.discriminator_path or cfg.model.path
        if not path:
            return self.mcfg, ""
        return ModelConfig.from_hf(path, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                                   remat=cfg.model.remat), path

    def _init_student(self) -> Any:
        from sgalm_jax.training.model_setup import build_model

        cfg = self.config
        return split_model(build_model(cfg.model, mesh=self.mesh, seed=cfg.seed))[1]

    def _init_discriminator(self) -> Any:
        """The instruct checkpoint's body with a fresh head from the run seed (or a classifier
        checkpoint as it is); for ``model.init`` runs, the same random body as the student's."""
        from sgalm_jax.models import load_score_model, score_model_from_causal_lm
        from sgalm_jax.training.model_setup import build_model

        cfg = self.config
        _, path = self._d_config()
        if path:
            model = load_score_model(path, seed=cfg.seed, mesh=self.mesh, dtype=cfg.model.dtype,
                                     param_dtype=cfg.model.param_dtype, remat=cfg.model.remat)
        else:
            model = score_model_from_causal_lm(
                build_model(cfg.model, mesh=self.mesh, seed=cfg.seed), seed=cfg.seed)
        return split_model(model)[1]

    def build_roles(self, ckpt: Checkpointer, resume_step: int | None) -> dict[str, Any]:
        """Declare and build the roles: restored from this run's checkpoint ``resume_step``, or
        (GAD stage) student and discriminator from the warmup's checkpoint, or fresh."""
        from sgalm_jax.models import CausalLM, ScoreModel

        cfg, g = self.config, self.config.gad
        updates = self.num_steps * int(g.num_minibatches) * int(g.num_iterations)
        d_opt = ml_collections.ConfigDict(cfg.optimizer.to_dict())
        d_opt.learning_rate = float(g.d_learning_rate or cfg.optimizer.learning_rate)
        d_opt.freeze = ""  # optimizer.freeze selects the student's params

        def g_optimizer(params: Any) -> Any:
            return make_optimizer(cfg.optimizer, num_steps=updates, params=params)

        def d_optimizer(params: Any) -> Any:
            return make_optimizer(d_opt, num_steps=self.num_steps, params=params)

        reference = self.stage == "gad" and self.opts.beta > 0
        self.lora = None
        if cfg.lora.enabled:  # adapter sets (and D's head) on one frozen base
            from sgalm_jax.algorithms import gad_lora

            roles, self.lora, self.g_graphdef, self.d_graphdef = gad_lora.declare_roles(
                cfg, self.mesh, self.mcfg, make_g_optimizer=g_optimizer,
                make_d_optimizer=d_optimizer, reference=reference)
            self.roles = roles
        else:
            self.g_graphdef, g_params = split_model(
                nnx.eval_shape(lambda: CausalLM(self.mcfg, rngs=nnx.Rngs(0))))
            d_mcfg, _ = self._d_config()
            self.d_graphdef, d_params = split_model(
                nnx.eval_shape(lambda: ScoreModel(d_mcfg, rngs=nnx.Rngs(0))))
            tx_g, lr_g = g_optimizer(g_params)
            tx_d, lr_d = d_optimizer(d_params)
            roles = self.roles = Roles(self.mesh)
            roles.learner("student", self.g_graphdef, g_params, tx_g, schedule=lr_g,
                          seed=cfg.seed, init=self._init_student)
            roles.learner("discriminator", self.d_graphdef, d_params, tx_d, schedule=lr_d,
                          seed=cfg.seed + 1, init=self._init_discriminator)
            if reference:
                # The stage's start model, stored with every checkpoint of the stage.
                roles.snapshot("reference", of="student")

        if resume_step is not None:
            meta = roles.build(ckpt, resume_step)
            if meta.get("stage", self.stage) != self.stage:
                raise CheckpointError(f"{ckpt.directory}: its checkpoints are of the "
                                      f"{meta['stage']!r} stage, this run is gad.stage="
                                      f"{self.stage!r}; use a new workdir for each stage")
            self.prompt_offset = int(meta.get("prompt_offset", 0))
            log.info("resumed from %s at step %d", ckpt.directory, resume_step)
        elif g.warmup_dir:
            with Checkpointer.from_config(os.path.join(g.warmup_dir, "checkpoints"),
                                          cfg.checkpoint) as wck:
                step = int(g.warmup_step) or wck.latest_step()
                if step is None:
                    raise CheckpointError(f"gad.warmup_dir: no complete checkpoint in "
                                          f"{wck.directory}")
                warm = roles.build(wck, step, only=["student", "discriminator"])
            if warm.get("stage", "warmup") != "warmup":
                raise CheckpointError(f"gad.warmup_dir: {wck.directory}/{step} is a "
                                      f"{warm['stage']!r} checkpoint, not a warmup one")
            # Continue through the prompts where the warmup stopped (as verl's resumed loader).
            self.prompt_offset = int(warm.get("step", step))
            meta = {}
            log.info("GAD stage from the warmup checkpoint %s/%d (student and discriminator)",
                     wck.directory, step)
        else:
            meta = roles.build()
            if self.stage == "gad":
                log.warning("gad.warmup_dir is empty: the GAD stage starts from the base student "
                            "and a fresh discriminator (the no-warmup ablation)")

        common = dict(compute_dtype=cfg.train.compute_dtype or None,
                      skip_nonfinite=cfg.train.nonfinite == "skip")
        student = roles["student"]
        trainable = (trainable_mask(student.own_params, cfg.optimizer.freeze)
                     if cfg.optimizer.freeze else None)
        roles["discriminator"].add_step("bt", make_bt_loss(self.d_graphdef),
                                        grad_accum_steps=d_accum(cfg), **common)
        if self.stage == "warmup":
            from sgalm_jax.algorithms.sft import make_sft_loss

            student.add_step("sft", make_sft_loss(self.g_graphdef, cfg.sft.normalize,
                                                  cfg.sft.logits_chunk_size),
                             accum_weight="num_tokens" if cfg.sft.normalize == "token" else None,
                             grad_accum_steps=d_accum(cfg), trainable=trainable, **common)
        else:
            student.add_step("grpo", make_grpo_loss(self.g_graphdef, self.opts),
                             accum_weight=LOSS_TYPES[g.loss_type][1], trainable=trainable,
                             grad_accum_steps=cfg.train.grad_accum_steps, **common)
        self._make_tools()
        return meta

    def _make_tools(self) -> None:
        from sgalm_jax.sampling import Sampler

        cfg, g = self.config, self.config.gad
        rb = int(g.rollout_batch_size)
        self.sampler = Sampler(self.g_graphdef, self.mcfg, pad_token_id=self.pad, mesh=self.mesh,
                               min_batch_bucket=rb // self.group if rb else self.prompts,
                               max_batch_size=rb or None,
                               min_prompt_bucket=min(cfg.data.min_bucket,
                                                     self.encoder.max_prompt_tokens))
        micro = self.prompts // d_accum(cfg) * (1 + self.group)
        self.scorer = ScorePass(self.d_graphdef, self.mesh,
                                rows_per_call=int(g.score_batch_size) or micro,
                                compute_dtype=cfg.train.compute_dtype or None)
        self.updater = PolicyUpdate(
            self.roles, "student", self.g_graphdef, self.opts, self.mesh,
            rows_per_step=int(cfg.train.batch_size), grad_accum_steps=cfg.train.grad_accum_steps,
            minibatches=int(g.num_minibatches), epochs=int(g.num_iterations),
            old_logprobs=g.old_logprobs, seed=cfg.seed, pad_id=self.pad,
            min_bucket=cfg.data.min_bucket, max_length=cfg.data.max_length,
            mask_truncated=bool(g.mask_truncated), compute_dtype=cfg.train.compute_dtype or None)
        self.evaluator = (CheckpointEval(cfg, self.workdir, self.tokenizer, self.encoder,
                                         self.sampler, self.mesh)
                          if g.eval_examples else None)

    # ---------------------------------------------------------------- pieces of a step
    def sample(self, s: int) -> Rollout:
        """Step ``s``'s prompts and G responses to each from the current student."""
        g = self.config.gad
        idx = rollout_prompts(len(self.pool), self.prompt_offset + s, self.prompts,
                              seed=self.config.seed, shuffle=self.config.data.shuffle)
        salt = 17 if self.stage == "warmup" else 19
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), salt), s)
        kw = self.encoder.sampler_kwargs
        return sample_rollout(self.sampler, self.roles["student"].params, self.pool, idx,
                              group=self.group, rng=rng, max_new_tokens=kw["max_new_tokens"],
                              temperature=float(g.temperature), top_k=int(g.top_k),
                              top_p=float(g.top_p), stop_token_ids=kw["stop_token_ids"],
                              tokenizer=self.tokenizer)

    def d_rows(self, rollout: Rollout) -> dict[str, np.ndarray]:
        """The discriminator's ``[P, 1 + G, T]`` rows of a rollout (:func:`discriminator_rows`)."""
        cfg = self.config
        return discriminator_rows(self.pool, self.encoder, rollout, group=self.group,
                                  pad_id=self.pad, min_bucket=cfg.data.min_bucket,
                                  max_length=cfg.data.max_length)

    def score(self, params: Any, d_rows: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``(teacher [P], student [P * G])`` scores of ``d_rows`` under discriminator ``params``."""
        p, g1, t = d_rows["input_ids"].shape
        flat = {k: v.reshape(p * g1, t) for k, v in d_rows.items()}
        scores = self.scorer(params, flat).reshape(p, g1)
        return scores[:, 0], scores[:, 1:].reshape(-1)

    def sft_rows(self, rollout: Rollout) -> dict[str, np.ndarray]:
        """Prompt + teacher response of each of the step's prompts (:func:`teacher_sft_rows`)."""
        cfg = self.config
        return teacher_sft_rows(self.pool, rollout.prompt_index[::self.group], pad_id=self.pad,
                                min_bucket=cfg.data.min_bucket, max_length=cfg.data.max_length)

    def d_update(self, d_rows: dict[str, np.ndarray]) -> dict[str, Any]:
        """One group Bradley-Terry step of the discriminator (metrics on the device)."""
        return self.roles["discriminator"].step("bt", to_global(d_rows, self.mesh))

    # ---------------------------------------------------------------- one step
    def step(self, s: int, finite: FiniteGuard | None = None) -> tuple[dict[str, Any], Rollout]:
        """Train step ``s`` (0-based) of the stage; returns its record and rollout."""
        t0 = time.perf_counter()
        rollout = self.sample(s)
        t1 = time.perf_counter()
        d_rows = self.d_rows(rollout)
        record: dict[str, Any] = {"stage": self.stage}
        record.update(length_metrics(rollout))
        times = {"time/rollout": t1 - t0}
        if self.stage == "gad":
            teacher, student = self.score(self.roles["discriminator"].params, d_rows)
            t2 = time.perf_counter()
            # The reward is the raw score of the discriminator *before* its update.
            record.update(set_advantages(rollout, student, group=self.group,
                                         scale=self.config.gad.scale_rewards,
                                         eps=float(self.config.gad.adv_eps)))
            rollout.rewards["teacher_score"] = np.repeat(teacher, self.group)
            record.update(teacher_score=float(teacher.mean()), student_score=float(student.mean()))
            times["time/score"] = t2 - t1
            t1 = t2
        d_m = self.d_update(d_rows)
        if finite is not None:
            finite.add(s + 1, d_m, role="discriminator")
        d_m = sh.to_host(d_m)
        t2 = time.perf_counter()
        times["time/d_update"] = t2 - t1
        record.update({k: float(d_m[k]) for k in ("d_loss", "d_acc", "margin")})
        record.update(d_grad_norm=float(d_m["grad_norm"]),
                      d_learning_rate=float(d_m.get("learning_rate", np.nan)))
        if self.stage == "warmup":
            # Scores of this step's rows before the update, read in the BT step's own forward.
            record.update(teacher_score=float(d_m["teacher_score"]),
                          student_score=float(d_m["student_score"]))
            if s >= int(self.config.gad.d_only_steps):
                rows = to_global(self.sft_rows(rollout), self.mesh)
                g_m = self.roles["student"].step("sft", rows)
                if finite is not None:
                    finite.add(s + 1, g_m, role="student")
                g_m = sh.to_host(g_m)
                record.update(sft_loss=float(g_m["loss"]), g_grad_norm=float(g_m["grad_norm"]),
                              g_learning_rate=float(g_m.get("learning_rate", np.nan)))
            times["time/g_update"] = time.perf_counter() - t2
        else:
            inject_fault(s + 1, point="after_d")  # tests: a kill between the two updates
            rows = self.updater.rows(self.pool, rollout)
            t3 = time.perf_counter()
            steps = self.updater.update(s, rows)
            if finite is not None:
                for m in steps:
                    finite.add(s + 1, m, role="student")
            g_m = mean_metrics(steps)
            for k in ("loss", "grad_norm", "learning_rate"):
                g_m[f"g_{k}"] = g_m.pop(k, float("nan"))
            record.update(g_m)
            times.update({"time/logprobs": t3 - t2, "time/g_update": time.perf_counter() - t3})
        record.update(times)
        return record, rollout


# ------------------------------------------------------------------------------------ run
def run(config: Any, workdir: str) -> dict[str, Any]:
    """Train one stage; returns the last logged metrics (and ``preempted`` / ``export`` /
    ``best`` entries)."""
    algo = GAD(config, workdir)
    g = config.gad
    ckpt = Checkpointer.from_config(os.path.join(workdir, "checkpoints"), config.checkpoint)
    finite = FiniteGuard.from_config(config, ckpt)
    resume_step = ckpt.latest_step() if config.checkpoint.resume else None
    meta = algo.build_roles(ckpt, resume_step)
    s0 = int(meta.get("step", 0)) if resume_step is not None else 0
    history = list(meta.get("evals", []))
    if algo.evaluator is not None:
        algo.evaluator.restore(history)
    every = int(config.checkpoint.every_steps)
    last: dict[str, Any] = {}
    preempted = early = False
    s = s0
    with ckpt, PreemptionGuard() as guard, MetricsWriter(
            workdir, total_steps=algo.num_steps, initial_step=s0,
            tensorboard=config.metrics.tensorboard, progress_bar=config.metrics.progress_bar,
            bar_keys=("d_acc", "student_score", "completion_length_mean")) as writer:
        for s in range(s0, algo.num_steps):
            record, rollout = algo.step(s, finite)
            step = s + 1
            last = writer.write(step, record)
            finite.check()  # before any save: never checkpoint or export a diverged state
            if algo.is_main and g.save_rollouts:
                if rollout.reward is None:  # warmup: no rewards, the responses only
                    rollout.reward = np.full(len(rollout), np.nan)
                    rollout.advantages = np.full(len(rollout), np.nan)
                save_rollout(os.path.join(workdir, "rollouts", f"rollout_{step:06d}.jsonl"),
                             algo.pool, rollout, step=step)
            for i in range(min(int(g.log_samples), len(rollout))):
                writer.write_text(step, "samples/response",
                                  f"{algo.pool.texts[rollout.prompt_index[i]]}{rollout.texts[i]}")
            stop = guard.should_stop(step)
            if (every > 0 and step % every == 0) or stop or step == algo.num_steps:
                if algo.evaluator is not None and not stop:
                    result = algo.evaluator(algo.roles["student"].params, step)
                    history.append(result)
                    last = writer.write(step, {f"eval/{k}": v for k, v in result.items()
                                               if k != "step"})
                    # Agreed: a judge that is an external service may answer each process
                    # differently, and both the export below and stopping are collective.
                    early = mh.broadcast_from_main(bool(algo.evaluator.should_stop()))
                algo.roles.save(ckpt, step, {"stage": algo.stage, "step": step,
                                             "prompt_offset": algo.prompt_offset,
                                             "evals": history, "time": time.time()})
                if algo.evaluator is not None and g.export_best and not stop and \
                        mh.broadcast_from_main(bool(algo.evaluator.improved)):
                    # Every process: the export gathers the sharded weights; process 0 writes.
                    algo.evaluator.export_best(algo.roles["student"].model(), algo.tokenizer)
            inject_fault(step)
            if stop or early:
                preempted = stop
                break
        ckpt.wait()
        ckpt.close()
        writer.flush()
    step = s + 1 if algo.num_steps > s0 else s0
    if preempted:
        log.warning("preempted: checkpoint of step %d saved to %s; rerun the same command to "
                    "resume", step, ckpt.directory)
        return {**last, "preempted": True, "step": step}
    out = {**last, "preempted": False, "step": step, "early_stopped": early}
    if algo.evaluator is not None and algo.evaluator.best is not None:
        out["best"] = algo.evaluator.best
    if config.checkpoint.export:  # every process: the export gathers the sharded weights
        from sgalm_jax.models import save_pretrained, save_score_model

        export_dir = os.path.join(workdir, "export")
        dtype = config.checkpoint.export_dtype or None
        save_pretrained(algo.roles["student"].model(), export_dir, tokenizer=algo.tokenizer,
                        dtype=dtype)
        d_dir = os.path.join(workdir, "export_discriminator")
        save_score_model(algo.roles["discriminator"].model(), d_dir, tokenizer=algo.tokenizer,
                         pad_token_id=algo.pad, dtype=dtype)
        log.info("exported the student (HF causal LM) to %s and the discriminator (HF "
                 "*ForSequenceClassification) to %s", export_dir, d_dir)
        out["export"], out["export_discriminator"] = export_dir, d_dir
        if algo.lora is not None:  # the merged exports above, and each adapter set in PEFT's
            out["export_adapter"] = algo.lora.export_adapter(  # format (D: SEQ_CLS + its head)
                algo.roles["student"].model(), os.path.join(workdir, "export_adapter"))
            out["export_discriminator_adapter"] = algo.lora.export_adapter(
                algo.roles["discriminator"].model(),
                os.path.join(workdir, "export_discriminator_adapter"))
    return out
