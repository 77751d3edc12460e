"""LoRA through the CLI: SGALM two_models (two adapter sets on one base) and GRPO (the KL
reference is the base itself), each killed mid-run and resumed; checkpoints hold adapters only;
the exports (merged HF weights, PEFT adapters) agree with transformers + peft.

Both start from a tiny random HF checkpoint (``model.path``), so peft can load the exported
adapters onto the same base; the builtin tiny tokenizer's ids fit its vocabulary.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import cli_env

REPO = Path(__file__).resolve().parents[2]
REWARD = "tests.algorithms.grpo_rewards:low_token_fraction"

pytestmark = pytest.mark.slow


def _cli(config, workdir, cache_dir, *extra, fault=None):
    env = cli_env(cache_dir, fault=fault)
    cmd = [sys.executable, "-m", "sgalm_jax.main", f"--config={REPO / 'configs' / config}",
           f"--config.workdir={workdir}", "--config.checkpoint.async_save=false",
           "--config.mesh.data=2", "--config.lora.enabled=true", "--config.lora.rank=4",
           *extra]
    return subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=400)


def _records(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _steps(workdir):
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir()
                  if p.name.isdigit())


def _stored_paths(workdir, step):
    """Every array path a checkpoint holds (Orbax's metadata, nothing read)."""
    import jax
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(str(Path(workdir) / "checkpoints" / str(step) /
                                                   "state"))
    tree = meta.item_metadata.tree
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _load(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


def test_sgalm_two_models_lora_cli_killed_and_resumed_exports_match_peft(tmp_path, hf_model_dir):
    """Two adapter sets (generator, discriminator) on one frozen base, killed after update 5 and
    resumed. Checkpoints hold the two adapter sets and their optimizer states, nothing of the
    base; the merged export is what peft computes with the exported adapter on the base."""
    import torch
    import transformers

    peft = pytest.importorskip("peft")
    base = hf_model_dir("qwen2")
    run = tmp_path / "run"
    common = (f"--config.model.path={base}", "--config.model.init=",
              "--config.tokenizer.path=builtin:tiny", "--config.sgalm.variant=two_models")
    proc = _cli("sgalm_tiny.py", run, tmp_path / "cache", *common, fault="sigkill@5")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert max(_steps(run)) == 4
    stored = _stored_paths(run, 4)
    assert {p.split("]")[0] for p in stored} == {"['discriminator'", "['generator'"}
    params = [p for p in stored if "['params']" in p]
    assert params and all("['lora']" in p for p in params)  # adapters only: no base weight
    proc = _cli("sgalm_tiny.py", run, tmp_path / "cache", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r["step"] for r in _records(run) if "d_loss" in r or "g_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 5, 6, 7, 8]  # update 5 ran twice: before the kill and after

    g_adapter, d_adapter = _load(run / "export_adapter" / "adapter_model.safetensors"), _load(
        run / "export_discriminator_adapter" / "adapter_model.safetensors")
    assert set(g_adapter) == set(d_adapter)
    assert all(not np.array_equal(g_adapter[k], d_adapter[k]) for k in g_adapter)
    ids = torch.tensor(np.random.RandomState(0).randint(0, 500, size=(2, 10)))
    for adapter, merged in (("export_adapter", "export"),
                            ("export_discriminator_adapter", "export_discriminator")):
        hf = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
        with torch.no_grad():
            ref = peft.PeftModel.from_pretrained(hf, run / adapter).eval()(ids).logits.numpy()
            got = transformers.AutoModelForCausalLM.from_pretrained(
                run / merged).eval()(ids).logits.numpy()
        assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) <= 1e-5, adapter
        assert not np.allclose(got, hf(ids).logits.detach().numpy())  # trained away from base


def test_grpo_lora_cli_resumes_bit_identically_with_the_base_as_reference(tmp_path,
                                                                          hf_model_dir):
    """GRPO with beta > 0 and LoRA: the reference is the base (no weights of its own). An
    uninterrupted run and one killed after step 6 and rerun end with the same adapters and the
    same merged export; checkpoints hold the policy's adapters and optimizer state only."""
    base = hf_model_dir("qwen2")
    common = (f"--config.model.path={base}", "--config.model.init=",
              "--config.tokenizer.path=builtin:tiny", f"--config.grpo.reward={REWARD}",
              "--config.grpo.max_new_tokens=16", "--config.optimizer.learning_rate=5e-2")
    cache, full, broken = tmp_path / "cache", tmp_path / "full", tmp_path / "broken"
    proc = _cli("grpo_tiny.py", full, cache, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [r for r in _records(full) if "reward_mean" in r]
    assert [r["step"] for r in recs] == [2, 4, 6, 8]
    assert all(r["kl"] > 0 for r in recs)  # the policy moves away from the base reference
    stored = _stored_paths(full, 8)
    assert {p.split("]")[0] for p in stored} == {"['policy'"}
    assert all("['lora']" in p for p in stored if "['params']" in p)

    proc = _cli("grpo_tiny.py", broken, cache, *common, fault="sigkill@6")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert _steps(broken) == [4]
    proc = _cli("grpo_tiny.py", broken, cache, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in _records(broken) if "reward_mean" in r] == [2, 4, 6, 6, 8]
    for name in ("export_adapter/adapter_model.safetensors", "export/model.safetensors"):
        a, b = _load(full / name), _load(broken / name)
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}: {k}")
