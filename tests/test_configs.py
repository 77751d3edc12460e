"""Every experiment file in configs/ loads and passes the schema checks (keys, types, values)."""

from __future__ import annotations

import pytest

from sgalm_jax.config import load_config_file, validate_config
from tests.conftest import REPO

CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_file_is_valid(name):
    config = load_config_file(name, str(REPO / "configs" / name))
    validate_config(config)
    assert config.algorithm


def test_variants_differ_from_their_base_only_in_the_variant():
    base = load_config_file("qwen3b_gsm8k.py", str(REPO / "configs" / "x"))
    for variant in ("d_only", "g_only"):
        config = load_config_file(f"qwen3b_gsm8k_{variant}.py", str(REPO / "configs" / "x"))
        assert config.sgalm.variant == variant
        config.sgalm.variant = base.sgalm.variant
        assert config.to_dict() == base.to_dict()
