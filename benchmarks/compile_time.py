"""Compile time of a 3B-shaped SFT train step against depth: scanned vs unrolled layers.

    python benchmarks/compile_time.py                       # 4, 12, 36 layers; scan and unroll
    python benchmarks/compile_time.py --layers 4 36 --rounds 3 --modes scan

The step is the one ``sgalm_jax.algorithms.sft`` runs: a Qwen2.5-3B-shaped model (hidden 2048,
MLP 11008, 16 heads / 2 KV heads, vocab 151,936) with abstract weights (``nnx.eval_shape``: nothing
is allocated), fp32 master weights, bf16 compute, full remat, AdamW + clipping, the loss from hidden
states in 128-position chunks, batch 2 x 512 on a one-device mesh. Only the layer count changes.
Each measurement is ``jit(step).lower(...)`` (tracing) plus ``.compile()`` (XLA) in a fresh
process, so no cache is shared between them; ``--rounds`` repeats every (layers, mode) pair,
alternating them, and the medians are printed with the machine's load average.

``--modes``: ``scan`` (``model.scan_layers=True``: one scanned block over stacked weights, the
default) and ``unroll`` (a Python loop over the layers); ``legacy`` runs the children on another
checkout given by ``--legacy-path`` (e.g. one from before scanned layers existed, whose model has
no ``scan_layers`` option), so the old and new code alternate under the same load.

The peer is the PyTorch side of nothing: compilation has no torch counterpart; the comparison is
depth against depth (target: 36 layers within 1.3x of 4 with scan).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def measure(layers: int, mode: str, batch: int, seq: int, chunk: int) -> dict:
    """Lower and compile one train step in this process; returns the times in seconds."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sgalm_jax import sharding as sh
    from sgalm_jax.algorithms.sft import make_sft_loss
    from sgalm_jax.config import MODEL_PRESETS, base_config
    from sgalm_jax.models import CausalLM, ModelConfig
    from sgalm_jax.training import TrainState, make_optimizer, make_train_step, split_model
    from sgalm_jax.training.state import train_state_shardings

    hf = dict(MODEL_PRESETS["qwen2.5-3b"], num_hidden_layers=layers)
    extra = {} if mode == "legacy" else {"scan_layers": mode == "scan"}
    cfg = ModelConfig.from_hf(hf, dtype="bfloat16", param_dtype="float32", remat="full", **extra)
    mesh = sh.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.devices()[:1])
    graphdef, params = split_model(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
    opt = base_config().optimizer
    opt.name, opt.learning_rate, opt.max_grad_norm = "adamw", 1e-5, 1.0
    tx, schedule = make_optimizer(opt, num_steps=100, params=params)
    pshard = sh.state_shardings(params, mesh)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                       opt_state=jax.eval_shape(tx.init, params),
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    shardings = train_state_shardings(state, mesh, pshard)
    step = make_train_step(make_sft_loss(graphdef, logits_chunk_size=chunk), tx, mesh=mesh,
                           state_shardings=shardings, learning_rate=schedule)
    spec = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    batch_spec = {"input_ids": spec, "attention_mask": spec, "positions": spec,
                  "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.float32)}
    t0 = time.perf_counter()
    lowered = step.lower(state, batch_spec)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"layers": layers, "mode": mode, "lower_s": t1 - t0, "compile_s": t2 - t1,
            "total_s": t2 - t0, "params": cfg.num_params()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 12, 36])
    p.add_argument("--modes", nargs="+", default=["scan", "unroll"],
                   choices=["scan", "unroll", "legacy"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--chunk", type=int, default=128, help="sft.logits_chunk_size")
    p.add_argument("--legacy-path", default="",
                   help="checkout whose sgalm_jax the 'legacy' mode imports (PYTHONPATH)")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # child: 'layers,mode'
    args = p.parse_args(argv)
    if args.one:
        layers, mode = args.one.split(",")
        print(json.dumps(measure(int(layers), mode, args.batch, args.seq, args.chunk)))
        return

    results: dict[tuple[int, str], list[dict]] = {}
    loads = []
    for r in range(args.rounds):
        for layers in args.layers:
            for mode in args.modes:
                loads.append(os.getloadavg()[0])
                cmd = [sys.executable, __file__, "--one", f"{layers},{mode}", "--batch",
                       str(args.batch), "--seq", str(args.seq), "--chunk", str(args.chunk)]
                env = dict(os.environ)
                if mode == "legacy" and args.legacy_path:
                    env["PYTHONPATH"] = os.path.abspath(args.legacy_path)
                out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
                if out.returncode:
                    sys.exit(f"layers={layers} mode={mode} failed:\n{out.stderr[-3000:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault((layers, mode), []).append(res)
                print(f"round {r}: {layers:3d} layers, {mode:6s}: lower {res['lower_s']:.2f}s + "
                      f"compile {res['compile_s']:.2f}s = {res['total_s']:.2f}s", flush=True)
    import jax

    print(f"\njax {jax.__version__}, {os.cpu_count()} CPUs, load average during the runs: "
          f"median {np.median(loads):.1f} (min {min(loads):.1f}, max {max(loads):.1f})")
    print(f"{'layers':>6} {'mode':>7} {'lower s':>8} {'compile s':>9} {'total s':>8} "
          f"{'vs first':>8}")
    for mode in args.modes:
        base = None
        for layers in args.layers:
            rs = results[(layers, mode)]
            lo = float(np.median([x["lower_s"] for x in rs]))
            co = float(np.median([x["compile_s"] for x in rs]))
            tot = float(np.median([x["total_s"] for x in rs]))
            base = base or tot
            print(f"{layers:>6} {mode:>7} {lo:>8.2f} {co:>9.2f} {tot:>8.2f} {tot / base:>7.2f}x")


if __name__ == "__main__":
    main()
