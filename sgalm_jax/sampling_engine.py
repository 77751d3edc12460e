"""Continuous batching: a fixed number of decode slots kept busy until every row has ended.

The static sampler (:mod:`sgalm_jax.sampling`) decodes a batch until its *longest* row ends; with the
ragged lengths of real answers most of its steps go to rows that have already stopped. This engine
holds ``S`` slots, each with its own region of one preallocated KV cache of ``P + W`` positions per
slot (values ``[L, S, kv_heads, P + W, head_dim]``, keys transposed, as
:class:`~sgalm_jax.models.transformer.KVCache` lays them out, stacked over the ``L`` layers as the
scanned decoder carries them through its layer scan; ``P`` the prompt bucket, ``W`` the longest
row's token budget). When a row ends (a stop token, or its own maximum length) its slot takes the
next waiting row, on the device, so every decode step works on ``S`` live rows until the queue is
empty. All shapes are fixed per (slots, prompt bucket, width, sampling mode, stop ids): a call
configuration compiles 3 programs, plus a prefill per smaller prompt bucket its chunks use and 2
per smaller slot count the tail shrinks to, whatever the prompts and lengths; plus, once per
engine, ``head`` (below) for a tied head on CPU.

Programs (in :mod:`sgalm_jax.sampling_engine_programs`; ``ContinuousEngine.num_compilations``
counts them):

* ``init``: the slot state, allocated once per call directly in its sharding.
* ``prefill``: ``C`` waiting prompts at once (a batched chunk, right-padded to its own bucket
  ``T <= P``; the host schedules prompts longest first so chunks pad little) into a *stash*:
  their keys/values (padded to ``P``) and last-position logits. With ``num_samples = n`` each
  stashed prompt feeds ``n`` rows, so the prompt is run once, not once per sample.
* ``decode``: a ``lax.while_loop`` over decode steps of all slots (every slot at its own position;
  all write their new keys/values at one shared ring position, see :func:`_init`). Before the
  first step and after each one it copies ended rows into an exit buffer (:func:`_harvest`) and
  starts the stash's next rows in the freed slots (:func:`_start`: the prompt's keys/values
  copied into the slot, the first token sampled from the stash's logits). It returns to the host
  when every slot is idle, when the stash is used up while prompts wait for a prefill and
  ``refill_min`` slots are idle, when the exit buffer is full, or, with nothing waiting, when the
  live rows fit in half the slots.
* ``compact``: in that tail, the live rows gathered into a state with half the slots (down to
  ``min_slots``), decoded from then on by the ``decode`` program of that size.
* ``head``: on CPU with a tied head, the ``[hidden, vocab]`` copy of the embedding that decode
  multiplies by, made once per call (inside ``decode`` it would be redone at every call).

Between programs the host only prefills the next chunk and copies ended rows out of the exit
buffer: about one decode call per prefill chunk.

Randomness is per row: row ``r`` (prompt ``r // n``, sample ``r % n``) draws step ``j`` from
``fold_in(fold_in(rng, r), j)``. Output therefore does not depend on the slot count, the chunk size,
the order rows were scheduled in, or how the prompts were split over hosts; it is not the same
stream as the static sampler's (one key per step for the whole batch), but the same distribution.

Log-probs are ``log_softmax(raw logits)[token]``, as in the static sampler.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sgalm_jax.errors import ConfigError
from sgalm_jax.models.config import ModelConfig
from sgalm_jax.sampling_static import bucket_size
from sgalm_jax.sampling_engine_programs import (_compact, _decode, _EngineProgram, _head, _init,
                                                _prefill, _Queue, _slot_shardings)
from sgalm_jax.sampling_ops import _Mode
from sgalm_jax.sharding import BATCH_AXES, to_host

__all__ = ["ContinuousEngine", "EngineResult", "default_prefill_chunk"]


# ------------------------------------------------------------------------- compile accounting
# XLA compilations are counted from JAX's compile events while an engine runs: a jitted function's
# dispatch-cache size can hold two entries for one executable (seen with donated, sharded inputs),
# and a count of programs should count programs.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_PROGRAM_NAMES = ("_init", "_prefill", "_decode", "_compact", "_head")
_active_counter: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "sgalm_engine_compiles", default=None)


def _on_duration_event(event: str, duration: float, **kwargs: Any) -> None:
    if event != _COMPILE_EVENT:
        return
    counter = _active_counter.get()
    name = str(kwargs.get("fun_name", ""))
    if counter is not None and any(n in name for n in _PROGRAM_NAMES):
        counter[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration_event)


@contextlib.contextmanager
def _counting(counter: list[int]):
    token = _active_counter.set(counter)
    try:
        yield
    finally:
        _active_counter.reset(token)


# ---------------------------------------------------------------------------------- the engine
@dataclasses.dataclass
class EngineResult:
    """Per-row outputs in row order (row ``r`` continues prompt ``r // num_samples``)."""

    tokens: np.ndarray  # [R, W] int32
    logprobs: np.ndarray  # [R, W] float32
    lengths: np.ndarray  # [R] int32
    finished: np.ndarray  # [R] bool: ended on a stop token
    decode_calls: int = 0  # decode programs run (host round trips)
    prefills: int = 0
    slot_sizes: tuple[int, ...] = ()  # the slot counts decoded with (shrinking in the tail)
    decode_steps: tuple[tuple[int, int], ...] = ()  # (slots, decode steps) of each decode call


def default_prefill_chunk(slots: int, num_samples: int, num_prompts: int, multiple: int = 1) -> int:
    """Prompts per prefill: enough to fill every slot once (``ceil(slots / num_samples)``), as a
    power of two, but not more than the (bucketed) number of prompts."""
    want = -(-slots // max(num_samples, 1))
    return bucket_size(min(want, max(num_prompts, 1)), 1, multiple)


class ContinuousEngine:
    """Compiled slot programs for one model graph, cached per (slots, prompt bucket, width, sampling
    mode, stop ids); prefill and insert also compile once per prefill chunk size.

    Use it through :class:`sgalm_jax.sampling.Sampler` (``engine="continuous"``); :meth:`run` is
    the array-level entry point.
    """

    def __init__(self, graphdef: nnx.GraphDef, config: ModelConfig, *,
                 compiler_options: Mapping[str, Any] | None = None):
        self.graphdef = graphdef
        self.config = config
        self.compiler_options = dict(compiler_options) if compiler_options else None
        self._programs: dict[tuple, tuple[Any, ...]] = {}
        self._head = jax.jit(functools.partial(_head, graphdef),
                             compiler_options=self.compiler_options)
        self._compiles = [0]
        self.last_run: dict[str, Any] = {}  # decode calls, prefills, slot sizes of the last run

    @property
    def num_compilations(self) -> int:
        """XLA programs compiled so far (init, prefill, insert and decode count separately)."""
        return self._compiles[0]

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        """The (slots, prompt bucket, width) shapes compiled so far (each jitted program also
        compiles once per prefill chunk size it sees)."""
        return sorted({k[:3] for k in self._programs})

    def _get_programs(self, prog: _EngineProgram, mesh: Mesh | None):
        key = (prog.slots, prog.prompt_len, prog.width, prog.mode, prog.stop_ids,
               prog.pad_id, jnp.dtype(prog.cache_dtype).name, prog.head_nn, mesh)
        if key not in self._programs:
            opts = self.compiler_options
            out = _slot_shardings(self.config, prog, mesh)
            init = jax.jit(functools.partial(_init, self.config, prog, mesh), out_shardings=out,
                           compiler_options=opts)
            prefill = jax.jit(functools.partial(_prefill, self.graphdef, self.config, prog, mesh),
                              compiler_options=opts)
            repl = None if mesh is None else NamedSharding(mesh, P())
            decode = jax.jit(functools.partial(_decode, self.graphdef, prog),
                             donate_argnums=(2,), out_shardings=(out, repl, repl, repl),
                             compiler_options=opts)
            compact = jax.jit(_compact, out_shardings=out, compiler_options=opts)
            self._programs[key] = (init, prefill, decode, compact)
        return self._programs[key]

    def _plan(self, num_prompts: int, prompt_tokens: int, width: int, num_samples: int,
              slots: int, prefill_chunk: int | None, min_prompt_bucket: int, mesh: Mesh | None,
              platform: str | None = None, **static: Any) -> tuple[_EngineProgram, int, int]:
        """The program of a call (slots and prompt bucket, both bucketed; ``static``: its mode,
        stop ids, pad id and cache dtype), its prefill chunk and the mesh's data-parallel size.
        ``platform``: the devices compiled for (default: the mesh's, else the default backend)."""
        dp = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES
                                                 if a in mesh.shape]))  # axes it has
        platform = platform or (mesh.devices.flat[0].platform if mesh is not None
                                else jax.default_backend())
        s = bucket_size(min(slots, num_prompts * num_samples), 1, dp)
        c = bucket_size(prefill_chunk or default_prefill_chunk(s, num_samples, num_prompts, dp),
                        1, dp)
        prog = _EngineProgram(slots=s, prompt_len=bucket_size(prompt_tokens, min_prompt_bucket),
                              width=width, head_nn=self.config.tie_word_embeddings
                              and platform == "cpu", **static)
        return prog, c, dp

    def abstract_programs(self, state: Any, *, num_prompts: int, prompt_tokens: int, width: int,
                          mode: _Mode, stop_ids: tuple[int, ...], pad_id: int, cache_dtype: Any,
                          num_samples: int, slots: int, prefill_chunk: int | None = None,
                          min_prompt_bucket: int = 16, mesh: Mesh | None = None,
                          platform: str | None = None) -> list[tuple[str, Any, Any]]:
        """``[(name, jitted, args)]`` of the prefill and decode programs of a call at its largest
        shapes (``num_prompts`` prompts of up to ``prompt_tokens`` tokens, rows of up to ``width``
        new tokens), for ahead-of-time compilation (``sgalm_jax.compile_only``). ``state`` may be
        abstract. The decode's ``args`` is a function of the compiled prefill (its output
        shardings place the stash); the slot state has fixed shardings. ``platform``: the
        target's (default: the mesh's devices', else the default backend)."""
        prog, c, _ = self._plan(num_prompts, prompt_tokens, width, num_samples, slots,
                                prefill_chunk, min_prompt_bucket, mesh, platform, mode=mode,
                                stop_ids=stop_ids, pad_id=pad_id, cache_dtype=cache_dtype)
        s, t = prog.slots, prog.prompt_len
        _, prefill, decode, _ = self._get_programs(prog, mesh)

        def sharded(tree: Any, shardings: Any) -> Any:
            if shardings is None:
                return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
            return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                tree, shardings)

        def spec(shape, dtype, sharding=None):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        batch = None if mesh is None else NamedSharding(mesh, P(BATCH_AXES, None))
        repl = None if mesh is None else NamedSharding(mesh, P())
        slot_state = sharded(jax.eval_shape(functools.partial(_init, self.config, prog, None)),
                             _slot_shardings(self.config, prog, mesh))
        key = jax.eval_shape(lambda: jax.random.key(0))
        key = spec(key.shape, key.dtype, repl)
        scalars = (spec((), jnp.float32, repl), spec((), jnp.float32, repl))
        i32 = spec((), jnp.int32, repl)
        q = spec((c * num_samples,), jnp.int32, repl)
        queue = _Queue(rows=q, src=q, limits=q, size=i32, cursor=i32)
        prefill_args = (state, spec((c, t), jnp.int32, batch), spec((c, t), jnp.bool_, batch))
        head = None
        if prog.head_nn:
            head = jax.eval_shape(self._head, state)
            head = spec(head.shape, head.dtype, repl)

        def decode_args(compiled_prefill: Any) -> tuple:
            stash = prefill.eval_shape(*prefill_args)
            stash = sharded(stash, compiled_prefill.output_shardings)
            return (state, head, slot_state, stash, queue, i32, i32, i32, key, i32, *scalars)

        size = f"{s} slots x {t + width} cache"
        return [(f"engine prefill ({c} x {t} prompt)", prefill, prefill_args),
                (f"engine decode ({size}, {c}-prompt stash)", decode, decode_args)]

    def run(self, *args: Any, **kwargs: Any) -> EngineResult:
        """Generate every row of ``prompts`` x ``num_samples`` with ``slots`` slots (see
        :meth:`_run` for the arguments), counting the programs it compiles."""
        with _counting(self._compiles):
            res = self._run(*args, **kwargs)
        steps: dict[int, int] = {}
        for slots, n in res.decode_steps:
            steps[slots] = steps.get(slots, 0) + n
        self.last_run = dict(decode_calls=res.decode_calls, prefills=res.prefills,
                             slot_sizes=res.slot_sizes, decode_steps=steps)
        return res

    def _run(self, state: Any, prompts: Sequence[np.ndarray], limits: np.ndarray, *, mode: _Mode,
             stop_ids: tuple[int, ...], pad_id: int, cache_dtype: Any, num_samples: int,
             rng: jax.Array, temperature: float, top_p: float | None, slots: int,
             prefill_chunk: int | None = None, refill_min: int | None = None,
             min_slots: int | None = None, min_prompt_bucket: int = 16,
             mesh: Mesh | None = None, row_offset: int = 0,
             width: int | None = None) -> EngineResult:
        """Generate every row of ``prompts`` x ``num_samples`` with ``slots`` slots.

        ``limits`` [len(prompts) * num_samples]: each row's maximum new tokens (>= 1).
        ``refill_min``: once the stash's rows have all started, return to the host for the next
        prefill when this many slots are idle (default ``slots // 32``, at least 1).
        ``min_slots``: once no row is waiting, the live rows move to programs of half as many
        slots whenever they fit, down to this many (default ``slots // 4``; ``slots`` turns
        shrinking off). ``row_offset`` shifts the row ids that seed
        each row's key (a host sampling a share of a larger workload passes the global index of its
        first row, so its samples equal those of a single-host run). ``width``: the output width
        (default ``max(limits)``).
        """
        n_prompts, n = len(prompts), num_samples
        n_rows = n_prompts * n
        limits = np.asarray(limits, np.int32).reshape(-1)
        if limits.shape != (n_rows,) or (limits < 1).any():
            raise ConfigError(f"limits: expected {n_rows} positive per-row maximum lengths, got "
                              f"shape {limits.shape} (min {limits.min() if limits.size else '-'})")
        width = int(width or limits.max())
        if width < limits.max():
            raise ConfigError(f"width={width} is less than the longest row limit {limits.max()}")
        if n_rows == 0:
            return EngineResult(tokens=np.full((0, width), pad_id, np.int32),
                                logprobs=np.zeros((0, width), np.float32),
                                lengths=np.zeros((0,), np.int32), finished=np.zeros((0,), bool))
        prog, c, dp = self._plan(n_prompts, max(p.size for p in prompts), width, n, slots,
                                 prefill_chunk, min_prompt_bucket, mesh, mode=mode,
                                 stop_ids=stop_ids, pad_id=pad_id, cache_dtype=cache_dtype)
        s, t = prog.slots, prog.prompt_len
        init, prefill, decode, _ = self._get_programs(prog, mesh)
        refill_min = jnp.int32(refill_min or max(1, s // 32))
        min_slots = bucket_size(min(min_slots or s // 4, s), 1, dp)

        ids = np.full((n_prompts, t), pad_id, np.int32)
        mask = np.zeros((n_prompts, t), bool)
        for i, p in enumerate(prompts):
            ids[i, :p.size] = p
            mask[i, :p.size] = True
        batch_sharding = None if mesh is None else NamedSharding(mesh, P(BATCH_AXES))
        vec_sharding = None if mesh is None else NamedSharding(mesh, P())

        def put(x, sharding=vec_sharding):
            return jnp.asarray(x) if sharding is None else jax.device_put(x, sharding)

        temp = jnp.float32(temperature if temperature > 0 else 1.0)
        p_top = jnp.float32(1.0 if top_p is None else top_p)
        offset = jnp.int32(row_offset)

        out_tokens = np.full((n_rows, width), pad_id, np.int32)
        out_lps = np.zeros((n_rows, width), np.float32)
        out_len = np.zeros((n_rows,), np.int32)
        out_fin = np.zeros((n_rows,), bool)
        harvested = np.zeros((n_rows,), bool)
        # Prompts are scheduled longest first, so that each prefill chunk pads to the smallest
        # bucket it can (output does not depend on the schedule: each row has its own key), and
        # rows whose answers run long with their questions start early rather than in the tail.
        order = np.argsort(-mask.sum(-1), kind="stable")
        next_row = 0  # rows handed to a queue so far (whole prompts: a multiple of n)
        stash = queue = None
        cursor = size = 0
        q_src = put(np.repeat(np.arange(c, dtype=np.int32), n))  # each queued row's stash entry
        decode_calls = prefills = 0
        decode_steps: list[tuple[int, int]] = []  # (slots, steps) per decode call
        sizes = [s]
        head = self._head(state) if prog.head_nn else None
        x = init()
        while not harvested.all():
            if cursor >= size and next_row < n_rows:  # the queue is used up: prefill the next chunk
                lo = next_row // n
                chunk = order[lo:lo + c]  # prompt ids
                tc = bucket_size(int(mask[chunk].sum(-1).max()), min(min_prompt_bucket, t))
                cid = np.full((c, tc), pad_id, np.int32)
                cmask = np.zeros((c, tc), bool)
                cmask[:, 0] = True  # dummy rows: one token, never started
                cid[:chunk.size], cmask[:chunk.size] = ids[chunk, :tc], mask[chunk, :tc]
                stash = prefill(state, put(cid, batch_sharding), put(cmask, batch_sharding))
                prefills += 1
                size = chunk.size * n
                q_rows = np.zeros((c * n,), np.int32)
                q_rows[:size] = (chunk[:, None] * n + np.arange(n)).reshape(-1)
                q_lim = np.ones((c * n,), np.int32)
                q_lim[:size] = limits[q_rows[:size]]
                queue = _Queue(rows=put(q_rows), src=q_src, limits=put(q_lim),
                               size=jnp.int32(size), cursor=jnp.int32(0))
                next_row += size
                cursor = 0
            else:
                queue = dataclasses.replace(queue, cursor=jnp.int32(cursor))
            shrink_at = s // 2 if next_row >= n_rows and s // 2 >= min_slots else -1
            waiting = jnp.int32(n_rows - next_row)
            x, cur, ex, n_steps = decode(state, head, x, stash, queue, waiting, refill_min,
                                         jnp.int32(shrink_at), rng, offset, temp, p_top)
            decode_calls += 1
            # Slot-sharded over every host's devices on a multi-host mesh: gathered to each process
            # (the same values everywhere, so every process takes the same scheduling decisions).
            steps, cursor, count, rows, tokens, lps, lengths, stopped, active, slot_row = to_host(
                (n_steps, cur, ex.count, ex.rows, ex.tokens, ex.logprobs, ex.lengths, ex.stopped,
                 x.active, x.row))
            cursor, count = int(cursor), int(count)
            decode_steps.append((s, int(steps)))
            r = rows[:count]
            out_tokens[r], out_lps[r], out_len[r], out_fin[r] = (
                tokens[:count], lps[:count], lengths[:count], stopped[:count])
            harvested[r] = True
            live = int(active.sum())
            if (next_row >= n_rows and cursor >= size and 0 < live <= s // 2
                    and s // 2 >= min_slots and (slot_row[~active] < 0).all()):
                # The tail: move the live rows to a program with fewer slots (live ones first;
                # every ended row has been copied out, so the rest are free slots).
                s = bucket_size(live, min_slots, dp)
                keep = np.concatenate([np.flatnonzero(active), np.flatnonzero(~active)])[:s]
                prog = dataclasses.replace(prog, slots=s)
                _, _, decode, compact = self._get_programs(prog, mesh)
                x = compact(x, put(keep.astype(np.int32)))
                sizes.append(s)
        del x, head
        return EngineResult(tokens=out_tokens, logprobs=out_lps, lengths=out_len,
                            finished=out_fin, decode_calls=decode_calls, prefills=prefills,
                            slot_sizes=tuple(sizes), decode_steps=tuple(decode_steps))
