"""The ``eval`` algorithm: config checks, model-path resolution, and the CLI on a tiny random model
over small local slices of GSM8K, ARC-Challenge and MBPP (../shared/data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sgalm_jax.algorithms import eval as ev
from sgalm_jax.config import base_config
from sgalm_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_parse_tasks():
    assert ev.parse_tasks("gsm8k, ARC_challenge,mbpp,arc") == ["gsm8k", "arc", "mbpp"]
    with pytest.raises(ConfigError, match="^eval.tasks"):
        ev.parse_tasks("gsm8k,hellaswag")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as our algorithms leave it: config.json (the run's) and export/ (a tiny
    random Qwen2 model with the builtin tokenizer)."""
    from sgalm_jax.config import MODEL_PRESETS
    from sgalm_jax.models import ModelConfig, save_pretrained
    from sgalm_jax.training.model_setup import init_model
    from sgalm_jax.training.tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("eval_run") / "run"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"algorithm": "sft"}))
    model = init_model(ModelConfig.from_hf(MODEL_PRESETS["tiny-qwen2"]), mesh=None, seed=3)
    save_pretrained(model, root / "export", tokenizer=build_tiny_tokenizer())
    return root


def test_model_path_resolution(run_dir, tmp_path):
    assert ev.resolve_model_path(str(run_dir)) == str(run_dir / "export")
    assert ev.resolve_model_path(str(run_dir / "export")) == str(run_dir / "export")
    with pytest.raises(ConfigError, match="^model.path"):
        ev.resolve_model_path(str(tmp_path))


def _config(**eval_overrides):
    c = base_config()
    c.algorithm = "eval"
    c.model.init = "tiny-qwen2"
    c.tokenizer.path = "builtin:tiny"
    for k, v in eval_overrides.items():
        c.eval[k] = v
    return c


@pytest.mark.parametrize("overrides,key", [
    (dict(tasks="gsm8k,squad"), "eval.tasks"),
    (dict(tasks=""), "eval.tasks"),
    (dict(arc_mode="mc"), "eval.arc_mode"),
    (dict(num_samples=5), "eval.num_samples"),  # several samples need temperature > 0
    (dict(k_shot=-2), "eval.k_shot"),
    (dict(data_dir="/nonexistent/data"), "eval.data_dir"),
    (dict(batch_size=0), "eval.batch_size"),
])
def test_bad_eval_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        ev.validate(_config(**overrides))
    assert str(err.value).startswith(key), str(err.value)


def test_no_model_is_an_error(tmp_path):
    c = _config()
    c.model.init = ""
    with pytest.raises(ConfigError, match="^model.path"):
        ev.validate(c)
    c.model.path = str(tmp_path)
    with pytest.raises(ConfigError, match="^model.path"):
        ev.validate(c)


def test_eval_cli_on_a_run_directory(run_dir, shared_data, tmp_path):
    """``--config.model.path=<run dir>`` evaluates its export (tokenizer included) on 3 examples of
    each task from ../shared/data, 1-shot, and writes the summaries, per-example records and
    results.json."""
    env = dict(os.environ)
    env.update({"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
                "HF_HUB_OFFLINE": "1", "SGALM_LOG_LEVEL": "WARNING"})
    work = tmp_path / "eval"
    cmd = [sys.executable, "-m", "sgalm_jax.main", f"--config={REPO / 'configs' / 'eval_gsm8k.py'}",
           f"--config.model.path={run_dir}", "--config.model.dtype=float32",
           "--config.model.param_dtype=float32", "--config.eval.tasks=gsm8k,arc,mbpp",
           f"--config.eval.data_dir={shared_data}", "--config.eval.max_examples=3",
           "--config.eval.k_shot=1", "--config.eval.max_new_tokens=8",
           "--config.eval.batch_size=4", f"--config.workdir={work}",
           "--config.metrics.progress_bar=false"]
    proc = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = work / "eval"
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"gsm8k", "arc_challenge", "mbpp"}
    assert results["gsm8k"]["n"] == 3 and 0.0 <= results["gsm8k"]["exact_match"] <= 1.0
    assert results["arc_challenge"]["mode"] == "loglik" and "acc_norm" in results["arc_challenge"]
    assert "pass@1" in results["mbpp"] and sum(results["mbpp"]["sandbox_status"].values()) == 3
    for name in results:
        summary = json.loads((out / f"{name}_summary.json").read_text())
        assert summary["n"] == 3
        rows = [json.loads(l) for l in (out / f"{name}_examples.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and {"id", "prompt", "output", "correct"} <= set(rows[0])
    gsm = [json.loads(l) for l in (out / "gsm8k_examples.jsonl").read_text().splitlines()]
    assert gsm[0]["prompt"].count("Question:") == 2  # one demonstration, then the question
    arc = [json.loads(l) for l in (out / "arc_challenge_examples.jsonl").read_text().splitlines()]
    assert all(len(r["loglikelihoods"]) == len(r["choices"]) for r in arc)
    assert all(l < 0 for r in arc for l in r["loglikelihoods"])
    assert json.loads((work / "config.json").read_text())["algorithm"] == "eval"


@pytest.mark.parametrize("name", ["eval_gsm8k", "eval_arc", "eval_mbpp"])
def test_eval_configs_validate(name, shared_data):
    import importlib.util

    from sgalm_jax.config import validate_config

    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    assert c.algorithm == "eval" and not c.model.path  # the checkpoint comes from the command line
    c.model.init = "qwen2.5-3b"
    c.tokenizer.path = str(shared_data / "tokenizers" / "qwen2.5")
    c.eval.data_dir = str(shared_data)
    validate_config(c)
    ev.validate(c)
