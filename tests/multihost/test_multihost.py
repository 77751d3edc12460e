"""Multi-host: every algorithm run as 2 processes x 4 CPU devices matches 1 process x 8 devices.

Each case runs its tiny config(s) twice on the same global mesh:

- **1 x 8**: in this pytest process (8 simulated CPU devices, see tests/conftest.py);
- **2 x 4**: ``sgalm_jax.tools.launch_local`` starts two processes of 4 simulated devices each, one
  JAX job over 127.0.0.1 (coordinator bound to loopback, gloo collectives). Cases with a
  ``preempt`` step send SIGTERM to process 1 only after that step (``$SGALM_FAULT_INJECT``): both
  processes must agree to save the next step and exit 0, and the same launch then resumes.

Then the two workdirs are compared: every numeric metric of ``metrics.jsonl`` (losses, gradient
norms, diagnostics, evaluation scores; timings excluded) to float noise, generated samples exactly,
the latest checkpoint's arrays and the exported HF weights to float noise, evaluation results.

Adding an algorithm is one more :class:`Run` in ``CASES`` (its config file, small
overrides, the files to compare), in a new :class:`Case` when it should be preempted (the step
to preempt at; runs placed first in a case with ``preempted`` > 1 are preempted in the same
launch). These runs are the expensive part of the suite (CI runs them too: ``slow`` only
marks them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sgalm_jax.tools.launch_local import launch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
SHARED_DATA = REPO.parent / "shared" / "data"
QUIET = ("--config.metrics.tensorboard=false", "--config.metrics.progress_bar=false")
# Metrics that measure the machine, not the run.
TIMING_WORDS = ("time", "seconds", "per_sec", "mfu", "duration")
# Weights after a few optimizer steps (float noise, as the metrics).
PARAM_RTOL, PARAM_ATOL = 1e-4, 1e-5


@dataclasses.dataclass(frozen=True)
class Run:
    """One algorithm run and what to compare between its 1 x 8 and 2 x 4 versions.

    sub: its workdir (under the case's root); config: a file of configs/; overrides: ``--config.*``
      arguments (``{model}`` = the saved tiny checkpoint).
    samples: globs (under the workdir) of JSONL / JSON / NPZ files compared record by record.
    exports: export directories compared tensor by tensor.
    checkpoints: compare the latest checkpoint of ``checkpoints/``.
    metrics: the metrics.jsonl files compared step by step (a glob).
    discrete: metrics not compared because they are a step function of a quantity that is float
      noise in this run (e.g. a reward accuracy while the policy still equals its reference).
    log_patterns: regular expressions each process's log must match.
    """

    sub: str
    config: str
    overrides: tuple[str, ...]
    samples: tuple[str, ...] = ()
    exports: tuple[str, ...] = ("export",)
    checkpoints: bool = True
    metrics: str = "metrics.jsonl"
    discrete: tuple[str, ...] = ()
    log_patterns: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Case:
    """Runs that share launches: one after another in the same processes (one start-up, and one
    persistent compilation cache, for related configs). With ``preempt``, a first launch runs only
    the first ``preempted`` runs and process 1 alone gets SIGTERM after that step of each; the
    second launch resumes them and runs the rest."""

    name: str
    runs: tuple[Run, ...]
    preempt: int | None = None
    preempted: int = 1


# Every run but SFT's starts from one saved tiny Qwen2 checkpoint and tokenizer (the tiny configs'
# architecture): loading it compiles nothing, where random init and the builtin tokenizer's BPE
# training would cost each run (and each process) seconds. SFT keeps model.init, so the sharded
# random init is covered too.
PRETRAINED = ("--config.model.init=", "--config.model.path={model}",
              "--config.tokenizer.path={model}")
# SGD with momentum where a loss has near-zero gradients (a random model's rewards): Adam and
# RMSProp divide by the gradient's magnitude and turn its float noise into lr-sized updates.
SGD = ("--config.optimizer.name=sgd", "--config.optimizer.momentum=0.9",
       "--config.optimizer.learning_rate=0.01")
# The data axis across the two processes, FSDP within each (as data=hosts on a pod); SFT keeps the
# default FSDP over all 8 devices, across the processes.
# Unscanned layers on this mesh: a scanned step over (data=2, fsdp=4) on 8 simulated CPU devices
# deadlocks now and then inside XLA:CPU's in-process collectives (docs/training.md, Multi-host).
DATA_2 = ("--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.model.scan_layers=false")

SGALM_SMALL = PRETRAINED + SGD + DATA_2 + (
    "--config.train.batch_size=16", "--config.sgalm.max_new_tokens=16",
    "--config.data.max_examples=48",
    # The raw reward as the advantage: a random model's rewards differ by ~1e-4, so centring or
    # standardising them would blow float noise up to visible differences.
    "--config.sgalm.advantage=raw")

# 8 prompts x 2 responses a step: the discriminator's groups are sharded over all 8 devices.
GAD_SMALL = PRETRAINED + SGD + DATA_2 + (
    "--config.data.max_examples=16", "--config.train.batch_size=16",
    "--config.gad.num_generations=2", "--config.distill.max_response_tokens=16")

CASES = [
    Case("sft_data_engine", preempt=3, runs=(
        Run("sft", "sft_tiny.py", (
            "--config.train.num_steps=6", "--config.data.max_examples=32",
            "--config.checkpoint.every_steps=2", "--config.optimizer.warmup_steps=2"),
            # 32 records, 4 batches of 8 per epoch: each host tokenizes the 16 of its rows.
            log_patterns=(r"32 training examples; .*this host tokenized 16 of them",)),
        # SGALM-prompt samples, a student's SFT and its eval (GSM8K, ARC log-likelihood, MBPP).
        Run("data_engine", "sgalm_data_engine.py", PRETRAINED + (
            "--config.model.dtype=float32", "--config.checkpoint.export_dtype=",
            "--config.data.task=arithmetic", "--config.data.max_examples=16",
            "--config.data.max_length=256", "--config.data.min_bucket=64",
            "--config.sgalm.num_shots=1", "--config.sgalm.max_new_tokens=16",
            "--config.sgalm.sample_batch_size=16", "--config.data_engine.methods=sgalm",
            "--config.data_engine.scales=1", "--config.data_engine.baseline_real_only=false",
            "--config.data_engine.student_path={model}", "--config.data_engine.epochs=1.0",
            "--config.train.batch_size=8", "--config.train.grad_accum_steps=1",
            "--config.sampling.num_slots=0", "--config.optimizer.warmup_steps=0",
            "--config.eval.tasks=gsm8k,arc,mbpp", f"--config.eval.data_dir={SHARED_DATA}",
            "--config.eval.k_shot=0", "--config.eval.max_examples=2",
            "--config.eval.max_new_tokens=8", "--config.eval.batch_size=8"),
            samples=("synthetic/*.jsonl", "students/*/eval/*.json*", "results.json"),
            exports=("students/sgalm_k1/export",), checkpoints=False,
            metrics="students/*/metrics.jsonl"),
    )),
    Case("sgalm", preempt=2, runs=(
        Run("two_models", "sgalm_tiny.py", SGALM_SMALL + (
            "--config.sgalm.variant=two_models", "--config.sgalm.final_samples=8"),
            samples=("samples/*.jsonl",), exports=("export", "export_discriminator")),
    ) + tuple(
        Run(variant, "sgalm_tiny.py", SGALM_SMALL + (
            f"--config.sgalm.variant={variant}", "--config.sgalm.iterations=1",
            "--config.sgalm.final_samples=0"), samples=("samples/*.jsonl",))
        for variant in ("full",))),
    Case("selfplay_grpo", preempt=4, preempted=2, runs=(
        Run("iris", "selfplay_tiny.py", PRETRAINED + SGD + DATA_2 + (
            "--config.selfplay.loss=iris", "--config.selfplay.alpha_schedule=adaptive",
            "--config.data.max_examples=16", "--config.selfplay.steps_per_iteration=3",
            "--config.selfplay.max_new_tokens=16", "--config.selfplay.eval_every=2",
            "--config.eval.tasks=arithmetic", "--config.eval.max_examples=4",
            "--config.eval.max_new_tokens=8"),
            samples=("samples/*.jsonl", "selfplay/iter_*/data.npz", "eval/*/*.json*"),
            # share of pairs with real reward > synthetic reward: at an iteration's first step
            # the policy is its reference, so every reward is 0 up to float noise.
            discrete=("accuracy",)),
        # The GAD stage (no warmup: the student and a fresh-headed discriminator from the tiny
        # checkpoint), preempted in the same launch as iris: sampling, D's scores as rewards, its
        # Bradley-Terry step, the student's GRPO step, evaluation at steps 2, 4 and 6 (the
        # preemption saves step 5, between them), the best student and both exports.
        Run("gad", "gad_tiny.py", GAD_SMALL + (
            "--config.gad.stage=gad", "--config.train.num_steps=6",
            "--config.gad.eval_examples=4"),
            samples=("rollouts/*.jsonl", "eval/*.json"),
            exports=("export", "export_discriminator", "best")),
        # 2 rollouts of 4 prompts x 4 completions, a reward a random model's samples spread on.
        # Sampled host-locally through 8 continuous-engine slots: each of the 2 hosts decodes its
        # 2 prompts on its own copy of the params; 1 x 8 decodes all 16 rows on one: same rows.
        Run("grpo", "grpo_tiny.py", PRETRAINED + SGD + DATA_2 + (
            "--config.sampling.engine=continuous", "--config.sampling.num_slots=8",
            "--config.sampling.placement=host_local",
            "--config.grpo.reward=tests.algorithms.grpo_rewards:low_token_fraction",
            "--config.train.num_steps=4", "--config.grpo.max_new_tokens=16",
            "--config.data.max_examples=16"),
            samples=("rollouts/*.jsonl",)),
    )),
]


# ------------------------------------------------------------------------------------ running
def _args(runs: tuple[Run, ...], root: Path, model: Path) -> list[list[str]]:
    return [[f"--config={CONFIGS / r.config}", *QUIET,
             *(o.replace("{model}", str(model)) for o in r.overrides),
             f"--config.workdir={root / r.sub}"] for r in runs]


def _save_tiny_model(path: Path) -> Path:
    """The tiny configs' model (tiny-qwen2, random) and the builtin tokenizer, in HF format."""
    from sgalm_jax.config import base_config
    from sgalm_jax.models import save_pretrained
    from sgalm_jax.training.model_setup import init_model, model_config
    from sgalm_jax.training.tokenizer import build_tiny_tokenizer

    cfg = base_config()
    cfg.model.init = "tiny-qwen2"
    save_pretrained(init_model(model_config(cfg.model), mesh=None, seed=0), path,
                    tokenizer=build_tiny_tokenizer())
    return path


@contextlib.contextmanager
def _compilation_cache(path: Path):
    """A persistent compilation cache in this process for a while (then as before): the runs of a
    case share programs (the sampler, scorers, train steps of the SGALM variants)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    cc.set_cache_dir(str(path))
    try:
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
        cc.reset_cache()


def _run_single(case: Case, root: Path, model: Path, cache: Path) -> float:
    from sgalm_jax.main import main

    start = time.perf_counter()
    with _compilation_cache(cache):
        for args in _args(case.runs, root, model):
            assert main(["sgalm_jax.main", *args]) == 0, args
    return time.perf_counter() - start


def _launch(runs: tuple[Run, ...], root: Path, log_dir: Path, cache: Path, model: Path,
            env_1: dict[str, str] | None = None) -> list[int]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("SGALM_FAULT_INJECT", None)
    # One persistent compilation cache for every launch: a resumed run, or another variant,
    # loads the programs the previous launch compiled instead of compiling them again.
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return launch([json.dumps(_args(runs, root, model))], num_processes=2, cpu_devices=4,
                  log_dir=str(log_dir), env=env, env_per_process={1: env_1} if env_1 else None,
                  module="tests.multihost._driver", timeout=600, echo=False)


def _tail(log_dir: Path) -> str:
    out = []
    for f in sorted(log_dir.glob("process_*.log")):
        lines = [x for x in f.read_text().splitlines() if "[Gloo]" not in x]
        out.append(f"--- {f.name}\n" + "\n".join(lines[-30:]))
    return "\n".join(out)


def _run_multi(case: Case, root: Path, cache: Path, model: Path) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    info: dict[str, Any] = {}
    if case.preempt is not None:
        logs = root.parent / "logs_preempt"
        codes = _launch(case.runs[:case.preempted], root, logs, cache, model,
                        {"SGALM_FAULT_INJECT": f"sigterm@{case.preempt}"})
        assert codes == [0, 0], _tail(logs)  # both processes saved and exited cleanly
        from sgalm_jax.training.checkpoint import Checkpointer

        for run in case.runs[:case.preempted]:
            first = root / run.sub
            info[f"{run.sub}/preempted_at"] = Checkpointer(str(first / "checkpoints")).latest_step()
            info[f"{run.sub}/export_after_preempt"] = (first / "export").exists()
    logs = root.parent / "logs"
    codes = _launch(case.runs, root, logs, cache, model)
    assert codes == [0, 0], _tail(logs)
    return time.perf_counter() - start, info


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(case) -> (single root, multi root, info)``, each case run once per module."""
    done: dict[str, Any] = {}
    cache = tmp_path_factory.mktemp("jax_cache")
    model = _save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")

    def get(case: Case):
        if case.name not in done:
            base = tmp_path_factory.mktemp(case.name)
            single, multi = base / "single" / "w", base / "multi" / "w"
            t1 = _run_single(case, single, model, cache)
            t2, info = _run_multi(case, multi, cache, model)
            info.update(single_seconds=round(t1, 1), multi_seconds=round(t2, 1))
            done[case.name] = (single, multi, info)
        return done[case.name]

    return get


# ------------------------------------------------------------------------------------ comparing
def _records(path: Path) -> dict[int, dict[str, Any]]:
    """metrics.jsonl as step -> merged record (a resumed run appends to the preempted one's)."""
    out: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        step = rec.pop("step")
        out.setdefault(step, {}).update(rec)
    return out


def _is_timing(key: str) -> bool:
    return any(w in key for w in TIMING_WORDS)


def _close(a: Any, b: Any, rtol: float = 1e-4, atol: float = 1e-4) -> bool:
    """Equal, or for floats equal to float noise: summed log-probs are ~100 in float32, so a reward
    (a difference of two) that should be 0 is ~1e-5 either way."""
    if isinstance(a, float) or isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return True
        return abs(a - b) <= atol + rtol * abs(b)
    return a == b


def compare_metrics(single: Path, multi: Path, discrete: tuple[str, ...] = ()) -> float:
    """Assert that every step's metrics of two metrics.jsonl files match (``discrete`` ones are
    only required to exist); returns the largest |difference| of a loss."""
    a, b = _records(single), _records(multi)
    assert sorted(a) == sorted(b), "the two runs logged different steps"
    worst = 0.0
    for step in a:
        keys = {k for k in a[step] if not _is_timing(k)}
        assert keys == {k for k in b[step] if not _is_timing(k)}, f"step {step}: other metrics"
        for k in keys - set(discrete):
            x, y = a[step][k], b[step][k]
            assert _close(x, y), f"step {step} {k}: 1x8 {x} vs 2x4 {y}"
            if "loss" in k and isinstance(x, float) and math.isfinite(x):
                worst = max(worst, abs(x - y))
    return worst


def _compare_json(x: Any, y: Any, where: str) -> None:
    if isinstance(x, dict):
        assert isinstance(y, dict) and set(x) == set(y), f"{where}: other keys"
        for k in x:
            if _is_timing(k):
                continue
            _compare_json(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, list):
        assert isinstance(y, list) and len(x) == len(y), f"{where}: other lengths"
        for i, (u, v) in enumerate(zip(x, y)):
            _compare_json(u, v, f"{where}[{i}]")
    elif isinstance(x, float) or isinstance(y, float):
        assert _close(float(x), float(y)), f"{where}: {x} vs {y}"
    else:
        assert x == y, f"{where}: {x!r} vs {y!r}"


def compare_files(single: Path, multi: Path, pattern: str) -> int:
    """Assert that the files matching ``pattern`` exist on both sides and hold the same data;
    returns how many were compared."""
    names = sorted(os.path.relpath(p, single) for p in glob.glob(str(single / pattern)))
    other = sorted(os.path.relpath(p, multi) for p in glob.glob(str(multi / pattern)))
    assert names and names == other, f"{pattern}: {names} vs {other}"
    for name in names:
        x, y = single / name, multi / name
        if name.endswith(".npz"):
            with np.load(x) as u, np.load(y) as v:
                assert set(u.files) == set(v.files)
                for k in u.files:
                    if k == "meta":  # JSON: statistics and timings
                        mu, mv = (json.loads(str(z[k])) for z in (u, v))
                        _compare_json({q: w for q, w in mu.items() if not _is_timing(q)},
                                      {q: w for q, w in mv.items() if not _is_timing(q)},
                                      f"{name}:meta")
                    elif u[k].dtype.kind == "f":
                        np.testing.assert_allclose(u[k], v[k], rtol=1e-4, atol=1e-4, err_msg=name)
                    else:
                        np.testing.assert_array_equal(u[k], v[k], err_msg=f"{name}:{k}")
        elif name.endswith(".jsonl"):
            lx, ly = x.read_text().splitlines(), y.read_text().splitlines()
            assert len(lx) == len(ly), name
            for i, (u, v) in enumerate(zip(lx, ly)):
                _compare_json(json.loads(u), json.loads(v), f"{name}:{i + 1}")
        else:
            _compare_json(json.loads(x.read_text()), json.loads(y.read_text()), name)
    return len(names)


def compare_export(single: Path, multi: Path) -> float:
    """Assert the exported HF checkpoints hold the same tensors; returns the max |difference|."""
    from safetensors.numpy import load_file

    def tensors(d: Path) -> dict[str, np.ndarray]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = tensors(single), tensors(multi)
    assert a and set(a) == set(b)
    assert json.loads((single / "config.json").read_text()) == json.loads(
        (multi / "config.json").read_text())
    worst = 0.0
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=k)
        worst = max(worst, float(np.max(np.abs(a[k].astype(np.float64) - b[k]))))
    return worst


def latest_checkpoint(ckpt_dir: Path) -> tuple[int, dict[str, np.ndarray]]:
    """(step, flattened arrays) of the latest checkpoint, read on the host."""
    import jax
    import orbax.checkpoint as ocp

    step = max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    path = ckpt_dir / str(step) / "state"
    meta = ocp.PyTreeCheckpointer().metadata(path)
    tree = meta.item_metadata.tree
    args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = ocp.PyTreeCheckpointer().restore(path, restore_args=args)
    flat = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(restored)[0]}
    return step, flat


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_two_processes_match_one(case: Case, runs):
    single_root, multi_root, info = runs(case)
    report: dict[str, Any] = {"case": case.name, **info}
    if case.preempt is not None:
        # SIGTERM reached process 1 after step `preempt`; both agreed to save the next step.
        for run in case.runs[:case.preempted]:
            assert info[f"{run.sub}/preempted_at"] == case.preempt + 1, run.sub
            assert not info[f"{run.sub}/export_after_preempt"], run.sub
    for run in case.runs:
        single, multi = single_root / run.sub, multi_root / run.sub
        metric_files = sorted(os.path.relpath(p, single)
                              for p in glob.glob(str(single / run.metrics)))
        assert metric_files, run.metrics
        report[f"{run.sub}/max_loss_diff"] = max(
            compare_metrics(single / f, multi / f, run.discrete) for f in metric_files)
        for pattern in run.samples:
            report[f"{run.sub}/{pattern}"] = compare_files(single, multi, pattern)
        for export in run.exports:
            report[f"{run.sub}/{export}_max_diff"] = compare_export(single / export,
                                                                    multi / export)
        if run.checkpoints:
            (s1, a), (s2, b) = (latest_checkpoint(d / "checkpoints") for d in (single, multi))
            assert s1 == s2 and set(a) == set(b)
            for k in a:
                np.testing.assert_allclose(a[k], b[k], rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=k)
        for pattern in run.log_patterns:
            for log in sorted((multi_root.parent / "logs").glob("process_*.log")):
                assert re.search(pattern, log.read_text()), (log.name, pattern)
        # Process 0 alone wrote the run's files: no leftovers of concurrent writers.
        assert not list(multi.rglob("*.tmp*")), list(multi.rglob("*.tmp*"))
    print(json.dumps(report), file=sys.stderr)
