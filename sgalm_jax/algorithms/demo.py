"""The embedded default job: a forward pass and a greedy continuation of a small random model.

Runs with no download and no config file (``python -m sgalm_jax.main``): builds ``model.init``
(default ``tiny-qwen2``) with the offline ``builtin:tiny`` tokenizer, scores an arithmetic
word problem from the built-in task (mean next-token log-likelihood), then continues it greedily with
the sampler. The weights are random, so the continuation is noise; the point is that the whole
stack (config, mesh, model, tokenizer, sampler) runs end to end.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgalm_jax import sharding as sh
from sgalm_jax.data import get_task
from sgalm_jax.losses.common import causal_lm_logprobs
from sgalm_jax.sampling import Sampler
from sgalm_jax.training.model_setup import build_model
from sgalm_jax.training.tokenizer import BUILTIN_TINY, load_tokenizer

log = logging.getLogger(__name__)


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Forward + greedy continuation; prints and returns what it measured."""
    if not config.model.path and not config.model.init:
        config.model.init = "tiny-qwen2"
    if not config.tokenizer.path:
        config.tokenizer.path = config.model.path or BUILTIN_TINY
    mesh = sh.make_mesh(dict(config.mesh))
    model = build_model(config.model, mesh=mesh, seed=config.seed)
    tokenizer = load_tokenizer(config.tokenizer.path, cache_dir=workdir)
    problem = get_task("arithmetic", seed=config.seed).load("test", limit=1)[0]
    prompt = f"Question: {problem.question}\nAnswer:"
    ids = np.asarray([tokenizer(prompt)["input_ids"]], np.int32)

    graphdef, state = nnx.split(model)

    @jax.jit
    def score(state, ids):
        logits = nnx.merge(graphdef, state)(ids)
        out = causal_lm_logprobs(logits, ids, jnp.ones_like(ids))
        return out.sequence_mean[0]

    start = time.perf_counter()
    mean_logprob = float(score(state, ids))
    forward_s = time.perf_counter() - start

    sampler = Sampler(graphdef, model.config)
    start = time.perf_counter()
    gen = sampler.generate(state, [ids[0].tolist()], max_new_tokens=32, temperature=0.0,
                           rng=jax.random.key(config.seed))
    generate_s = time.perf_counter() - start
    continuation = tokenizer.decode(gen.completions()[0])

    summary = {
        "model": config.model.path or config.model.init,
        "params": model.config.num_params(),
        "devices": jax.device_count(),
        "prompt_tokens": int(ids.shape[1]),
        "mean_logprob": mean_logprob,
        "new_tokens": int(gen.lengths[0]),
        "forward_s": round(forward_s, 3),
        "generate_s": round(generate_s, 3),
    }
    print(f"model {summary['model']} ({summary['params']:,} params) on "
          f"{summary['devices']} device(s)")
    print(f"prompt ({summary['prompt_tokens']} tokens): {prompt!r}")
    print(f"mean next-token log-prob of the prompt: {mean_logprob:.3f} "
          f"(uniform would be {-np.log(model.config.vocab_size):.3f})")
    print(f"greedy continuation ({summary['new_tokens']} tokens): {continuation!r}")
    return summary
