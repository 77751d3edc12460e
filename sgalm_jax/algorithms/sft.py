"""Supervised fine-tuning: next-token cross-entropy on response tokens only.

The loop, in order: load the model (or init it) sharded on the mesh; tokenize prompt/response
records (plain, or through the tokenizer's chat template); build deterministic batches (padding to
power-of-two buckets, or packing); resume from the latest checkpoint if there is one; run the
jitted train step; log; checkpoint every N steps and on SIGTERM; export the final model in HF
format to ``workdir/export``.

Data: ``data.train_file`` (JSONL records with ``data.prompt_key`` / ``data.response_key``) or
``data.task`` (a task of :mod:`sgalm_jax.data`, e.g. ``gsm8k`` or the offline ``arithmetic``),
whose ``format_sample`` gives (prompt, response) and ``chat_user``/``chat_assistant`` the chat turns.
With ``sft.distill = True`` (SeqKD, the GAD paper's baseline) the records are distillation pairs
read by :mod:`sgalm_jax.algorithms.distill_data` exactly as GAD reads them (LMSYS layout or
prompt/response, the ``distill`` section's fields and length caps, the end token after the
response).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sgalm_jax import sharding as sh
from sgalm_jax.algorithms.distill_data import load_distill_pool, make_encoder, validate_distill
from sgalm_jax.config import validate_for_devices
from sgalm_jax.errors import ConfigError, DataError
from sgalm_jax.losses.common import sequence_logprobs_from_hidden, shift_targets
from sgalm_jax.losses.sft import sft_loss, sft_loss_from_logprobs
from sgalm_jax.training import (
    Checkpointer,
    MetricsWriter,
    PreemptionGuard,
    StepTimer,
    TrainState,
    abstract_like,
    create_train_state,
    inject_fault,
    make_optimizer,
    make_train_step,
    merge_model,
    model_loss,
    peak_flops_per_device,
    split_model,
    train_state_shardings,
    trainable_mask,
)
from sgalm_jax.training import multihost as mh
from sgalm_jax.training.batching import (
    BatchSource,
    LazyExamples,
    TokenizedExample,
    host_share,
    truncate,
)
from sgalm_jax.training.finite import FiniteGuard
from sgalm_jax.training.model_setup import build_model, model_config
from sgalm_jax.training.run_setup import setup_run, tokenizer_source
from sgalm_jax.training.tokenizer import BUILTIN_TINY

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ validation
def validate(config: Any) -> None:
    """SFT-specific checks (model, tokenizer, data, devices); ConfigError naming the key."""
    model_config(config.model)  # model.path / model.init exist and parse
    tok = tokenizer_source(config)
    if not tok:
        raise ConfigError("tokenizer.path: no tokenizer; set tokenizer.path (a directory, or "
                          f"{BUILTIN_TINY!r} for tiny random models)")
    if tok != BUILTIN_TINY and not os.path.isdir(tok):
        raise ConfigError(f"tokenizer.path: {tok!r} is not a directory")
    d = config.data
    if bool(d.train_file) == bool(d.task):
        raise ConfigError("data.train_file: set exactly one of data.train_file and data.task")
    if d.train_file and os.path.isdir(d.train_file):
        raise ConfigError(f"data.train_file: {d.train_file!r} is a folder, not a JSONL file")
    if d.train_file and not os.path.isfile(d.train_file):
        raise ConfigError(f"data.train_file: {d.train_file!r} does not exist")
    if d.task:
        from sgalm_jax.data import list_tasks

        if d.task.strip().lower().replace("-", "_") not in list_tasks():
            raise ConfigError(f"data.task: unknown task {d.task!r}; known: {list_tasks()}")
    if d.data_dir and not os.path.exists(d.data_dir):
        raise ConfigError(f"data.data_dir: {d.data_dir!r} does not exist")
    if config.sft.distill:
        validate_distill(config)
    validate_for_devices(config, jax.device_count(), jax.process_count())


# ------------------------------------------------------------------------------------ data
def load_records(config: Any) -> list[tuple[str, str]]:
    """(prompt, response) pairs from ``data.train_file`` or ``data.task``."""
    d = config.data
    limit = d.max_examples or None
    pairs: list[tuple[str, str]] = []
    if d.train_file:
        from sgalm_jax.data.io import iter_lines

        for lineno, line in iter_lines(d.train_file):  # DataError naming a non-UTF-8 line
            if not line.strip():
                continue
            where = f"{d.train_file}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object")
            for key in (d.prompt_key, d.response_key):
                if not isinstance(rec.get(key), str):
                    raise DataError(f"{where}: field {key!r} missing or not a string "
                                    "(data.prompt_key / data.response_key)")
            pairs.append((rec[d.prompt_key], rec[d.response_key]))
            if limit and len(pairs) >= limit:
                break
    else:
        from sgalm_jax.data import get_task

        task = get_task(d.task, **({"source": d.data_dir} if d.data_dir else {}))
        for ex in task.load(d.split, limit=limit):
            if d.chat_template:
                pairs.append((task.chat_user(ex), task.chat_assistant(ex)))
            else:
                pairs.append(task.format_sample(ex))
    if not pairs:
        raise DataError(f"{d.train_file or d.task}: no training records")
    return pairs


def distill_examples(config: Any, tokenizer: Any, *, eos_id: int, stop_ids: tuple[int, ...],
                     vocab_size: int) -> list[TokenizedExample]:
    """SeqKD's examples (``sft.distill``): every distillation pair of ``data.split`` through the
    :class:`~sgalm_jax.data.distill_tokens.DistillEncoder` GAD uses, so the student learns to end
    its responses exactly as GAD's discriminator sees teacher responses end."""
    encoder = make_encoder(config, tokenizer, end_token_id=eos_id, stop_token_ids=stop_ids)
    pool = load_distill_pool(config, tokenizer, encoder, split=config.data.split,
                             limit=config.data.max_examples or None, vocab_size=vocab_size)
    return [pool.sft_example(i) for i in range(len(pool))]


def encode(pairs: list[tuple[str, str]], tokenizer: Any, data_cfg: Any, *, eos_id: int,
           vocab_size: int | None) -> list[TokenizedExample]:
    """Tokenize (prompt, response) pairs; the loss mask covers the response and its eos.

    ``vocab_size``: raise ConfigError for a token id outside the model's vocabulary (None: no
    check, the caller checks).
    """
    if not pairs:
        return []
    if data_cfg.chat_template:
        from sgalm_jax.data.prompts import ensure_chat_template, render_chat

        if not getattr(tokenizer, "chat_template", None):
            log.warning("tokenizer has no chat template: using ChatML")
        ensure_chat_template(tokenizer)
        prompts = []
        for p, _ in pairs:
            messages = ([{"role": "system", "content": data_cfg.system_prompt}]
                        if data_cfg.system_prompt else [])
            messages.append({"role": "user", "content": p})
            prompts.append(render_chat(tokenizer, messages, add_generation_prompt=True))
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer([p for p, _ in pairs])["input_ids"]  # BOS where the tokenizer adds it
    response_ids = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    out = []
    for p, r in zip(prompt_ids, response_ids):
        p, r = truncate(p, list(r) + [eos_id], data_cfg.max_length)
        ids = np.asarray(p + r, np.int32)
        mask = np.concatenate([np.zeros(len(p), np.float32), np.ones(len(r), np.float32)])
        out.append(TokenizedExample(ids, mask))
    if vocab_size is not None:
        check_vocab(max(int(e.input_ids.max()) for e in out), vocab_size)
    return out


def check_vocab(top: int, vocab_size: int) -> None:
    if top >= vocab_size:
        raise ConfigError(f"tokenizer.path: token id {top} is outside the model's vocabulary "
                          f"({vocab_size}); the tokenizer does not match the model")


def host_examples(pairs: list[tuple[str, str]], tokenizer: Any, config: Any, *, eos_id: int,
                  vocab_size: int) -> tuple[LazyExamples, np.ndarray]:
    """This host's view of the tokenized training set: ``(examples, lengths of all of them)``.

    Every host reads all records (cheap, and a broken record fails on every host alike) but
    tokenizes only its :func:`~sgalm_jax.training.batching.host_share` up front: in padding mode
    exactly the examples of its rows in the first epoch. The hosts then exchange the lengths (and
    the largest token id, so a tokenizer / model mismatch fails everywhere at once): batch shapes
    and packing need every length, the token ids only this host's rows. Later epochs tokenize
    their new rows on first use. One process tokenizes everything, as before.
    """
    d = config.data
    n = len(pairs)

    def encode_some(indices: list[int]) -> list[TokenizedExample]:
        return encode([pairs[i] for i in indices], tokenizer, d, eos_id=eos_id, vocab_size=None)

    share = host_share(n, batch_size=config.train.batch_size, seed=config.seed,
                       shuffle=d.shuffle, packing=d.packing, process_index=jax.process_index(),
                       process_count=jax.process_count())
    local = encode_some([int(i) for i in share])
    table = np.zeros(n + 1, np.int32)  # lengths of this host's share, then its largest token id
    for i, ex in zip(share, local):
        table[i] = len(ex)
    table[n] = max((int(e.input_ids.max()) for e in local), default=0)
    everyone = mh.allgather(table)
    check_vocab(int(everyone[:, n].max()), vocab_size)
    lengths = everyone[:, :n].astype(np.int64).sum(axis=0)  # each tokenized by exactly one host
    examples = LazyExamples(n, encode_some, cache={int(i): ex for i, ex in zip(share, local)})
    return examples, lengths


# ------------------------------------------------------------------------------------ loss
def make_sft_loss(graphdef: Any, normalize: str = "token", logits_chunk_size: int = 0):
    """``loss_fn(params, batch, rng)`` for :func:`make_train_step`: masked next-token NLL.

    ``logits_chunk_size > 0`` projects hidden states to logits that many positions at a time and
    never materialises the ``[B, T, vocab]`` logits (the backward recomputes each chunk): the same
    loss and gradients with a fraction of the memory for large vocabularies (no ``token_accuracy``
    metric then).
    """

    def loss_on_model(model, batch, rng):
        del rng  # deterministic loss (no dropout in the model)
        args = (batch["input_ids"], batch["attention_mask"], batch["positions"])
        targets, mask = shift_targets(batch["input_ids"], batch["loss_mask"])
        if logits_chunk_size:
            hidden, _ = model.model(*args)
            lp = sequence_logprobs_from_hidden(hidden, model.logits_from_hidden, targets, mask,
                                               chunk_size=logits_chunk_size)
            return sft_loss_from_logprobs(lp.token_logprobs, mask, normalize=normalize)
        return sft_loss(model(*args), targets, mask, normalize=normalize)

    return model_loss(graphdef, loss_on_model)


# ------------------------------------------------------------------------------------ run
def run(config: Any, workdir: str) -> dict[str, Any]:
    """Train; returns the last logged metrics (and ``preempted`` / ``export`` entries)."""
    setup = setup_run(config, workdir)
    mesh, tokenizer, mcfg, eos = setup.mesh, setup.tokenizer, setup.model_config, setup.eos_id
    if config.sft.distill:
        # Every host builds the whole distillation pool (its encoder fixes GAD's response ends);
        # the pool is small next to the run, and the batches still take only this host's rows.
        examples = distill_examples(config, tokenizer, eos_id=eos, stop_ids=mcfg.eos_token_ids,
                                    vocab_size=mcfg.vocab_size)
        lengths = np.asarray([len(e) for e in examples], np.int64)
        log.info("%d training examples (distillation pairs); mean length %.1f tokens",
                 len(examples), float(np.mean(lengths)))
    else:
        examples, lengths = host_examples(load_records(config), tokenizer, config, eos_id=eos,
                                          vocab_size=mcfg.vocab_size)
        log.info("%d training examples; mean length %.1f tokens; this host tokenized %d of them",
                 len(examples), float(np.mean(lengths)), examples.num_encoded)
    source = BatchSource(examples, lengths=lengths, batch_size=config.train.batch_size,
                         max_length=config.data.max_length, seed=config.seed,
                         shuffle=config.data.shuffle, packing=config.data.packing,
                         min_bucket=config.data.min_bucket, pad_id=setup.pad_id)

    num_steps = config.train.num_steps
    ckpt = Checkpointer.from_config(os.path.join(workdir, "checkpoints"), config.checkpoint)
    finite = FiniteGuard.from_config(config, ckpt)
    resume_step = ckpt.latest_step() if config.checkpoint.resume else None

    # Params: loaded/initialised, or (when resuming) only their shapes: the checkpoint fills them.
    if resume_step is None:
        model = build_model(config.model, mesh=mesh, seed=config.seed)
        graphdef, params = split_model(model)
        del model
    else:
        from flax import nnx

        from sgalm_jax.models import CausalLM

        abstract_model = nnx.eval_shape(lambda: CausalLM(mcfg, rngs=nnx.Rngs(0)))
        graphdef, params = split_model(abstract_model)
    tx, schedule = make_optimizer(config.optimizer, num_steps=num_steps, params=params)
    params_shardings = sh.state_shardings(params, mesh)
    data_position = 0
    if resume_step is None:
        state, shardings = create_train_state(params, tx, seed=config.seed, mesh=mesh,
                                              params_shardings=params_shardings)
    else:
        abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                              opt_state=jax.eval_shape(tx.init, params),
                              rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
        shardings = train_state_shardings(abstract, mesh, params_shardings)
        restored, meta = ckpt.restore(abstract_like(abstract.to_dict(), shardings.to_dict()),
                                      resume_step)
        state = TrainState.from_dict(restored)
        data_position = int(meta.get("data_position", resume_step))
        log.info("resumed from %s at step %d (data position %d)", ckpt.directory, resume_step,
                 data_position)
    del params

    trainable = trainable_mask(state.params, config.optimizer.freeze)
    step_fn = make_train_step(
        make_sft_loss(graphdef, config.sft.normalize, config.sft.logits_chunk_size), tx,
        mesh=mesh, state_shardings=shardings,
        grad_accum_steps=config.train.grad_accum_steps,
        accum_weight="num_tokens" if config.sft.normalize == "token" else None,
        compute_dtype=config.train.compute_dtype or None,
        trainable=trainable if config.optimizer.freeze else None, learning_rate=schedule,
        skip_nonfinite=finite.skip)

    start = int(jax.device_get(state.step))
    timer = StepTimer(mcfg.num_params(),
                      peak_per_device=peak_flops_per_device(
                          override_tflops=config.metrics.peak_tflops))
    last: dict[str, Any] = {}
    preempted = False
    pidx, pcount = jax.process_index(), jax.process_count()
    with ckpt, PreemptionGuard() as guard, MetricsWriter(
            workdir, total_steps=num_steps, initial_step=start,
            tensorboard=config.metrics.tensorboard,
            progress_bar=config.metrics.progress_bar) as writer:
        step = start
        while step < num_steps:
            local = source.batch(data_position, process_index=pidx, process_count=pcount)
            batch = sh.global_batch_from_local(local, mesh)
            state, metrics = step_fn(state, batch)
            step += 1
            data_position += 1
            timer.add(tokens=local["input_ids"].size * pcount)
            finite.add(step, metrics)
            if step % config.train.log_every == 0 or step == num_steps:
                metrics = jax.device_get(metrics)
                metrics.update(timer.tick())
                metrics["epoch"] = source.locate(data_position - 1)[0]
                last = writer.write(step, metrics)
                finite.check()
                if step == start + 1:
                    log.info("step %d: loss %.4f (first step, includes compilation: %.1fs)",
                             step, float(metrics["loss"]), metrics["step_time"])
            stop = guard.should_stop(step)
            if ckpt.should_save(step) or stop or step == num_steps:
                finite.check()  # never checkpoint (or later export) a diverged state
                ckpt.save(step, state.to_dict(), {"data_position": data_position,
                                                  "time": time.time()})
            inject_fault(step)
            if stop:
                preempted = True
                break
        ckpt.wait()
        ckpt.close()
        writer.flush()
    if preempted:
        log.warning("preempted: checkpoint of step %d saved to %s; rerun the same command to "
                    "resume", step, ckpt.directory)
        return {**last, "preempted": True, "step": step}

    out = {**last, "preempted": False, "step": step}
    if config.checkpoint.export:
        from sgalm_jax.models import save_pretrained

        export_dir = os.path.join(workdir, "export")
        save_pretrained(merge_model(graphdef, state.params), export_dir, tokenizer=tokenizer,
                        dtype=config.checkpoint.export_dtype or None)
        log.info("exported the model in HF format to %s", export_dir)
        out["export"] = export_dir
    return out
