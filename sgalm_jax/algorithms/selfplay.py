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

import json
import logging
import os
import time
import types
from typing import Any

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
# The config section, loss, schedules, validation, roles and --compile-only programs: part of
# this module's interface (selfplay.validate, selfplay.make_selfplay_loss, ...).
from sgalm_jax.algorithms.selfplay_setup import (  # noqa: F401
    GAP_ESTIMATORS,
    add_train_step,
    alpha_for_iteration,
    declare_roles,
    learning_rate,
    make_selfplay_loss,
    num_rows,
    parse_learning_rates,
    programs,
    resolve_loss,
    steps_per_iteration,
    validate,
)
from sgalm_jax.errors import ConfigError
from sgalm_jax.training import (
    Checkpointer,
    MetricsWriter,
    PreemptionGuard,
    Roles,
    StepTimer,
    inject_fault,
    make_optimizer,
    merge_model,
)
from sgalm_jax.training import multihost as mh
from sgalm_jax.training.finite import FiniteGuard
from sgalm_jax.training.run_setup import sampler_options, setup_run

log = logging.getLogger(__name__)

# Reference log-prob passes run by this process, per iteration (tests count them).
REFERENCE_PASSES: dict[int, int] = {}


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

    def build_roles(self, latest: int | None) -> dict[str, Any]:
        """The roles (:func:`declare_roles`), restored from checkpoint ``latest`` when given."""
        self.roles, self.graphdef, self.lora = declare_roles(
            self.config, self.mesh, self.mcfg, load=latest is None,
            optimizer=lambda params: self.optimizer(0, params))
        return self.roles.build(self.ckpt, latest)

    def train_step_name(self, t: int) -> str:
        """Add (once per learning rate and length) the policy's train step for iteration t."""
        name = f"selfplay_lr{learning_rate(self.config, t)!r}_n{self.steps[t]}"
        add_train_step(self.roles["policy"], name, self.config, self.graphdef, self.loss_fn,
                       self.takes_alpha, self.mesh, skip_nonfinite=self.finite.skip)
        return name

    def ensure_tools(self) -> None:
        if self.sampler is None:
            sp, n = self.config.selfplay, len(self.data)
            # Rows decoded at once: a train step's sequences (chosen + rejected of
            # train.batch_size pairs) unless sampling.num_slots says otherwise; a generation
            # chunk's rows flow through those slots (continuous engine by default).
            options = sampler_options(self.config, 2 * int(self.config.train.batch_size))
            per_call = max(1, int(options["max_batch_size"]) // int(sp.num_samples))
            self.sampler = self.sampler_cls(
                self.graphdef, self.mcfg, pad_token_id=self.pad, mesh=self.mesh,
                min_batch_bucket=min(sp.generation_batch_size, n, per_call), **options)
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
                                        mesh=self.mesh, seed=self.config.seed,
                                        sampling=self.config)
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
