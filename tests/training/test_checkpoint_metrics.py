"""Checkpointer round trips (resharding, keep-last-K, incomplete saves), preemption flag, metrics."""

from __future__ import annotations

import json
import os
import signal
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sgalm_jax import sharding as sh
from sgalm_jax.errors import CheckpointError
from sgalm_jax.training import (
    Checkpointer,
    MetricsWriter,
    PreemptionGuard,
    StepTimer,
    TrainState,
    abstract_like,
    create_train_state,
    mfu,
    peak_flops_per_device,
    train_state_shardings,
)


def _state(host_params, mesh):
    _, params = host_params
    return create_train_state(params, optax.adamw(1e-3), seed=3, mesh=mesh)


def test_save_restore_reshards_and_keeps_last_k(tmp_path, host_params):
    mesh_a = sh.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    mesh_b = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    state, shardings = _state(host_params, mesh_a)
    with Checkpointer(str(tmp_path / "ck"), every_steps=2, keep=2) as ck:
        assert ck.latest_step() is None
        assert [ck.should_save(s) for s in range(5)] == [False, False, True, False, True]
        for step in (2, 4, 6):
            ck.save(step, state.to_dict(), {"data_position": step * 10})
        ck.wait()
        assert ck.all_steps() == [4, 6]
        assert ck.latest_step() == 6

        # Restore onto another mesh: arrays land directly in the new shardings.
        _, params = host_params
        target_state, _ = _state(host_params, mesh_b)
        target_sh = train_state_shardings(target_state, mesh_b, sh.state_shardings(params, mesh_b))
        restored, meta = ck.restore(abstract_like(target_state.to_dict(), target_sh.to_dict()))
    assert meta["data_position"] == 60 and meta["step"] == 6
    restored = TrainState.from_dict(restored)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q = restored.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"][...]  # [L, ...]
    assert q.sharding.mesh.shape == mesh_b.shape and q.sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor")
    np.testing.assert_array_equal(restored.rng, jax.random.key_data(jax.random.key(3)))


def test_incomplete_checkpoint_is_ignored(tmp_path, host_params):
    mesh = sh.make_mesh({"fsdp": -1})
    state, _ = _state(host_params, mesh)
    directory = tmp_path / "ck"
    with Checkpointer(str(directory), keep=3) as ck:
        ck.save(1, state.to_dict(), {})
    # What a run killed mid-save leaves behind: an uncommitted temporary step directory.
    (directory / "2.orbax-checkpoint-tmp-1234").mkdir()
    (directory / "2.orbax-checkpoint-tmp-1234" / "junk").write_text("partial")
    with Checkpointer(str(directory), keep=3) as ck:
        assert ck.latest_step() == 1
    with Checkpointer(str(tmp_path / "empty")) as ck, pytest.raises(CheckpointError):
        ck.restore(state.to_dict())


def test_restore_into_wrong_structure_names_the_checkpoint(tmp_path, host_params):
    mesh = sh.make_mesh({"fsdp": -1})
    state, _ = _state(host_params, mesh)
    with Checkpointer(str(tmp_path / "ck")) as ck:
        ck.save(1, state.to_dict(), {})
        ck.wait()
        bad = {"step": state.step, "params": {"w": jnp.zeros((3,))}}
        with pytest.raises(CheckpointError, match="ck/1"):
            ck.restore(bad)


def test_preemption_guard_turns_sigterm_into_a_flag():
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop(2)
    assert signal.getsignal(signal.SIGTERM) is previous


def _read_tb_scalars(logdir):
    """Scalar (tag, step, value) from TensorBoard event files (TFRecord framing + Event proto)."""
    from tensorboardX.proto import event_pb2

    out = []
    for name in os.listdir(logdir):
        if not name.startswith("events.out.tfevents"):
            continue
        data = open(os.path.join(logdir, name), "rb").read()
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for v in event.summary.value:
                out.append((v.tag, event.step, v.simple_value))
    return out


def test_metrics_writer_jsonl_and_tensorboard(tmp_path):
    with MetricsWriter(str(tmp_path), total_steps=3, progress_bar=True) as w:
        w.write(1, {"loss": np.float32(2.5), "tokens_per_sec": 100.0, "vector": np.ones(3)})
        w.write(2, {"loss": jnp.asarray(1.5)})
    records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == 2.5 and "vector" not in records[0]
    scalars = _read_tb_scalars(str(tmp_path))
    assert ("loss", 1, 2.5) in scalars and ("loss", 2, 1.5) in scalars


def test_mfu_and_peak_table():
    assert peak_flops_per_device("TPU v4") == 275e12
    assert peak_flops_per_device("TPU v5 lite") == 197e12
    assert peak_flops_per_device("TPU v5p") == 459e12
    assert peak_flops_per_device("TPU v6 lite") == 918e12
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_per_device("NVIDIA H200") == 989e12
    assert peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_per_device("cpu") is None
    assert peak_flops_per_device("cpu", override_tflops=2.0) == 2e12
    # 1B params, 100k tokens/s on 8 chips of 1e15: 6e14 / 8e15.
    np.testing.assert_allclose(mfu(10**9, 1e5, 8, 1e15), 0.075)
    assert mfu(10**9, 1e5, 8, None) is None
    timer = StepTimer(10**6, peak_per_device=1e12, num_devices=1)
    timer.add(1000)
    out = timer.tick()
    assert out["tokens_per_sec"] > 0 and "mfu" in out and out["step_time"] > 0
