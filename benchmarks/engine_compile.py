"""Compile time of the continuous engine's programs against depth (a tiny random model).

    python benchmarks/engine_compile.py --layers 2 12

A Qwen2-shaped tiny model (hidden 64, 4 heads / 2 KV heads, vocab 1000) with ``--layers`` layers,
scanned (the default) or unrolled (``--unroll``). One engine call (8 prompts of 3-15 tokens, up to
12 new tokens, 4 slots, greedy; the tail shrinks to 2 and 1 slots) compiles every engine program;
the script prints the summed XLA compile time of those programs (JAX's compile events), the number
of programs, and the wall time of the first (compiling) and second (cached) call. Each layer count
runs in this process one after another; the peer is depth against depth (the same call at 2
layers).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

from sgalm_jax.models import CausalLM, ModelConfig
from sgalm_jax.sampling import Sampler

_EVENTS: list[float] = []


def _listen(event: str, duration: float, **kw) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _EVENTS.append(duration)


def measure(layers: int, scan: bool) -> dict:
    cfg = ModelConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      scan_layers=scan)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rs = np.random.RandomState(0)
    prompts = [rs.randint(3, 1000, rs.randint(3, 16)).tolist() for _ in range(8)]
    limits = rs.randint(1, 13, 8)
    limits[0] = 12
    sampler = Sampler(graphdef, cfg, engine="continuous", num_slots=4)
    kw = dict(max_new_tokens=limits, temperature=0.0, rng=jax.random.key(0), use_eos=False)
    _EVENTS.clear()
    t0 = time.perf_counter()
    sampler.generate(state, prompts, **kw)
    first = time.perf_counter() - t0
    compile_s = sum(_EVENTS)
    t0 = time.perf_counter()
    sampler.generate(state, prompts, **kw)
    second = time.perf_counter() - t0
    return dict(layers=layers, compile_s=compile_s, first_s=first, second_s=second,
                programs=sampler.continuous_engine.num_compilations)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 12])
    p.add_argument("--unroll", action="store_true", help="model.scan_layers=False")
    args = p.parse_args(argv)
    jax.monitoring.register_event_duration_secs_listener(_listen)
    print("| layers | scan | programs | XLA compile s (engine call) | first call s "
          "| second call s |")
    print("|---|---|---|---|---|---|")
    for n in args.layers:
        r = measure(n, not args.unroll)
        print(f"| {n} | {not args.unroll} | {r['programs']} | {r['compile_s']:.2f} | "
              f"{r['first_s']:.2f} | {r['second_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
