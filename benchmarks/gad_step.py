"""Time of one GAD step, split into rollout / discriminator scoring / D update / G update.

    python benchmarks/gad_step.py                  # CPU shape: the GAD demo's 0.4M student
    python benchmarks/gad_step.py --shape gpu      # Qwen2.5-1.5B-shaped roles, bf16 compute
    python benchmarks/gad_step.py --shape tpu --preset qwen2.5-3b --prompts 16

A GAD-stage step of ``sgalm_jax.algorithms.gad`` exactly as the loop runs it (``GAD.step``), on
randomly initialised roles (student, discriminator with a fresh head, frozen reference) and the
offline arithmetic prompts, with the byte-level tokenizer built offline; nothing is downloaded. The
first ``--warmup`` steps (compilation) are not timed; then ``--steps`` steps are, and the median of
each part is printed with its share:

* rollout: sampling G responses per prompt with the student (prefill + decode);
* D scoring: the discriminator's no-grad forward over teacher and student rows (the rewards);
* D update: one Bradley-Terry train step of the discriminator;
* G update: the student's reference log-prob pass (``logprobs``) and its GRPO train step.

A random student rarely stops early, so responses run to ``--response-tokens``: the decode is at
its longest. The peer numbers printed for comparison are published ones, not measured here: a
third-party reproduction of GAD on verl (7B student, 256 prompts x 8, 8 x H200) took ~405 s per
step with the reference config and ~212 s with vLLM TP=1 (research notes, gad_spin_grpo.md §1.5).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

SHAPES = {
    # The GAD demo's student (configs/gad_demo.py): hidden 96, 4 layers, vocab 512.
    "cpu": dict(init="tiny-qwen2", hf_config={"hidden_size": 96, "intermediate_size": 256,
                                              "num_hidden_layers": 4, "num_attention_heads": 4,
                                              "num_key_value_heads": 2, "vocab_size": 512},
                prompts=8, group=8, prompt_tokens=80, response_tokens=48, dtype="float32"),
    "gpu": dict(init="qwen2.5-1.5b", hf_config={}, prompts=16, group=8, prompt_tokens=256,
                response_tokens=512, dtype="bfloat16"),
    "tpu": dict(init="qwen2.5-1.5b", hf_config={}, prompts=16, group=8, prompt_tokens=256,
                response_tokens=512, dtype="bfloat16"),
}


def build_config(args: argparse.Namespace, workdir: str):
    from sgalm_jax.algorithms import base_config

    s = SHAPES[args.shape]
    c = base_config()
    c.algorithm = "gad"
    c.workdir = workdir
    c.model.init = args.preset or s["init"]
    c.model.hf_config = {} if args.preset else s["hf_config"]
    c.model.dtype = s["dtype"]
    c.model.remat = "full" if args.shape != "cpu" else "none"
    c.tokenizer.path = "builtin:tiny"
    c.data.task = "arithmetic"
    c.data.max_examples = 256
    prompt = args.prompt_tokens or s["prompt_tokens"]
    response = args.response_tokens or s["response_tokens"]
    c.data.max_length = 1 << (prompt + response - 1).bit_length()
    c.data.min_bucket = c.data.max_length
    c.distill.max_prompt_tokens = prompt
    c.distill.max_response_tokens = response
    c.distill.prompt_truncation = "left"
    g = c.gad
    g.stage = "gad"
    g.num_generations = args.group or s["group"]
    g.temperature = 0.8
    g.beta = 1e-3
    g.eval_examples = 0
    g.save_rollouts = False
    g.log_samples = 0
    g.logprob_chunk_size = 256
    prompts = args.prompts or s["prompts"]
    c.train.batch_size = prompts * g.num_generations
    c.train.grad_accum_steps = args.accum
    g.d_grad_accum_steps = args.d_accum or args.accum
    c.train.compute_dtype = "bfloat16" if s["dtype"] == "bfloat16" else ""
    c.train.num_steps = args.warmup + args.steps
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-6
    c.optimizer.max_grad_norm = 0.2
    c.metrics.tensorboard = False
    c.metrics.progress_bar = False
    c.checkpoint.export = False
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    ap.add_argument("--preset", default="", help="model.init preset instead of the shape's")
    ap.add_argument("--prompts", type=int, default=0)
    ap.add_argument("--group", type=int, default=0)
    ap.add_argument("--prompt-tokens", type=int, default=0)
    ap.add_argument("--response-tokens", type=int, default=0)
    ap.add_argument("--accum", type=int, default=1, help="train.grad_accum_steps")
    ap.add_argument("--d-accum", type=int, default=0, help="gad.d_grad_accum_steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()

    import jax

    from sgalm_jax.algorithms import gad
    from sgalm_jax.training import Checkpointer

    workdir = tempfile.mkdtemp(prefix="gad_step_")
    config = build_config(args, workdir)
    gad.validate(config)
    algo = gad.GAD(config, workdir)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    algo.build_roles(ckpt, None)
    ckpt.close()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(algo.roles["student"].params))
    parts = ("time/rollout", "time/score", "time/d_update", "time/logprobs", "time/g_update")
    times: dict[str, list[float]] = {k: [] for k in parts}
    totals, lengths = [], []
    for s in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        record, _ = algo.step(s)
        total = time.perf_counter() - t0
        if s >= args.warmup:
            for k in parts:
                times[k].append(record[k])
            totals.append(total)
            lengths.append(record["completion_length_mean"])
    load = os.getloadavg()
    print(f"GAD step, shape {args.shape}: student {n_params / 1e6:.2f}M params "
          f"({config.model.init}), {algo.prompts} prompts x {algo.group} responses, prompt <= "
          f"{config.distill.max_prompt_tokens} and response <= "
          f"{config.distill.max_response_tokens} tokens (mean response "
          f"{np.mean(lengths):.1f}); {jax.device_count()} x {jax.devices()[0].device_kind}; "
          f"{platform.machine()} with {os.cpu_count()} CPUs, load average "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    total = float(np.median(totals))
    names = {"time/rollout": "rollout", "time/score": "D scoring", "time/d_update": "D update",
             "time/logprobs": "G: reference log-probs", "time/g_update": "G update (GRPO step)"}
    print(f"{'part':<26}{'median s':>10}{'share':>8}")
    for k in parts:
        med = float(np.median(times[k]))
        print(f"{names[k]:<26}{med:>10.3f}{med / total:>8.1%}")
    print(f"{'whole step':<26}{total:>10.3f}{'':>8}  ({args.steps} timed steps after "
          f"{args.warmup} untimed)")
    print("peer (published, not measured here): GAD on verl, 7B student, 256 prompts x 8, "
          "8 x H200: ~405 s per step (reference config), ~212 s with vLLM TP=1.")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
