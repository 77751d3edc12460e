"""SGALM's data side: the real pool, generator / discriminator prompts, sampling, saved samples,
and the padded batches of the discriminator and generator steps.

A *sample* is one whole task example as text (``Task.sample_text``: a GSM8K question and worked
answer, an MBPP description + asserts + code, ...). The generator writes samples from a k-shot
prompt of real ones (format ``full``), or answers a real training question (format ``answer``:
the sample is that question plus the generated answer). The discriminator reads a sample inside
its "Real or Fake" prompt and is scored at the next token.

Generated samples of an iteration are written to ``workdir/samples/iter_NNN.jsonl`` (one record
per sample, atomically) with everything a resumed run needs to reuse them: the prompt text, the
kept completion token ids, the text, the start-of-iteration discriminator logit and the checks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
from typing import Any, Sequence

import jax
import numpy as np

from sgalm_jax.algorithms import diagnostics as diag
from sgalm_jax.data import get_task
from sgalm_jax.data.prompts import (
    SGALMTemplates,
    render_chat,
    sgalm_discriminator_prompt,
    sgalm_generator_prompt,
)
from sgalm_jax.errors import ConfigError, DataError
from sgalm_jax.training.tokenizer import LabelTokenIds, resolve_label_token_ids
from sgalm_jax.sampling import Sampler, trim_stop_strings
from sgalm_jax.training.batching import truncate

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ samples
@dataclasses.dataclass
class Sample:
    """One generated sample (a record of ``samples/iter_NNN.jsonl``)."""

    index: int
    prompt: str  # the generator prompt, as given to the tokenizer
    completion_ids: list[int]  # the generated tokens kept as the sample (stop marks cut off)
    text: str  # the sample as the discriminator reads it
    stopped: bool  # ended by a stop string or EOS (False: cut by max_new_tokens)
    heldout: bool = False  # kept out of D's training (diagnostics only)
    question: int = -1  # format 'answer': index in the real pool of the answered question
    z_snapshot: float = float("nan")  # D logit z_Real - z_Fake under the iteration-start params
    well_formed: bool = False
    valid: bool | None = None  # the task's checker (None: the task has none)
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if math.isnan(d["z_snapshot"]):
            d["z_snapshot"] = None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Sample":
        d = dict(d)
        if d.get("z_snapshot") is None:
            d["z_snapshot"] = float("nan")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def samples_path(workdir: str, iteration: int | str) -> str:
    """``workdir/samples/iter_NNN.jsonl`` (or ``final.jsonl``)."""
    name = iteration if isinstance(iteration, str) else f"iter_{iteration:03d}"
    return os.path.join(workdir, "samples", f"{name}.jsonl")


def save_samples(path: str, samples: Sequence[Sample]) -> None:
    """Write samples as JSONL atomically (a killed run never leaves a half-written file)."""
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s.to_json()) + "\n")
    os.replace(tmp, path)


def load_samples(path: str) -> list[Sample]:
    """Samples saved by :func:`save_samples`; DataError naming the line if one is broken."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    out.append(Sample.from_json(json.loads(line)))
                except (json.JSONDecodeError, TypeError) as e:
                    raise DataError(f"{path}:{lineno}: broken sample record ({e})") from None
    return out


# ------------------------------------------------------------------------------------ trimming
def trim_completion(tokenizer: Any, ids: Sequence[int], stop_strings: Sequence[str]
                    ) -> tuple[list[int], str, bool]:
    """Cut generated ``ids`` before the first stop string; returns ``(kept ids, text, cut)``.

    The kept ids are a prefix of the sampled ones (the longest whose decoded text ends at or
    before the stop string), so their log-prob is that of what was sampled (the score-function
    estimator needs the sampled tokens, not a re-tokenisation).
    """
    ids = list(ids)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    cut_text = trim_stop_strings(text, stop_strings)
    if len(cut_text) == len(text):
        return ids, text, False
    cut = len(cut_text)
    lo, hi = 0, len(ids)
    while lo < hi:  # largest n with len(decode(ids[:n])) <= cut
        mid = (lo + hi + 1) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=False)) <= cut:
            lo = mid
        else:
            hi = mid - 1
    kept = ids[:lo]
    return kept, tokenizer.decode(kept, skip_special_tokens=False), True


# ------------------------------------------------------------------------------------ the data
class SGALMData:
    """The task, the real pool and held-out reals, the prompts and their tokenisation.

    Args:
      config: the run config (``data``, ``sgalm`` sections).
      tokenizer: a transformers tokenizer.
      eos_id: the id that ends generation.
    """

    def __init__(self, config: Any, tokenizer: Any, *, eos_id: int):
        s, d = config.sgalm, config.data
        self.tokenizer = tokenizer
        self.eos_id = int(eos_id)
        self.format = s.sample_format
        self.chat = bool(s.chat_template)
        self.num_shots = int(s.num_shots)
        self.max_length = int(d.max_length)
        kwargs = dict(s.task_options.to_dict() if hasattr(s.task_options, "to_dict")
                      else s.task_options)
        if d.data_dir:
            kwargs["source"] = d.data_dir
        try:
            self.task = get_task(d.task, **kwargs)
        except TypeError as e:
            raise ConfigError(f"sgalm.task_options: {e}") from None
        examples = self.task.load(d.split, limit=d.max_examples or None)
        order = np.random.default_rng([config.seed, 17]).permutation(len(examples))
        n_held = int(s.heldout_size)
        if len(examples) - n_held < self.num_shots + 2:
            raise ConfigError(
                f"sgalm.heldout_size: {n_held} held-out samples leave {len(examples) - n_held} of "
                f"the {len(examples)} real samples, fewer than sgalm.num_shots + 2")
        self.heldout = [examples[i] for i in order[:n_held]]
        self.pool = [examples[i] for i in order[n_held:]]
        self.real_texts = [self.task.sample_text(e) for e in self.pool]
        self.heldout_texts = [self.task.sample_text(e) for e in self.heldout]

        self.templates = SGALMTemplates.from_config(
            {**(s.prompts.to_dict() if hasattr(s.prompts, "to_dict") else dict(s.prompts)),
             "num_examples": self.num_shots})
        t = self.templates
        # The label follows the prompt's last character: "...:" + " Real"; a chat turn + "Real".
        leading_space = not self.chat and not t.discriminator.endswith((" ", "\n"))
        self.labels: LabelTokenIds = resolve_label_token_ids(
            tokenizer, t.real_word, t.fake_word, leading_space=leading_space)
        self.stop_strings = [t.generator_stop]
        if self.format == "answer":
            target = self.task.format_target(self.pool[0])
            self.stop_strings += [x for x in self.task.stop_sequences if x and x not in target]
        if self.chat:
            from sgalm_jax.data.prompts import ensure_chat_template

            ensure_chat_template(tokenizer)
        # Token ids of the real samples, cached: D prompts and the anchor's targets.
        self.real_d_ids = [self.d_ids(x) for x in self.real_texts]
        self.heldout_d_ids = [self.d_ids(x) for x in self.heldout_texts]
        self.real_sample_ids = [self.encode(x, special=False) for x in self.real_texts]
        lengths = sorted(len(x) for x in self.real_sample_ids)
        self.p99_length = lengths[min(len(lengths) - 1, int(0.99 * len(lengths)))]

    # ---------------------------------------------------------------- text and tokens
    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids; plain prompts get the tokenizer's special tokens (BOS), chat ones carry
        their own."""
        return list(self.tokenizer(text, add_special_tokens=special and not self.chat)
                    ["input_ids"])

    def _wrap(self, text: str) -> str:
        if not self.chat:
            return text
        return render_chat(self.tokenizer, [{"role": "user", "content": text}],
                           add_generation_prompt=True)

    def generator_prompt(self, rng: random.Random) -> tuple[str, int]:
        """A k-shot generator prompt of random real samples; ``(text, question index or -1)``."""
        n = len(self.pool)
        if self.format == "full":
            demos = rng.sample(range(n), self.num_shots)
            return self._wrap(sgalm_generator_prompt([self.real_texts[i] for i in demos],
                                                     self.templates)), -1
        q = rng.randrange(n)
        demos = [i for i in rng.sample(range(n), self.num_shots + 1) if i != q][:self.num_shots]
        prefix = self.task.format_prompt(self.pool[q])
        return self._wrap(sgalm_generator_prompt([self.real_texts[i] for i in demos],
                                                 self.templates, prefix=prefix)), q

    def discriminator_prompt(self, sample_text: str) -> str:
        """The "Real or Fake" prompt of a sample (chat-wrapped with ``sgalm.chat_template``)."""
        return self._wrap(sgalm_discriminator_prompt(sample_text, self.templates))

    def d_ids(self, sample_text: str) -> list[int]:
        """Token ids of the discriminator prompt; the answer position is the last one (long
        prompts keep their end)."""
        return self.encode(self.discriminator_prompt(sample_text))[-self.max_length:]

    def sample_text(self, question: int, completion: str) -> str:
        """The sample the discriminator reads: the completion (``full``), or the real question's
        prompt followed by the generated answer (``answer``)."""
        if self.format == "full" or question < 0:
            return completion.strip()
        return (self.task.format_prompt(self.pool[question]) + completion).strip()

    # ---------------------------------------------------------------- sampling
    def generate(self, sampler: Sampler, params: Any, num: int, *, rng_seed: Sequence[int],
                 max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                 batch_size: int, heldout: int = 0, progress: bool = False) -> list[Sample]:
        """``num`` samples from ``params`` (deterministic in ``rng_seed``); the last ``heldout``
        are marked held out. Well-formedness and validity are checked here."""
        prompt_rng = random.Random(repr(tuple(rng_seed)))
        prompts = [self.generator_prompt(prompt_rng) for _ in range(num)]
        key = jax.random.key(int(np.random.default_rng(list(rng_seed)).integers(2 ** 31)))
        budget = max(self.max_length - 1, 1)
        out: list[Sample] = []
        stops = set(sampler.config.eos_token_ids) | {self.eos_id}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=num, desc="sample", dynamic_ncols=True, leave=False)
        for c, start in enumerate(range(0, num, batch_size)):
            chunk = prompts[start:start + batch_size]
            ids = [self.encode(p)[-budget:] for p, _ in chunk]
            gen = sampler.generate(
                params, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=None if top_p >= 1 else top_p, top_k=top_k or None,
                stop_token_ids=(self.eos_id,), rng=jax.random.fold_in(key, c))
            for j, ((prompt, q), comp, fin) in enumerate(zip(chunk, gen.completions(),
                                                              gen.finished)):
                if fin and comp and comp[-1] in stops:  # the EOS is not part of the sample
                    comp = comp[:-1]
                kept, text, cut = trim_completion(self.tokenizer, comp, self.stop_strings)
                out.append(Sample(index=start + j, prompt=prompt, completion_ids=kept,
                                  text=self.sample_text(q, text), stopped=bool(cut or fin),
                                  question=q))
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        for s in out[num - heldout:] if heldout else []:
            s.heldout = True
        self.check(out)
        return out

    def check(self, samples: Sequence[Sample]) -> None:
        """Fill ``well_formed``, ``valid`` and ``reason`` of each sample."""
        texts = [s.text for s in samples]
        for s, (valid, reason) in zip(samples, diag.check_validity(self.task, texts)):
            s.well_formed = diag.well_formed(self.task, s.text)
            s.valid, s.reason = valid, reason

    # ---------------------------------------------------------------- generator sequences
    def g_row(self, prompt: str, completion_ids: Sequence[int]) -> tuple[list[int], list[float]]:
        """``prompt + completion`` ids and the loss mask over the completion (input positions)."""
        p, c = truncate(self.encode(prompt), list(completion_ids), self.max_length)
        return p + c, [0.0] * len(p) + [1.0] * len(c)


# ------------------------------------------------------------------------------------ batches
def pad_rows(rows: Sequence[Sequence[int]], *, bucket: int, pad_id: int, num_rows: int | None = None,
             loss_masks: Sequence[Sequence[float]] | None = None, prefix: str = ""
             ) -> dict[str, np.ndarray]:
    """Right-padded ``[num_rows, T]`` arrays of token rows; ``T`` is the smallest power of two
    times ``bucket`` that fits the longest row (few distinct shapes, so few compilations).

    Keys (with ``prefix``): ``input_ids``, ``attention_mask``, ``positions``, ``last`` (index of
    each row's last token: the discriminator's answer position), ``row_mask`` (1 = real row, 0 =
    filler row beyond ``len(rows)``) and, with ``loss_masks``, ``loss_mask``.
    """
    n = len(rows) if num_rows is None else int(num_rows)
    longest = max((len(r) for r in rows), default=1)
    width = max(int(bucket), 1)
    while width < longest:
        width *= 2
    ids = np.full((n, width), pad_id, np.int32)
    attn = np.zeros((n, width), np.int32)
    pos = np.zeros((n, width), np.int32)
    last = np.zeros((n,), np.int32)
    row_mask = np.zeros((n,), np.float32)
    loss = np.zeros((n, width), np.float32) if loss_masks is not None else None
    for i, r in enumerate(rows):
        k = len(r)
        ids[i, :k] = r
        attn[i, :k] = 1
        pos[i, :k] = np.arange(k)
        last[i] = max(k - 1, 0)
        row_mask[i] = 1.0
        if loss is not None:
            loss[i, :k] = loss_masks[i]
    out = {"input_ids": ids, "attention_mask": attn, "positions": pos, "last": last,
           "row_mask": row_mask}
    if loss is not None:
        out["loss_mask"] = loss
    return {prefix + k: v for k, v in out.items()}


class Minibatches:
    """Deterministic minibatch indices of one iteration: ``(seed, iteration)`` fix the order of the
    training fakes and of the real pool; minibatch ``i`` takes the ``i``-th slice of each (epochs
    wrap around with a fresh permutation)."""

    def __init__(self, num_fakes: int, num_reals: int, half: int, seed: int, iteration: int):
        self.num_fakes, self.num_reals, self.half = num_fakes, num_reals, half
        self.seed, self.iteration = seed, iteration

    def _take(self, n: int, stream: int, index: int) -> list[int]:
        per_epoch = max(n // self.half, 1)
        epoch, b = divmod(index, per_epoch)
        order = np.random.default_rng([self.seed, self.iteration, stream, epoch]).permutation(n)
        if n < self.half:  # fewer items than a half batch: repeat them
            order = np.resize(order, self.half)
        return order[b * self.half:(b + 1) * self.half].tolist()

    def fakes(self, index: int, stream: int = 0) -> list[int]:
        return self._take(self.num_fakes, stream, index)

    def reals(self, index: int, stream: int = 1) -> list[int]:
        return self._take(self.num_reals, stream, index)
