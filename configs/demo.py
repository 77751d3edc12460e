"""The SGALM demo's config (what ``python -m sgalm_jax.main`` with no arguments runs).

    python -m sgalm_jax.main --config configs/demo.py [--config.sgalm.iterations=5 ...]

A small Qwen2-architecture model and a tokenizer built offline, SFT pre-training on the built-in
arithmetic task, SGALM iterations, and a comparison with continuing plain SFT; about 6 minutes on a
2-core CPU. The phases and settings are described in sgalm_jax/algorithms/demo.py and
docs/sgalm.md; ``train.num_steps`` is the pre-training length.
"""

from sgalm_jax.algorithms.demo import demo_config


def get_config():
    return demo_config()
