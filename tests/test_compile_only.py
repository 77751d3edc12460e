"""``--compile-only``: every program of a config compiled for a target without running anything.

CI compiles the tiny configs for ``cpu-8`` (the 8 simulated devices of the test session): XLA's CPU
compiler needs no extra install. The TPU test runs only where libtpu is installed (the ``tpu``
extra); the figures of the shipped configs on TPU targets are in docs/benchmarks.md.
"""

from __future__ import annotations

import importlib.util
import os

import jax.numpy as jnp
import pytest

from sgalm_jax import main as cli
from sgalm_jax.algorithms import get_algorithm
from sgalm_jax.compile_only import (CompileCheckError, Target, parse_target, run_compile_only)
from sgalm_jax.errors import ConfigError
from sgalm_jax.training.model_setup import model_config

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
    """Every SGALM program (D step, G step, D scorer, and the sampler's programs: the continuous
    engine's prefill, insert and decode, which runs use by default) compiles for an 8-device mesh
    from the tiny config, without data, tokenizer or run directory."""
    assert cli.main(["sgalm_jax.main", f"--config={SGALM_TINY}", "--compile-only=cpu-8",
                     "--config.train.batch_size=16", "--config.workdir=/nonexistent/w"]) == 0
    out = capsys.readouterr().out
    assert "target cpu-8: 8 host CPU device(s); mesh data=1 fsdp=8 tensor=1" in out
    for name in ("D step (16 x 256)", "G step (8 x 256)", "D scorer (16 x 256)",
                 "engine prefill (16 x 256 prompt)",
                 "engine decode (16 slots x 288 cache, 16-prompt stash)"):
        assert name in out, out
    assert "sampler prefill" not in out
    assert not os.path.exists("/nonexistent/w")


def test_sampler_programs_follow_the_configured_engine():
    """``sampling.engine=static`` lists the static sampler's prefill and decode instead; the
    continuous engine's decode holds its slot cache (keys and values of every layer for
    ``slots x (prompt + new tokens)`` positions) among its arguments."""
    base = ["m", f"--config={SGALM_TINY}", "--config.train.batch_size=16"]
    static = cli.parse_config(base + ["--config.sampling.engine=static"])
    names = [r.name for r in run_compile_only(static, get_algorithm("sgalm"),
                                              parse_target("cpu-8"))]
    assert names[-2:] == ["sampler prefill (16 x 256 prompt, 16 rows x 288 cache)",
                          "sampler decode (16 x 256 prompt, 16 rows x 288 cache)"], names
    config = cli.parse_config(base)
    reports = {r.name: r for r in run_compile_only(config, get_algorithm("sgalm"),
                                                   parse_target("cpu-8"))}
    decode = reports["engine decode (16 slots x 288 cache, 16-prompt stash)"]
    mc = model_config(config.model)
    # keys and values; 16 slots over the 8 devices' batch axes: 2 slots per device
    cache = (2 * mc.num_hidden_layers * 2 * mc.num_key_value_heads * mc.head_dim * 288
             * jnp.dtype(mc.dtype).itemsize)
    assert decode.arguments >= cache and decode.aliased >= cache


def test_grpo_lora_programs_compile_from_the_runs_roles(capsys):
    """GRPO with LoRA: the run's own roles built abstract (a bf16 base, adapters as the policy,
    the reference a view of the base), so the step takes the base as an argument and holds only
    the adapters' optimizer state; the reference pass is the base's own graph."""
    config = cli.parse_config(["m", f"--config={GRPO_TINY}", "--config.lora.enabled=true",
                               "--config.lora.base_dtype=bfloat16"])
    reports = {r.name: r for r in run_compile_only(config, get_algorithm("grpo"),
                                                   parse_target("cpu-8"))}
    assert [n.split(" (")[0] for n in reports] == ["GRPO step", "old log-probs",
                                                   "reference log-probs", "engine prefill",
                                                   "engine decode"], sorted(reports)
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


def test_data_engine_programs_generator_sampler_and_student_sft():
    """The data engine lists the generator's sampler programs (the continuous engine at
    ``sgalm.sample_batch_size`` slots) and the student's SFT step, each model at its own shape."""
    config = cli.parse_config([
        "m", "--config.algorithm=data_engine", "--config.model.init=tiny-qwen2",
        "--config.data.task=arithmetic", "--config.data.max_length=256",
        "--config.sgalm.sample_batch_size=16", "--config.sgalm.max_new_tokens=32",
        "--config.data_engine.student_init=tiny-llama", "--config.train.batch_size=8"])
    reports = run_compile_only(config, get_algorithm("data_engine"), parse_target("cpu-8"))
    assert [r.name for r in reports] == [
        "generator engine prefill (16 x 256 prompt)",
        "generator engine decode (16 slots x 288 cache, 16-prompt stash)",
        "student SFT step (8 x 256)"]
    assert all(r.peak > 0 for r in reports)
