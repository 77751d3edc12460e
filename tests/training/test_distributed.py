"""Multi-host plumbing that needs no second process: launch settings from config keys and the
environment, the single-process behaviour of the agreement helpers, per-host tokenization shares,
and the local launcher's process handling. (tests/multihost/ runs real 2-process jobs.)"""

from __future__ import annotations

import os
import sys
import textwrap

import jax
import numpy as np
import pytest

from sgalm_jax import sharding as sh
from sgalm_jax.config import base_config
from sgalm_jax.errors import ConfigError
from sgalm_jax.tools.launch_local import free_port, launch, process_env
from sgalm_jax.training import multihost as mh
from sgalm_jax.training.batching import BatchSource, LazyExamples, TokenizedExample, host_share
from sgalm_jax.training.distributed import (
    default_bind_address,
    detected_cluster,
    launched_multi_process,
    resolve_launch,
)


def _dist(**kw):
    d = base_config().distributed
    for k, v in kw.items():
        d[k] = v
    return d


# ------------------------------------------------------------------------------ launch settings
def test_single_process_needs_nothing():
    assert resolve_launch(_dist(), env={}) is None
    assert resolve_launch(_dist(mode="off"), env={"JAX_COORDINATOR_ADDRESS": "h:1"}) is None


def test_environment_only_launch():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}
    spec = resolve_launch(_dist(), env=env)
    assert (spec.coordinator_address, spec.num_processes, spec.process_id) == ("10.0.0.2:1234", 4, 3)
    assert spec.coordinator_bind_address is None  # a routable address: JAX's default (all)
    # Config keys win over the environment.
    spec = resolve_launch(_dist(process_id=1), env=env)
    assert spec.process_id == 1
    assert spec.kwargs()["process_id"] == 1 and "local_device_ids" not in spec.kwargs()


@pytest.mark.parametrize("env, missing", [
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, "distributed.num_processes"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "distributed.coordinator_address"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "distributed.process_id"),
])
def test_partial_setup_is_a_config_error_naming_what_is_missing(env, missing):
    with pytest.raises(ConfigError, match=f"^{missing}: not set"):
        resolve_launch(_dist(), env=env)


def test_bad_values_name_the_key():
    full = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}
    with pytest.raises(ConfigError, match=r"^distributed.process_id: 2 is not in \[0, 2\)"):
        resolve_launch(_dist(process_id=2), env=full)
    with pytest.raises(ConfigError, match="^distributed.process_id: .* not an integer"):
        resolve_launch(_dist(), env={**full, "JAX_PROCESS_ID": "one"})
    with pytest.raises(ConfigError, match="^distributed.coordinator_address: 'nohost' is not"):
        resolve_launch(_dist(coordinator_address="nohost", num_processes=2, process_id=0), env={})
    with pytest.raises(ConfigError, match="^distributed.local_device_ids"):
        resolve_launch(_dist(local_device_ids="0,x"), env={**full, "JAX_PROCESS_ID": "0"})


def test_loopback_coordinator_binds_to_loopback():
    assert default_bind_address("127.0.0.1:5000") == "127.0.0.1:5000"
    assert default_bind_address("localhost:5000") == "127.0.0.1:5000"
    assert default_bind_address("[::1]:5000") == "[::1]:5000"
    assert default_bind_address("10.1.2.3:5000") is None
    spec = resolve_launch(_dist(coordinator_address="127.0.0.1:5000", num_processes=2,
                                process_id=0), env={})
    assert spec.kwargs()["coordinator_bind_address"] == "127.0.0.1:5000"
    spec = resolve_launch(_dist(coordinator_address="10.1.2.3:5000", num_processes=2,
                                process_id=0, coordinator_bind_address="10.1.2.3:5000",
                                local_device_ids="0,1,2,3"), env={})
    assert spec.kwargs()["coordinator_bind_address"] == "10.1.2.3:5000"
    assert spec.kwargs()["local_device_ids"] == [0, 1, 2, 3]


def test_clusters_detect_the_rest_themselves():
    slurm = {"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}
    assert detected_cluster(slurm) == "slurm" and launched_multi_process(slurm)
    spec = resolve_launch(_dist(), env=slurm)
    assert spec.kwargs() == {"initialization_timeout": 300}  # JAX reads SLURM's variables
    # A partial setup is fine there: JAX fills in the rest from the cluster.
    assert resolve_launch(_dist(coordinator_address="n1:7777"), env=slurm).num_processes is None
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
    assert detected_cluster({"SLURM_NTASKS": "4"}) is None  # the batch script, not a step
    assert not launched_multi_process({})
    assert launched_multi_process({"JAX_NUM_PROCESSES": "2"})


def test_main_reports_a_partial_environment_launch(monkeypatch, capsys):
    from sgalm_jax import main as cli

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    assert cli.main(["sgalm_jax.main", "--config.algorithm=sft"]) == 2
    err = capsys.readouterr().err
    assert "distributed.num_processes: not set" in err and "JAX_NUM_PROCESSES" in err


# ------------------------------------------------------------------------------ one-process helpers
def test_agreement_helpers_are_local_on_one_process(tmp_path):
    assert mh.is_main() and mh.agree_any(True) and not mh.agree_any(False)
    assert mh.broadcast_from_main(7) == 7 and mh.broadcast_from_main(True) is True
    assert not mh.exists(str(tmp_path / "nope")) and mh.exists(str(tmp_path))
    np.testing.assert_array_equal(mh.allgather(np.arange(3)), [[0, 1, 2]])
    mh.write_once(lambda p: open(p, "w").write("x"), str(tmp_path / "f"))
    assert (tmp_path / "f").read_text() == "x"
    with pytest.raises(TypeError):
        mh.broadcast_from_main(0.5)
    with pytest.raises(ValueError, match="int32"):
        mh.broadcast_from_main(2**40)


def test_to_host_reads_sharded_and_replicated_arrays():
    mesh = sh.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    x = jax.device_put(np.arange(32.0).reshape(8, 4), sh.batch_sharding(mesh, 2))
    r = jax.device_put(np.float32(3.0), sh.replicated(mesh))
    hx, (hr, plain) = sh.to_host((x, (r, np.arange(2))))
    assert isinstance(hx, np.ndarray)
    np.testing.assert_array_equal(hx, np.arange(32.0).reshape(8, 4))
    assert float(hr) == 3.0 and plain.tolist() == [0, 1]


# ------------------------------------------------------------------------------ per-host data
def _examples(n=37):
    rng = np.random.default_rng(1)
    return [TokenizedExample(np.arange(int(rng.integers(3, 40)), dtype=np.int32) + 100 * i,
                             np.ones(1, np.float32)) for i in range(n)]


@pytest.mark.parametrize("packing", [False, True])
def test_host_shares_partition_the_examples(packing):
    n, b = 37, 8
    shares = [host_share(n, batch_size=b, seed=3, shuffle=True, packing=packing,
                         process_index=p, process_count=4) for p in range(4)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(n))
    assert host_share(n, batch_size=b, seed=3, shuffle=True, packing=packing, process_index=0,
                      process_count=1).tolist() == list(range(n))
    if not packing:  # exactly the rows each host assembles in epoch 0
        src = BatchSource(_examples(n), batch_size=b, max_length=64, seed=3, min_bucket=8)
        for p in range(4):
            used = {int(r) for i in range(n // b)
                    for r in src.batch(i, process_index=p, process_count=4)["input_ids"][:, 0] // 100}
            assert used == set(shares[p][:len(used)].tolist())


@pytest.mark.parametrize("packing", [False, True])
def test_lazy_examples_give_the_same_batches_and_tokenize_only_this_hosts_rows(packing):
    full = _examples()
    n, b, p, count = len(full), 8, 1, 2
    share = host_share(n, batch_size=b, seed=5, shuffle=True, packing=packing, process_index=p,
                       process_count=count)
    calls = []

    def encode(indices):
        calls.append(list(indices))
        return [full[i] for i in indices]

    lazy = LazyExamples(n, encode, cache={int(i): full[i] for i in share})
    lengths = [len(e) for e in full]
    kw = dict(batch_size=b, max_length=64, seed=5, min_bucket=8, packing=packing)
    eager, mine = BatchSource(full, **kw), BatchSource(lazy, lengths=lengths, **kw)
    for i in range(4):
        want = eager.batch(i, process_index=p, process_count=count)
        got = mine.batch(i, process_index=p, process_count=count)
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])
    if not packing:  # epoch 0 needed nothing beyond the share
        assert calls == [] and lazy.num_encoded == len(share)
    with pytest.raises(ValueError, match="lengths"):
        BatchSource(lazy, lengths=lengths[:-1], **kw)


# ------------------------------------------------------------------------------ the launcher
def test_process_env_sets_the_documented_variables():
    env = process_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"}, index=1,
                      count=2, address="127.0.0.1:9", cpu_devices=4)
    assert (env["JAX_COORDINATOR_ADDRESS"], env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == (
        "127.0.0.1:9", "2", "1")
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
    assert env["JAX_PLATFORMS"] == "cpu"
    assert 0 < free_port() < 65536


def test_launcher_stops_the_others_when_one_fails(tmp_path):
    (tmp_path / "fake_job.py").write_text(textwrap.dedent("""
        import os, sys, time
        print("process", os.environ["JAX_PROCESS_ID"], "of", os.environ["JAX_NUM_PROCESSES"],
              os.environ["JAX_COORDINATOR_ADDRESS"], flush=True)
        if os.environ["JAX_PROCESS_ID"] == "1":
            sys.exit(3)
        time.sleep(60)  # would wait for process 1 forever
    """))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    codes = launch([], num_processes=2, module="fake_job", env=env, log_dir=str(tmp_path / "logs"),
                   echo=False, grace=5)
    assert codes[1] == 3 and codes[0] != 0
    log = (tmp_path / "logs" / "process_1.log").read_text()
    assert log.startswith("process 1 of 2 127.0.0.1:")
    with pytest.raises(TimeoutError):
        launch([], num_processes=1, module="fake_job", env=env, timeout=1, echo=False, grace=1)
    assert sys.executable  # the children ran under this interpreter
