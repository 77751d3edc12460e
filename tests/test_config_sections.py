"""Algorithm config sections: declared beside the algorithm's code, one mechanism for defaults,
descriptions (--describe), type checks and unknown-key errors; the built-in ones are registered
by their modules, not by sgalm_jax.config."""

from __future__ import annotations

import ast
from pathlib import Path

import ml_collections
import pytest

from sgalm_jax import config as cfg
from sgalm_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy_section():
    cfg.register_section("toy_algo", {
        "rounds": (3, "rounds per iteration"),
        "inner": {"scale": (0.5, "a nested key")},
        "options": ({}, f"{cfg.FREE_FORM} anything"),
    }, owner=__name__)
    yield
    del cfg._SCHEMA["toy_algo"], cfg.SECTIONS["toy_algo"]
    cfg._refresh()


def test_a_registered_section_gets_defaults_descriptions_and_checks(toy_section):
    c = cfg.base_config()
    assert c.toy_algo.rounds == 3 and c.toy_algo.inner.scale == 0.5
    assert "toy_algo.inner.scale" in cfg.describe() and "rounds per iteration" in cfg.describe()
    cfg.validate_config(c)
    cfg.check_key("toy_algo.options.whatever")  # free-form
    with pytest.raises(ConfigError, match=r"^toy_algo.rouns: unknown config key; did you mean "
                                          r"'toy_algo.rounds'"):
        cfg.check_key("toy_algo.rouns")
    d = c.to_dict()
    d["toy_algo"]["rounds"] = "three"
    with pytest.raises(ConfigError, match="^toy_algo.rounds: expected int"):
        cfg.validate_config(ml_collections.ConfigDict(d))
    with pytest.raises(ValueError, match="already defined"):
        cfg.register_section("toy_algo", {"x": (1, "x")}, owner="someone.else")
    with pytest.raises(ValueError, match="already defined by the base schema"):
        cfg.register_section("optimizer", {"x": (1, "x")}, owner=__name__)
    with pytest.raises(ValueError, match=r"toy2.x: expected \(default, description\)"):
        cfg.register_section("toy2", {"x": 1}, owner=__name__)


def test_builtin_sections_come_from_their_modules_and_config_imports_no_algorithm():
    from sgalm_jax.algorithms import base_config

    c = base_config()
    assert {"sgalm", "selfplay", "data_engine", "grpo"} <= set(cfg.SECTIONS)
    assert cfg.SECTIONS["grpo"] == "sgalm_jax.algorithms.grpo"
    assert c.grpo.num_generations >= 1 and c.sgalm.variant == "full"
    tree = ast.parse((REPO / "sgalm_jax" / "config.py").read_text())
    imported = [getattr(n, "module", None) or n.names[0].name for n in ast.walk(tree)
                if isinstance(n, (ast.Import, ast.ImportFrom))]
    # Only the leaf modules below every layer (errors, atomic file writes, its own schema): no
    # algorithm.
    leaves = {"sgalm_jax.errors", "sgalm_jax.config", "sgalm_jax.config_schema", "sgalm_jax.fileio"}
    assert not [m for m in imported if m and m.startswith("sgalm_jax.") and m not in leaves], \
        imported
