"""The GAD demo on a CPU: SeqKD vs GAD distilling the arithmetic task's solver into a small student.

    python -m sgalm_jax.main --config configs/gad_demo.py --config.workdir=runs/gad_demo

See sgalm_jax/algorithms/gad_demo.py for the phases and docs/gad.md for a measured run.
"""

from sgalm_jax.algorithms.gad_demo import demo_config


def get_config():
    return demo_config()
