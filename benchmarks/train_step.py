"""SFT train-step throughput: our jitted step vs PyTorch + transformers (same model, batch, optimizer).

    python benchmarks/train_step.py                     # CPU: small Qwen2-shaped model, fp32, vs torch
    python benchmarks/train_step.py --preset qwen2.5-1.5b --dtype bfloat16 --batch 8 --seq 2048 \
        --remat full --chunk 256 --no-torch             # GPU/TPU: MFU of a Qwen2.5-1.5B-shaped model

Both sides start from the same random weights (ours exported with ``save_pretrained`` and loaded by
``transformers``), take the same batch (random tokens, loss on the second half of each row, as SFT on
responses) and the same optimizer (AdamW, lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay,
global-norm clipping at 1.0). A step is forward + backward + clip + update; the first ``--warmup``
steps (compilation for us) are not timed; the timed steps alternate between the two sides in
``--rounds`` rounds so that load from other processes on a shared machine hits both alike. Prints
tokens/s (median and best step) for each side, the ratio ours/torch, and MFU
(6 * params * tokens/s / peak) when the device's peak is known.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import jax
import numpy as np

PRESETS = {
    # CPU comparison: Qwen2-shaped, 4 layers, hidden 512, vocab 8192 (~15M params).
    "small": dict(model_type="qwen2", vocab_size=8192, hidden_size=512, intermediate_size=1408,
                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  max_position_embeddings=4096, tie_word_embeddings=True),
}


def model_config(args):
    from sgalm_jax.config import MODEL_PRESETS
    from sgalm_jax.models import ModelConfig

    hf = dict(PRESETS.get(args.preset) or MODEL_PRESETS[args.preset])
    return ModelConfig.from_hf(hf, dtype=args.dtype, param_dtype=args.param_dtype,
                               remat=args.remat)


def make_batch(args, vocab: int):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(args.batch, args.seq)).astype(np.int32)
    attn = np.ones_like(ids)
    loss_mask = np.zeros(ids.shape, np.float32)
    loss_mask[:, args.seq // 2:] = 1.0  # "response" half
    positions = np.tile(np.arange(args.seq, dtype=np.int32), (args.batch, 1))
    return {"input_ids": ids, "attention_mask": attn, "positions": positions,
            "loss_mask": loss_mask}


def bench_ours(args, cfg, batch_np, export_dir):
    from sgalm_jax import sharding as sh
    from sgalm_jax.algorithms.sft import make_sft_loss
    from sgalm_jax.config import base_config
    from sgalm_jax.models import save_pretrained
    from sgalm_jax.training import create_train_state, make_optimizer, make_train_step, split_model
    from sgalm_jax.training.model_setup import init_model

    mesh = sh.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    model = init_model(cfg, mesh=mesh, seed=0)
    if export_dir:
        save_pretrained(model, export_dir, dtype="float32")
    graphdef, params = split_model(model)
    del model
    opt = base_config().optimizer
    opt.name, opt.learning_rate, opt.max_grad_norm = "adamw", 1e-4, 1.0
    tx, schedule = make_optimizer(opt, num_steps=1000, params=params)
    state, shardings = create_train_state(params, tx, mesh=mesh)
    step = make_train_step(make_sft_loss(graphdef, logits_chunk_size=args.chunk), tx, mesh=mesh,
                           state_shardings=shardings,
                           learning_rate=schedule)
    batch = sh.global_batch_from_local(batch_np, mesh)
    holder = {"state": state}

    def run_step():
        holder["state"], metrics = step(holder["state"], batch)
        return float(jax.block_until_ready(metrics)["loss"])

    t0 = time.perf_counter()
    first_loss = run_step()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        run_step()
    return run_step, {"first_loss": first_loss, "compile_s": compile_s,
                      "params": cfg.num_params()}


def bench_torch(args, batch_np, export_dir):
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)
    ids = torch.tensor(batch_np["input_ids"], dtype=torch.long)
    attn = torch.tensor(batch_np["attention_mask"])
    mask = torch.tensor(batch_np["loss_mask"])[:, 1:]

    def step():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                ids[:, 1:].reshape(-1), reduction="none")
        loss = (nll * mask.reshape(-1)).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    first_loss = step()
    for _ in range(args.warmup - 1):
        step()
    return step, {"first_loss": first_loss, "threads": torch.get_num_threads()}


def time_interleaved(fns: dict, rounds: int, per_round: int) -> tuple[dict, dict]:
    """Per-step times of each fn, alternating fns every ``per_round`` steps (so a load spike on a
    shared machine hits both sides alike), and each side's CPU utilisation: process CPU seconds
    per wall second while it ran (2.0 = both of two cores busy)."""
    times = {name: [] for name in fns}
    cpu = {name: 0.0 for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round):
                c, t = time.process_time(), time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
                cpu[name] += time.process_time() - c
    return times, {name: cpu[name] / sum(times[name]) for name in fns}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small",
                   help="'small' or a sgalm_jax.config.MODEL_PRESETS name (qwen2.5-1.5b, ...)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=12, help="timed steps per side")
    p.add_argument("--rounds", type=int, default=4,
                   help="the timed steps alternate between the sides in this many rounds")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on accelerators)")
    p.add_argument("--param_dtype", default="float32", help="master-weight dtype")
    p.add_argument("--remat", default="none")
    p.add_argument("--chunk", type=int, default=0,
                   help="SFT loss from hidden states in chunks of this many positions (never "
                        "materialising [B, T, vocab] logits); 0 = full logits")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU only: pin the process to N cores (both sides) and give torch N "
                        "threads; 0 = every core")
    p.add_argument("--no-torch", dest="torch", action="store_false",
                   help="skip the PyTorch side (accelerator runs: only our MFU)")
    args = p.parse_args(argv)
    if args.threads:  # before the XLA backend starts: XLA sizes its thread pools from this
        # CPU affinity, not XLA_FLAGS: with jax 0.10's CPU runtime --xla_cpu_multi_thread_eigen=false
        # leaves the step multi-threaded (its intra-op pool still runs dots on every core), which
        # is why an earlier "one thread" run of this script measured the same as two threads.
        cores = sorted(os.sched_getaffinity(0))[:args.threads]
        os.sched_setaffinity(0, cores)
        import torch

        torch.set_num_threads(args.threads)

    from sgalm_jax.training.metrics import mfu, peak_flops_per_device

    cfg = model_config(args)
    batch = make_batch(args, cfg.vocab_size)
    tokens = args.batch * args.seq
    device = jax.devices()[0]
    print(f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} of {os.cpu_count()} "
          f"CPUs, load average {os.getloadavg()[0]:.1f}; jax {jax.__version__} on "
          f"{jax.device_count()} x {device.device_kind} ({jax.default_backend()})")
    print(f"model: {args.preset}, {cfg.num_params() / 1e6:.1f}M params, dtype {args.dtype} "
          f"(params {args.param_dtype}), remat {args.remat}; batch {args.batch} x {args.seq} = "
          f"{tokens} tokens/step; AdamW + clip 1.0")

    with tempfile.TemporaryDirectory() as tmp:
        export_dir = os.path.join(tmp, "model") if args.torch else None
        fns, info = {}, {}
        fns["ours"], info["ours"] = bench_ours(args, cfg, batch, export_dir)
        if args.torch:
            fns["torch"], info["torch"] = bench_torch(args, batch, export_dir)
        per_round = max(args.steps // args.rounds, 1)
        times, util = time_interleaved(fns, args.rounds, per_round)

    tps = {}
    for name, ts in times.items():
        med, best = float(np.median(ts)), float(np.min(ts))
        tps[name] = (tokens / med, tokens / best)
        extra = (f"compile+first step {info[name]['compile_s']:.1f}s, " if name == "ours"
                 else f"{info[name]['threads']} threads, ")
        print(f"{name:5s}: first loss {info[name]['first_loss']:.5f}, {extra}step median "
              f"{med * 1e3:.1f} ms (best {best * 1e3:.1f}), {tps[name][0]:,.0f} tokens/s "
              f"(best {tps[name][1]:,.0f}) over {len(ts)} steps; {util[name]:.2f} cores busy")
    peak = peak_flops_per_device(device.device_kind)
    util = mfu(info["ours"]["params"], tps["ours"][0], jax.device_count(), peak)
    if util is not None:
        print(f"ours : MFU {util * 100:.1f}% (6 * {info['ours']['params'] / 1e9:.2f}B params * "
              f"tokens/s / {jax.device_count()} x {peak / 1e12:.0f} TFLOP/s)")
    if "torch" in tps:
        if abs(info["ours"]["first_loss"] - info["torch"]["first_loss"]) > 1e-3 * abs(
                info["torch"]["first_loss"]):
            print("WARNING: the first-step losses differ: the two sides do not compute the "
                  "same thing", file=sys.stderr)
        print(f"ratio ours/torch: {tps['ours'][0] / tps['torch'][0]:.2f}x (median), "
              f"{tps['ours'][1] / tps['torch'][1]:.2f}x (best)")


if __name__ == "__main__":
    main()
