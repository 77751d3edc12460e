"""``--compile-only``: every program of a config compiled for a target without running anything.

CI compiles the tiny configs for ``cpu-8`` (the 8 simulated devices of the test session): XLA's CPU
compiler needs no extra install. The TPU test runs only where libtpu is installed (the ``tpu``
extra); the figures of the shipped configs on TPU targets are in docs/benchmarks.md.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from sgalm_jax import main as cli
from sgalm_jax.algorithms import get_algorithm
from sgalm_jax.compile_only import (CompileCheckError, Target, parse_target, run_compile_only)
from sgalm_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SGALM_TINY = os.path.join(REPO, "configs", "sgalm_tiny.py")
SFT_TINY = os.path.join(REPO, "configs", "sft_tiny.py")
GRPO_TINY = os.path.join(REPO, "configs", "grpo_tiny.py")


def test_targets_parse():
    v5e = parse_target("v5e-8")
    assert (v5e.platform, v5e.topology, v5e.num_devices, v5e.memory) == ("tpu", "v5e:2x4", 8,
                                                                         16 * 2 ** 30)
    v4 = parse_target("v4-8")  # v4 slices count TensorCores: 4 chips
    assert (v4.topology, v4.num_devices, v4.memory) == ("v4:2x2x1", 4, 32 * 2 ** 30)
    assert parse_target("cpu-8").num_devices == 8 and parse_target("cpu-8").memory is None
    for bad in ("v5e-3", "h100", "v4-5"):
        with pytest.raises(ConfigError, match="--compile-only"):
            parse_target(bad)


def test_sgalm_programs_compile_for_cpu_devices(capsys):
    """Every SGALM program (D step, G step, D scorer, sampler prefill and decode) compiles for an
    8-device mesh from the tiny config, without data, tokenizer or run directory."""
    assert cli.main(["sgalm_jax.main", f"--config={SGALM_TINY}", "--compile-only=cpu-8",
                     "--config.train.batch_size=16", "--config.workdir=/nonexistent/w"]) == 0
    out = capsys.readouterr().out
    assert "target cpu-8: 8 host CPU device(s); mesh data=1 fsdp=8 tensor=1" in out
    for name in ("D step (16 x 256)", "G step (8 x 256)", "D scorer (16 x 256)",
                 "sampler prefill (16 x 256 prompt, 16 rows x 288 cache)",
                 "sampler decode (16 x 256 prompt, 16 rows x 288 cache)"):
        assert name in out, out
    assert not os.path.exists("/nonexistent/w")


def test_grpo_lora_programs_compile_from_the_runs_roles(capsys):
    """GRPO with LoRA: the run's own roles built abstract (a bf16 base, adapters as the policy,
    the reference a view of the base), so the step takes the base as an argument and holds only
    the adapters' optimizer state; the reference pass is the base's own graph."""
    config = cli.parse_config(["m", f"--config={GRPO_TINY}", "--config.lora.enabled=true",
                               "--config.lora.base_dtype=bfloat16"])
    reports = {r.name: r for r in run_compile_only(config, get_algorithm("grpo"),
                                                   parse_target("cpu-8"))}
    assert [n.split(" (")[0] for n in reports] == ["GRPO step", "old log-probs",
                                                   "reference log-probs", "sampler prefill",
                                                   "sampler decode"], sorted(reports)
    step = reports["GRPO step (8 x 256)"]
    # donated: exactly the adapters' train state, which is all the step outputs (+ metrics)
    assert 0 < step.aliased <= step.outputs and step.resident == 0
    assert "GRPO step" in capsys.readouterr().out


def test_a_program_that_does_not_fit_fails_naming_it(capsys):
    config = cli.parse_config(["m", f"--config={SFT_TINY}"])
    tiny = Target("tiny", "cpu", None, 8, 2 ** 20, "8 CPU devices of 1 MiB")
    with pytest.raises(CompileCheckError, match=r"SFT step \(8 x 256\) needs [0-9.]+ MiB per "
                                                r"device, more than the 1.00 MiB of a tiny device"):
        run_compile_only(config, get_algorithm("sft"), tiny)
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_compile_only_needs_a_model_shape(capsys):
    status = cli.main(["m", f"--config={SFT_TINY}", "--compile-only=cpu-8",
                       "--config.model.init="])
    assert status == 2 and "model.architecture" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install 'sgalm_jax[tpu]')")
def test_tiny_config_compiles_for_a_tpu_topology(capsys):
    assert cli.main(["m", f"--config={SFT_TINY}", "--compile-only=v5e-8"]) == 0
    assert "SFT step (8 x 256)" in capsys.readouterr().out
