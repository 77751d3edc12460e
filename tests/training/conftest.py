"""Fixtures of the training-core tests: a tiny model, its params on the host, batches."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sgalm_jax.config import MODEL_PRESETS
from sgalm_jax.models import ModelConfig


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return ModelConfig.from_hf(MODEL_PRESETS["tiny-qwen2"])


@pytest.fixture(scope="session")
def host_params(tiny_config):
    """(graphdef, params as numpy): every test device_puts its own copy (steps donate them)."""
    from sgalm_jax.training import split_model
    from sgalm_jax.training.model_setup import init_model

    graphdef, params = split_model(init_model(tiny_config, mesh=None, seed=0))
    return graphdef, jax.device_get(params)


def random_sft_batch(batch: int = 16, length: int = 32, vocab: int = 512, seed: int = 0):
    """A right-padded SFT batch with varied lengths and prompt/response split."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, length)).astype(np.int32)
    lengths = rng.integers(length // 2, length + 1, size=batch)
    prompt = rng.integers(2, length // 2, size=batch)
    pos = np.arange(length)[None, :]
    attn = (pos < lengths[:, None]).astype(np.int32)
    loss = ((pos >= prompt[:, None]) & (pos < lengths[:, None])).astype(np.float32)
    ids = np.where(attn == 1, ids, 0)
    positions = np.where(attn == 1, pos, 0).astype(np.int32)
    return {"input_ids": ids, "attention_mask": attn, "positions": positions, "loss_mask": loss}


@pytest.fixture(scope="session")
def make_batch():
    """``make_batch(batch=16, length=32, vocab=512, seed=0)`` -> a random SFT batch (numpy)."""
    return random_sft_batch
