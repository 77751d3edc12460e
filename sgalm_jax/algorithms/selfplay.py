"""The iterative self-play loop (SPIN's protocol) with any self-play loss from the registry.

Iteration t, with θ_t the current params (θ_0 = ``model.path`` / ``model.init``):

1. **Generate** ``selfplay.num_samples`` (K) synthetic responses y' ~ π_θt per training prompt with
   the sampler, in chunks of ``selfplay.generation_batch_size`` prompts; each chunk is saved to
   ``workdir/selfplay/iter_NNN/gen_CCCCC.npz``, so a killed run resumes generation where it was.
2. **Score once**: one pass of :class:`~sgalm_jax.algorithms.scoring.SequenceScorer` computes the
   reference log-probs ℓ_θt of every real response, of the new synthetic responses and (with
   ``selfplay.mix_previous``) of the previous iteration's synthetic responses. They are stored with
   the data in ``iter_NNN/data.npz``; training never runs the reference model, so no second copy
   of the weights is on the devices. (``REFERENCE_PASSES`` counts these passes per iteration, and
   ``selfplay/events.jsonl`` records each one.)
3. **α_t** for losses that take ``alpha`` (IRIS): constant, linear/cosine over the iterations, or
   adaptive from the measured gap (:mod:`sgalm_jax.losses.selfplay`); it is passed to the jitted
   step as an array, so a new value does not recompile.
4. **Train** θ_{t+1} from θ_t (fresh optimizer state; learning rate ``selfplay.lr_per_iteration``)
   on rows (prompt, real, K synthetic) with ``selfplay.loss`` picked by name from the loss registry
   (``register_loss(..., family="selfplay")``; ``selfplay.loss_module`` imports a researcher's
   module first). From iteration 1 on, SPIN's protocol also trains on the previous iteration's
   synthetic responses (re-scored under θ_t).
5. **Checkpoint** (Orbax; meta: iteration and step within it), export optionally, and run the
   evaluation hook (the ``eval`` section's GSM8K / ARC / MBPP via
   :class:`~sgalm_jax.algorithms.eval.Evaluator`), writing ``workdir/eval/iter_NNN/``.

Resume: the latest checkpoint gives (iteration, step); a finished iteration's data is reloaded,
never regenerated or re-scored; a half-generated iteration continues at its next chunk.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import time
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sgalm_jax import sharding as sh
from sgalm_jax.algorithms.scoring import SequenceScorer
from sgalm_jax.algorithms.selfplay_data import (
    IterationData,
    PairBatches,
    PromptSet,
    atomic_savez,
    load_prompt_set,
    synthetic_rows,
)
from sgalm_jax.config import FREE_FORM, register_section
from sgalm_jax.errors import ConfigError
from sgalm_jax.losses.common import causal_lm_logprobs, sequence_logprobs_from_hidden, shift_targets
from sgalm_jax.training import multihost as mh
from sgalm_jax.training.finite import FiniteGuard
from sgalm_jax.training.run_setup import setup_run
from sgalm_jax.training import (
    Checkpointer,
    MetricsWriter,
    PreemptionGuard,
    Roles,
    StepTimer,
    inject_fault,
    make_optimizer,
    merge_model,
    model_loss,
    split_model,
    trainable_mask,
)

log = logging.getLogger(__name__)

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

# Reference log-prob passes run by this process, per iteration (tests count them).
REFERENCE_PASSES: dict[int, int] = {}


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


# ------------------------------------------------------------------------------------ the run
class _Run:
    """State and steps of one self-play run (see the module docstring)."""

    def __init__(self, config: Any, workdir: str):
        from sgalm_jax.sampling import Sampler

        self.config, self.workdir = config, workdir
        sp = config.selfplay
        setup = setup_run(config, workdir)
        self.mesh, self.is_main, self.tokenizer = setup.mesh, setup.is_main, setup.tokenizer
        self.mcfg, self.eos, self.pad = setup.model_config, setup.eos_id, setup.pad_id
        self.data: PromptSet = load_prompt_set(config, self.tokenizer, eos_id=self.eos,
                                               vocab_size=self.mcfg.vocab_size)
        self.fingerprint = self.data.fingerprint()
        n = len(self.data)
        self.steps = [steps_per_iteration(n, config, t) for t in range(sp.iterations)]
        self.offsets = [0] + [int(x) for x in np.cumsum(self.steps)]
        log.info("%d prompts; %d iterations of %s steps (loss %s)", n, sp.iterations, self.steps,
                 sp.loss)
        self.loss_fn, self.takes_alpha = resolve_loss(config)
        self.sampler_cls = Sampler
        self.ckpt = Checkpointer.from_config(os.path.join(workdir, "checkpoints"),
                                             config.checkpoint)
        self.finite = FiniteGuard.from_config(config, self.ckpt)
        self.roles: Roles | None = None
        self.lora = None  # a LoraSetup with lora.enabled
        self._evaluator = None
        self.scorer = None
        self.sampler = None

    # ---------------------------------------------------------------- paths and events
    def iter_dir(self, t: int) -> str:
        return os.path.join(self.workdir, "selfplay", f"iter_{t:03d}")

    def event(self, name: str, **fields: Any) -> None:
        """Append to ``workdir/selfplay/events.jsonl`` (what happened when; tests read it)."""
        if not self.is_main:
            return
        path = os.path.join(self.workdir, "selfplay", "events.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"event": name, "time": round(time.time(), 3), **fields}) + "\n")

    # ---------------------------------------------------------------- params and optimizer
    def optimizer(self, t: int, params: Any):
        opt = types.SimpleNamespace(**{**self.config.optimizer.to_dict(),
                                       "learning_rate": learning_rate(self.config, t)})
        return make_optimizer(opt, num_steps=self.steps[t], params=params)

    def abstract_params(self):
        from flax import nnx

        from sgalm_jax.models import CausalLM

        abstract_model = nnx.eval_shape(lambda: CausalLM(self.mcfg, rngs=nnx.Rngs(0)))
        return split_model(abstract_model)

    def build_roles(self, latest: int | None) -> dict[str, Any]:
        """The ``policy`` learner (θ_t while iteration t trains) and its ``reference`` view: the
        policy as it is when an iteration starts, scored once before any step of that iteration
        (no second copy on the devices). Restored from checkpoint ``latest`` when given."""
        from sgalm_jax.training.model_setup import build_model

        config = self.config
        self.roles = Roles(self.mesh)
        if config.lora.enabled:  # the policy is adapters on a frozen base (its view reads both)
            from sgalm_jax.models.lora import split_adapters
            from sgalm_jax.training.lora_setup import LoraSetup

            self.lora = LoraSetup(config, self.mesh, self.mcfg)
            self.graphdef = self.lora.graphdef
            tx, schedule = self.optimizer(0, split_adapters(self.lora.abstract)[0])
            self.lora.declare_base(self.roles)
            self.lora.learner(self.roles, "policy", tx, schedule=schedule, seed=config.seed)
            self.roles.view("reference", of="policy")
            return self.roles.build(self.ckpt, latest)
        if latest is None:
            model = build_model(config.model, mesh=self.mesh, seed=config.seed)
            self.graphdef, params = split_model(model)
            del model
        else:
            self.graphdef, params = self.abstract_params()
        # The optimizer's state has the same structure in every iteration (only the LR differs).
        tx, schedule = self.optimizer(0, params)
        self.roles.learner("policy", self.graphdef, params, tx, schedule=schedule, seed=config.seed)
        self.roles.view("reference", of="policy")
        return self.roles.build(self.ckpt, latest)

    def train_step_name(self, t: int) -> str:
        """Add (once per learning rate and length) the policy's train step for iteration t."""
        name = f"selfplay_lr{learning_rate(self.config, t)!r}_n{self.steps[t]}"
        cfg, policy = self.config, self.roles["policy"]
        policy.add_step(
            name, make_selfplay_loss(self.graphdef, self.loss_fn, takes_alpha=self.takes_alpha,
                                     chunk_size=cfg.selfplay.logprob_chunk_size),
            extra_shardings=(sh.replicated(self.mesh),),
            grad_accum_steps=cfg.train.grad_accum_steps,
            compute_dtype=cfg.train.compute_dtype or None,
            trainable=trainable_mask(policy.own_params, cfg.optimizer.freeze)
            if cfg.optimizer.freeze
            else None, skip_nonfinite=self.finite.skip)
        return name

    def ensure_tools(self) -> None:
        if self.sampler is None:
            sp, n = self.config.selfplay, len(self.data)
            self.sampler = self.sampler_cls(self.graphdef, self.mcfg, pad_token_id=self.pad,
                                            min_batch_bucket=min(sp.generation_batch_size, n),
                                            mesh=self.mesh)
            self.scorer = SequenceScorer(self.graphdef, mesh=self.mesh,
                                         batch_size=sp.ref_batch_size,
                                         min_bucket=self.config.data.min_bucket,
                                         max_length=self.config.data.max_length, pad_id=self.pad,
                                         chunk_size=sp.logprob_chunk_size,
                                         compute_dtype=self.config.train.compute_dtype or None)

    # ---------------------------------------------------------------- generation + reference
    def prepare_iteration(self, t: int, params: Any, guard: PreemptionGuard) -> IterationData | None:
        """Iteration t's data: loaded if stored, else generated (resumable) and scored once.
        None when preempted during generation."""
        path = os.path.join(self.iter_dir(t), "data.npz")
        n, k = len(self.data), self.config.selfplay.num_samples
        if mh.exists(path):  # process 0's view, so that every process takes the same branch
            data = IterationData.load(path)
            if data.meta.get("fingerprint") != self.fingerprint or data.num_samples != k:
                raise ConfigError(f"{path}: stored for other prompts or another num_samples; use a "
                                  "new workdir (or delete workdir/selfplay) after changing the data")
            log.info("iteration %d: reusing the stored synthetic data and reference log-probs", t)
            self.event("reuse", iteration=t)
            return data
        self.ensure_tools()
        sp = self.config.selfplay
        t0 = time.time()
        tokens, lengths, finished = [], [], []
        gb = sp.generation_batch_size
        for c, start in enumerate(range(0, n, gb)):
            chunk_path = os.path.join(self.iter_dir(t), f"gen_{c:05d}.npz")
            if mh.exists(chunk_path):
                with np.load(chunk_path) as z:
                    tok, ln, fin = z["tokens"], z["lengths"], z["finished"]
            else:
                rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed),
                                                            1_000 + t), c)
                gen = self.sampler.generate(
                    params, self.data.prompts[start:start + gb],
                    max_new_tokens=sp.max_new_tokens, temperature=sp.temperature,
                    top_k=sp.top_k or None, top_p=None if sp.top_p >= 1 else sp.top_p,
                    num_samples=k, stop_token_ids=(self.eos,), rng=rng)
                tok, ln, fin = gen.tokens, gen.lengths, gen.finished
                if self.is_main:
                    atomic_savez(chunk_path, tokens=tok, lengths=ln, finished=fin)
                self.event("generate", iteration=t, chunk=c, prompts=len(ln) // k)
                if guard.should_stop(self.offsets[t]):
                    return None
            tokens += list(tok)
            lengths.append(ln)
            finished.append(fin)
        gen_seconds = time.time() - t0
        lengths, finished = np.concatenate(lengths), np.concatenate(finished)
        width = max(len(x) for x in tokens)
        tok_arr = np.zeros((len(tokens), width), np.int32)
        for i, x in enumerate(tokens):
            tok_arr[i, :len(x)] = x
        syn = synthetic_rows(tok_arr, lengths, finished, [len(p) for p in self.data.prompts],
                             num_samples=k, eos_id=self.eos, max_length=self.config.data.max_length)

        # The reference pass: every sequence this iteration trains on, scored once under θ_t.
        prev = None
        want_prev = t > 0 and (sp.mix_previous or sp.gap == "logratio")
        if want_prev:
            prev = IterationData.load(os.path.join(self.iter_dir(t - 1), "data.npz"))
        t1 = time.time()
        groups = [list(self.data.real), syn] + ([prev.syn] if prev is not None else [])
        seqs, masks = [], []
        for g, rows in enumerate(groups):
            for r, resp in enumerate(rows):
                p = self.data.prompts[r if g == 0 else r // k]
                seqs.append(np.concatenate([p, resp]))
                masks.append(np.concatenate([np.zeros(len(p), np.float32),
                                             np.ones(len(resp), np.float32)]))
        forwards = self.scorer.forwards
        res = self.scorer.score(params, seqs, masks)
        REFERENCE_PASSES[t] = REFERENCE_PASSES.get(t, 0) + 1
        ref_seconds = time.time() - t1
        self.event("reference", iteration=t, sequences=len(seqs),
                   forwards=self.scorer.forwards - forwards)
        lp, nt = res.logprob_sum, res.num_tokens
        data = IterationData(
            iteration=t, num_samples=k, syn=syn, ref_real=lp[:n], real_ntok=nt[:n],
            ref_syn=lp[n:n + n * k].reshape(n, k), syn_ntok=nt[n:n + n * k].reshape(n, k))
        if prev is not None:
            data.ref_prev_syn = lp[n + n * k:].reshape(n, k)
            data.prev_syn_ntok = nt[n + n * k:].reshape(n, k)
        data.meta = self.iteration_stats(t, data, prev, lengths, finished)
        data.meta.update(fingerprint=self.fingerprint, gen_seconds=round(gen_seconds, 3),
                         ref_seconds=round(ref_seconds, 3), ref_sequences=len(seqs))
        mh.write_once(data.save, path, name=f"selfplay_data_{t}")  # the next iteration reads it
        if self.is_main:
            self.write_samples(t, syn)
        data.meta["fresh"] = True
        return data

    def iteration_stats(self, t: int, data: IterationData, prev: IterationData | None,
                        lengths: np.ndarray, finished: np.ndarray) -> dict[str, Any]:
        from sgalm_jax.losses.selfplay import likelihood_gap, logratio_gap

        sp = self.config.selfplay
        lik = float(likelihood_gap(data.ref_real, data.ref_syn, real_num_tokens=data.real_ntok,
                                   syn_num_tokens=data.syn_ntok))
        stats: dict[str, Any] = {"likelihood_gap": lik}
        gap = lik
        if prev is not None:
            # θ_t against θ_{t-1} on the previous iteration's pairs: how far the last iteration
            # moved real above synthetic, per token.
            lr = float(logratio_gap(data.ref_real, data.ref_prev_syn, prev.ref_real, prev.ref_syn,
                                    real_num_tokens=data.real_ntok,
                                    syn_num_tokens=data.prev_syn_ntok))
            stats["logratio_gap"] = lr
            if sp.gap == "logratio":
                gap = lr
        elif sp.gap == "logratio":
            log.info("iteration %d: no previous pairs for the log-ratio gap; using the likelihood "
                     "gap", t)
        stats["gap"] = gap
        stats["alpha"] = alpha_for_iteration(self.config, t, gap)
        stats.update(
            syn_length_mean=float(np.mean(lengths)), syn_finished=float(np.mean(finished)),
            real_length_mean=float(np.mean(data.real_ntok)),
            ref_logp_real_per_token=float(np.mean(data.ref_real / np.maximum(data.real_ntok, 1))),
            ref_logp_syn_per_token=float(np.mean(data.ref_syn / np.maximum(data.syn_ntok, 1))),
            num_rows=num_rows(len(self.data), self.config, t), steps=self.steps[t])
        return stats

    def write_samples(self, t: int, syn: list[np.ndarray]) -> None:
        """``workdir/samples/iter_NNN.jsonl``: prompt, real and synthetic responses as text."""
        k = self.config.selfplay.num_samples
        path = os.path.join(self.workdir, "samples", f"iter_{t:03d}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for i, prompt in enumerate(self.data.prompt_texts):
                rec = {"prompt": prompt, "real": self.data.real_texts[i],
                       "synthetic": [self.tokenizer.decode(syn[i * k + j], skip_special_tokens=True)
                                     for j in range(k)]}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)

    # ---------------------------------------------------------------- evaluation and export
    def evaluator(self):
        if self._evaluator is None:
            from sgalm_jax.algorithms.eval import Evaluator

            self._evaluator = Evaluator(self.config.eval, self.graphdef, self.mcfg, self.tokenizer,
                                        mesh=self.mesh, seed=self.config.seed)
        return self._evaluator

    def eval_due(self, t: int) -> bool:
        sp = self.config.selfplay
        return bool(sp.eval_every) and ((t + 1) % sp.eval_every == 0 or t == sp.iterations - 1)

    def maybe_evaluate(self, tag: str, params: Any, step: int, writer: MetricsWriter) -> None:
        from sgalm_jax.algorithms.eval import flat_metrics

        out = os.path.join(self.workdir, "eval", tag)
        if mh.exists(os.path.join(out, "results.json")):
            return
        t0 = time.time()
        results = self.evaluator().evaluate(params, out_dir=out)
        metrics = flat_metrics(results)
        metrics["eval/seconds"] = time.time() - t0
        writer.write(step, metrics)
        self.event("eval", tag=tag, step=step)

    def maybe_export(self, path: str, params: Any) -> None:
        """Export ``params`` to ``path`` unless done. Every process calls it: the export gathers
        the sharded weights (a collective); only process 0 writes."""
        from sgalm_jax.models import save_pretrained

        if mh.exists(os.path.join(path, "config.json")):
            return
        model = merge_model(self.graphdef, params)
        if self.lora is not None:  # the adapters first: the merged export marks completion
            self.lora.export_adapter(model, path + "_adapter")
        save_pretrained(model, path, tokenizer=self.tokenizer,  # LoRA: merged weights
                        dtype=self.config.checkpoint.export_dtype or None)
        log.info("exported the model in HF format to %s", path)

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        config, sp = self.config, self.config.selfplay
        iters = sp.iterations
        latest = self.ckpt.latest_step() if config.checkpoint.resume else None
        meta = self.build_roles(latest)
        policy = self.roles["policy"]
        start_t, start_s = 0, 0
        ready = 0  # the iteration whose optimizer state the policy holds (None: a fresh one is due)
        if latest is not None:
            t, s = int(meta["iteration"]), int(meta["iter_step"])
            if s >= self.steps[t]:
                start_t, ready = t + 1, None
            else:
                start_t, start_s, ready = t, s, t
            log.info("resumed from %s at step %d (iteration %d, step %d of it)",
                     self.ckpt.directory, latest, t, s)
            self.event("resume", step=int(latest), iteration=t, iter_step=s)

        total = self.offsets[-1]
        last: dict[str, Any] = {}
        timer = StepTimer(self.mcfg.num_params())
        with self.ckpt, PreemptionGuard() as guard, MetricsWriter(
                self.workdir, total_steps=total, initial_step=self.offsets[start_t] + start_s,
                tensorboard=config.metrics.tensorboard,
                progress_bar=config.metrics.progress_bar) as writer:
            if sp.eval_at_start and start_t == 0 and start_s == 0:
                self.maybe_evaluate("initial", policy.params, 0, writer)
            if start_t > 0:  # a run killed between its last checkpoint and the hooks
                self.after_iteration(start_t - 1, policy.params, writer)
            for t in range(start_t, iters):
                data = self.prepare_iteration(t, self.roles["reference"].params, guard)
                if data is None:
                    return self.preempted(last, self.offsets[t])
                if data.meta.get("fresh"):  # written once, when the data is made
                    writer.write(self.offsets[t], {f"iter/{k}": v for k, v in data.meta.items()
                                                   if isinstance(v, (int, float))
                                                   and not isinstance(v, bool)})
                log.info("iteration %d: gap %.4f, alpha %.4f, synthetic length %.1f", t,
                         data.meta["gap"], data.meta["alpha"], data.meta["syn_length_mean"])
                tx, schedule = self.optimizer(t, policy.own_params)
                if ready == t:  # built for, or restored in the middle of, this iteration
                    policy.set_optimizer(tx, schedule)
                else:  # θ_{t+1} trains from θ_t with a fresh optimizer state
                    policy.reset_optimizer(tx, schedule, seed=config.seed + t)
                ready = None
                step_name = self.train_step_name(t)
                sources = [(data.syn, data.ref_syn)]
                if sp.mix_previous and t > 0:
                    prev = IterationData.load(os.path.join(self.iter_dir(t - 1), "data.npz"))
                    sources.append((prev.syn, data.ref_prev_syn))
                batches = PairBatches(self.data.prompts, self.data.real, sources, data.ref_real,
                                      num_samples=sp.num_samples,
                                      batch_size=config.train.batch_size,
                                      max_length=config.data.max_length,
                                      min_bucket=config.data.min_bucket, seed=config.seed,
                                      iteration=t, pad_id=self.pad, shuffle=config.data.shuffle)
                alpha = jax.device_put(jnp.float32(data.meta["alpha"]), sh.replicated(self.mesh))
                pidx, pcount = jax.process_index(), jax.process_count()
                timer.reset()
                for s in range(start_s, self.steps[t]):
                    local = batches.batch(s, process_index=pidx, process_count=pcount)
                    metrics = policy.step(step_name, sh.global_batch_from_local(local, self.mesh),
                                          alpha)
                    g = self.offsets[t] + s + 1
                    self.finite.add(g, metrics)
                    timer.add(tokens=int(local["attention_mask"].sum()) * pcount)
                    if g % config.train.log_every == 0 or s + 1 == self.steps[t]:
                        metrics = jax.device_get(metrics)
                        metrics.update(timer.tick())
                        metrics.update(iteration=t, alpha=data.meta["alpha"])
                        last = writer.write(g, metrics)
                        self.finite.check()
                    stop = guard.should_stop(g)
                    if self.ckpt.should_save(g) or stop or s + 1 == self.steps[t]:
                        self.finite.check()  # never checkpoint or export a diverged state
                        self.roles.save(self.ckpt, g, {"iteration": t, "iter_step": s + 1,
                                                       "time": time.time()})
                    inject_fault(g)
                    if stop:
                        self.ckpt.wait()
                        return self.preempted(last, g)
                start_s = 0
                self.ckpt.wait()
                self.after_iteration(t, policy.params, writer)
            self.ckpt.close()
            writer.flush()
        out = {**last, "preempted": False, "step": total,
               "reference_passes": dict(REFERENCE_PASSES)}
        if config.checkpoint.export:
            export = os.path.join(self.workdir, "export")
            self.maybe_export(export, policy.params)
            out["export"] = export
        return out

    def after_iteration(self, t: int, params: Any, writer: MetricsWriter) -> None:
        """The per-iteration hooks (idempotent: skipped when their files exist)."""
        step = self.offsets[t + 1]
        if self.config.selfplay.export_iterations:
            self.maybe_export(os.path.join(self.workdir, "iterations", f"iter_{t:03d}"), params)
        if self.eval_due(t):
            self.maybe_evaluate(f"iter_{t:03d}", params, step, writer)

    def preempted(self, last: dict[str, Any], step: int) -> dict[str, Any]:
        self.ckpt.wait()
        self.ckpt.close()
        log.warning("preempted at step %d; rerun the same command to resume", step)
        return {**last, "preempted": True, "step": step}


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Run the self-play loop (see the module docstring); returns the last logged metrics."""
    return _Run(config, workdir).run()
