"""Sampler throughput: sgalm_jax.sampling vs transformers ``generate`` on the same weights and prompts.

CPU (default): a small Qwen2-shaped random model (4 layers, hidden 512, vocab 8192), batch 1, 8, 32,
128 new tokens, greedy and sampled (temperature 0.8, top-k 50, top-p 0.95); prints tokens/s of both
and the ratio as a markdown table::

    python benchmarks/sampling.py                      # CPU table (about 5 minutes on 2 cores)
    python benchmarks/sampling.py --batches 8 --modes greedy --repeats 1

GPU (``--gpu``): a Qwen2.5-1.5B-shaped random model in bfloat16 at batch 64 and 256; prints tokens/s,
decode ms/step and the fraction of the memory-bandwidth limit reached, i.e. (weight bytes + KV-cache
bytes a step must read) / step time, divided by the HBM bandwidth measured with a large device copy.
HF ``generate`` is run on the GPU as well when torch sees CUDA (``--no-hf`` skips it)::

    python benchmarks/sampling.py --gpu

Both sides generate exactly ``--new-tokens`` tokens per row (the models have no EOS id). After one
warm-up call each, the two samplers run alternately ``--repeats`` times and the best time of each is
kept (the CPU machines are shared, so medians mostly measure other tenants' load); our first call,
which includes compilation, is reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

CPU_MODEL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=True,
                 max_position_embeddings=4096)
GPU_MODEL = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                 tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0)
SAMPLED = dict(temperature=0.8, top_k=50, top_p=0.95)


def make_checkpoint(shape: dict, dtype: str, path: str) -> None:
    """A random Qwen2 checkpoint of ``shape`` saved in HF format (no EOS id, so rows never stop)."""
    import torch
    import transformers

    cfg = transformers.Qwen2Config(**shape, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)


def make_prompts(batch: int, vocab: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    rs = np.random.RandomState(seed)
    return [rs.randint(1, vocab, rs.randint(lo, hi + 1)).tolist() for _ in range(batch)]


def left_pad(prompts: list[list[int]]):
    t = max(map(len, prompts))
    ids = np.zeros((len(prompts), t), np.int64)
    mask = np.zeros((len(prompts), t), np.int64)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = p
        mask[i, t - len(p):] = 1
    return ids, mask


def best_times(fns: dict, repeats: int) -> dict:
    """{name: (first-call seconds, best seconds over ``repeats``)}, the calls interleaved.

    The runs of the two samplers alternate and the best (minimum) time is kept, so a burst of load
    from other processes on a shared machine penalises neither side systematically.
    """
    out = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        out[name] = [time.perf_counter() - t0]
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    return {name: (t[0], min(t[1:])) for name, t in out.items()}


def ours_fn(path: str, prompts, new_tokens: int, mode: str, dtype: str):
    """A no-argument callable running our sampler, and the sampler (for its compile count)."""
    from flax import nnx

    from sgalm_jax.models import load_pretrained
    from sgalm_jax.sampling import Sampler

    model = load_pretrained(path, dtype=dtype)
    graphdef, state = nnx.split(model)
    sampler = Sampler(graphdef, model.config)
    kw = dict(temperature=0.0) if mode == "greedy" else dict(SAMPLED)
    counter = iter(range(10**6))

    def call():
        out = sampler.generate(state, prompts, max_new_tokens=new_tokens, use_eos=False,
                               rng=jax.random.key(next(counter)), **kw)
        assert (out.lengths == new_tokens).all(), out.lengths
        return out

    return call, sampler


def hf_fn(path: str, prompts, new_tokens: int, mode: str, device: str):
    """A no-argument callable running transformers ``generate`` on the same prompts."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    ids, mask = left_pad(prompts)
    ids, mask = torch.tensor(ids, device=device), torch.tensor(mask, device=device)
    kw = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, **SAMPLED)

    def call():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=0, **kw)
        if device != "cpu":
            torch.cuda.synchronize()
        assert out.shape[1] == ids.shape[1] + new_tokens
        return out

    return call


def measure_bandwidth(size: int = 256 * 1024 * 1024) -> float:
    """Device memory bandwidth (bytes/s) from a large on-device copy (read + write)."""
    x = jnp.ones((size,), jnp.float32)  # 1 GiB by default
    f = jax.jit(lambda a: a * 1.0001)
    f(x).block_until_ready()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * x.nbytes / min(times)


def cpu_main(args) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(CPU_MODEL, "float32", tmp)
        for batch in args.batches:
            prompts = make_prompts(batch, CPU_MODEL["vocab_size"], args.prompt_min, args.prompt_max)
            for mode in args.modes:
                ours, sampler = ours_fn(tmp, prompts, args.new_tokens, mode, "float32")
                hf = hf_fn(tmp, prompts, args.new_tokens, mode, "cpu")
                load = os.getloadavg()[0]
                t = best_times({"hf": hf, "ours": ours}, args.repeats)
                toks = batch * args.new_tokens
                row = dict(batch=batch, mode=mode, hf_tok_s=toks / t["hf"][1],
                           ours_tok_s=toks / t["ours"][1], ratio=t["hf"][1] / t["ours"][1],
                           first_call_s=t["ours"][0], compilations=sampler.num_compilations,
                           load=max(load, os.getloadavg()[0]))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"\nCPU: {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()}), torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads); model {CPU_MODEL}; prompts "
          f"{args.prompt_min}-{args.prompt_max} tokens; {args.new_tokens} new tokens; best of "
          f"{args.repeats} interleaved runs\n")
    print("| batch | mode | HF generate tok/s | ours tok/s | ours / HF | our first call (s) | "
          "load avg |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['mode']} | {r['hf_tok_s']:.0f} | {r['ours_tok_s']:.0f} | "
              f"{r['ratio']:.2f}x | {r['first_call_s']:.1f} | {r['load']:.1f} |")


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def gpu_main(args) -> None:
    from sgalm_jax.models.config import ModelConfig

    shape = CPU_MODEL if args.smoke else GPU_MODEL
    bandwidth = measure_bandwidth(2**22 if args.smoke else 2**28)
    print(f"device: {jax.devices()[0].device_kind}; measured copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s", file=sys.stderr)
    cfg = ModelConfig(model_type="qwen2", **shape)
    weight_bytes = cfg.num_params() * 2
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(shape, "bfloat16", tmp)
        for batch in args.batches:
            prompts = make_prompts(batch, shape["vocab_size"], args.prompt_min, args.prompt_max)
            mean_prompt = np.mean([len(p) for p in prompts])
            for mode in args.modes:
                fns = {}
                fns["ours"], sampler = ours_fn(tmp, prompts, args.new_tokens, mode, "bfloat16")
                fns["ours_prefill"], _ = ours_fn(tmp, prompts, 1, mode, "bfloat16")
                if args.hf and _torch_cuda():
                    fns["hf"] = hf_fn(tmp, prompts, args.new_tokens, mode, "cuda")
                t = best_times(fns, args.repeats)
                compile_s, ours = t["ours"]
                prefill = t["ours_prefill"][1]
                step = (ours - prefill) / (args.new_tokens - 1)  # one decode step
                kv_bytes = batch * (mean_prompt + args.new_tokens / 2) * kv_per_token
                frac = (weight_bytes + kv_bytes) / step / bandwidth
                row = dict(batch=batch, mode=mode, ours_tok_s=batch * args.new_tokens / ours,
                           decode_tok_s=batch / step, prefill_s=prefill, ms_per_step=step * 1e3,
                           bandwidth_fraction=frac, first_call_s=compile_s,
                           compilations=sampler.num_compilations)
                if "hf" in t:
                    hf = t["hf"][1]
                    row.update(hf_tok_s=batch * args.new_tokens / hf, ratio=hf / ours)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"\nGPU: {jax.devices()[0].device_kind}, bandwidth {bandwidth / 1e9:.0f} GB/s measured; "
          f"{'small smoke-test' if args.smoke else 'Qwen2.5-1.5B-shaped'} random model, bf16 "
          f"({weight_bytes / 1e9:.2f} GB of weights); prompts {args.prompt_min}-{args.prompt_max} "
          f"tokens; {args.new_tokens} new tokens; best of {args.repeats}\n")
    print("| batch | mode | ours tok/s (end to end) | decode tok/s | decode ms/step | "
          "bandwidth fraction | prefill s | HF tok/s | ours / HF |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        hf = f"{r['hf_tok_s']:.0f} | {r['ratio']:.2f}x" if "hf_tok_s" in r else "- | -"
        print(f"| {r['batch']} | {r['mode']} | {r['ours_tok_s']:.0f} | {r['decode_tok_s']:.0f} | "
              f"{r['ms_per_step']:.2f} | {r['bandwidth_fraction']:.0%} | {r['prefill_s']:.2f} | "
              f"{hf} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="the GPU benchmark (1.5B-shaped, bf16)")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--modes", nargs="+", default=["greedy", "sampled"],
                    choices=["greedy", "sampled"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-min", type=int, default=16)
    ap.add_argument("--prompt-max", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-hf", dest="hf", action="store_false")
    ap.add_argument("--smoke", action="store_true",
                    help="with --gpu: run the GPU code path on the small CPU model (a quick check)")
    args = ap.parse_args()
    if args.gpu:
        args.batches = args.batches or ([2] if args.smoke else [64, 256])
        if not args.smoke:
            args.prompt_min, args.prompt_max = max(args.prompt_min, 64), max(args.prompt_max, 128)
        gpu_main(args)
    else:
        args.batches = args.batches or [1, 8, 32]
        cpu_main(args)


if __name__ == "__main__":
    main()
