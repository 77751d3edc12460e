"""GAD with LoRA through the CLI: the student an adapter set, the discriminator another adapter set
plus its scalar head, both on one frozen base (a tiny random HF checkpoint), the KL reference the
base with the adapters off. A GAD stage killed (SIGKILL) between its two updates and rerun ends
bit-identical to an uninterrupted run; checkpoints hold adapters and the head only; the merged
exports equal transformers + peft with the exported PEFT adapters (CAUSAL_LM and SEQ_CLS).
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

pytestmark = pytest.mark.slow


def _cli(workdir, cache_dir, base, fault=None):
    env = cli_env(cache_dir, fault=fault)
    cmd = [sys.executable, "-m", "sgalm_jax.main", f"--config={REPO / 'configs' / 'gad_tiny.py'}",
           f"--config.workdir={workdir}", "--config.checkpoint.async_save=false",
           "--config.mesh.data=2", "--config.gad.stage=gad", "--config.gad.eval_examples=0",
           "--config.distill.max_response_tokens=16", "--config.metrics.tensorboard=false",
           "--config.lora.enabled=true", "--config.lora.rank=4", f"--config.model.path={base}",
           "--config.model.init=", "--config.tokenizer.path=builtin:tiny"]
    return subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=400)


def _steps(workdir):
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir()
                  if p.name.isdigit())


def _stored_paths(workdir, step):
    import jax
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(str(Path(workdir) / "checkpoints" / str(step) /
                                                   "state"))
    tree = meta.item_metadata.tree
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_gad_lora_cli_killed_between_updates_resumes_bit_identically(tmp_path, hf_model_dir):
    import torch
    import transformers
    from safetensors.numpy import load_file

    peft = pytest.importorskip("peft")
    base = hf_model_dir("qwen2")
    cache, full, broken = tmp_path / "cache", tmp_path / "full", tmp_path / "broken"
    proc = _cli(full, cache, base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(r["kl"] > 0 for r in recs[1:])  # the student moves away from the base reference
    stored = _stored_paths(full, 4)
    assert {p.split("]")[0] for p in stored} == {"['student'", "['discriminator'"}
    params = [p for p in stored if "['params']" in p]
    assert params and all("['lora']" in p or "['score']" in p for p in params)  # no base weight
    assert any("['discriminator']" in p and "['score']" in p for p in params)  # D's own head

    proc = _cli(broken, cache, base, fault="sigkill@3:after_d")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert _steps(broken) == [2]
    proc = _cli(broken, cache, base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("export/model.safetensors", "export_discriminator/model.safetensors",
                 "export_adapter/adapter_model.safetensors",
                 "export_discriminator_adapter/adapter_model.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(broken / name))
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}: {k}")

    # The merged exports are what peft computes with each adapter on the HF base.
    ids = torch.tensor(np.random.RandomState(0).randint(3, 500, size=(2, 10)))
    pad = json.loads((full / "export_discriminator" / "config.json").read_text())["pad_token_id"]
    with torch.no_grad():
        lm = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
        ref = peft.PeftModel.from_pretrained(lm, full / "export_adapter").eval()(ids).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(full / "export").eval()(ids).logits
        assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5
        clf = transformers.AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=1, pad_token_id=pad).eval()
        ref = peft.PeftModel.from_pretrained(clf, full / "export_discriminator_adapter").eval()(
            ids).logits
        got = transformers.AutoModelForSequenceClassification.from_pretrained(
            full / "export_discriminator").eval()(ids).logits
        assert ref.shape == got.shape == (2, 1)
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
