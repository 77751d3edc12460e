"""The evidence study (docs/evidence.md): every method from the same pre-trained model, several seeds.

    python benchmarks/study.py --root /tmp/study               # 5 seeds, every method
    python benchmarks/study.py --root /tmp/study_quick --quick # 2 seeds, 1 iteration of 6 updates
    python benchmarks/study.py --root /tmp/study --report      # table and plots of what is done

Resumable: rerun the same command after an interruption; finished (method, seed, iteration)
evaluations are read back from ``ROOT/results.jsonl`` and every run resumes from its checkpoint.
Prints the table (mean ± 95% t-interval over seeds at the last iteration), writes
``ROOT/summary.json``, ``ROOT/table.md`` and one PNG per metric over the iterations
(``ROOT/plots/<metric>.png``; needs matplotlib: ``pip install -e ".[plot]"``), and reports wall
and CPU (process) time per method.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgalm_jax.algorithms import evidence as ev  # noqa: E402


def plot(rows: list[dict], out_dir: str, iterations: int) -> list[str]:
    """One PNG per metric: each method's mean over seeds per iteration with its 95% band
    (iteration 0 is the shared pre-trained model)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no plots")
        return []
    os.makedirs(out_dir, exist_ok=True)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "base"]
    paths = []
    for metric in ev.METRICS:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for m in methods:
            xs, ys, lo, hi = [], [], [], []
            for t in range(0, iterations + 1):
                sel = [r for r in rows if (r["method"], r["iteration"]) == (m, t)] if t else \
                    [r for r in rows if r["method"] == "base"
                     and r["seed"] in {q["seed"] for q in rows if q["method"] == m}]
                mean, half, n = ev.mean_ci(r.get(metric) for r in sel)
                if n == 0:
                    continue
                xs.append(t)
                ys.append(mean)
                h = 0.0 if math.isnan(half) else half
                lo.append(mean - h)
                hi.append(mean + h)
            if xs:
                line, = ax.plot(xs, ys, marker="o", label=ev.label(m))
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
        ax.set_xlabel("iteration (0 = pre-trained model)")
        ax.set_ylabel(metric)
        ax.set_title(ev.METRIC_DOC[metric], fontsize=9)
        ax.set_xticks(range(0, iterations + 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{metric}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def times(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per method: mean wall / CPU seconds of training (one run of all iterations) and of one
    evaluation, over seeds."""
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == m]
        seeds = {r["seed"] for r in mine}
        out[m] = {k: sum(r.get(k, 0.0) for r in mine) / max(len(seeds), 1)
                  for k in ("train_seconds", "train_cpu_seconds")}
        out[m].update({k: sum(r.get(k, 0.0) for r in mine) / len(mine)
                       for k in ("eval_seconds", "eval_cpu_seconds")})
    return out


def report(study: ev.Study) -> dict:
    rows = study.results()
    if not rows:
        print("no results yet")
        return {}
    summary = ev.summarize(rows)
    table = ev.format_table(summary)
    per_iter = {t: ev.summarize([r for r in rows if r["iteration"] in (0, t)], iteration=t)
                for t in range(1, study.iterations + 1)}
    tm = times(rows)
    print("\n" + table)
    print("\nseconds per seed (training: all iterations; evaluation: one model):")
    for m, v in tm.items():
        print(f"  {ev.label(m):<15} train {v['train_seconds']:7.1f} wall {v['train_cpu_seconds']:7.1f}"
              f" cpu   eval {v['eval_seconds']:6.1f} wall {v['eval_cpu_seconds']:6.1f} cpu")
    plots = plot(rows, os.path.join(study.root, "plots"), study.iterations)
    out = {"summary": summary, "per_iteration": per_iter, "times": tm, "plots": plots,
           "settings": {"iterations": study.iterations, "updates_per_iteration": study.updates,
                        "pretrain_steps": study.pretrain_steps,
                        "anneal_steps": study.anneal_steps,
                        "num_samples": study.num_samples, "num_questions": study.num_questions,
                        "task_options": ev.TASK_OPTIONS}}
    with open(os.path.join(study.root, "summary.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(study.root, "table.md"), "w") as f:
        f.write(markdown(summary) + "\n\n")
        for metric in ("validity", "answer_accuracy", "d_acc"):
            f.write(f"{metric} over iterations:\n\n{trajectory(rows, metric, study.iterations)}\n\n")
        f.write("\n\n".join(
            f"After iteration {t}:\n\n{markdown(s)}" for t, s in per_iter.items()) + "\n")
    return out


def trajectory(rows: list[dict], metric: str, iterations: int) -> str:
    """``metric`` per method (rows) and iteration (columns; 0 = the pre-trained model on the same
    seeds), mean ± 95% half-width."""
    lines = ["| method | " + " | ".join(f"it {t}" for t in range(iterations + 1)) + " |",
             "|---" * (iterations + 2) + "|"]
    for m in dict.fromkeys(r["method"] for r in rows):
        if m == "base":
            continue
        seeds = {r["seed"] for r in rows if r["method"] == m}
        cells = []
        for t in range(iterations + 1):
            sel = [r for r in rows if r["method"] == "base" and r["seed"] in seeds] if t == 0 \
                else [r for r in rows if (r["method"], r["iteration"]) == (m, t)]
            mean, half, n = ev.mean_ci(r.get(metric) for r in sel)
            cells.append("" if n == 0 else f"{mean:.3f}" if math.isnan(half)
                         else f"{mean:.3f} ± {half:.3f}")
        lines.append(f"| {ev.label(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    head = "| model | " + " | ".join(ev.METRICS) + " | seeds |"
    lines = [head, "|---" * (len(ev.METRICS) + 2) + "|"]
    for m, stats in summary.items():
        cells = []
        for c in ev.METRICS:
            mean, half, _ = stats[c]
            cells.append(f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}")
        lines.append(f"| {ev.label(m)} | " + " | ".join(cells)
                     + f" | {max(s[2] for s in stats.values())} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="study directory (resumable)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0,
                   help="run seeds first-seed .. seeds-1 only (a second process can take "
                        "the last seeds; results.jsonl is shared)")
    p.add_argument("--methods", default=",".join(m for m, x in ev.METHODS.items()
                                                 if x.available()),
                   help=f"comma-separated, of {list(ev.METHODS)}")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--updates", type=int, default=20, help="optimizer steps per iteration")
    p.add_argument("--pretrain-steps", type=int, default=800)
    p.add_argument("--anneal-steps", type=int, default=0,
                   help="second pre-training phase (AdamW 1e-3, cosine) from the first's model")
    p.add_argument("--learning-rate", type=float, default=0.0,
                   help="every method's optimizer.learning_rate (0 = the demo's 1e-4); a "
                        "sensitivity run: use its own --root, sharing the base model is fine")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 2 seeds, 1 iteration of 6 updates, 40-step base, "
                        "small evaluations")
    p.add_argument("--report", action="store_true", help="only the table and plots")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("SGALM_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import jax

    kw = dict(iterations=args.iterations, updates=args.updates,
              pretrain_steps=args.pretrain_steps, anneal_steps=args.anneal_steps)
    seeds = args.seeds
    if args.quick:
        seeds = min(seeds, 2)
        kw = dict(iterations=1, updates=6, pretrain_steps=100, anneal_steps=0, num_samples=32, num_questions=16,
                  num_heldout=16, prompts_per_iteration=16)
    config = ev.study_config()
    if args.learning_rate:
        config.optimizer.learning_rate = args.learning_rate
    study = ev.Study(args.root, config, **kw)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in ev.METHODS or not ev.METHODS[m].available()]
    if unknown:
        p.error(f"unknown or unavailable methods {unknown}; available: "
                f"{[m for m, x in ev.METHODS.items() if x.available()]}")
    if not args.report:
        os.makedirs(study.root, exist_ok=True)
        if not jax.config.jax_compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", os.path.join(study.root, "jax_cache"))
        t0, c0 = time.perf_counter(), time.process_time()
        study.prepare()
        print(f"prepared in {time.perf_counter() - t0:.0f}s wall, "
              f"{time.process_time() - c0:.0f}s cpu", flush=True)
        for seed in range(args.first_seed, seeds):
            study.run_seed(seed, methods)
            print(f"seed {seed} done at {time.perf_counter() - t0:.0f}s wall, "
                  f"{time.process_time() - c0:.0f}s cpu", flush=True)
    report(study)
    return 0


if __name__ == "__main__":
    sys.exit(main())
