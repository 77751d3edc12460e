"""Batched autoregressive sampling: one jitted prefill, then a ``lax.while_loop`` decode over a KV cache.

The sampler never closes over parameters. :class:`Sampler` is built once from a model's ``GraphDef``
(static) and called with a params ``State`` (an argument of the jitted programs), so a training loop
samples from the current or a frozen params snapshot without rebuilding a module or recompiling::

    graphdef, params = nnx.split(model)
    sampler = Sampler(graphdef, model.config)
    out = sampler.generate(params, prompts, max_new_tokens=64, temperature=0.7, num_samples=8,
                           rng=jax.random.key(0))

``generate(model, prompts, ...)`` is the one-call form for a module.

The static engine's programs live in :mod:`sgalm_jax.sampling_static`; the continuous engine
(``engine="continuous"``) in :mod:`sgalm_jax.sampling_engine`.

How a call runs:

1. Prompts (ragged token lists, or an array plus mask with any padding) are left-padded to a prompt
   bucket (the next power of two, at least ``min_prompt_bucket``) and the batch is padded with dummy
   rows to a batch bucket (power of two, at least ``min_batch_bucket``, a multiple of the mesh's
   data-parallel size). Each (batch bucket, prompt bucket, max_new_tokens, sampling mode) compiles
   one prefill and one decode program; :attr:`Sampler.num_compilations` counts them.
2. The prefill program runs the prompt once, computes the last position's logits only, repeats the
   cache and logits ``num_samples`` times along the batch (no prefill per sample), and samples the
   first token.
3. The decode program takes the cache by donation (updated in place, no second copy) and loops with
   ``lax.while_loop`` until every row has produced a stop token or ``max_new_tokens`` tokens.

Log-probs: ``Generation.logprobs`` holds ``log_softmax(raw_logits)[token]`` for every generated
token, i.e. the log-probability under the *model* (temperature 1, no top-k/top-p), which is what a
teacher-forced forward over prompt + completion gives. It is not the probability under the filtered
sampling distribution.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sgalm_jax.errors import ConfigError
from sgalm_jax.models.config import ModelConfig, resolve_dtype
from sgalm_jax.models.transformer import CausalLM
from sgalm_jax.sampling_ops import (  # noqa: F401 (re-exported: the public sampling pieces)
    _make_mode, _Mode, sample_tokens, scale_temperature, token_logprobs, top_k_filter,
    top_p_filter)
from sgalm_jax.sampling_static import _decode, _prefill, _Program, bucket_size
from sgalm_jax.sharding import BATCH_AXES, data_parallel_size, jit_on_mesh, to_host

log = logging.getLogger(__name__)

__all__ = [
    "Generation", "Sampler", "TextGeneration", "generate", "generate_text", "scale_temperature",
    "top_k_filter", "top_p_filter", "token_logprobs", "sample_tokens", "bucket_size", "row_limits",
    "ENGINES",
]


# ------------------------------------------------------------------------------------- results
@dataclasses.dataclass
class Generation:
    """Sampled continuations; row ``i`` continues prompt ``prompt_index[i] = i // num_samples``.

    ``tokens`` [N, max_new_tokens] int32: a row's first ``lengths[i]`` entries are real, including the
    stop token when ``finished[i]``; the rest hold ``pad_token_id``. ``logprobs`` [N, max_new_tokens]
    float32: the model's log-prob of each generated token (log-softmax of the raw logits, equal to a
    teacher-forced forward; not the temperature / top-k / top-p distribution), 0 past the end.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    logprobs: np.ndarray
    finished: np.ndarray
    prompt_index: np.ndarray
    num_samples: int

    def completions(self) -> list[list[int]]:
        """Each row's generated token ids (stop token included)."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]

    def sum_logprobs(self) -> np.ndarray:
        """Total log-prob of each completion [N]."""
        return self.logprobs.sum(axis=-1)


@dataclasses.dataclass
class TextGeneration:
    """Decoded completions (``texts[i]`` continues ``prompts[i // num_samples]``)."""

    texts: list[str]
    prompts: list[str]
    generation: Generation


# ---------------------------------------------------------------------------------- the sampler
ENGINES = ("auto", "static", "continuous")
PLACEMENTS = ("global", "host_local")


def _find_mesh(state: Any) -> Mesh | None:
    """The mesh the params live on (None for single-device or unsharded params)."""
    for leaf in jax.tree.leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def row_limits(max_new_tokens: int | Sequence[int], num_prompts: int, num_samples: int
               ) -> np.ndarray:
    """Per-row maximum new tokens [prompts x samples] from one int, one per prompt or one per row."""
    if np.ndim(max_new_tokens) == 0:
        limits = np.full((num_prompts * num_samples,), int(max_new_tokens), np.int64)
    else:
        limits = np.asarray(max_new_tokens, np.int64).reshape(-1)
        if limits.size == num_prompts:
            limits = np.repeat(limits, num_samples)
        elif limits.size != num_prompts * num_samples:
            raise ConfigError(f"max_new_tokens: {limits.size} values for {num_prompts} prompts x "
                              f"{num_samples} samples; give one int, one per prompt or one per row")
    if limits.size and limits.min() < 1:
        raise ConfigError(f"max_new_tokens={int(limits.min())} must be >= 1 (every row)")
    return limits.astype(np.int32)


def _prompt_rows(prompts: Any, prompt_mask: Any) -> list[np.ndarray]:
    """Ragged int32 token rows from a list of lists or from an array plus mask (any padding)."""
    if prompt_mask is not None or isinstance(prompts, (np.ndarray, jax.Array)):
        ids = np.asarray(prompts)
        if ids.ndim != 2:
            raise ConfigError(f"prompts: expected a [batch, length] array, got shape {ids.shape}")
        mask = np.ones(ids.shape, bool) if prompt_mask is None else np.asarray(prompt_mask, bool)
        if mask.shape != ids.shape:
            raise ConfigError(f"prompt_mask shape {mask.shape} != prompts shape {ids.shape}")
        rows = [row[m].astype(np.int32) for row, m in zip(ids, mask)]
    else:
        rows = [np.asarray(list(p), np.int32) for p in prompts]
    for i, row in enumerate(rows):
        if row.size == 0:
            raise ConfigError(f"prompts[{i}] is empty; every prompt needs at least one token")
    return rows


class Sampler:
    """Compiled prefill/decode programs for one model graph, cached per shape bucket.

    Args:
      graphdef: the model's ``GraphDef`` (``nnx.split(model)[0]``); params are passed per call.
      config: the model's :class:`ModelConfig` (for cache shapes and the default EOS ids).
      cache_dtype: KV-cache dtype; default the model's compute dtype on CPU, bfloat16 on accelerators.
      min_prompt_bucket, min_batch_bucket: smallest prompt-length and batch buckets.
      max_batch_size: most rows (prompts x num_samples) per prefill/decode; larger calls are split.
      pad_token_id: filler for padding and for tokens past a row's end (default: the config's pad id,
        else 0).
      mesh: the mesh to shard the batch over; default: found from the params' shardings.
      engine: ``"static"`` (decode each batch until its longest row ends), ``"continuous"`` (a
        fixed number of slots, each refilled with the next waiting row when its row ends; see
        :mod:`sgalm_jax.sampling_engine`) or ``"auto"`` (continuous when a call has more rows than
        ``num_slots``, static otherwise). :meth:`generate` can override it per call.
      num_slots: rows decoded at once by the continuous engine (its memory bound); default
        ``max_batch_size``, else the call's row count capped at 64.
      prefill_chunk: prompts per prefill of the continuous engine; default enough to fill every
        slot once (``num_slots / num_samples``).
      refill_min: once the prefilled prompts have all started, the continuous engine returns to
        the host for the next prefill when this many slots are idle (default ``num_slots // 32``,
        at least 1; rows start in freed slots on the device, without the host).
      min_slots: once no row waits, the continuous engine moves its live rows to programs with
        half as many slots whenever they fit, down to this many (default ``num_slots // 4``;
        ``num_slots`` turns this off).
      placement: ``"global"`` (sample on the params' own mesh) or ``"host_local"`` (every host gets
        a copy of the params on its own devices, laid out by ``local_mesh_shape``, and samples its
        share of the prompts with the continuous engine; the rows are gathered in prompt order on
        every host; see :mod:`sgalm_jax.sampling_placement`).
      local_mesh_shape: the per-host sampling mesh of ``placement="host_local"`` (default
        ``{"data": local devices}``: the params replicated on each device).
    """

    def __init__(self, graphdef: nnx.GraphDef, config: ModelConfig, *, cache_dtype: Any = None,
                 min_prompt_bucket: int = 16, min_batch_bucket: int = 1,
                 max_batch_size: int | None = None, pad_token_id: int | None = None,
                 mesh: Mesh | None = None, compiler_options: Mapping[str, Any] | None = None,
                 engine: str = "auto", num_slots: int | None = None,
                 prefill_chunk: int | None = None, refill_min: int | None = None,
                 min_slots: int | None = None, placement: str = "global",
                 local_mesh_shape: Mapping[str, int] | None = None):
        if engine not in ENGINES:
            raise ConfigError(f"engine={engine!r}: expected one of {', '.join(ENGINES)}")
        if placement not in PLACEMENTS:
            raise ConfigError(f"placement={placement!r}: expected one of {', '.join(PLACEMENTS)}")
        for name, v in (("num_slots", num_slots), ("prefill_chunk", prefill_chunk),
                        ("refill_min", refill_min), ("min_slots", min_slots),
                        ("max_batch_size", max_batch_size)):
            if v is not None and int(v) < 1:
                raise ConfigError(f"{name}={v} must be >= 1 (or None)")
        self.graphdef = graphdef
        self.config = config
        self.cache_dtype = resolve_dtype(cache_dtype, "cache_dtype")
        self.min_prompt_bucket = int(min_prompt_bucket)
        self.min_batch_bucket = int(min_batch_bucket)
        self.max_batch_size = max_batch_size
        pad = config.pad_token_id if pad_token_id is None else pad_token_id
        self.pad_token_id = int(pad if pad is not None else 0)
        self.mesh = mesh
        self.compiler_options = dict(compiler_options) if compiler_options else None
        self.engine = engine
        self.num_slots = num_slots
        self.prefill_chunk = prefill_chunk
        self.refill_min = refill_min
        self.min_slots = min_slots
        self.placement = placement
        self.local_mesh_shape = dict(local_mesh_shape) if local_mesh_shape else None
        self._local_mesh = None
        self._programs: dict[tuple, tuple[Any, Any]] = {}
        self._continuous = None  # the ContinuousEngine, built on first use

    @classmethod
    def from_model(cls, model: CausalLM, **kwargs: Any) -> "Sampler":
        return cls(nnx.graphdef(model), model.config, **kwargs)

    # ---------------------------------------------------------------- compile bookkeeping
    @property
    def num_compilations(self) -> int:
        """XLA programs compiled so far by both engines (each program counts separately)."""
        n = sum(f._cache_size() for pair in self._programs.values() for f in pair)
        return n + (self._continuous.num_compilations if self._continuous is not None else 0)

    @property
    def continuous_engine(self):
        """The :class:`~sgalm_jax.sampling_engine.ContinuousEngine` (built on first use)."""
        if self._continuous is None:
            from sgalm_jax.sampling_engine import ContinuousEngine  # it imports this module

            self._continuous = ContinuousEngine(self.graphdef, self.config,
                                                compiler_options=self.compiler_options)
        return self._continuous

    def resolve_engine(self, num_rows: int, engine: str | None = None) -> str:
        """``"static"`` or ``"continuous"``: the engine a call with ``num_rows`` rows runs on."""
        engine = engine or self.engine
        if engine not in ENGINES:
            raise ConfigError(f"engine={engine!r}: expected one of {', '.join(ENGINES)}")
        if engine == "auto":
            slots = self.num_slots or self.max_batch_size
            return "continuous" if slots is not None and num_rows > slots else "static"
        return engine

    @property
    def buckets(self) -> list[tuple[int, int, int, int]]:
        """The (batch, prompt length, num_samples, max_new_tokens) buckets seen so far."""
        return sorted({k[:4] for k in self._programs})

    def _resolve_cache_dtype(self, platform: str | None = None) -> Any:
        if self.cache_dtype is not None:
            return self.cache_dtype
        return self.config.dtype if (platform or jax.default_backend()) == "cpu" else jnp.bfloat16

    def _get_programs(self, prog: _Program, mesh: Mesh | None):
        key = (prog.batch, prog.prompt_len, prog.num_samples, prog.max_new, prog.mode,
               prog.stop_ids, prog.pad_id, jnp.dtype(prog.cache_dtype).name, prog.head_nn, mesh)
        if key not in self._programs:
            opts = self.compiler_options
            prefill = jit_on_mesh(functools.partial(_prefill, self.graphdef, self.config, prog,
                                                    mesh), mesh, compiler_options=opts)
            decode = jit_on_mesh(functools.partial(_decode, self.graphdef, prog), mesh,
                                 donate_argnums=(1,), compiler_options=opts)
            self._programs[key] = (prefill, decode)
        return self._programs[key]

    # ------------------------------------------------------------------------ sampling
    def generate(self, state: Any, prompts: Any, *, max_new_tokens: int | Sequence[int],
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 num_samples: int = 1, stop_token_ids: Sequence[int] = (),
                 rng: jax.Array, prompt_mask: Any = None, use_eos: bool = True,
                 engine: str | None = None) -> Generation:
        """Sample ``num_samples`` continuations of every prompt with params ``state``.

        ``prompts``: a list of token-id lists (ragged), or a [B, T] array with ``prompt_mask``
        (1 = real token; left, right or no padding). Rows stop at the model's EOS ids (unless
        ``use_eos=False``), at any of ``stop_token_ids``, or after ``max_new_tokens``: one int, or
        one per prompt, or one per row (prompts x ``num_samples``); the output is as wide as the
        largest. ``temperature=0`` is greedy. ``rng`` is a ``jax.random.key``; the same key,
        prompts and settings give the same samples. ``engine`` overrides the sampler's engine.
        """
        if num_samples < 1:
            raise ConfigError(f"num_samples={num_samples} must be >= 1")
        mode = _make_mode(float(temperature), top_k, top_p)
        if mode.greedy and num_samples > 1:
            log.warning("num_samples=%d with temperature 0: all samples are identical", num_samples)
        rows = _prompt_rows(prompts, prompt_mask)
        limits = row_limits(max_new_tokens, len(rows), num_samples)
        stop = tuple(sorted(set((self.config.eos_token_ids if use_eos else ()))
                            | {int(s) for s in stop_token_ids}))
        mesh = self.mesh if self.mesh is not None else _find_mesh(state)
        if isinstance(rng, (int, np.integer)):
            rng = jax.random.key(int(rng))
        continuous = self.resolve_engine(len(limits), engine) == "continuous"
        compiled = self.num_compilations
        if continuous or self.placement == "host_local":
            out = self._generate_continuous(state, rows, limits, mesh, mode=mode, stop_ids=stop,
                                            num_samples=num_samples, rng=rng,
                                            temperature=float(temperature), top_p=top_p)
            self._report_compiles(compiled, "continuous", len(limits))
            return Generation(**out, prompt_index=np.repeat(np.arange(len(rows)), num_samples),
                              num_samples=num_samples)

        dp = data_parallel_size(mesh) if mesh is not None else 1
        per_call = self._prompts_per_call(len(rows), num_samples)
        width = int(limits.max())
        outs = []
        for c, start in enumerate(range(0, len(rows), per_call)):
            chunk = rows[start:start + per_call]
            key = rng if c == 0 else jax.random.fold_in(rng, c)
            lim = limits[start * num_samples:(start + len(chunk)) * num_samples]
            outs.append(self._generate_chunk(state, chunk, mesh, dp, mode, stop, width, lim,
                                             float(temperature), top_p, num_samples, key))
        tokens, logprobs, lengths, done = (np.concatenate(x) for x in zip(*outs))
        self._report_compiles(compiled, "static", len(limits))
        # A row ended on a stop token iff its last token is one (a row stops at its first); `done`
        # also holds for rows that reached their own max length.
        done = done & np.isin(tokens[np.arange(len(lengths)), np.maximum(lengths - 1, 0)], stop)
        return Generation(tokens=tokens, lengths=lengths, logprobs=logprobs, finished=done,
                          prompt_index=np.repeat(np.arange(len(rows)), num_samples),
                          num_samples=num_samples)

    def _prompts_per_call(self, prompts: int, num_samples: int) -> int:
        """Prompts the static engine decodes per program call: all of them, or as many as
        ``max_batch_size`` rows hold."""
        if self.max_batch_size is None:
            return prompts
        return max(1, min(prompts, self.max_batch_size // num_samples))

    def _report_compiles(self, before: int, engine: str, rows: int) -> None:
        """Log the programs a call compiled (a bounded number per shape configuration: a count
        that keeps growing from call to call means shapes are not being reused)."""
        now = self.num_compilations
        if now > before:
            log.info("sampler: %s engine compiled %d program(s) for %d rows (%d so far)", engine,
                     now - before, rows, now)

    def _generate_continuous(self, state, rows, limits, mesh, **kw) -> dict[str, np.ndarray]:
        """All rows through the continuous engine, on ``mesh`` or (``placement="host_local"``)
        each host's share on its own copy of the params, gathered."""
        kw.update(pad_id=self.pad_token_id, cache_dtype=self._resolve_cache_dtype(),
                  slots=int(self.num_slots or self.max_batch_size or min(len(limits), 64)),
                  prefill_chunk=self.prefill_chunk, refill_min=self.refill_min,
                  min_slots=self.min_slots, min_prompt_bucket=self.min_prompt_bucket,
                  width=int(limits.max()))
        if self.placement == "host_local":
            from sgalm_jax.sampling_placement import run_host_local

            return run_host_local(self.continuous_engine, state, rows, limits,
                                  mesh=self.host_local_mesh(), **kw)
        res = self.continuous_engine.run(state, rows, limits, mesh=mesh, **kw)
        return dict(tokens=res.tokens, logprobs=res.logprobs, lengths=res.lengths,
                    finished=res.finished)

    def host_local_mesh(self) -> Mesh:
        """This host's sampling mesh for ``placement="host_local"``."""
        if self._local_mesh is None:
            from sgalm_jax.sampling_placement import local_mesh

            self._local_mesh = local_mesh(self.local_mesh_shape)
        return self._local_mesh

    def _program(self, rows: int, longest: int, dp: int, mode: _Mode, stop: tuple[int, ...],
                 max_new: int, num_samples: int, mesh: Mesh | None = None) -> _Program:
        """The static program of a chunk of ``rows`` prompts whose longest has ``longest`` tokens
        (for the platform of ``mesh``'s devices, else the default backend)."""
        platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
        return _Program(batch=bucket_size(rows, self.min_batch_bucket, multiple=dp),
                        prompt_len=bucket_size(longest, self.min_prompt_bucket),
                        num_samples=num_samples, max_new=max_new, mode=mode, stop_ids=stop,
                        pad_id=self.pad_token_id, cache_dtype=self._resolve_cache_dtype(platform),
                        head_nn=self.config.tie_word_embeddings and platform == "cpu")

    def abstract_programs(self, state: Any, *, rows: int, prompt_tokens: int,
                          max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0,
                          top_k: int | None = None, top_p: float | None = None,
                          mesh: Mesh | None = None,
                          engine: str | None = None) -> list[tuple[str, Any, Any]]:
        """``[(name, jitted, args)]`` of the programs that a call with ``rows`` prompts of up to
        ``prompt_tokens`` tokens would run, for ahead-of-time compilation
        (``sgalm_jax.compile_only``). ``state`` may be abstract (``jax.ShapeDtypeStruct`` with
        shardings). A program's ``args`` may be a function of the program compiled before it (its
        output shardings place the next one's inputs).

        ``engine`` (default: the sampler's): the static engine gives its prefill and decode, for a
        batch of ``rows`` prompts capped by ``max_batch_size`` as :meth:`generate` chunks them;
        the continuous engine (also ``"auto"`` when the sampler has a row bound, since the
        algorithms pass whole workloads) its prefill and decode at ``num_slots`` (or
        ``max_batch_size``) slots."""
        mesh = mesh if mesh is not None else self.mesh
        dp = data_parallel_size(mesh) if mesh is not None else 1
        mode = _make_mode(float(temperature), top_k, top_p)
        stop = tuple(sorted(set(self.config.eos_token_ids)))
        engine = engine or self.engine
        if engine == "auto":
            bound = self.num_slots or self.max_batch_size
            engine = "continuous" if bound is not None else "static"
        if engine == "continuous":
            platform = mesh.devices.flat[0].platform if mesh is not None else None
            slots = int(self.num_slots or self.max_batch_size or rows * num_samples)
            return self.continuous_engine.abstract_programs(
                state, num_prompts=rows, prompt_tokens=prompt_tokens, width=max_new_tokens,
                mode=mode, stop_ids=stop, pad_id=self.pad_token_id,
                cache_dtype=self._resolve_cache_dtype(platform), num_samples=num_samples,
                slots=slots, prefill_chunk=self.prefill_chunk,
                min_prompt_bucket=self.min_prompt_bucket, mesh=mesh, platform=platform)
        rows = self._prompts_per_call(rows, num_samples)
        prog = self._program(rows, prompt_tokens, dp, mode, stop, max_new_tokens, num_samples,
                             mesh)
        prefill, decode = self._get_programs(prog, mesh)
        batch = NamedSharding(mesh, P(BATCH_AXES, None)) if mesh is not None else None
        repl = NamedSharding(mesh, P()) if mesh is not None else None
        spec = lambda shape, dtype, sh: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)  # noqa
        shape = (prog.batch, prog.prompt_len)
        key = jax.eval_shape(lambda: jax.random.key(0))
        scalars = (spec((), jnp.float32, repl), spec((), jnp.float32, repl))
        rows_1d = NamedSharding(mesh, P(BATCH_AXES)) if mesh is not None else None
        prefill_args = (state, spec(shape, jnp.int32, batch), spec(shape, jnp.bool_, batch),
                        spec((prog.batch * num_samples,), jnp.int32, rows_1d),  # row limits
                        spec(key.shape, key.dtype, repl), *scalars)

        def decode_args(compiled_prefill: Any) -> tuple:
            out = prefill.eval_shape(*prefill_args)
            ds = jax.tree.map(lambda o, s: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=s),
                              out, compiled_prefill.output_shardings)
            return (state, ds, *scalars)

        size = f"{prog.batch} x {prog.prompt_len} prompt, {prog.batch * num_samples} rows x " \
               f"{prog.prompt_len + max_new_tokens} cache"
        return [(f"sampler prefill ({size})", prefill, prefill_args),
                (f"sampler decode ({size})", decode, decode_args)]

    def _generate_chunk(self, state, rows, mesh, dp, mode, stop, max_new, limits, temperature,
                        top_p, num_samples, key):
        b = len(rows)
        longest = max(r.size for r in rows)
        prog = self._program(b, longest, dp, mode, stop, max_new, num_samples, mesh)
        t, bb = prog.prompt_len, prog.batch
        ids = np.full((bb, t), self.pad_token_id, np.int32)
        mask = np.zeros((bb, t), bool)
        for i, r in enumerate(rows):
            ids[i, t - r.size:] = r
            mask[i, t - r.size:] = True
        prefill, decode = self._get_programs(prog, mesh)
        limit = np.ones((bb * num_samples,), np.int32)  # dummy rows: 1
        limit[:limits.size] = limits
        ids, mask, limit = jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(limit)
        if mesh is not None:
            sharding = NamedSharding(mesh, P(BATCH_AXES, None))
            ids, mask = jax.device_put(ids, sharding), jax.device_put(mask, sharding)
            limit = jax.device_put(limit, NamedSharding(mesh, P(BATCH_AXES)))
        temp = jnp.float32(temperature if temperature > 0 else 1.0)
        p = jnp.float32(1.0 if top_p is None else top_p)
        ds = prefill(state, ids, mask, limit, key, temp, p)
        out = decode(state, ds, temp, p)
        del ds  # donated
        # Batch-sharded over every host's devices: gathered so each process gets every row.
        tokens, logprobs, lengths, done = to_host((out.tokens, out.logprobs, out.lengths,
                                                   out.done))
        n = b * num_samples
        return tokens[:n], logprobs[:n], lengths[:n], done[:n]

    # ---------------------------------------------------------------------------- text
    def generate_text(self, state: Any, tokenizer: Any, prompts: Sequence[Any], *,
                      chat_template: bool | None = None, stop_strings: Sequence[str] = (),
                      skip_special_tokens: bool = True, **kwargs: Any) -> TextGeneration:
        """Generate from strings or chat conversations and return decoded completions.

        ``prompts``: strings, or chat conversations (lists of ``{"role", "content"}`` dicts).
        ``chat_template``: apply the tokenizer's chat template (with the generation prompt); default
        True for conversations, False for strings (a string is then sent as one user message).
        Completions are decoded and cut before the first of ``stop_strings`` (generation itself stops
        only on stop tokens). The tokenizer's EOS id is added to the stop tokens. Other keyword
        arguments go to :meth:`generate`.
        """
        texts_in, ids = [], []
        for i, prompt in enumerate(prompts):
            is_chat = not isinstance(prompt, str)
            use_template = is_chat if chat_template is None else chat_template
            if is_chat and not use_template:
                raise ConfigError(f"prompts[{i}] is a conversation but chat_template=False")
            if use_template:
                messages = [{"role": "user", "content": prompt}] if not is_chat else list(prompt)
                text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=True)
            else:
                text = prompt
            texts_in.append(text)
            # A chat template writes its own BOS and special tokens; raw text gets the tokenizer's.
            ids.append(tokenizer(text, add_special_tokens=not use_template)["input_ids"])
        stop = set(kwargs.pop("stop_token_ids", ()))
        if getattr(tokenizer, "eos_token_id", None) is not None:
            stop.add(int(tokenizer.eos_token_id))
        gen = self.generate(state, ids, stop_token_ids=tuple(sorted(stop)), **kwargs)
        texts = [trim_stop_strings(tokenizer.decode(c, skip_special_tokens=skip_special_tokens),
                                   stop_strings) for c in gen.completions()]
        return TextGeneration(texts=texts, prompts=texts_in, generation=gen)


def trim_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` cut before the earliest occurrence of any of ``stop_strings``."""
    cut = len(text)
    for s in stop_strings:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


# ------------------------------------------------------------------------ module-level helpers
_SAMPLERS: dict[tuple, Sampler] = {}


def _sampler_for(model: CausalLM, options: Mapping[str, Any]) -> tuple[Sampler, Any]:
    graphdef, state = nnx.split(model)
    key = (graphdef, tuple(sorted((k, repr(v)) for k, v in options.items())))
    sampler = _SAMPLERS.get(key)
    if sampler is None:
        if len(_SAMPLERS) >= 16:  # bounded: drop the oldest
            _SAMPLERS.pop(next(iter(_SAMPLERS)))
        sampler = _SAMPLERS[key] = Sampler(graphdef, model.config, **options)
    return sampler, state


_SAMPLER_OPTIONS = ("cache_dtype", "min_prompt_bucket", "min_batch_bucket", "max_batch_size",
                    "pad_token_id", "mesh", "num_slots", "prefill_chunk", "refill_min", "min_slots",
                    "placement", "local_mesh_shape")


def generate(model: CausalLM, prompts: Any, *, max_new_tokens: int | Sequence[int],
             temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, num_samples: int = 1,
             stop_token_ids: Sequence[int] = (), rng: jax.Array, **kwargs: Any) -> Generation:
    """Sample from ``model`` (see :meth:`Sampler.generate`; sampler options may be passed too).

    Repeated calls on models with the same graph reuse one cached :class:`Sampler`, so compiled
    programs are shared.
    """
    options = {k: kwargs.pop(k) for k in _SAMPLER_OPTIONS if k in kwargs}
    sampler, state = _sampler_for(model, options)
    return sampler.generate(state, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, num_samples=num_samples,
                            stop_token_ids=stop_token_ids, rng=rng, **kwargs)


def generate_text(model: CausalLM, tokenizer: Any, prompts: Sequence[Any], **kwargs: Any
                  ) -> TextGeneration:
    """Text in, text out (see :meth:`Sampler.generate_text`)."""
    options = {k: kwargs.pop(k) for k in _SAMPLER_OPTIONS if k in kwargs}
    sampler, state = _sampler_for(model, options)
    return sampler.generate_text(state, tokenizer, prompts, **kwargs)
