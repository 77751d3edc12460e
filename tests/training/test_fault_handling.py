"""Faults in the training core: divergence (error / skip), corrupt and unwritable checkpoints, the
run directory's checks and lock. Each fault ends in one error naming the step, file or path, and
the last complete checkpoint stays intact. The CLI-level versions are in tests/test_main.py."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sgalm_jax import sharding as sh
from sgalm_jax.errors import CheckpointError, NonFiniteError, WorkdirError
from sgalm_jax.training import (
    Checkpointer,
    FiniteGuard,
    WorkdirLock,
    check_workdir,
    checksums,
    create_train_state,
    make_train_step,
)
from sgalm_jax.training.checkpoint import close_all

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- divergence
def test_guard_names_the_first_diverged_step_and_the_last_checkpoint(tmp_path):
    with Checkpointer(str(tmp_path / "ck"), async_save=False) as ck:
        ck.save(2, {"w": jnp.ones(3)})
        guard = FiniteGuard("error", checkpointer=ck)
        for step, loss, gn in ((3, 1.0, 0.5), (4, 2.0, float("inf")), (5, float("nan"), 1.0)):
            guard.add(step, {"loss": jnp.float32(loss), "grad_norm": jnp.float32(gn)})
        with pytest.raises(NonFiniteError) as err:
            guard.check()
    msg = str(err.value)
    assert msg.startswith("step 4: grad_norm = inf"), msg
    assert f"last complete checkpoint is step 2 in {tmp_path / 'ck'}" in msg
    assert "train.nonfinite='skip'" in msg
    guard.check()  # the pending list was consumed


def test_skip_mode_tolerates_a_few_skipped_steps_then_stops():
    guard = FiniteGuard("skip", max_skipped=2)
    nan = float("nan")
    for step, skipped in ((1, 1), (2, 0), (3, 1), (4, 1)):
        guard.add(step, {"loss": nan if skipped else 1.0, "grad_norm": 1.0, "skipped": skipped})
    guard.check()  # 1 skip, a good step, then 2 in a row: within the limit
    assert guard.total_skips == 3 and guard.consecutive_skips == 2
    guard.add(5, {"loss": nan, "grad_norm": nan, "skipped": 1})
    with pytest.raises(NonFiniteError, match=r"^step 5: loss = nan, grad_norm = nan; 3 consecutive"):
        guard.check()
    # A non-finite step that the train step did not skip is an error even in skip mode.
    guard = FiniteGuard("skip")
    guard.add(7, {"loss": nan, "grad_norm": 1.0})
    with pytest.raises(NonFiniteError, match="^step 7: loss = nan"):
        guard.check()


def test_train_step_skips_a_nonfinite_update():
    """``skip_nonfinite``: a step whose loss is inf keeps params and optimizer state (its
    ``skipped`` metric is 1); a finite step applies as usual."""
    mesh = sh.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    params = {"w": jnp.asarray([1.0, -2.0, 3.0])}
    repl = NamedSharding(mesh, P())
    tx = optax.adam(0.1)
    state, shardings = create_train_state(params, tx, mesh=mesh, params_shardings={"w": repl})

    def loss_fn(p, batch, rng):
        return jnp.sum((p["w"] * batch["x"]) ** 2), {}

    step = make_train_step(loss_fn, tx, mesh=mesh, state_shardings=shardings,
                           skip_nonfinite=True)
    good = {"x": jnp.ones((1, 3))}
    bad = {"x": jnp.asarray([[1.0, jnp.inf, 1.0]])}
    before = jax.device_get(state)
    state, m = step(state, bad)
    assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
    after = jax.device_get(state)
    np.testing.assert_array_equal(after.params["w"], before.params["w"])
    for a, b in zip(jax.tree.leaves(after.opt_state), jax.tree.leaves(before.opt_state)):
        np.testing.assert_array_equal(a, b)
    assert int(after.step) == 1  # the step counter (data position) still advances
    state, m = step(state, good)
    assert int(m["skipped"]) == 0
    assert not np.allclose(jax.device_get(state.params["w"]), before.params["w"])


# ---------------------------------------------------------------------------- checkpoints
def _tree(v: float):
    return {"w": jnp.full((256,), v, jnp.float32), "b": [jnp.arange(64, dtype=jnp.float32) + v]}


def _flip_a_byte(step_dir: Path) -> str:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    return str(victim.relative_to(step_dir))


@pytest.mark.parametrize("async_save", [True, False])
def test_checksums_catch_flipped_bytes_and_fall_back_on_request(tmp_path, async_save, caplog):
    d = tmp_path / "ck"
    with Checkpointer(str(d), keep=3, async_save=async_save) as ck:
        for step in (1, 2, 3):
            ck.save(step, _tree(step), {"data_position": 10 * step})
    for step in (1, 2, 3):  # every complete checkpoint carries a manifest that verifies
        assert checksums.verify_manifest(str(d / str(step))) is None
    victim = _flip_a_byte(d / "3")

    ck = Checkpointer(str(d), keep=3)
    with pytest.raises(CheckpointError) as err:
        ck.restore(_tree(0))
    assert str(err.value).startswith(f"{d}/3: the checkpoint of step 3 is corrupt ({victim}: ")
    assert "checkpoint.on_corrupt='previous'" in str(err.value)

    ck.on_corrupt = "previous"
    state, meta = ck.restore(_tree(0))
    assert meta["step"] == 2 and meta["data_position"] == 20
    np.testing.assert_array_equal(state["w"], _tree(2)["w"])
    assert sorted(os.listdir(d)) == ["1", "2", "3.corrupt"]
    assert ck.latest_step() == 2 and "moved it to" in caplog.text
    ck.save(3, _tree(33))  # the step number is free again: the resumed run saves it anew
    ck.close()
    assert checksums.verify_manifest(str(d / "3")) is None


def test_no_intact_checkpoint_and_unverified_ones(tmp_path, caplog):
    d = tmp_path / "ck"
    with Checkpointer(str(d), async_save=False) as ck:
        ck.save(1, _tree(1))
    _flip_a_byte(d / "1")
    with Checkpointer(str(d), on_corrupt="previous") as ck:
        with pytest.raises(CheckpointError, match="no intact checkpoint at or before step 1"):
            ck.restore(_tree(0))
    # A checkpoint without a manifest (older version) is restored, with a warning.
    with Checkpointer(str(d), checksums=False, async_save=False) as ck:
        ck.save(5, _tree(5))
    with Checkpointer(str(d)) as ck:
        state, meta = ck.restore(_tree(0))
    assert meta["step"] == 5 and "no checksum manifest" in caplog.text


def _stderr_is_clean(capfd):
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_disk_full_while_finishing_a_save(tmp_path, monkeypatch, capfd):
    """ENOSPC in Orbax's background thread (here: while the checksum manifest is written, before
    the rename): one CheckpointError naming the directory, the previous checkpoint intact, and
    close() leaves no thread that prints a traceback."""
    d = tmp_path / "ck"
    real = checksums.write_manifest

    def full_disk(folder):
        if "2.orbax-checkpoint-tmp" in folder:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), folder)
        real(folder)

    monkeypatch.setattr(checksums, "write_manifest", full_disk)
    ck = Checkpointer(str(d), keep=2)
    ck.save(1, _tree(1))
    ck.save(2, _tree(2))
    with pytest.raises(CheckpointError) as err:
        ck.wait()
    msg = str(err.value)
    assert msg.startswith(f"{d}: saving step 2 failed ("), msg
    assert msg.endswith("no space left on the device); the last complete checkpoint (step 1) is "
                        "intact"), msg
    close_all()  # what main does on its error path
    assert not [t for t in threading.enumerate() if t.name.startswith(("save_finalize",
                                                                       "async_save"))]
    assert ck.complete_steps() == [1] and checksums.verify_manifest(str(d / "1")) is None
    _stderr_is_clean(capfd)


def test_disk_full_on_a_real_small_file_system(small_tmpfs, capfd):
    d = small_tmpfs("1m") / "ck"
    big = {"w": jnp.asarray(np.random.default_rng(0).random(100_000, np.float32))}  # 400 kB
    with pytest.raises(CheckpointError) as err:
        with Checkpointer(str(d), keep=5) as ck:
            for step in range(1, 6):
                ck.save(step, big)
    assert "no space left on the device" in str(err.value)
    steps = ck.complete_steps()
    assert steps and all(checksums.verify_manifest(str(d / str(s))) is None for s in steps)
    assert f"the last complete checkpoint (step {steps[-1]}) is intact" in str(err.value)
    _stderr_is_clean(capfd)


def test_hopeless_save_is_refused_up_front(tmp_path, monkeypatch):
    import shutil

    class Usage:
        free = 1000

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage())
    with Checkpointer(str(tmp_path / "ck")) as ck:
        with pytest.raises(CheckpointError, match=r"not enough free space to save step 1: it "
                                                  r"needs about 4.0 MiB uncompressed, the file "
                                                  r"system has 0.0 MiB free"):
            ck.save(1, {"w": jnp.zeros((1 << 20,), jnp.float32)})
        assert ck.complete_steps() == []


def test_checkpoint_folder_that_is_a_file(tmp_path):
    (tmp_path / "checkpoints").write_text("x")
    with pytest.raises(CheckpointError, match="checkpoints: the checkpoint folder is a file"):
        Checkpointer(str(tmp_path / "checkpoints"))


# ---------------------------------------------------------------------------- run directory
def test_workdir_layout_errors_name_the_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkdirError, match=r"file: the run directory \(workdir\) is a file"):
        check_workdir(str(tmp_path / "file"))
    w = tmp_path / "w1"
    (w / "config.json").mkdir(parents=True)
    with pytest.raises(WorkdirError, match=r"w1/config.json: expected a file"):
        check_workdir(str(w))
    w = tmp_path / "w2"
    w.mkdir()
    (w / "checkpoints").write_text("x")
    with pytest.raises(WorkdirError, match=r"w2/checkpoints: expected a folder"):
        check_workdir(str(w))
    check_workdir(str(tmp_path / "new" / "run"))  # created
    assert (tmp_path / "new" / "run").is_dir()


def test_read_only_workdir(readonly_dir):
    with pytest.raises(WorkdirError, match=f"cannot create the run directory: {readonly_dir}/w"):
        check_workdir(str(readonly_dir / "w"))
    check_workdir(str(readonly_dir))  # it exists and is a folder...
    with pytest.raises(WorkdirError, match=f"not writable: {readonly_dir}/run.lock"):
        WorkdirLock(str(readonly_dir)).acquire()  # ...but nothing can be written there


_HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("wd", sys.argv[1])
wd = importlib.util.module_from_spec(spec); spec.loader.exec_module(wd)
wd.WorkdirLock(sys.argv[2]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_one_run_per_workdir_and_a_killed_run_leaves_no_stale_lock(tmp_path):
    w = str(tmp_path / "run")
    check_workdir(w)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(REPO / "sgalm_jax" / "training" / "workdir.py"), w],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirError) as err:
            WorkdirLock(w).acquire()
        assert f"another run is using this workdir (pid {holder.pid} on host " in str(err.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with WorkdirLock(w) as lock:  # the kernel released the dead run's lock
        assert lock.held
        assert f"pid {os.getpid()}" in (Path(w) / "run.lock").read_text()
    with WorkdirLock(w):  # and released again on exit
        pass
