"""Forward and forward+backward throughput of our decoder vs transformers (PyTorch), same weights.

    python benchmarks/forward_backward.py                      # small Qwen2-shaped model, CPU, fp32
    python benchmarks/forward_backward.py --preset qwen2.5-0.5b --dtype bfloat16 --batch 8 --seq 2048
                                                               # on a GPU: also prints MFU

Both sides run the same random Qwen2-architecture weights on the same batch; the loss for the
backward pass is next-token cross-entropy. Prints tokens/s for each side and the ratio ours/theirs.
MFU = achieved model FLOP/s / the device's peak (printed when the peak of the device is known).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

PRESETS = {
    # The CPU comparison model: Qwen2-shaped, 4 layers, hidden 512.
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=8192),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
}

# Dense bf16 peak FLOP/s per device, by substrings of jax's device_kind.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for key, value in PEAK_FLOPS.items():
        if key.lower() in kind.lower():
            return value
    return None


def model_flops_per_token(cfg, seq: int, backward: bool) -> float:
    """2N (forward) or 6N (forward+backward) per token, plus the attention score/value matmuls."""
    from sgalm_jax.models import ModelConfig

    n = ModelConfig(model_type="qwen2", tie_word_embeddings=True, **{
        **cfg, "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"]}).num_params()
    attn = 2 * 2 * cfg["num_hidden_layers"] * seq * cfg["hidden_size"]  # QK^T and PV, causal ~/2 ignored
    per_token = 2 * n + attn
    return per_token * (3 if backward else 1)


def bench_ours(path: str, ids: np.ndarray, dtype: str):
    """(forward, forward+backward) callables of our model, compiled and warmed up."""
    from flax import nnx

    from sgalm_jax.models import load_pretrained

    model = load_pretrained(path, dtype=dtype)
    graphdef, params = nnx.split(model)
    x = jnp.asarray(ids)

    @jax.jit
    def forward(params, x):
        return nnx.merge(graphdef, params)(x)

    def loss(params, x):
        logits = nnx.merge(graphdef, params)(x)[:, :-1]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, x[:, 1:, None], axis=-1))

    grad = jax.jit(jax.value_and_grad(loss))
    return (lambda: forward(params, x).block_until_ready(),
            lambda: jax.block_until_ready(grad(params, x)))


def bench_torch(path: str, ids: np.ndarray, dtype: str):
    """(forward, forward+backward) callables of transformers' model on the same weights."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=tdtype).to(device)
    x = torch.tensor(ids, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward():
        with torch.no_grad():
            model(x).logits
        sync()

    def backward():
        model.zero_grad(set_to_none=True)
        logits = model(x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1))
        loss.backward()
        sync()

    return forward, backward


def alternating_times(sides: dict[str, tuple], warmup: int, rounds: int) -> dict[str, list]:
    """Median seconds per call of each side's (forward, backward), timed in alternating rounds.

    Alternating keeps a neighbour's load from landing on one side only (the CPU may be shared).
    """
    for fns in sides.values():
        for fn in fns:
            for _ in range(warmup):
                fn()
    times = {name: [[], []] for name in sides}
    for _ in range(rounds):
        for name, fns in sides.items():
            for k, fn in enumerate(fns):
                start = time.perf_counter()
                fn()
                times[name][k].append(time.perf_counter() - start)
    return {name: [float(np.median(t)) for t in ts] for name, ts in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU only: pin the process to N cores (both sides; torch gets N threads)")
    p.add_argument("--no-torch", action="store_true", help="only time our model")
    args = p.parse_args(argv)

    if args.threads:  # CPU affinity, not XLA_FLAGS (see benchmarks/train_step.py --threads)
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    cfg = PRESETS[args.preset]
    torch.manual_seed(0)
    hf_config = transformers.Qwen2Config(**cfg, tie_word_embeddings=True,
                                         max_position_embeddings=max(4096, args.seq))
    tmp = tempfile.mkdtemp(prefix="fwdbwd-")
    transformers.Qwen2ForCausalLM(hf_config).save_pretrained(tmp)
    ids = np.random.RandomState(0).randint(0, cfg["vocab_size"], size=(args.batch, args.seq))
    tokens = args.batch * args.seq
    device = jax.devices()[0]
    print(f"# {args.preset}  batch={args.batch} seq={args.seq} dtype={args.dtype}  "
          f"jax device: {device.device_kind} x{jax.device_count()}  "
          f"torch threads: {torch.get_num_threads()}  cpus: {os.cpu_count()}")

    sides = {"ours": bench_ours(tmp, ids, args.dtype)}
    if not args.no_torch:
        sides["torch"] = bench_torch(tmp, ids, args.dtype)
    times = alternating_times(sides, args.warmup, args.iters)
    ours, theirs = times["ours"], times.get("torch")
    peak = peak_flops(device)
    print(f"{'pass':<18}{'ours tok/s':>14}{'torch tok/s':>14}{'ratio':>8}{'MFU':>8}")
    for k, name in enumerate(["forward", "forward+backward"]):
        ours_tps = tokens / ours[k]
        line = f"{name:<18}{ours_tps:>14,.0f}"
        if theirs is not None:
            torch_tps = tokens / theirs[k]
            line += f"{torch_tps:>14,.0f}{ours_tps / torch_tps:>8.2f}"
        else:
            line += f"{'-':>14}{'-':>8}"
        if peak:
            mfu = ours_tps * model_flops_per_token(cfg, args.seq, backward=k == 1) / peak
            line += f"{mfu:>8.1%}"
        print(line)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
