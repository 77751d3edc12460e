"""SGALM's setup: the ``sgalm`` config section, validation, the programs ``--compile-only``
compiles and the roles of each variant (:mod:`sgalm_jax.algorithms.sgalm` runs the loop).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sgalm_jax import sharding as sh
from sgalm_jax.algorithms.sgalm_steps import DScorer, GeneratorOptions, make_d_loss, make_g_loss
from sgalm_jax.config import FREE_FORM, register_section, validate_for_devices
from sgalm_jax.errors import ConfigError
from sgalm_jax.losses.sgalm import ADVANTAGES, GENERATOR_FORMS, GENERATOR_REWARDS
from sgalm_jax.sampling import Sampler
from sgalm_jax.training import Roles, copy_params, make_optimizer, split_model, trainable_mask
from sgalm_jax.training.aot import Program, abstract_batch, rows_fields
from sgalm_jax.training.aot import resident as aot_resident
from sgalm_jax.training.model_setup import build_model, model_config
from sgalm_jax.training.run_setup import sampler_options, tokenizer_source
from sgalm_jax.training.tokenizer import BUILTIN_TINY, LabelTokenIds

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


# ------------------------------------------------------------------------------------ AOT
def _worst_width(bucket: int, max_length: int) -> int:
    """The widest rows ``pad_rows`` makes for rows of up to ``max_length`` tokens."""
    width = max(int(bucket), 1)
    while width < max_length:
        width *= 2
    return width


def programs(config: Any, mesh: Any) -> list[Program]:
    """The programs a run compiles, at the largest shapes the config allows, with abstract
    arguments (``--compile-only``): the D and G train steps, the D scorer and the sampler's
    prefill and decode (prompts of up to ``data.max_length - 1`` tokens). The roles are the run's
    own (:func:`declare_roles`, LoRA included), built abstract."""
    s, b = config.sgalm, int(config.train.batch_size)
    mcfg = model_config(config.model)
    declared = declare_roles(config, mesh, mcfg, load=False, n_g=1000, n_d=1000)
    roles, graphdef = declared.roles, declared.graphdef
    roles.build_abstract()
    labels = LabelTokenIds(0, 1, (0,), (1,), False, "")  # token ids only matter as constants
    opts = GeneratorOptions.from_config(config)
    add_steps(roles, config, graphdef, labels, opts)
    gen, disc = roles["generator"], roles["discriminator"]
    width = _worst_width(s.length_bucket, int(config.data.max_length))
    half = b // 2
    steps_d, steps_g = active_steps(config)
    out: list[Program] = []

    def program(name: str, fn: Any, args: Any) -> Program:
        return Program(name, fn, args, resident=aot_resident(roles, args))

    if steps_d:
        fields = {**rows_fields(b, width), "is_real": ((b,), jnp.float32)}
        out.append(program(f"D step ({b} x {width})", disc.steps["d"],
                           disc.step_args(abstract_batch(mesh, fields))))
    if steps_g:
        fields = rows_fields(half, width, loss_mask=True)
        if opts.reward_source == "snapshot":
            fields["z_snapshot"] = ((half,), jnp.float32)
        else:
            fields.update(rows_fields(half, width, prefix="d_"))
        if opts.anchor_weight > 0:
            fields.update(rows_fields(half, width, prefix="a_", loss_mask=True))
        extra = (disc.params,) if opts.reward_source == "separate" else ()
        out.append(program(f"G step ({half} x {width})", gen.steps["g"],
                           gen.step_args(abstract_batch(mesh, fields), *extra)))
    score_rows = -(-int(s.score_batch_size) // sh.data_parallel_size(mesh)) * \
        sh.data_parallel_size(mesh)
    scorer = DScorer(graphdef, labels, mesh, batch_size=score_rows, bucket=s.length_bucket,
                     pad_id=0)
    out.append(program(f"D scorer ({score_rows} x {width})", scorer._fn,
                       (disc.params, abstract_batch(mesh, rows_fields(score_rows, width)))))
    sampler = Sampler(graphdef, mcfg, pad_token_id=0, mesh=mesh,
                      min_batch_bucket=int(s.sample_batch_size),
                      **sampler_options(config, int(s.sample_batch_size)))  # as the run does
    max_new = int(s.max_new_tokens) or int(config.data.max_length)
    for name, fn, args in sampler.abstract_programs(
            gen.params, rows=int(s.sample_batch_size),
            prompt_tokens=max(int(config.data.max_length) - 1, 1), max_new_tokens=max_new,
            temperature=float(s.temperature), top_k=int(s.top_k) or None,
            top_p=None if s.top_p >= 1 else float(s.top_p)):
        # the decode's args come from its compiled prefill; the resident state is the same
        out.append(Program(name, fn, args, resident=aot_resident(roles, (gen.params,))))
    return out


# ------------------------------------------------------------------------------------ roles
@dataclasses.dataclass
class DeclaredRoles:
    """What :func:`declare_roles` gives: the (unbuilt) roles, the graph both roles run, the two
    optimizers and schedules, and with ``lora.enabled`` the ``LoraSetup``."""

    roles: Roles
    graphdef: Any
    tx_g: Any
    lr_g: Any
    tx_d: Any
    lr_d: Any
    lora: Any = None


def declare_roles(config: Any, mesh: Any, mcfg: Any, *, load: bool, n_g: int, n_d: int
                  ) -> DeclaredRoles:
    """The generator and discriminator roles: one learner ``model`` reached by both names, or
    (``two_models``) two learners of the same graph, D starting as a copy of G. With LoRA: one
    frozen ``base`` and adapters on it (two adapter sets for ``two_models``; D's from another
    seed, so with B = 0 both start as the base model, as D starts as a copy of G). ``load``: read
    the start weights now (a fresh run) rather than their shapes; ``n_g``/``n_d``: optimizer
    steps of each role (the schedules' lengths)."""
    two = config.sgalm.variant == "two_models"
    roles = Roles(mesh)
    if config.lora.enabled:
        from sgalm_jax.models.lora import split_adapters
        from sgalm_jax.training.lora_setup import LoraSetup

        lora = LoraSetup(config, mesh, mcfg)
        own, _ = split_adapters(lora.abstract)
        tx_g, lr_g = make_optimizer(config.optimizer, num_steps=max(n_g, 1), params=own)
        tx_d, lr_d = (make_optimizer(config.optimizer, num_steps=max(n_d, 1), params=own)
                      if two else (tx_g, lr_g))
        lora.declare_base(roles)
        if two:
            lora.learner(roles, "generator", tx_g, schedule=lr_g, seed=config.seed)
            lora.learner(roles, "discriminator", tx_d, schedule=lr_d, seed=config.seed + 1)
        else:
            lora.learner(roles, "model", tx_g, schedule=lr_g, seed=config.seed)
            roles.alias("generator", "model")
            roles.alias("discriminator", "model")
        return DeclaredRoles(roles, lora.graphdef, tx_g, lr_g, tx_d, lr_d, lora)
    if load:
        model = build_model(config.model, mesh=mesh, seed=config.seed)
    else:
        from sgalm_jax.models import CausalLM

        model = nnx.eval_shape(lambda: CausalLM(mcfg, rngs=nnx.Rngs(0)))
    graphdef, params = split_model(model)
    del model
    tx_g, lr_g = make_optimizer(config.optimizer, num_steps=max(n_g, 1), params=params)
    tx_d, lr_d = (make_optimizer(config.optimizer, num_steps=max(n_d, 1), params=params)
                  if two else (tx_g, lr_g))
    pshard = sh.state_shardings(params, mesh)
    if two:
        roles.learner("generator", graphdef, params, tx_g, schedule=lr_g, seed=config.seed,
                      params_shardings=pshard)
        # Separate buffers: the steps donate their state, so D must not alias G's params.
        roles.learner("discriminator", graphdef, params, tx_d, schedule=lr_d,
                      seed=config.seed + 1, params_shardings=pshard,
                      init=lambda: copy_params(roles["generator"].params, pshard))
    else:
        roles.learner("model", graphdef, params, tx_g, schedule=lr_g, seed=config.seed,
                      params_shardings=pshard)
        roles.alias("generator", "model")
        roles.alias("discriminator", "model")
    return DeclaredRoles(roles, graphdef, tx_g, lr_g, tx_d, lr_d)


def add_steps(roles: Roles, config: Any, graphdef: Any, labels: LabelTokenIds,
              gen_opts: GeneratorOptions) -> None:
    """The D step ``d`` (on the discriminator role) and the G step ``g`` (on the generator)."""
    gen, disc = roles["generator"], roles["discriminator"]
    trainable = (trainable_mask(gen.own_params, config.optimizer.freeze)
                 if config.optimizer.freeze else None)
    common = dict(grad_accum_steps=config.train.grad_accum_steps,
                  compute_dtype=config.train.compute_dtype or None, trainable=trainable,
                  skip_nonfinite=config.train.nonfinite == "skip")
    disc.add_step("d", make_d_loss(graphdef, labels), **common)
    extra = (disc.model_shardings(),) if gen_opts.reward_source == "separate" else ()
    gen.add_step("g", make_g_loss(graphdef, labels, gen_opts), extra_shardings=extra, **common)
