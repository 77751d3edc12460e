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
import numpy as np

from sgalm_jax import sharding as sh
from sgalm_jax.algorithms.distill_data import load_distill_pool, make_encoder
from sgalm_jax.algorithms.gad_data import ScorePass, discriminator_rows, teacher_sft_rows
from sgalm_jax.algorithms.gad_eval import CheckpointEval
# The config section, validation, roles and --compile-only programs; validate, programs and STAGES
# are part of this module's interface (gad.validate, ...).
from sgalm_jax.algorithms.gad_setup import (  # noqa: F401
    STAGES,
    add_steps,
    d_accum,
    declare_roles,
    programs,
    prompts_per_step,
    validate,
)
from sgalm_jax.algorithms.grpo_data import Rollout, rollout_prompts, save_rollout
from sgalm_jax.algorithms.grpo_update import (
    GRPOOptions,
    PolicyUpdate,
    length_metrics,
    mean_metrics,
    sample_rollout,
    set_advantages,
    to_global,
)
from sgalm_jax.errors import CheckpointError
from sgalm_jax.training import (
    Checkpointer,
    MetricsWriter,
    PreemptionGuard,
    inject_fault,
    split_model,
)
from sgalm_jax.training import multihost as mh
from sgalm_jax.training.finite import FiniteGuard
from sgalm_jax.training.lora_setup import mark_supported
from sgalm_jax.training.run_setup import setup_run

log = logging.getLogger(__name__)
mark_supported("gad")  # lora.enabled: roles built with LoraSetup (gad_lora)


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
        """Declare (:func:`declare_roles`) and build the roles: restored from this run's
        checkpoint ``resume_step``, or (GAD stage) student and discriminator from the warmup's
        checkpoint, or fresh."""
        cfg, g = self.config, self.config.gad
        roles, self.lora, self.g_graphdef, self.d_graphdef = declare_roles(
            cfg, self.mesh, self.mcfg, self._d_config()[0], stage=self.stage,
            beta=self.opts.beta, init_student=self._init_student,
            init_discriminator=self._init_discriminator)
        self.roles = roles

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

        add_steps(roles, cfg, self.g_graphdef, self.d_graphdef, self.opts, self.stage)
        self._make_tools()
        return meta

    def _make_tools(self) -> None:
        from sgalm_jax.sampling import Sampler
        from sgalm_jax.training.run_setup import sampler_options

        cfg, g = self.config, self.config.gad
        rb = int(g.rollout_batch_size)
        self.sampler = Sampler(self.g_graphdef, self.mcfg, pad_token_id=self.pad, mesh=self.mesh,
                               min_batch_bucket=rb // self.group if rb else self.prompts,
                               min_prompt_bucket=min(cfg.data.min_bucket,
                                                     self.encoder.max_prompt_tokens),
                               **sampler_options(cfg, rb or None))
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
