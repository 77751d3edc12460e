"""The CLI: config validation errors name the key; the default config dispatches to the demo; real
SFT runs through ``python -m sgalm_jax.main`` (train, write artifacts, survive SIGTERM and SIGKILL).

The subprocess runs are the expensive part (a JAX start-up and a compile each): they share one
persistent compilation cache and tiny shapes (2-layer model, sequences of 32 tokens).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sgalm_jax import main as cli
from sgalm_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "sft_tiny.py")


# ------------------------------------------------------------------------------ bad configs
def _prepare(*overrides, config=TINY):
    argv = ["sgalm_jax.main"] + ([f"--config={config}"] if config else []) + list(overrides)
    return cli.prepare(argv)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    """A small prompt/response JSONL file: two-number sums."""
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(64):
            a, b = (int(x) for x in rng.integers(0, 50, size=2))
            f.write(json.dumps({"prompt": f"{a} + {b} =", "response": f" {a + b}"}) + "\n")
    return str(path)


@pytest.mark.parametrize("overrides,key", [
    (["--config.train.bach_size=4"], "train.bach_size"),  # unknown key (with a suggestion)
    (["--config.train.batch_size=four"], "train.batch_size"),  # wrong type
    (["--config.optimizer.learning_rate=fast"], "optimizer.learning_rate"),
    (["--config.optimizer.name=adam"], "optimizer.name"),  # not a choice
    (["--config.model.init=", "--config.model.path="], "model.path"),  # no model at all
    (["--config.model.init=", "--config.model.path=/nonexistent/model"], "model.path"),
    (["--config.model.init=tiny-gpt"], "model.init"),
    (["--config.mesh.data=3"], "mesh.data"),  # 3 does not divide 8 devices
    (["--config.mesh.tensor=4", "--config.mesh.data=3"], "mesh.tensor"),  # 12 vs 8 devices
    (["--config.mesh.data=-1"], "mesh.fsdp"),  # two axes set to -1
    (["--config.train.batch_size=12"], "train.batch_size"),  # 12 rows over 8 data shards
    (["--config.train.batch_size=8", "--config.train.grad_accum_steps=3"], "train.batch_size"),
    (["--config.train.num_steps=0"], "train.num_steps"),
    (["--config.algorithm=nope"], "algorithm"),
    (["--config.data.task=", "--config.data.train_file=/nonexistent.jsonl"], "data.train_file"),
    (["--config.data.task=nonsense"], "data.task"),
    (["--config.tokenizer.path=/nonexistent/tok"], "tokenizer.path"),
])
def test_bad_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        _prepare(*overrides)
    assert str(err.value).startswith(key), str(err.value)


def test_bad_keys_in_a_config_file(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from sgalm_jax.config import base_config\n"
                   "def get_config():\n"
                   "    c = base_config()\n"
                   "    c.train.lerning_rate = 0.1\n"
                   "    return c\n")
    with pytest.raises(ConfigError, match=r"^train\.lerning_rate: unknown config key"):
        _prepare(config=str(bad))
    wrong_type = tmp_path / "wrong_type.py"
    wrong_type.write_text("import ml_collections\n"
                          "from sgalm_jax.config import base_config\n"
                          "def get_config():\n"
                          "    c = base_config().to_dict()\n"
                          "    c['seed'] = 'zero'\n"
                          "    return ml_collections.ConfigDict(c)\n")
    with pytest.raises(ConfigError, match=r"^seed: expected int"):
        _prepare(config=str(wrong_type))
    with pytest.raises(ConfigError, match="--config"):
        _prepare(config=str(tmp_path / "missing.py"))


def test_main_exit_code_and_message(capsys):
    assert cli.main(["sgalm_jax.main", f"--config={TINY}", "--config.mesh.data=3"]) == 2
    assert "config error: mesh.data" in capsys.readouterr().err


def test_no_config_runs_the_demo(monkeypatch, tmp_path):
    """With no --config the embedded default runs: algorithm 'demo', dispatched to demo.run."""
    from sgalm_jax import algorithms

    calls = []
    monkeypatch.setitem(algorithms._REGISTRY, "demo",
                        algorithms.Algorithm("demo", lambda config: calls.append(config)))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sgalm_jax.main", "--config.seed=5"]) == 0
    assert len(calls) == 1 and calls[0].algorithm == "demo" and calls[0].seed == 5
    assert json.loads((tmp_path / "runs" / "demo" / "config.json").read_text())["seed"] == 5


def test_algorithm_registry_plugs_in(monkeypatch, tmp_path):
    from sgalm_jax import algorithms

    seen = {}

    def validate(config):
        if config.seed == 13:
            raise ConfigError("seed: 13 is unlucky")

    def run(config, workdir):
        seen["workdir"] = workdir

    monkeypatch.setitem(algorithms._REGISTRY, "toy", None)  # removed again after the test
    algorithms.register_algorithm("toy", run, validate=validate)
    assert cli.main(["m", "--config.algorithm=toy", f"--config.workdir={tmp_path}/w"]) == 0
    assert seen["workdir"] == f"{tmp_path}/w"
    with pytest.raises(ConfigError, match="^seed"):
        cli.prepare(["m", "--config.algorithm=toy", "--config.seed=13"])
    assert {"sft", "toy", "demo"} <= set(algorithms.list_algorithms())
    monkeypatch.setitem(algorithms._MODULES, "missing", "sgalm_jax.algorithms.no_such_module")
    with pytest.raises(ConfigError, match="^algorithm: 'missing' is not available"):
        algorithms.get_algorithm("missing")


# ------------------------------------------------------------------------------ real CLI runs
STEPS = 30


def _cli(workdir, jsonl, cache_dir, *, fault=None, timeout=300):
    """Run the SFT CLI on the tiny model; returns the CompletedProcess."""
    env = dict(os.environ)
    env.update({
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "HF_HUB_OFFLINE": "1",
        "SGALM_LOG_LEVEL": "WARNING",
    })
    env.pop("SGALM_FAULT_INJECT", None)
    if fault:
        env["SGALM_FAULT_INJECT"] = fault
    cmd = [sys.executable, "-m", "sgalm_jax.main", f"--config={TINY}",
           f"--config.workdir={workdir}",
           "--config.data.task=", f"--config.data.train_file={jsonl}",
           "--config.data.max_length=32", "--config.data.min_bucket=32",
           f"--config.train.num_steps={STEPS}", "--config.train.batch_size=8",
           "--config.optimizer.learning_rate=0.01", "--config.optimizer.warmup_steps=2",
           "--config.checkpoint.every_steps=5", "--config.checkpoint.keep=2",
           "--config.metrics.progress_bar=false",
           "--config.mesh.data=2", "--config.mesh.fsdp=-1", "--config.mesh.tensor=1"]
    return subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=timeout)


def _checkpoint_steps(workdir):
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _export_arrays(workdir):
    from safetensors.numpy import load_file

    return load_file(str(Path(workdir) / "export" / "model.safetensors"))


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, jsonl):
    """An uninterrupted run, and one preempted (SIGTERM), then killed (SIGKILL), then finished
    with the same command. The first run fills the compilation cache the others reuse."""
    root = tmp_path_factory.mktemp("cli")
    cache = root / "jax_cache"
    full, broken = root / "full", root / "broken"
    log = {}

    log["full"] = _cli(full, jsonl, cache)
    log["sigterm"] = _cli(broken, jsonl, cache, fault="sigterm@7")
    log["after_sigterm_steps"] = _checkpoint_steps(broken)
    log["export_after_sigterm"] = (broken / "export").exists()
    log["sigkill"] = _cli(broken, jsonl, cache, fault="sigkill@18")
    log["after_sigkill_steps"] = _checkpoint_steps(broken)
    log["resume"] = _cli(broken, jsonl, cache)
    return full, broken, log


def _check(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cli_sft_run_trains_and_writes_everything(cli_runs):
    full, _, log = cli_runs
    _check(log["full"])
    config = json.loads((full / "config.json").read_text())
    assert config["algorithm"] == "sft" and config["train"]["num_steps"] == STEPS
    assert config["workdir"] == str(full)
    records = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
    assert all("tokens_per_sec" in r and "step_time" in r for r in records)
    assert any(p.name.startswith("events.out.tfevents") and p.stat().st_size > 0
               for p in full.iterdir())
    assert _checkpoint_steps(full) == [25, 30]  # every 5 steps, keep 2

    # The export loads in transformers and gives our model's logits.
    import torch
    import transformers

    from sgalm_jax.models import load_pretrained

    hf = transformers.AutoModelForCausalLM.from_pretrained(full / "export").eval()
    tok = transformers.AutoTokenizer.from_pretrained(full / "export")
    ids = tok(["3 + 4 = 7", "12 + 30 = 42"], padding=True)["input_ids"]
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(load_pretrained(full / "export")(np.asarray(ids)))
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)


def test_sigterm_leaves_a_complete_checkpoint_and_exits_cleanly(cli_runs):
    _, _, log = cli_runs
    _check(log["sigterm"])
    assert "preempted" in log["sigterm"].stderr
    # SIGTERM arrives during step 8 (sent right after step 7): the run finishes that step, saves
    # it, and exits with status 0. Checkpoints: the periodic one (5) and the preemption save (8).
    assert log["after_sigterm_steps"] == [5, 8]
    assert not log["export_after_sigterm"]


def test_sigkill_then_restart_finishes_with_the_uninterrupted_params(cli_runs):
    full, broken, log = cli_runs
    assert log["sigkill"].returncode == -9, log["sigkill"].stderr[-3000:]
    assert max(log["after_sigkill_steps"]) < STEPS
    _check(log["resume"])
    a, b = _export_arrays(full), _export_arrays(broken)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # Each restart resumed from a checkpoint (a restart from scratch would log step 1 again):
    # run 1 logged steps 1-8 (SIGTERM), run 2 steps 9-18 (SIGKILL), run 3 from its checkpoint on.
    steps = [json.loads(l)["step"] for l in (broken / "metrics.jsonl").read_text().splitlines()]
    assert steps[:18] == list(range(1, 19))
    resumed_at = max(s for s in log["after_sigkill_steps"])
    assert 10 <= resumed_at < 18
    assert steps[18:] == list(range(resumed_at + 1, STEPS + 1))


# ------------------------------------------------------------------------------ faults (issue 10)
@pytest.mark.parametrize("overrides,key", [
    (["--config.optimizer.learning_rate=nan"], "optimizer.learning_rate: must be a finite"),
    (["--config.optimizer.learning_rate=inf"], "optimizer.learning_rate: must be a finite"),
    (["--config.optimizer.learning_rate=-0.1"], "optimizer.learning_rate: must be > 0"),
    (["--config.optimizer.b1=nan"], "optimizer.b1: must be a finite"),
    (["--config.optimizer.end_lr_factor=2.0"], "optimizer.end_lr_factor: must be in [0, 1]"),
    (["--config.sgalm.temperature=-inf"], "sgalm.temperature: must be a finite"),  # any section
    (["--config.train.nonfinite=ignore"], "train.nonfinite: 'ignore' is not one of"),
    (["--config.checkpoint.on_corrupt=latest"], "checkpoint.on_corrupt: 'latest' is not one of"),
    (["--config.train.max_skipped_steps=-1"], "train.max_skipped_steps: must be >= 0"),
])
def test_non_finite_and_absurd_hyperparameters(overrides, key):
    with pytest.raises(ConfigError) as err:
        _prepare(*overrides)
    assert str(err.value).startswith(key), str(err.value)


def test_config_file_failures_are_reported_in_one_line(tmp_path):
    """get_config() raising is the file's fault (cause and line, no traceback in the message); an
    override of a key a free-form dict does not hold is the override's fault, not the file's."""
    bad = tmp_path / "raises.py"
    bad.write_text("from sgalm_jax.config import base_config\n"
                   "def get_config():\n"
                   "    config = base_config()\n"
                   "    raise ValueError('cluster settings not found')\n")
    with pytest.raises(ConfigError) as err:
        _prepare(config=str(bad))
    assert str(err.value) == (f"--config {bad}: get_config() failed (line 4): ValueError: "
                              "cluster settings not found")
    with pytest.raises(ConfigError, match=r"^model\.hf_config\.hidden_size: not in the config, and "
                                          r"an override can only change a key that exists"):
        _prepare("--config.model.hf_config.hidden_size=128")
    with pytest.raises(ConfigError, match=r"^model\.hf_config\.x: not in the config"):
        _prepare("--config.model.hf_config.x=1", config=None)  # the embedded default config
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        _prepare(config=str(tmp_path))


def _main_error(capsys, *overrides, config=TINY):
    """Run main in-process; returns (status, the stderr line). Output is one line, no traceback."""
    status = cli.main(["sgalm_jax.main", f"--config={config}", *overrides,
                       "--config.metrics.progress_bar=false", "--config.metrics.tensorboard=false"])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1, err
    return status, lines[0]


def test_io_faults_end_in_one_message_naming_the_path(tmp_path, capsys):
    as_file = tmp_path / "workdir_file"
    as_file.write_text("x")
    assert _main_error(capsys, f"--config.workdir={as_file}") == (
        1, f"error: {as_file}: the run directory (workdir) is a file, not a folder")
    w = tmp_path / "w1"
    (w / "config.json").mkdir(parents=True)
    status, msg = _main_error(capsys, f"--config.workdir={w}")
    assert status == 1 and msg.startswith(f"error: {w}/config.json: expected a file"), msg
    w = tmp_path / "w2"
    w.mkdir()
    (w / "checkpoints").write_text("x")
    status, msg = _main_error(capsys, f"--config.workdir={w}")
    assert status == 1 and msg.startswith(f"error: {w}/checkpoints: expected a folder"), msg

    # Data: a folder given as the data file; bytes that are not UTF-8.
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"prompt": "1 + 1 =", "response": " 2"}\n{"prompt": "\xff", '
                     b'"response": " 3"}\n')
    data_args = ["--config.data.task=", "--config.data.max_length=32",
                 "--config.data.min_bucket=32", f"--config.workdir={tmp_path / 'w3'}"]
    status, msg = _main_error(capsys, *data_args, f"--config.data.train_file={tmp_path}")
    assert (status, msg) == (2, f"config error: data.train_file: '{tmp_path}' is a folder, not a "
                                "JSONL file")
    status, msg = _main_error(capsys, *data_args, f"--config.data.train_file={data}")
    assert status == 1 and msg.startswith(f"error: {data}:2: column 13, not UTF-8 text"), msg

    # A model config.json that is not an object.
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("[]")
    status, msg = _main_error(capsys, "--config.model.init=", f"--config.model.path={model}")
    assert (status, msg) == (2, f"config error: model.path: {model}/config.json: expected a JSON "
                                "object (a model config), got list")


def test_read_only_workdir(readonly_dir, capsys):
    why = "read-only file system" if os.geteuid() == 0 else "permission denied"
    assert _main_error(capsys, f"--config.workdir={readonly_dir}") == (
        1, f"error: workdir: the run directory is not writable: {readonly_dir}/run.lock: {why}")
    assert _main_error(capsys, f"--config.workdir={readonly_dir}/run") == (
        1, f"error: workdir: cannot create the run directory: {readonly_dir}/run: {why}")


def test_a_busy_workdir_is_refused_with_the_holders_pid(tmp_path, capsys):
    holder_code = ("import fcntl, os, sys, time\n"
                   "fd = os.open(os.path.join(sys.argv[1], 'run.lock'), os.O_RDWR | os.O_CREAT)\n"
                   "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                   "os.write(fd, f'pid {os.getpid()} on host h1'.encode())\n"
                   "print('locked', flush=True)\n"
                   "time.sleep(120)\n")
    w = tmp_path / "busy"
    w.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", holder_code, str(w)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        status, msg = _main_error(capsys, f"--config.workdir={w}")
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert status == 1, msg
    assert msg.startswith(f"error: {w}: another run is using this workdir (pid {holder.pid} on "
                          "host h1)"), msg
    assert not (w / "config.json").exists()  # the other run's files are untouched


def _run_cli(workdir, jsonl, cache_dir, *overrides):
    env = dict(os.environ)
    env.update({"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
                "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
                "HF_HUB_OFFLINE": "1", "SGALM_LOG_LEVEL": "WARNING"})
    env.pop("SGALM_FAULT_INJECT", None)
    cmd = [sys.executable, "-m", "sgalm_jax.main", f"--config={TINY}",
           f"--config.workdir={workdir}", "--config.data.task=",
           f"--config.data.train_file={jsonl}", "--config.data.max_length=32",
           "--config.data.min_bucket=32", "--config.train.batch_size=4",
           "--config.optimizer.name=sgd", "--config.optimizer.max_grad_norm=0",
           "--config.optimizer.warmup_steps=2", "--config.optimizer.schedule=constant",
           "--config.checkpoint.keep=2", "--config.metrics.progress_bar=false",
           "--config.metrics.tensorboard=false", *overrides]
    return subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=300)


def _one_error_line(proc, status=1):
    """Exit ``status``; stderr ends in one ``error:`` line, with no traceback anywhere."""
    assert proc.returncode == status, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and proc.stderr.count("error: ") == 1, proc.stderr
    return last


@pytest.fixture(scope="module")
def fault_cache(tmp_path_factory):
    """One persistent compilation cache for the fault runs below (same model and shapes)."""
    return tmp_path_factory.mktemp("fault_jax_cache")


def test_cli_divergence_corrupt_checkpoint_and_fallback(tmp_path, jsonl, fault_cache):
    """A diverging run exits 1 naming the step, saves and exports nothing of it; bytes flipped in
    its latest checkpoint stop the next run (naming the step and file) unless
    checkpoint.on_corrupt='previous', which resumes from the previous one and finishes."""
    from sgalm_jax.training import checksums

    w, cache = tmp_path / "run", fault_cache
    # SGD at 1e12 after a linear warmup of 2 steps: step 1 moves nothing (lr 0), step 2 blows the
    # weights up, step 3's loss is NaN.
    diverge = _run_cli(w, jsonl, cache, "--config.optimizer.learning_rate=1e12",
                       "--config.train.num_steps=6", "--config.checkpoint.every_steps=1")
    msg = _one_error_line(diverge)
    assert msg.startswith("error: step 3: loss = nan, grad_norm = nan: the run diverged and stopped "
                          "before saving or exporting this state; the last complete checkpoint is "
                          f"step 2 in {w}/checkpoints"), msg
    assert _checkpoint_steps(w) == [1, 2] and not (w / "export").exists()
    for step in (1, 2):
        assert checksums.verify_manifest(str(w / "checkpoints" / str(step))) is None

    state = w / "checkpoints" / "2" / "state"
    victim = max((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x55
    victim.write_bytes(bytes(data))
    sane = ["--config.optimizer.learning_rate=0.01", "--config.train.num_steps=4",
            "--config.checkpoint.every_steps=2"]
    corrupt = _run_cli(w, jsonl, cache, *sane)
    msg = _one_error_line(corrupt)
    assert msg.startswith(f"error: {w}/checkpoints/2: the checkpoint of step 2 is corrupt "
                          f"({victim.relative_to(w / 'checkpoints' / '2')}: SHA-256 differs"), msg

    fallback = _run_cli(w, jsonl, cache, *sane, "--config.checkpoint.on_corrupt=previous")
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    assert "restoring step 1 instead of the corrupt step 2" in fallback.stderr
    assert (w / "checkpoints" / "2.corrupt").is_dir() and _checkpoint_steps(w) == [2, 4]
    steps = [json.loads(l)["step"] for l in (w / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 2, 3, 4]  # diverged run (1-3), then resumed after step 1
    assert all(np.isfinite(a).all() for a in _export_arrays(w).values())


def test_cli_disk_full_during_a_checkpoint(small_tmpfs, jsonl, fault_cache):
    # AdamW's state makes a checkpoint of ~1.3 MB: two fit (keep=2), the third runs out of space.
    w = small_tmpfs("3500k") / "run"
    proc = _run_cli(w, jsonl, fault_cache, "--config.optimizer.name=adamw",
                    "--config.optimizer.learning_rate=0.01",
                    "--config.train.num_steps=20", "--config.checkpoint.every_steps=2",
                    "--config.checkpoint.export=false")
    msg = _one_error_line(proc)
    assert msg.startswith(f"error: {w}/checkpoints: saving step ") and \
        "no space left on the device" in msg, msg
    last = _checkpoint_steps(w)[-1]
    assert msg.endswith(f"the last complete checkpoint (step {last}) is intact"), msg
    from sgalm_jax.training import checksums

    assert checksums.verify_manifest(str(w / "checkpoints" / str(last))) is None
