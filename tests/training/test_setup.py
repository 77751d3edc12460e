"""Run set-up pieces: model presets and init, config JSON round trip, multi-host detection,
launch scripts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

from sgalm_jax import sharding as sh
from sgalm_jax.config import (
    DESCRIPTIONS,
    base_config,
    describe,
    load_config_json,
    save_config,
    validate_config,
)
from sgalm_jax.errors import ConfigError
from sgalm_jax.training.distributed import launched_multi_process
from sgalm_jax.training.model_setup import init_model, model_config

REPO = Path(__file__).resolve().parents[2]


def test_every_key_has_a_description_and_default():
    text = describe()
    for key, desc in DESCRIPTIONS.items():
        assert desc and key in text
    validate_config(base_config())
    assert base_config().algorithm == "demo"


def test_config_json_round_trip(tmp_path):
    c = base_config()
    c.model.init = "tiny-llama"
    c.model.hf_config = {"hidden_size": 32, "intermediate_size": 48}
    c.train.batch_size = 16
    save_config(c, str(tmp_path / "config.json"))
    json.loads((tmp_path / "config.json").read_text())
    assert load_config_json(str(tmp_path / "config.json")) == c
    (tmp_path / "bad.json").write_text(json.dumps({"train": {"nope": 1}}))
    with pytest.raises(ConfigError, match="^train.nope"):
        load_config_json(str(tmp_path / "bad.json"))


def test_model_config_from_presets_and_overrides():
    c = base_config().model
    c.init = "tiny-qwen3"
    c.hf_config = {"num_hidden_layers": 3}
    c.dtype = "bfloat16"
    mc = model_config(c)
    assert mc.model_type == "qwen3" and mc.num_hidden_layers == 3 and mc.qk_norm
    assert mc.dtype == jax.numpy.bfloat16 and mc.param_dtype == jax.numpy.float32
    c.hf_config = {"hidden_act": "gelu"}
    with pytest.raises(ConfigError, match="^model.hf_config"):
        model_config(c)


def test_init_model_is_sharded_and_mesh_independent(tiny_config, host_params):
    mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = init_model(tiny_config, mesh=mesh, seed=0)
    _, plain = host_params  # init_model(tiny_config, mesh=None, seed=0): one device
    k = sharded.model.layers.mlp.gate_proj.kernel[...]  # stacked [L, hidden, mlp]
    assert k.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    np.testing.assert_array_equal(
        np.asarray(k), plain["model"]["layers"]["mlp"]["gate_proj"]["kernel"][...])


def test_multi_host_launch_detection():
    assert not launched_multi_process({})
    assert not launched_multi_process({"SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"})
    assert launched_multi_process({"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"})
    assert not launched_multi_process({"SLURM_NTASKS": "4"})  # the batch script itself
    assert launched_multi_process({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"})
    assert not launched_multi_process({"TPU_WORKER_HOSTNAMES": "localhost"})
    assert launched_multi_process({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"})
    assert launched_multi_process({"OMPI_COMM_WORLD_SIZE": "2"})


def test_launch_scripts_parse():
    scripts = sorted((REPO / "launch").rglob("*.sh")) + sorted((REPO / "launch").rglob("*.sbatch"))
    assert len(scripts) >= 5 and (REPO / "launch" / "README.md").exists()
    for s in scripts:
        subprocess.run(["bash", "-n", str(s)], check=True)


def test_sampler_options_from_the_sampling_section():
    """The algorithms' samplers: the algorithm's batch size bounds the rows decoded at once, and
    the default engine is continuous once a call holds more rows than that."""
    from sgalm_jax.sampling import Sampler
    from sgalm_jax.training.run_setup import sampler_options

    c = base_config()
    opts = sampler_options(c, 32)
    assert opts["engine"] == "auto" and opts["max_batch_size"] == 32
    assert opts["placement"] == "global" and opts["local_mesh_shape"] is None
    c.model.init = "tiny-qwen2"
    auto = Sampler(None, model_config(c.model), **opts)  # the graph is only needed to sample
    assert auto.resolve_engine(33) == "continuous" and auto.resolve_engine(32) == "static"
    c.sampling.num_slots, c.sampling.engine, c.sampling.local_mesh = 8, "static", {"tensor": 2}
    opts = sampler_options(c, 32)
    assert opts["max_batch_size"] == 8 and opts["engine"] == "static"
    assert opts["local_mesh_shape"] == {"tensor": 2}
    assert sampler_options({}, 16) == {"max_batch_size": 16}  # a config without the section
    c.sampling.engine = "paged"
    with pytest.raises(ConfigError, match="sampling.engine"):
        validate_config(c)
