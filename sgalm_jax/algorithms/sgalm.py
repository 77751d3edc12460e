"""SGALM: one LLM as generator and discriminator of a GAN-style game on a real dataset.

    python -m sgalm_jax.main --config configs/qwen3b_gsm8k.py --config.model.path=... \
        --config.workdir=runs/sgalm_gsm8k

For each of ``sgalm.iterations`` iterations t:

1. **Sample** ``sgalm.num_samples`` synthetic samples with a frozen snapshot of the current params:
   each from a ``sgalm.num_shots``-shot prompt of random real samples (format ``full``: the model
   writes a new sample; ``answer``: it answers a real question). The snapshot also scores every
   sample with the discriminator (``z_snapshot``), and the per-iteration diagnostics are logged.
   The samples are saved to ``workdir/samples/iter_NNN.jsonl`` before any training, so a resumed
   run reuses them instead of sampling again.
2. **Train** for ``rounds_per_iteration`` rounds of ``d_steps`` discriminator steps then ``g_steps``
   generator steps (the generic train step of :mod:`sgalm_jax.training`, RMSProp in the configs),
   over minibatches of ``train.batch_size / 2`` real and as many generated samples:

   - D step: ``L_D = mean_real softplus(-z) + mean_fake softplus(z)``, ``z = z_Real - z_Fake`` at the
     answer position of the discriminator prompt (:func:`sgalm_jax.losses.discriminator_loss`);
   - G step: ``L_G = -mean_j sg(A_j) log p(s_j | prompt_j)``, ``A = standardize(log D(s))`` over the
     minibatch (:func:`sgalm_jax.losses.generator_loss`); the reward's D runs on
     ``stop_gradient(params)`` (``reward_params='current'``) or is the snapshot's ``z``.

Variants (``sgalm.variant``): ``full``; ``d_only`` (no G steps); ``g_only`` (no D steps; the reward
is D frozen at the iteration start); ``two_models`` (separate G and D params and optimizer states,
the same steps). Roles (:mod:`sgalm_jax.training.roles`): one learner ``model`` reached as
``generator`` and ``discriminator``, or two learners of one graph for ``two_models``. Checkpoints
(Orbax, every role) are taken every ``checkpoint.every_steps`` updates, at the end of every
iteration and on SIGTERM; the metadata says where in the iteration to resume.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgalm_jax import sharding as sh
from sgalm_jax.algorithms import diagnostics as diag
from sgalm_jax.algorithms.sgalm_data import (
    Minibatches,
    Sample,
    SGALMData,
    load_samples,
    pad_rows,
    samples_path,
    save_samples,
)
from sgalm_jax.config import FREE_FORM, register_section, validate_for_devices
from sgalm_jax.errors import ConfigError
from sgalm_jax.losses.common import sequence_logprobs_from_hidden, shift_targets
from sgalm_jax.losses.sgalm import (
    ADVANTAGES,
    GENERATOR_FORMS,
    GENERATOR_REWARDS,
    discriminator_loss,
    discriminator_score_logits,
    generator_loss,
)
from sgalm_jax.sampling import Sampler
from sgalm_jax.training import (
    Checkpointer,
    MetricsWriter,
    PreemptionGuard,
    Roles,
    copy_params,
    inject_fault,
    make_optimizer,
    split_model,
    trainable_mask,
)
from sgalm_jax.training import multihost as mh
from sgalm_jax.training.finite import FiniteGuard
from sgalm_jax.training.model_setup import build_model, model_config
from sgalm_jax.training.run_setup import setup_run, tokenizer_source
from sgalm_jax.training.tokenizer import BUILTIN_TINY, LabelTokenIds

log = logging.getLogger(__name__)

VARIANTS = ("full", "d_only", "g_only", "two_models")
SAMPLE_FORMATS = ("full", "answer")
REWARD_PARAMS = ("current", "snapshot")

# This algorithm's config section (``--describe`` lists it; see sgalm_jax.config).
register_section("sgalm", {
    "variant": ("full", "full (one model is G and D), d_only (only D steps), g_only (only G "
                        "steps, rewarded by D frozen at the iteration start) or two_models "
                        "(separate G and D params and optimizer states)"),
    "sample_format": ("full", "full: the model writes a whole new sample (question and "
                              "answer); answer: it answers a real training question"),
    "iterations": (4, "outer iterations T: sample with a frozen snapshot, then train D and G"),
    "num_samples": (0, "synthetic samples generated per iteration; 0 = the size of the real "
                       "pool"),
    "num_shots": (4, "real samples shown in each generator prompt (in-context examples)"),
    "d_steps": (1, "discriminator steps per round (k_D)"),
    "g_steps": (1, "generator steps per round (k_G)"),
    "rounds_per_iteration": (0, "D/G rounds per iteration; 0 = one pass over the generated "
                                "samples (ceil(N_train / (train.batch_size / 2)))"),
    "heldout_size": (64, "real samples kept out of the pool, and generated samples kept out "
                         "of D's training, for the per-iteration diagnostics"),
    "final_samples": (-1, "samples generated after the last iteration for the final "
                          "diagnostics; -1 = sgalm.num_samples, 0 = none"),
    "max_new_tokens": (0, "longest generated sample in tokens; 0 = the 99th percentile of "
                          "the real samples' lengths plus 16"),
    "temperature": (1.0, "sampling temperature of the generator (0 = greedy)"),
    "top_p": (1.0, "nucleus sampling of the generator (1 = off)"),
    "top_k": (0, "top-k sampling of the generator (0 = off)"),
    "sample_batch_size": (64, "rows (prompts) per sampler call"),
    "score_batch_size": (32, "sequences per forward when scoring samples with D"),
    "reward": ("log_d", "generator reward from D: log_d, d or logit"),
    "generator_loss": ("score_function", "score_function (REINFORCE with the batch-"
                                         "standardised reward) or weighted_likelihood"),
    "advantage": ("standardize", "score function: standardize, center or raw reward"),
    "tau": (1.0, "weighted_likelihood: softmax temperature of the weights"),
    "length_normalize": (False, "generator loss on the per-token mean log-prob of a sample "
                                "instead of its sum"),
    "reward_params": ("current", "params of the D that rewards G steps: current (the params "
                                 "being trained, detached) or snapshot (frozen at the "
                                 "iteration start); g_only always uses snapshot"),
    "anchor_weight": (0.0, "weight of an SFT anchor (NLL of real samples under the "
                           "generator prompt) added to the generator loss; 0 = off"),
    "g_loss_weight": (1.0, "multiplier of the generator loss (lambda_G)"),
    "chat_template": (False, "wrap generator and discriminator prompts in the tokenizer's "
                             "chat template (the label then has no leading space)"),
    "prompts": ({}, f"{FREE_FORM} SGALMTemplates fields overriding the default prompts, "
                    "e.g. {'real_word': 'Human', 'fake_word': 'Model'}"),
    "task_options": ({}, f"{FREE_FORM} keyword arguments of the task, e.g. "
                         "{'max_value': 99} for arithmetic"),
    "length_bucket": (64, "shortest padded length of D/G batches; longer ones pad to this "
                          "times the next power of two"),
    "logprob_chunk_size": (256, "generator loss: log-probs from hidden states in chunks of "
                                "this many positions (no [B, T, vocab] logits)"),
    "log_samples": (4, "generated samples per iteration also written as TensorBoard text"),
}, owner=__name__)


# ------------------------------------------------------------------------------------ validation
def validate(config: Any) -> None:
    """SGALM-specific checks before anything is compiled; ConfigError naming the key."""
    from sgalm_jax.data import list_tasks

    mcfg = model_config(config.model)
    if config.lora.enabled:
        from sgalm_jax.training.lora_setup import validate as validate_lora

        validate_lora(config, mcfg)
    tok = tokenizer_source(config)
    if not tok:
        raise ConfigError("tokenizer.path: no tokenizer; set tokenizer.path (a directory, or "
                          f"{BUILTIN_TINY!r} for tiny random models)")
    if tok != BUILTIN_TINY and not os.path.isdir(tok):
        raise ConfigError(f"tokenizer.path: {tok!r} is not a directory")
    if not config.data.task:
        raise ConfigError("data.task: SGALM needs a task (its samples are task examples; e.g. "
                          "gsm8k, arithmetic, mbpp, arc_challenge)")
    if config.data.task.strip().lower().replace("-", "_") not in list_tasks():
        raise ConfigError(f"data.task: unknown task {config.data.task!r}; known: {list_tasks()}")
    if config.data.data_dir and not os.path.exists(config.data.data_dir):
        raise ConfigError(f"data.data_dir: {config.data.data_dir!r} does not exist")
    s = config.sgalm
    for key, choices in (("variant", VARIANTS), ("sample_format", SAMPLE_FORMATS),
                         ("reward", GENERATOR_REWARDS), ("generator_loss", GENERATOR_FORMS),
                         ("advantage", ADVANTAGES), ("reward_params", REWARD_PARAMS)):
        if s[key] not in choices:
            raise ConfigError(f"sgalm.{key}: {s[key]!r} is not one of {list(choices)}")
    for key in ("iterations", "num_shots", "sample_batch_size", "score_batch_size",
                "length_bucket", "logprob_chunk_size"):
        if s[key] < 1:
            raise ConfigError(f"sgalm.{key}: must be >= 1, got {s[key]}")
    for key in ("num_samples", "d_steps", "g_steps", "rounds_per_iteration", "heldout_size",
                "max_new_tokens", "top_k", "log_samples", "anchor_weight"):
        if s[key] < 0:
            raise ConfigError(f"sgalm.{key}: must be >= 0, got {s[key]}")
    if s.final_samples < -1:
        raise ConfigError(f"sgalm.final_samples: must be >= -1, got {s.final_samples}")
    if s.temperature < 0 or not 0 < s.top_p <= 1 or s.tau <= 0:
        raise ConfigError("sgalm.temperature: must be >= 0 (and sgalm.top_p in (0, 1], "
                          "sgalm.tau > 0)")
    if s.d_steps + s.g_steps == 0:
        raise ConfigError("sgalm.d_steps: d_steps and g_steps are both 0")
    steps_d, steps_g = active_steps(config)
    if steps_d + steps_g == 0:
        raise ConfigError(f"sgalm.variant: {s.variant!r} with d_steps={s.d_steps}, "
                          f"g_steps={s.g_steps} trains nothing")
    b = config.train.batch_size
    if b % 2:
        raise ConfigError(f"train.batch_size: {b} must be even (half real, half generated)")
    sizes = validate_for_devices(config, jax.device_count(), jax.process_count())
    dp = sizes["data"] * sizes["fsdp"]
    half = b // 2 // config.train.grad_accum_steps
    if (b // 2) % config.train.grad_accum_steps or half % dp:
        raise ConfigError(
            f"train.batch_size: the generator step's {b // 2} rows (half of train.batch_size) "
            f"over train.grad_accum_steps={config.train.grad_accum_steps} micro-batches must "
            f"divide by the data-parallel size {dp}")


def active_steps(config: Any) -> tuple[int, int]:
    """(D steps, G steps) per round for the variant."""
    s = config.sgalm
    d = 0 if s.variant == "g_only" else int(s.d_steps)
    g = 0 if s.variant == "d_only" else int(s.g_steps)
    return d, g


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

        self._fn = jax.jit(z_fn)

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


# ------------------------------------------------------------------------------------ the run
class SGALM:
    """The SGALM loop's state and pieces; :func:`run` drives it. Reused by the demo."""

    def __init__(self, config: Any, workdir: str):
        self.config, self.workdir = config, workdir
        s = config.sgalm
        setup = setup_run(config, workdir)
        self.mesh, self.tokenizer = setup.mesh, setup.tokenizer
        self.mcfg, self.eos, self.pad = setup.model_config, setup.eos_id, setup.pad_id
        self.data = SGALMData(config, self.tokenizer, eos_id=self.eos)
        top = max(max(r) for r in self.data.real_d_ids)
        if top >= self.mcfg.vocab_size:
            raise ConfigError(f"tokenizer.path: token id {top} is outside the model's vocabulary "
                              f"({self.mcfg.vocab_size}); the tokenizer does not match the model")
        self.num_samples = int(s.num_samples) or len(self.data.pool)
        self.heldout_fakes = min(int(s.heldout_size), self.num_samples // 4)
        self.half = config.train.batch_size // 2
        self.steps_d, self.steps_g = active_steps(config)
        per_round = self.steps_d + self.steps_g
        train_fakes = self.num_samples - self.heldout_fakes
        self.rounds = int(s.rounds_per_iteration) or max(1, math.ceil(train_fakes / self.half))
        self.per_iter = self.rounds * per_round
        self.total_updates = int(s.iterations) * self.per_iter
        self.max_new_tokens = int(s.max_new_tokens) or self.data.p99_length + 16
        self.gen_opts = GeneratorOptions.from_config(config)
        self.lora = None  # a LoraSetup with lora.enabled
        log.info("SGALM %s: %d iterations x %d rounds x (%d D + %d G steps); %d samples per "
                 "iteration (%d held out), up to %d new tokens; %d real samples (+%d held out)",
                 s.variant, s.iterations, self.rounds, self.steps_d, self.steps_g,
                 self.num_samples, self.heldout_fakes, self.max_new_tokens,
                 len(self.data.pool), len(self.data.heldout))

    # ---------------------------------------------------------------- roles
    def build_roles(self, ckpt: Checkpointer, resume_step: int | None
                    ) -> tuple[Roles, dict[str, Any]]:
        """The generator and discriminator roles: one learner ``model`` reached by both names,
        or (``two_models``) two learners of the same graph, D starting as a copy of G. Restored
        from checkpoint ``resume_step`` when given."""
        cfg = self.config
        two = cfg.sgalm.variant == "two_models"
        if cfg.lora.enabled:
            return self._build_lora_roles(ckpt, resume_step)
        if resume_step is None:
            model = build_model(cfg.model, mesh=self.mesh, seed=cfg.seed)
        else:
            from sgalm_jax.models import CausalLM

            model = nnx.eval_shape(lambda: CausalLM(self.mcfg, rngs=nnx.Rngs(0)))
        graphdef, params = split_model(model)
        del model
        n_g = int(cfg.sgalm.iterations) * self.rounds * (self.steps_g if two else
                                                         self.steps_d + self.steps_g)
        n_d = int(cfg.sgalm.iterations) * self.rounds * self.steps_d
        self.tx_g, self.lr_g = make_optimizer(cfg.optimizer, num_steps=max(n_g, 1), params=params)
        self.tx_d, self.lr_d = (make_optimizer(cfg.optimizer, num_steps=max(n_d, 1),
                                               params=params) if two else (self.tx_g, self.lr_g))
        pshard = sh.state_shardings(params, self.mesh)
        roles = Roles(self.mesh)
        if two:
            roles.learner("generator", graphdef, params, self.tx_g, schedule=self.lr_g,
                          seed=cfg.seed, params_shardings=pshard)
            # Separate buffers: the steps donate their state, so D must not alias G's params.
            roles.learner("discriminator", graphdef, params, self.tx_d, schedule=self.lr_d,
                          seed=cfg.seed + 1, params_shardings=pshard,
                          init=lambda: copy_params(roles["generator"].params, pshard))
        else:
            roles.learner("model", graphdef, params, self.tx_g, schedule=self.lr_g,
                          seed=cfg.seed, params_shardings=pshard)
            roles.alias("generator", "model")
            roles.alias("discriminator", "model")
        meta = roles.build(ckpt, resume_step)
        if resume_step is not None:
            log.info("resumed from %s at update %d (iteration %d, step %d of %d)", ckpt.directory,
                     resume_step, meta.get("iteration", 0), meta.get("iter_step", 0),
                     self.per_iter)
        self.graphdef = graphdef
        return roles, meta

    def _build_lora_roles(self, ckpt: Checkpointer, resume_step: int | None
                          ) -> tuple[Roles, dict[str, Any]]:
        """LoRA: one frozen ``base``; ``model`` (adapters on it, reached as generator and
        discriminator), or for ``two_models`` two adapter sets on the same base (D's adapters from
        another seed; with B = 0 both start as the base model, as D starts as a copy of G)."""
        from sgalm_jax.models.lora import split_adapters
        from sgalm_jax.training.lora_setup import LoraSetup

        cfg = self.config
        two = cfg.sgalm.variant == "two_models"
        self.lora = LoraSetup(cfg, self.mesh, self.mcfg)
        own, _ = split_adapters(self.lora.abstract)
        n_g = int(cfg.sgalm.iterations) * self.rounds * (self.steps_g if two else
                                                         self.steps_d + self.steps_g)
        n_d = int(cfg.sgalm.iterations) * self.rounds * self.steps_d
        self.tx_g, self.lr_g = make_optimizer(cfg.optimizer, num_steps=max(n_g, 1), params=own)
        self.tx_d, self.lr_d = (make_optimizer(cfg.optimizer, num_steps=max(n_d, 1), params=own)
                                if two else (self.tx_g, self.lr_g))
        roles = Roles(self.mesh)
        self.lora.declare_base(roles)
        if two:
            self.lora.learner(roles, "generator", self.tx_g, schedule=self.lr_g, seed=cfg.seed)
            self.lora.learner(roles, "discriminator", self.tx_d, schedule=self.lr_d,
                              seed=cfg.seed + 1)
        else:
            self.lora.learner(roles, "model", self.tx_g, schedule=self.lr_g, seed=cfg.seed)
            roles.alias("generator", "model")
            roles.alias("discriminator", "model")
        meta = roles.build(ckpt, resume_step)
        self.graphdef = self.lora.graphdef
        return roles, meta

    def make_steps(self, roles: Roles) -> None:
        """The D step (on the discriminator role) and the G step (on the generator role)."""
        cfg = self.config
        gen, disc = roles["generator"], roles["discriminator"]
        trainable = (trainable_mask(gen.own_params, cfg.optimizer.freeze)
                     if cfg.optimizer.freeze else None)
        common = dict(grad_accum_steps=cfg.train.grad_accum_steps,
                      compute_dtype=cfg.train.compute_dtype or None, trainable=trainable,
                      skip_nonfinite=cfg.train.nonfinite == "skip")
        labels = self.data.labels
        disc.add_step("d", make_d_loss(self.graphdef, labels), **common)
        extra = (disc.model_shardings(),) if self.gen_opts.reward_source == "separate" else ()
        gen.add_step("g", make_g_loss(self.graphdef, labels, self.gen_opts),
                     extra_shardings=extra, **common)
        self.sampler = Sampler(self.graphdef, self.mcfg, pad_token_id=self.pad, mesh=self.mesh,
                               min_batch_bucket=int(cfg.sgalm.sample_batch_size))
        self.scorer = DScorer(self.graphdef, labels, self.mesh,
                              batch_size=cfg.sgalm.score_batch_size,
                              bucket=cfg.sgalm.length_bucket, pad_id=self.pad)

    # ---------------------------------------------------------------- sampling + diagnostics
    def sample(self, g_params: Any, d_params: Any, num: int, tag: Any, heldout: int
               ) -> list[Sample]:
        s = self.config.sgalm
        start = time.perf_counter()
        samples = self.data.generate(
            self.sampler, g_params, num, rng_seed=(self.config.seed, 1, zlib.crc32(str(tag).encode())),
            max_new_tokens=self.max_new_tokens, temperature=float(s.temperature),
            top_p=float(s.top_p), top_k=int(s.top_k), batch_size=int(s.sample_batch_size),
            heldout=heldout, progress=self.config.metrics.progress_bar)
        z = self.scorer(d_params, [self.data.d_ids(x.text) for x in samples])
        for x, zi in zip(samples, z):
            x.z_snapshot = float(zi)
        log.info("sampled %d samples (%s) in %.1fs", num, tag, time.perf_counter() - start)
        return samples

    def diagnostics(self, d_params: Any, samples: list[Sample], prefix: str = "diag/"
                    ) -> dict[str, float]:
        """Mean D on held-out / training reals and on the samples, D's balanced accuracy on
        held-out reals vs held-out samples, the fake-score alarm, validity and diversity."""
        data = self.data
        n = len(data.heldout)
        z_held = self.scorer(d_params, data.heldout_d_ids) if n else np.zeros(0)
        z_train = self.scorer(d_params, data.real_d_ids[:max(n, 1)])
        z_fake = np.asarray([x.z_snapshot for x in samples], np.float64)
        held = [i for i, x in enumerate(samples) if x.heldout] or list(range(len(samples)))
        zf_held = z_fake[held]
        texts = [x.text for x in samples]
        out = {
            "d_heldout_real": float(sigmoid(z_held).mean()) if n else float("nan"),
            "d_train_real": float(sigmoid(z_train).mean()),
            "d_fake": float(sigmoid(z_fake).mean()),
            "d_heldout_fake": float(sigmoid(zf_held).mean()),
            "d_acc_heldout": balanced_accuracy(z_held, zf_held),
            "well_formed": float(np.mean([x.well_formed for x in samples])),
            "stopped": float(np.mean([x.stopped for x in samples])),
            "sample_tokens": float(np.mean([len(x.completion_ids) for x in samples])),
        }
        out["fake_alarm"] = float(out["d_fake"] < 0.1)
        valid = [x.valid for x in samples if x.valid is not None]
        if valid:
            out["validity"] = float(np.mean(valid))
        out.update(diag.diversity(texts, data.real_texts))
        return {prefix + k: v for k, v in out.items()}

    def end_of_iteration(self, d_params: Any, samples: list[Sample]) -> dict[str, float]:
        """D on held-out reals and held-out samples after this iteration's D steps."""
        held = [x for x in samples if x.heldout] or samples
        z_fake = self.scorer(d_params, [self.data.d_ids(x.text) for x in held])
        z_real = self.scorer(d_params, self.data.heldout_d_ids) if self.data.heldout else []
        z_real = np.asarray(z_real)
        return {"diag/end_d_heldout_real": float(sigmoid(z_real).mean()) if z_real.size else
                float("nan"),
                "diag/end_d_heldout_fake": float(sigmoid(z_fake).mean()),
                "diag/end_d_acc_heldout": balanced_accuracy(z_real, z_fake)}

    # ---------------------------------------------------------------- batches
    def d_batch(self, samples: list[Sample], mb: Minibatches, index: int) -> dict[str, Any]:
        fakes = [samples[i] for i in mb.fakes(index)]
        reals = mb.reals(index)
        rows = [self.data.real_d_ids[i] for i in reals] + [self.data.d_ids(x.text) for x in fakes]
        batch = pad_rows(rows, bucket=self.config.sgalm.length_bucket, pad_id=self.pad)
        batch["is_real"] = np.asarray([1.0] * len(reals) + [0.0] * len(fakes), np.float32)
        return batch

    def g_batch(self, samples: list[Sample], mb: Minibatches, index: int) -> dict[str, Any]:
        bucket = self.config.sgalm.length_bucket
        fakes = [samples[i] for i in mb.fakes(index, stream=2)]
        rows, masks = zip(*(self.data.g_row(x.prompt, x.completion_ids) for x in fakes))
        batch = pad_rows(rows, loss_masks=masks, bucket=bucket, pad_id=self.pad)
        if self.gen_opts.reward_source == "snapshot":
            batch["z_snapshot"] = np.asarray([x.z_snapshot for x in fakes], np.float32)
        else:
            batch.update(pad_rows([self.data.d_ids(x.text) for x in fakes], bucket=bucket,
                                  pad_id=self.pad, prefix="d_"))
        if self.gen_opts.anchor_weight > 0:
            reals = mb.reals(index, stream=3)
            arows, amasks = zip(*(self.data.g_row(x.prompt, self.data.real_sample_ids[r])
                                  for x, r in zip(fakes, reals)))
            batch.update(pad_rows(arows, loss_masks=amasks, bucket=bucket, pad_id=self.pad,
                                  prefix="a_"))
        return batch


def _d_metrics(m: dict[str, Any]) -> dict[str, Any]:
    m = dict(m)
    m.pop("loss", None)
    m["d_grad_norm"] = m.pop("grad_norm")
    if "learning_rate" in m:
        m["d_lr"] = m.pop("learning_rate")
    return m


def _g_metrics(m: dict[str, Any]) -> dict[str, Any]:
    m = dict(m)
    m.pop("loss", None)
    m["g_reward_d"] = m.pop("d_fake")
    m["g_grad_norm"] = m.pop("grad_norm")
    if "learning_rate" in m:
        m["g_lr"] = m.pop("learning_rate")
    return m


def _fmt(record: dict[str, Any], keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k.split('/')[-1]} {record[k]:.3f}" for k in keys
                     if k in record and isinstance(record[k], float) and not math.isnan(record[k]))


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Train; returns the last diagnostics (and ``preempted`` / ``export`` entries)."""
    algo = SGALM(config, workdir)
    s = config.sgalm
    ckpt = Checkpointer.from_config(os.path.join(workdir, "checkpoints"), config.checkpoint)
    finite = FiniteGuard.from_config(config, ckpt)
    resume_step = ckpt.latest_step() if config.checkpoint.resume else None
    roles, meta = algo.build_roles(ckpt, resume_step)
    algo.make_steps(roles)
    gen, disc = roles["generator"], roles["discriminator"]

    t = int(meta.get("iteration", 0))
    i0 = int(meta.get("iter_step", 0))
    if i0 >= algo.per_iter:
        t, i0 = t + 1, 0
    iterations = int(s.iterations)
    out: dict[str, Any] = {}
    preempted = False
    u = t * algo.per_iter + i0
    with ckpt, PreemptionGuard() as guard, MetricsWriter(
            workdir, total_steps=algo.total_updates, initial_step=u,
            tensorboard=config.metrics.tensorboard, progress_bar=config.metrics.progress_bar,
            bar_keys=("d_loss", "d_acc", "g_loss")) as writer:
        while t < iterations and not preempted:
            path = samples_path(workdir, t)
            resumed = mh.exists(path)  # process 0's view: every process takes one branch
            if resumed:
                samples = load_samples(path)
                log.info("iteration %d: reusing the %d samples of %s", t, len(samples), path)
            else:
                samples = algo.sample(gen.params, disc.params, algo.num_samples, t,
                                      algo.heldout_fakes)
                save_samples(path, samples)
            if not (resumed and i0 > 0):  # the iteration-start diagnostics (once per iteration)
                rec = algo.diagnostics(disc.params, samples)
                rec["diag/iteration"] = t
                out = writer.write(u, rec)
                print(f"iteration {t} start: " + _fmt(out, ("diag/d_acc_heldout",
                      "diag/d_heldout_real", "diag/d_fake", "diag/validity", "diag/well_formed",
                      "diag/distinct_2")), flush=True)
                if rec["diag/fake_alarm"]:
                    log.warning("fake-score alarm: mean D on this iteration's samples is %.3f < "
                                "0.1; D has won and the generator's reward is nearly flat",
                                rec["diag/d_fake"])
                for x in samples[:s.log_samples]:
                    writer.write_text(u, f"samples/iter_{t:03d}", x.text)
            train = [x for x in samples if not x.heldout]
            mb = Minibatches(len(train), len(algo.data.pool), algo.half, config.seed, t)
            per_round = algo.steps_d + algo.steps_g
            for i in range(i0, algo.per_iter):
                rnd, within = divmod(i, per_round)
                if within < algo.steps_d:
                    batch = algo.d_batch(train, mb, rnd * algo.steps_d + within)
                    m = disc.step("d", to_global(batch, algo.mesh))
                    finite.add(u + 1, m, role="discriminator")
                    m = _d_metrics(jax.device_get(m))
                else:
                    batch = algo.g_batch(train, mb, rnd * algo.steps_g + within - algo.steps_d)
                    extra = (disc.params,) if algo.gen_opts.reward_source == "separate" else ()
                    m = gen.step("g", to_global(batch, algo.mesh), *extra)
                    finite.add(u + 1, m, role="generator")
                    m = _g_metrics(jax.device_get(m))
                u += 1
                if u % config.train.log_every == 0 or i + 1 == algo.per_iter:
                    m["iteration"] = t
                    writer.write(u, m)
                finite.check()  # every update (its metrics are on the host already)
                stop = guard.should_stop(u)
                if ckpt.should_save(u) or stop or i + 1 == algo.per_iter:
                    roles.save(ckpt, u, {"iteration": t, "iter_step": i + 1, "update": u,
                                         "time": time.time()})
                inject_fault(u)
                if stop:
                    preempted = True
                    break
            if preempted:
                break
            rec = algo.end_of_iteration(disc.params, samples)
            rec["diag/iteration"] = t
            out.update(writer.write(u, rec))
            print(f"iteration {t} end: " + _fmt(rec, ("diag/end_d_acc_heldout",
                  "diag/end_d_heldout_real", "diag/end_d_heldout_fake")), flush=True)
            t, i0 = t + 1, 0
        ckpt.wait()
        ckpt.close()
        if preempted:
            writer.flush()
            log.warning("preempted: checkpoint of update %d saved to %s; rerun the same command "
                        "to resume", u, ckpt.directory)
            return {**out, "preempted": True, "update": u}
        n_final = algo.num_samples if s.final_samples < 0 else int(s.final_samples)
        if n_final:
            final = algo.sample(gen.params, disc.params, n_final, "final",
                                min(algo.heldout_fakes, n_final // 4))
            save_samples(samples_path(workdir, "final"), final)
            rec = algo.diagnostics(disc.params, final)
            rec["diag/iteration"] = iterations
            out.update(writer.write(u, rec))
            print("after training: " + _fmt(out, ("diag/d_acc_heldout", "diag/d_heldout_real",
                  "diag/d_fake", "diag/validity", "diag/well_formed", "diag/distinct_2")),
                  flush=True)
        writer.flush()
    out.update({"preempted": False, "update": u})
    if config.checkpoint.export:
        from sgalm_jax.models import save_pretrained

        export_dir = os.path.join(workdir, "export")
        save_pretrained(gen.model(), export_dir,  # LoRA: merged weights
                        tokenizer=algo.tokenizer, dtype=config.checkpoint.export_dtype or None)
        out["export"] = export_dir
        if algo.lora is not None:
            out["export_adapter"] = algo.lora.export_adapter(
                gen.model(), os.path.join(workdir, "export_adapter"))
        if not roles.same("generator", "discriminator"):
            save_pretrained(disc.model(),
                            os.path.join(workdir, "export_discriminator"),
                            tokenizer=algo.tokenizer,
                            dtype=config.checkpoint.export_dtype or None)
            if algo.lora is not None:
                algo.lora.export_adapter(disc.model(),
                                         os.path.join(workdir, "export_discriminator_adapter"))
        log.info("exported the generator in HF format to %s", export_dir)
    return out
