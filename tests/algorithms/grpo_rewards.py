"""Reward functions of the GRPO tests, importable as ``tests.algorithms.grpo_rewards:NAME`` (the
CLI runs name them in ``grpo.reward``)."""

from __future__ import annotations

import numpy as np


def low_token_fraction(prompts, completions, completion_ids):
    """The fraction of a completion's tokens whose id is below 256 (half the tiny vocabulary): a
    trivially learnable reward whose spread within a group is never zero for a random model."""
    return [float(np.mean(np.asarray(ids) < 256)) if len(ids) else 0.0 for ids in completion_ids]
