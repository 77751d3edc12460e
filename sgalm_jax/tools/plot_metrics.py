"""Plot a run's training curves from ``metrics.jsonl`` to a PNG.

    python -m sgalm_jax.tools.plot_metrics runs/sgalm/metrics.jsonl -o runs/sgalm/curves.png
    python scripts/plot_metrics.py runs/sgalm            # the same; -o defaults to curves.png

Panels (each drawn only when the run logged its metrics): the D and G losses; mean D on real and
generated samples (per D step, and the per-iteration held-out diagnostics); D accuracy; the
validity and well-formedness of generated samples; diversity (distinct-1/2, repetition,
duplicates). Works for any run's ``metrics.jsonl`` (an SFT run gets its ``loss``).

Needs matplotlib, which is not a dependency of the library: ``pip install matplotlib`` (or the
``plot`` extra: ``pip install -e .[plot]``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Sequence

Series = dict[str, tuple[list[int], list[float]]]

# (panel title, y label, metric names)
PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("losses", "loss", ("d_loss", "g_loss", "loss")),
    ("D on real / generated", "mean D", ("d_real", "d_fake", "diag/d_heldout_real",
                                         "diag/d_train_real", "diag/d_fake",
                                         "diag/end_d_heldout_real", "diag/end_d_heldout_fake")),
    ("D accuracy", "accuracy", ("d_acc", "diag/d_acc_heldout", "diag/end_d_acc_heldout")),
    ("generated samples: validity", "rate", ("diag/validity", "diag/well_formed",
                                             "diag/stopped")),
    ("generated samples: diversity", "value", ("diag/distinct_1", "diag/distinct_2",
                                               "diag/repetition", "diag/duplicates")),
)


def load_series(path: str) -> Series:
    """``{metric: (steps, values)}`` of every numeric metric in a ``metrics.jsonl`` (lines that
    are not JSON objects, text records and non-finite values are skipped)."""
    out: Series = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or "step" not in rec:
                continue
            for k, v in rec.items():
                if k in ("step", "time") or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                if not math.isfinite(v):
                    continue
                steps, values = out.setdefault(k, ([], []))
                steps.append(int(rec["step"]))
                values.append(float(v))
    return out


def panels(series: Series) -> list[tuple[str, str, list[str]]]:
    """The panels that have data: ``(title, y label, metric names present)``."""
    out = []
    for title, ylabel, names in PANELS:
        present = [n for n in names if n in series]
        if present:
            out.append((title, ylabel, present))
    return out


def plot(series: Series, output: str, title: str = "") -> str:
    """Draw the panels to ``output`` (PNG); returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot_metrics needs matplotlib: pip install matplotlib "
                         "(or pip install -e .[plot])") from None
    chosen = panels(series)
    if not chosen:
        raise SystemExit("no known metrics to plot in this metrics.jsonl")
    fig, axes = plt.subplots(len(chosen), 1, figsize=(8, 2.6 * len(chosen)), sharex=True,
                             squeeze=False)
    for ax, (name, ylabel, names) in zip(axes[:, 0], chosen):
        for n in names:
            steps, values = series[n]
            style = "o-" if n.startswith("diag/") else "-"
            ax.plot(steps, values, style, label=n, markersize=3, linewidth=1)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("update")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", help="a metrics.jsonl, or a run directory holding one")
    parser.add_argument("-o", "--output", default="",
                        help="PNG to write (default: curves.png beside metrics.jsonl)")
    args = parser.parse_args(argv)
    path = args.metrics
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file")
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(path)), "curves.png")
    plot(load_series(path), output, title=os.path.basename(os.path.dirname(os.path.abspath(path))))
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
