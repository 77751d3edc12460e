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

import logging
import math
import os
import time
import zlib
from typing import Any

import jax
import numpy as np

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
# The config section, validation, roles and --compile-only programs (sgalm_setup), the losses and
# the scorer (sgalm_steps): part of this module's interface (sgalm.validate, sgalm.make_d_loss, ...).
from sgalm_jax.algorithms.sgalm_setup import (  # noqa: F401
    REWARD_PARAMS,
    SAMPLE_FORMATS,
    VARIANTS,
    DeclaredRoles,
    active_steps,
    add_steps,
    declare_roles,
    programs,
    validate,
)
from sgalm_jax.algorithms.sgalm_steps import (  # noqa: F401
    DScorer,
    GeneratorOptions,
    _sequence_logprobs,
    balanced_accuracy,
    discriminator_logits,
    make_d_loss,
    make_g_loss,
    sigmoid,
    to_global,
)
from sgalm_jax.errors import ConfigError
from sgalm_jax.sampling import Sampler
from sgalm_jax.training import Checkpointer, MetricsWriter, PreemptionGuard, Roles, inject_fault
from sgalm_jax.training import multihost as mh
from sgalm_jax.training.finite import FiniteGuard
from sgalm_jax.training.run_setup import sampler_options, setup_run
from sgalm_jax.training.tokenizer import LabelTokenIds  # noqa: F401  (sgalm.LabelTokenIds)

log = logging.getLogger(__name__)


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
        """The generator and discriminator roles (:func:`declare_roles`), restored from
        checkpoint ``resume_step`` when given."""
        cfg = self.config
        two = cfg.sgalm.variant == "two_models"
        n_g = int(cfg.sgalm.iterations) * self.rounds * (self.steps_g if two else
                                                         self.steps_d + self.steps_g)
        n_d = int(cfg.sgalm.iterations) * self.rounds * self.steps_d
        declared = declare_roles(cfg, self.mesh, self.mcfg, load=resume_step is None,
                                 n_g=n_g, n_d=n_d)
        roles, self.graphdef, self.lora = declared.roles, declared.graphdef, declared.lora
        self.tx_g, self.lr_g, self.tx_d, self.lr_d = (declared.tx_g, declared.lr_g,
                                                      declared.tx_d, declared.lr_d)
        meta = roles.build(ckpt, resume_step)
        if resume_step is not None:
            log.info("resumed from %s at update %d (iteration %d, step %d of %d)", ckpt.directory,
                     resume_step, meta.get("iteration", 0), meta.get("iter_step", 0),
                     self.per_iter)
        return roles, meta

    def make_steps(self, roles: Roles) -> None:
        """The D and G steps (:func:`add_steps`), the sampler and the D scorer."""
        cfg = self.config
        add_steps(roles, cfg, self.graphdef, self.data.labels, self.gen_opts)
        self.sampler = Sampler(self.graphdef, self.mcfg, pad_token_id=self.pad, mesh=self.mesh,
                               min_batch_bucket=int(cfg.sgalm.sample_batch_size),
                               **sampler_options(cfg, int(cfg.sgalm.sample_batch_size)))
        self.scorer = DScorer(self.graphdef, self.data.labels, self.mesh,
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
