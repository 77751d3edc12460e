"""Computed (not measured) memory per device of a GAD stage: three roles of one 3B model.

    python benchmarks/gad_memory.py                       # the GAD configs' settings
    python benchmarks/gad_memory.py --prompt 1024 --response 1024

The numbers the GAD configs (configs/gad_qwen3b_lmsys.py, configs/gad_llama3b_lmsys.py) state.
What is counted, per device, with every role fully sharded over ``dp`` devices (``mesh.fsdp``):

* **state** (held for the whole run): the student and the discriminator each hold fp32 master
  weights and AdamW's two fp32 moments (12 bytes / param); the GAD stage's frozen KL reference holds
  fp32 weights (4 bytes / param; the warmup stage has none);
* **train-step transient** (one role's step at a time): fp32 gradients (4 B / param) and the bf16
  compute copy (``train.compute_dtype``, 2 B / param);
* **activations** of one micro-batch with ``model.remat = full``: each layer's bf16 input kept for the
  backward (rows x T x hidden x 2 B x layers) plus one layer recomputed in the backward: its fp32
  attention probabilities and their gradient (rows x heads x T^2 x 4 B x 2; ``jax.nn.
  dot_product_attention`` materialises them on TPU) and its MLP intermediates (rows x T x
  intermediate x 4 B x 3), plus one fp32 logits chunk and its gradient (rows x chunk x vocab x 4 B
  x 2) for the student;
* **rollout**: the sampler's bf16 KV cache (rows x T x layers x 2 x kv_heads x head_dim x 2 B).

The peak is state + max(step transient + the larger of the student's and the discriminator's
micro-batch activations, rollout). Rows per device: the student's GRPO micro-batch
``train.batch_size / train.grad_accum_steps / dp``; the discriminator's ``prompts /
gad.d_grad_accum_steps x (1 + G) / dp``; the rollout ``gad.rollout_batch_size / dp``.
Not counted: XLA's temporary buffers and fragmentation, the all-gathered bf16 weights of one layer
(tens of MB), the judge.
"""

from __future__ import annotations

import argparse

GB = 1e9

MODELS = {
    # Qwen2.5-3B(-Instruct): tied embeddings.
    "qwen2.5-3b": dict(params=3_085_938_688, vocab=151_936, hidden=2048, inter=11_008, layers=36,
                       heads=16, kv_heads=2, head_dim=128),
    # Llama-3.2-3B(-Instruct): tied embeddings.
    "llama-3.2-3b": dict(params=3_212_749_824, vocab=128_256, hidden=3072, inter=8192, layers=28,
                         heads=24, kv_heads=8, head_dim=128),
}

# name: (devices sharing the model, memory per device in GB)
DEVICES = {"1x GPU 80GB": (1, 80), "TPU v5e-8": (8, 16), "TPU v4-8": (4, 32),
           "8x GPU 80GB": (8, 80)}


def per_device(m: dict, dp: int, *, prompt: int, response: int, batch: int, accum: int,
               prompts: int, d_accum: int, group: int, rollout: int, chunk: int,
               reference: bool = True) -> dict[str, float]:
    """Bytes per device (see the module docstring) as GB."""
    p = m["params"]
    t = prompt + response
    state = (12 * p + 12 * p + (4 * p if reference else 0)) / dp
    transient = 6 * p / dp

    def acts(rows: float, logits: bool) -> float:
        keep = rows * t * m["hidden"] * 2 * m["layers"]
        layer = rows * (m["heads"] * t * t * 4 * 2 + t * m["inter"] * 4 * 3)
        head = rows * chunk * m["vocab"] * 4 * 2 if logits else 0
        return keep + layer + head

    g_rows = batch / accum / dp
    d_rows = prompts / d_accum * (1 + group) / dp
    act = max(acts(g_rows, True), acts(d_rows, False))
    kv = rollout / dp * t * m["layers"] * 2 * m["kv_heads"] * m["head_dim"] * 2
    peak = state + max(transient + act, kv)
    return {"state": state / GB, "step": transient / GB, "activations": act / GB,
            "rollout_kv": kv / GB, "peak": peak / GB, "g_rows": g_rows, "d_rows": d_rows}


def table(args: argparse.Namespace) -> str:
    lines = [f"GAD stage, prompt {args.prompt} + response {args.response} tokens, "
             f"{args.prompts} prompts x {args.group} per step, student micro-batch "
             f"{args.batch}/{args.accum}, discriminator micro-batch "
             f"{args.prompts}/{args.d_accum} groups, rollout {args.rollout} rows per sampler "
             "call (computed, GB per device):",
             f"{'model':<14}{'devices':<13}{'state':>7}{'step':>7}{'activ.':>8}{'KV':>7}"
             f"{'peak':>8}{'of':>5}  fits"]
    for name, m in MODELS.items():
        for dev, (dp, cap) in DEVICES.items():
            r = per_device(m, dp, prompt=args.prompt, response=args.response, batch=args.batch,
                           accum=args.accum, prompts=args.prompts, d_accum=args.d_accum,
                           group=args.group, rollout=args.rollout, chunk=args.chunk)
            fits = "yes" if r["peak"] <= 0.9 * cap else "tight" if r["peak"] <= cap else "no"
            lines.append(f"{name:<14}{dev:<13}{r['state']:7.1f}{r['step']:7.1f}"
                         f"{r['activations']:8.1f}{r['rollout_kv']:7.1f}{r['peak']:8.1f}"
                         f"{cap:5d}  {fits}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--response", type=int, default=1536)
    ap.add_argument("--prompts", type=int, default=256, help="prompts per step")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2048, help="train.batch_size (responses)")
    ap.add_argument("--accum", type=int, default=256, help="train.grad_accum_steps")
    ap.add_argument("--d-accum", type=int, default=32, help="gad.d_grad_accum_steps")
    ap.add_argument("--rollout", type=int, default=64, help="gad.rollout_batch_size")
    ap.add_argument("--chunk", type=int, default=256, help="gad.logprob_chunk_size")
    print(table(ap.parse_args()))


if __name__ == "__main__":
    main()
