"""Sampler throughput: sgalm_jax.sampling vs transformers ``generate`` on the same weights and prompts.

CPU, equal lengths (default, ``--workload equal``): a small Qwen2-shaped random model (4 layers,
hidden 512, vocab 8192), batch 1, 8, 32, 128 new tokens, greedy and sampled (temperature 0.8, top-k
50, top-p 0.95); prints tokens/s of HF, our static sampler and our continuous engine (as many slots
as rows) and the ratios as a markdown table::

    python benchmarks/sampling.py                      # CPU table (about 10 minutes on 2 cores)
    python benchmarks/sampling.py --batches 8 --modes greedy --repeats 1

CPU, ragged lengths (``--workload ragged``): 256 prompts whose per-row maximum lengths are drawn from
the token lengths of GSM8K reference answers (the real Qwen2.5 tokenizer on
``../shared/data/gsm8k/train.jsonl``, read at run time), so the workload is long-tailed and
reproducible with random weights (no EOS: each row generates exactly its length). At 16 and 32
slots: the continuous engine (``num_slots``), our static sampler (batches of that many rows, each
decoded until its longest row ends) and HF ``generate`` (the same batches, ``max_new_tokens`` the
batch's longest, cut afterwards). tokens/s counts the rows' own tokens only::

    python benchmarks/sampling.py --workload ragged    # about 20 minutes on 2 quiet cores

GPU (``--gpu``): a Qwen2.5-1.5B-shaped random model in bfloat16 at batch 64 and 256; prints tokens/s,
decode ms/step and the fraction of the memory-bandwidth limit reached, i.e. (weight bytes + KV-cache
bytes a step must read) / step time, divided by the HBM bandwidth measured with a large device copy.
HF ``generate`` is run on the GPU as well when torch sees CUDA (``--no-hf`` skips it)::

    python benchmarks/sampling.py --gpu
    python benchmarks/sampling.py --gpu --workload ragged   # both engines on GSM8K lengths

Both sides generate exactly their rows' lengths (the models have no EOS id). After one warm-up call
each, the samplers run alternately ``--repeats`` times; the median and the best time of each are
reported (the CPU machines are shared: alternation spreads other tenants' load over all sides); our
first call, which includes compilation, is reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

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


def gsm8k_answer_lengths(data_dir: Path, n: int, seed: int = 0) -> np.ndarray:
    """``n`` per-row lengths drawn (with replacement, seeded) from the token lengths of GSM8K's
    train-split reference answers, tokenized with the real Qwen2.5 tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(data_dir / "tokenizers" / "qwen2.5")
    with open(data_dir / "gsm8k" / "train.jsonl") as f:
        answers = [json.loads(line)["answer"] for line in f if line.strip()]
    lengths = np.array([len(x) for x in tok(answers, add_special_tokens=False)["input_ids"]])
    return np.random.RandomState(seed).choice(lengths, n).astype(np.int32)


def timed_rounds(fns: dict, repeats: int, warm: tuple[str, ...] | None = None) -> dict:
    """{name: (first-call s, median s, best s, median CPU s)} over ``repeats`` rounds.

    Each round runs every sampler once, in turn, so a burst of load from other processes on a
    shared machine is spread over all of them rather than penalising one. CPU seconds are the
    process's user + system time during the call (all threads): on a loaded machine they measure
    the work done better than wall time. ``warm``: the samplers that get a first (compiling)
    call outside the rounds (default all; HF needs none), whose time is reported as the first.
    """
    wall: dict = {}
    cpu: dict = {}

    def one(name, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.setdefault(name, []).append(time.perf_counter() - t0)
        cpu.setdefault(name, []).append(time.process_time() - c0)
        print(f"  {name}: {wall[name][-1]:.1f} s wall, {cpu[name][-1]:.1f} s CPU, load "
              f"{os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)

    warm = tuple(fns) if warm is None else warm
    for name, fn in fns.items():
        if name in warm:
            one(name, fn)
    for _ in range(repeats):
        for name, fn in fns.items():
            one(name, fn)
    skip = {name: 1 if name in warm else 0 for name in fns}
    return {name: (t[0], statistics.median(t[skip[name]:]), min(t[skip[name]:]),
                   statistics.median(cpu[name][skip[name]:])) for name, t in wall.items()}


def best_times(fns: dict, repeats: int) -> dict:
    """{name: (first-call seconds, best seconds)} (see :func:`timed_rounds`)."""
    return {k: (v[0], v[2]) for k, v in timed_rounds(fns, repeats).items()}


def ours_fn(path: str, prompts, new_tokens, mode: str, dtype: str, engine: str = "static",
            slots: int | None = None):
    """A no-argument callable running our sampler, and the sampler (for its compile count).

    ``new_tokens``: one int or one per prompt. ``engine="static"`` decodes ``slots`` rows per
    batch (all at once when None); ``"continuous"`` keeps ``slots`` slots busy.
    """
    from flax import nnx

    from sgalm_jax.models import load_pretrained
    from sgalm_jax.sampling import Sampler

    model = load_pretrained(path, dtype=dtype)
    graphdef, state = nnx.split(model)
    if engine == "continuous":
        sampler = Sampler(graphdef, model.config, engine="continuous",
                          num_slots=slots or len(prompts))
    else:
        sampler = Sampler(graphdef, model.config, engine="static", max_batch_size=slots)
    kw = dict(temperature=0.0) if mode == "greedy" else dict(SAMPLED)
    counter = iter(range(10**6))
    want = np.broadcast_to(np.asarray(new_tokens), (len(prompts),))

    def call():
        out = sampler.generate(state, prompts, max_new_tokens=new_tokens, use_eos=False,
                               rng=jax.random.key(next(counter)), **kw)
        assert (out.lengths == want).all(), out.lengths
        return out

    return call, sampler


def hf_fn(path: str, prompts, new_tokens, mode: str, device: str, batch: int | None = None):
    """A no-argument callable running transformers ``generate`` on the same prompts.

    ``new_tokens``: one int or one per prompt; prompts run in batches of ``batch`` (all at once when
    None), each until its longest row's length (the rows' own lengths are cut afterwards: HF has no
    per-row maximum).
    """
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    want = np.broadcast_to(np.asarray(new_tokens), (len(prompts),))
    batch = batch or len(prompts)
    batches = []
    for start in range(0, len(prompts), batch):
        ids, mask = left_pad(prompts[start:start + batch])
        batches.append((torch.tensor(ids, device=device), torch.tensor(mask, device=device),
                        int(want[start:start + batch].max())))
    kw = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, **SAMPLED)

    def call():
        outs = []
        for ids, mask, n in batches:
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=n,
                                     min_new_tokens=n, pad_token_id=0, **kw)
            if device != "cpu":
                torch.cuda.synchronize()
            assert out.shape[1] == ids.shape[1] + n
            outs.append(out[:, ids.shape[1]:])
        return outs

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


def _machine(torch) -> str:
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()}), torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads), load average {load}")


def cpu_main(args) -> None:
    """Equal lengths: every row generates ``--new-tokens``; HF vs static vs continuous."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(CPU_MODEL, "float32", tmp)
        for batch in args.batches:
            prompts = make_prompts(batch, CPU_MODEL["vocab_size"], args.prompt_min, args.prompt_max)
            for mode in args.modes:
                fns = {"hf": hf_fn(tmp, prompts, args.new_tokens, mode, "cpu")} if args.hf else {}
                fns["static"], static = ours_fn(tmp, prompts, args.new_tokens, mode, "float32")
                fns["continuous"], cont = ours_fn(tmp, prompts, args.new_tokens, mode, "float32",
                                                  engine="continuous", slots=batch)
                load = os.getloadavg()[0]
                t = timed_rounds(fns, args.repeats)
                toks = batch * args.new_tokens
                row = dict(batch=batch, mode=mode, load=max(load, os.getloadavg()[0]),
                           compilations=dict(static=static.num_compilations,
                                             continuous=cont.num_compilations),
                           first_call_s={k: t[k][0] for k in ("static", "continuous")})
                for k in fns:
                    row[f"{k}_tok_s"] = toks / t[k][1]
                    row[f"{k}_best_tok_s"] = toks / t[k][2]
                    row[f"{k}_cpu_s"] = t[k][3]
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"\nCPU equal lengths: {_machine(torch)}; model {CPU_MODEL}; prompts "
          f"{args.prompt_min}-{args.prompt_max} tokens; {args.new_tokens} new tokens per row; "
          f"median (best) of {args.repeats} alternating rounds\n")
    print("| batch | mode | HF tok/s | static tok/s | continuous tok/s | static / HF | "
          "continuous / static (CPU time) | first call s (static, continuous) | programs | load |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fc, pc = r["first_call_s"], r["compilations"]
        hf = (f"{r['hf_tok_s']:.0f} ({r['hf_best_tok_s']:.0f})",
              f"{r['static_tok_s'] / r['hf_tok_s']:.2f}x") if "hf_tok_s" in r else ("-", "-")
        print(f"| {r['batch']} | {r['mode']} | {hf[0]} | "
              f"{r['static_tok_s']:.0f} ({r['static_best_tok_s']:.0f}) | "
              f"{r['continuous_tok_s']:.0f} ({r['continuous_best_tok_s']:.0f}) | {hf[1]} | "
              f"{r['continuous_tok_s'] / r['static_tok_s']:.2f}x "
              f"({r['static_cpu_s'] / r['continuous_cpu_s']:.2f}x) | "
              f"{fc['static']:.1f}, {fc['continuous']:.1f} | {pc['static']}, {pc['continuous']} | "
              f"{r['load']:.1f} |")


def ragged_main(args) -> None:
    """Ragged lengths from GSM8K answers: continuous engine vs static sampler vs HF, per slot count."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    lengths = gsm8k_answer_lengths(Path(args.data_dir), args.prompts, seed=args.seed)
    if args.max_length:
        lengths = np.minimum(lengths, args.max_length)
    prompts = make_prompts(args.prompts, CPU_MODEL["vocab_size"], args.prompt_min, args.prompt_max)
    toks = int(lengths.sum())
    print(f"ragged workload: {args.prompts} prompts, {toks} tokens; per-row lengths min "
          f"{lengths.min()}, median {int(np.median(lengths))}, mean {lengths.mean():.0f}, p90 "
          f"{int(np.percentile(lengths, 90))}, max {lengths.max()}", file=sys.stderr, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(CPU_MODEL, "float32", tmp)
        for slots in args.slots:
            for mode in args.modes:
                fns = {}
                if args.hf:
                    fns["hf"] = hf_fn(tmp, prompts, lengths, mode, "cpu", batch=slots)
                fns["static"], static = ours_fn(tmp, prompts, lengths, mode, "float32",
                                                engine="static", slots=slots)
                fns["continuous"], cont = ours_fn(tmp, prompts, lengths, mode, "float32",
                                                  engine="continuous", slots=slots)
                load = os.getloadavg()[0]
                t = timed_rounds(fns, args.repeats, warm=("static", "continuous"))
                row = dict(slots=slots, mode=mode, load=max(load, os.getloadavg()[0]),
                           compilations=dict(static=static.num_compilations,
                                             continuous=cont.num_compilations),
                           first_call_s={k: t[k][0] for k in ("static", "continuous")})
                for k in fns:
                    row[f"{k}_tok_s"] = toks / t[k][1]
                    row[f"{k}_best_tok_s"] = toks / t[k][2]
                    row[f"{k}_cpu_s"] = t[k][3]
                row["engine"] = cont.continuous_engine.last_run
                rows.append(row)
                print(json.dumps(row, default=str), file=sys.stderr, flush=True)
    print(f"\nCPU ragged lengths: {_machine(torch)}; model {CPU_MODEL}; {args.prompts} prompts of "
          f"{args.prompt_min}-{args.prompt_max} tokens; per-row lengths from GSM8K answers (mean "
          f"{lengths.mean():.0f}, max {lengths.max()}), {toks} tokens; median (best) of "
          f"{args.repeats} alternating rounds\n")
    print("| slots | mode | HF tok/s | static tok/s | continuous tok/s | continuous / static "
          "(CPU time) | continuous / HF (CPU time) | first call s (static, continuous) | programs "
          "| load |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fc, pc = r["first_call_s"], r["compilations"]
        hf = (f"{r['hf_tok_s']:.0f} ({r['hf_best_tok_s']:.0f})",
              f"{r['continuous_tok_s'] / r['hf_tok_s']:.2f}x "
              f"({r['hf_cpu_s'] / r['continuous_cpu_s']:.2f}x)") if "hf_tok_s" in r else ("-", "-")
        print(f"| {r['slots']} | {r['mode']} | {hf[0]} | "
              f"{r['static_tok_s']:.0f} ({r['static_best_tok_s']:.0f}) | "
              f"{r['continuous_tok_s']:.0f} ({r['continuous_best_tok_s']:.0f}) | "
              f"**{r['continuous_tok_s'] / r['static_tok_s']:.2f}x** "
              f"({r['static_cpu_s'] / r['continuous_cpu_s']:.2f}x) | {hf[1]} | "
              f"{fc['static']:.1f}, {fc['continuous']:.1f} | {pc['static']}, {pc['continuous']} | "
              f"{r['load']:.1f} |")


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def gpu_main(args) -> None:
    """Equal lengths on an accelerator: tokens/s, decode tokens/s and the fraction of the
    memory-bandwidth limit, per engine (each with as many slots / batch rows as prompts)."""
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
                fns, samplers = {}, {}
                for eng in args.engines:
                    fns[eng], samplers[eng] = ours_fn(tmp, prompts, args.new_tokens, mode,
                                                      "bfloat16", engine=eng, slots=batch)
                    fns[f"{eng}_prefill"], _ = ours_fn(tmp, prompts, 1, mode, "bfloat16",
                                                       engine=eng, slots=batch)
                if args.hf and _torch_cuda():
                    fns["hf"] = hf_fn(tmp, prompts, args.new_tokens, mode, "cuda")
                t = best_times(fns, args.repeats)
                for eng in args.engines:
                    compile_s, ours = t[eng]
                    prefill = t[f"{eng}_prefill"][1]
                    step = (ours - prefill) / (args.new_tokens - 1)  # one decode step
                    kv_bytes = batch * (mean_prompt + args.new_tokens / 2) * kv_per_token
                    frac = (weight_bytes + kv_bytes) / step / bandwidth
                    row = dict(batch=batch, mode=mode, engine=eng,
                               ours_tok_s=batch * args.new_tokens / ours,
                               decode_tok_s=batch / step, prefill_s=prefill,
                               ms_per_step=step * 1e3, bandwidth_fraction=frac,
                               first_call_s=compile_s,
                               compilations=samplers[eng].num_compilations)
                    if "hf" in t:
                        hf = t["hf"][1]
                        row.update(hf_tok_s=batch * args.new_tokens / hf, ratio=hf / ours)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"\nGPU: {jax.devices()[0].device_kind}, bandwidth {bandwidth / 1e9:.0f} GB/s measured; "
          f"{'small smoke-test' if args.smoke else 'Qwen2.5-1.5B-shaped'} random model, bf16 "
          f"({weight_bytes / 1e9:.2f} GB of weights); prompts {args.prompt_min}-{args.prompt_max} "
          f"tokens; {args.new_tokens} new tokens; best of {args.repeats}\n")
    print("| batch | mode | engine | ours tok/s (end to end) | decode tok/s | decode ms/step | "
          "bandwidth fraction | prefill s | programs | HF tok/s | ours / HF |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        hf = f"{r['hf_tok_s']:.0f} | {r['ratio']:.2f}x" if "hf_tok_s" in r else "- | -"
        print(f"| {r['batch']} | {r['mode']} | {r['engine']} | {r['ours_tok_s']:.0f} | "
              f"{r['decode_tok_s']:.0f} | {r['ms_per_step']:.2f} | {r['bandwidth_fraction']:.0%} | "
              f"{r['prefill_s']:.2f} | {r['compilations']} | {hf} |")


def gpu_ragged_main(args) -> None:
    """Ragged lengths (GSM8K answers) on an accelerator: tokens/s of both engines (and HF)."""
    shape = CPU_MODEL if args.smoke else GPU_MODEL
    lengths = gsm8k_answer_lengths(Path(args.data_dir), args.prompts, seed=args.seed)
    if args.max_length:
        lengths = np.minimum(lengths, args.max_length)
    prompts = make_prompts(args.prompts, shape["vocab_size"], args.prompt_min, args.prompt_max)
    toks = int(lengths.sum())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(shape, "bfloat16", tmp)
        for slots in args.slots:
            for mode in args.modes:
                fns, samplers = {}, {}
                for eng in args.engines:
                    fns[eng], samplers[eng] = ours_fn(tmp, prompts, lengths, mode, "bfloat16",
                                                      engine=eng, slots=slots)
                if args.hf and _torch_cuda():
                    fns["hf"] = hf_fn(tmp, prompts, lengths, mode, "cuda", batch=slots)
                t = timed_rounds(fns, args.repeats)
                row = dict(slots=slots, mode=mode, **{f"{k}_tok_s": toks / v[1]
                                                      for k, v in t.items()},
                           compilations={k: v.num_compilations for k, v in samplers.items()})
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"\nGPU ragged lengths: {jax.devices()[0].device_kind}; "
          f"{'small smoke-test' if args.smoke else 'Qwen2.5-1.5B-shaped'} random model, bf16; "
          f"{args.prompts} prompts, per-row lengths from GSM8K answers (mean {lengths.mean():.0f}, "
          f"max {lengths.max()}); median of {args.repeats}\n")
    names = [e for e in args.engines] + (["hf"] if rows and "hf_tok_s" in rows[0] else [])
    print("| slots | mode | " + " | ".join(f"{n} tok/s" for n in names) + " | programs |")
    print("|---:|---|" + "---:|" * len(names) + "---|")
    for r in rows:
        print(f"| {r['slots']} | {r['mode']} | "
              + " | ".join(f"{r[f'{n}_tok_s']:.0f}" for n in names)
              + f" | {r['compilations']} |")


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
    ap.add_argument("--workload", choices=["equal", "ragged"], default="equal",
                    help="equal: every row --new-tokens long; ragged: per-row lengths from GSM8K "
                         "answers")
    ap.add_argument("--slots", type=int, nargs="+", default=None,
                    help="ragged: slot counts (static: rows per batch); default 16 32 (CPU), "
                         "64 256 (GPU)")
    ap.add_argument("--prompts", type=int, default=256, help="ragged: number of prompts")
    ap.add_argument("--max-length", type=int, default=0,
                    help="ragged: cap the drawn lengths (0 = no cap)")
    ap.add_argument("--seed", type=int, default=0, help="ragged: seed of the length draw")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1].parent
                                              / "shared" / "data"),
                    help="directory with gsm8k/train.jsonl and tokenizers/qwen2.5")
    ap.add_argument("--engines", nargs="+", default=["static", "continuous"],
                    choices=["static", "continuous"], help="--gpu: engines to time")
    args = ap.parse_args()
    if args.gpu:
        args.batches = args.batches or ([2] if args.smoke else [64, 256])
        args.slots = args.slots or ([4] if args.smoke else [64, 256])
        if args.smoke:
            args.prompts = min(args.prompts, 16)
        else:
            args.prompt_min, args.prompt_max = max(args.prompt_min, 64), max(args.prompt_max, 128)
        if args.workload == "ragged":
            args.repeats = args.repeats if "--repeats" in sys.argv else 3
            gpu_ragged_main(args)
        else:
            gpu_main(args)
    elif args.workload == "ragged":
        args.slots = args.slots or [16, 32]
        args.modes = args.modes if "--modes" in sys.argv else ["sampled"]
        args.repeats = args.repeats if "--repeats" in sys.argv else 2
        ragged_main(args)
    else:
        args.batches = args.batches or [1, 8, 32]
        cpu_main(args)


if __name__ == "__main__":
    main()
