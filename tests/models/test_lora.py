"""LoRA adapters (sgalm_jax.models.lora) and their PEFT-format I/O (sgalm_jax.models.peft).

References no one here wrote: transformers + peft on the same tiny random checkpoints (fp32):
PEFT's forward with our adapter, transformers loading our merged export, and PEFT's own adapters
imported into our model. The relative error is norm-wise, max|ours - ref| / max|ref|.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from sgalm_jax.errors import CheckpointError, ConfigError
from sgalm_jax.models import (CausalLM, ModelConfig, load_pretrained, load_score_model,
                              save_pretrained, save_score_model)
from sgalm_jax.models import lora as L
from sgalm_jax.models.peft import load_peft_adapter, save_peft_adapter
from tests.conftest import TINY

peft = pytest.importorskip("peft")

REL_TOL = 1e-5
IDS = np.random.RandomState(0).randint(0, 990, size=(2, 12))


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def randomize_adapters(model, seed: int, scale: float = 0.05) -> None:
    """A non-zero B (A keeps PEFT's init): updates of the size of the weights' own spread, so the
    adapters change the output measurably, as a trained adapter would."""
    rng = np.random.RandomState(seed)
    flat = []
    for key, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        value = var.get_value()
        if key[-1] == "b":
            value = jnp.asarray(rng.randn(*value.shape) * scale, jnp.float32)
        flat.append((key, var.replace(value)))
    nnx.update(model, nnx.from_flat_state(flat))


_FWD: dict = {}


def logits(model, ids=IDS) -> np.ndarray:
    graphdef, state = nnx.split(model)
    if graphdef not in _FWD:
        _FWD[graphdef] = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return np.asarray(_FWD[graphdef](state, jnp.asarray(ids)))


def hf_logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


# ------------------------------------------------------------------------------------ the adapter
def test_zero_initialised_adapters_leave_logits_equal_to_the_base(hf_model_dir):
    model = load_pretrained(hf_model_dir("llama31"))
    base = logits(model)
    paths = L.add_adapters(model, L.LoraSpec(rank=4, alpha=8.0, dropout=0.1), seed=1)
    assert len(paths) == 2 * 7  # every projection of both layers, no head
    assert not any("lm_head" in p for p in paths)
    np.testing.assert_array_equal(logits(model), base)  # B = 0: exactly the base
    # stacked layers: one adapter [L, in, r] per projection, A drawn for every layer
    a = np.asarray(L.adapter_modules(model)["model/layers/mlp/down_proj"].a[...])
    assert a.shape == (2, 128, 4) and 0 < np.abs(a).max() <= 1 / np.sqrt(128)  # PEFT's A init
    assert "model/layers/1/mlp/down_proj" in paths  # per-layer names, as HF's
    # init_adapters (jitted, from shapes) draws the same values as the eager path
    abstract = nnx.eval_shape(lambda: _adapted(model.config, L.LoraSpec(rank=4)))
    fresh = L.init_adapters(L.split_adapters(nnx.state(abstract, nnx.Param))[0], seed=1)
    eager = L.split_adapters(nnx.state(model, nnx.Param))[0]
    for x, y in zip(jax.tree.leaves(fresh), jax.tree.leaves(eager)):
        np.testing.assert_array_equal(x, y)


def _adapted(config, spec, seed=0):
    m = CausalLM(config, rngs=nnx.Rngs(0))
    L.add_adapters(m, spec, seed=seed)
    return m


def test_base_part_is_the_plain_model_and_targets_select_by_regex(hf_model_dir):
    model = load_pretrained(hf_model_dir("qwen2"))
    plain_graph, plain = nnx.split(model, nnx.Param)
    L.add_adapters(model, L.LoraSpec(rank=2, targets=r"layers/1/self_attn/(q|v)_proj$"))
    assert L.adapted_layer_names(model) == ["model/layers/1/self_attn/q_proj",
                                            "model/layers/1/self_attn/v_proj"]
    # a subset of a stack: the adapter spans [L] with layer 0's A and B zero (adds nothing)
    q = L.adapter_modules(model)["model/layers/self_attn/q_proj"]
    assert q.layers == (1,) and not np.any(np.asarray(q.a[...])[0])
    assert np.any(np.asarray(q.a[...])[1])
    adapters, base = L.split_adapters(nnx.state(model, nnx.Param))
    # "adapters off": the base part merges into the plain graph and is the original model
    assert jax.tree.structure(base) == jax.tree.structure(plain)
    np.testing.assert_array_equal(logits(nnx.merge(plain_graph, base)), logits(model))
    assert len(jax.tree.leaves(adapters)) == 4


def test_bad_specs_are_config_errors(hf_model_dir):
    model = load_pretrained(hf_model_dir("qwen2"))
    with pytest.raises(ConfigError, match="lora.targets: .*matches no linear layer"):
        L.add_adapters(model, L.LoraSpec(targets="lm_head"))  # heads cannot be adapted
    with pytest.raises(ConfigError, match="lora.targets: invalid regex"):
        L.LoraSpec(targets="(q_proj")
    with pytest.raises(ConfigError, match="lora.rank"):
        L.LoraSpec(rank=0)
    with pytest.raises(ConfigError, match="lora.dropout"):
        L.LoraSpec(dropout=1.0)


def test_dropout_only_inside_dropout_rng_and_differs_per_layer(hf_model_dir):
    model = load_pretrained(hf_model_dir("qwen2"))
    L.add_adapters(model, L.LoraSpec(rank=4, dropout=0.5, targets="q_proj$"))
    randomize_adapters(model, 0)
    graphdef, state = nnx.split(model)

    def fwd(s, key):
        with L.dropout_rng(key):
            return nnx.merge(graphdef, s)(jnp.asarray(IDS))

    fwd = jax.jit(fwd)
    plain = logits(model)
    a, b = fwd(state, jax.random.key(0)), fwd(state, jax.random.key(1))
    assert not np.allclose(a, plain) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, fwd(state, jax.random.key(0)))  # deterministic per key
    with L.dropout_rng(None):
        np.testing.assert_array_equal(logits(model), plain)


def test_stacked_layer_adapters_under_scan_equal_unrolled_layers():
    """The scanned layout: every layer param (adapters included) has a leading [L] axis and a
    lax.scan slices them; the adapters then compute what per-layer adapters compute."""
    from sgalm_jax.models.transformer import Linear

    cfg = ModelConfig.from_hf(dict(model_type="llama", **TINY))
    n = 3

    @nnx.split_rngs(splits=n)
    @nnx.vmap(axis_size=n)
    def make(r):
        return Linear(64, 128, axes=("embed", "mlp"), use_bias=False, config=cfg, rngs=r)

    stacked = make(nnx.Rngs(0))
    stacked.kernel.set_metadata(logical_axes=("layers", "embed", "mlp"))
    L.add_adapters(_Holder(stacked), L.LoraSpec(rank=4, targets="^layers$"))
    lora = stacked.lora
    assert lora.a.get_value().shape == (n, 64, 4) and lora.b.get_value().shape == (n, 4, 128)
    assert lora.a.get_metadata()["logical_axes"] == ("layers", "embed", "lora_rank")
    rng = np.random.RandomState(0)
    lora.b.set_value(jnp.asarray(rng.randn(n, 4, 128), jnp.float32))
    graphdef, params = nnx.split(stacked)
    x = jnp.asarray(rng.randn(2, 5, 64), jnp.float32)

    def body(h, p):
        return jnp.tanh(nnx.merge(graphdef, p)(h)[..., :64]), None

    scanned, _ = jax.lax.scan(body, x, params)
    h = x
    for i in range(n):
        k, a, b = (np.asarray(v.get_value()[i]) for v in (stacked.kernel, lora.a, lora.b))
        h = np.tanh((h @ k + lora.scale * (h @ a) @ b)[..., :64])
    np.testing.assert_allclose(scanned, h, rtol=1e-5, atol=1e-6)
    # the host-side merge used by the export handles the leading axis too
    merged = L.merged_kernel(np.asarray(stacked.kernel.get_value()), np.asarray(lora.a[...]),
                             np.asarray(lora.b[...]), lora.scale)
    assert merged.shape == (n, 64, 128)


class _Holder(nnx.Module):
    def __init__(self, layer):
        self.layers = layer


# ------------------------------------------------------------------------------------ vs peft
@pytest.mark.parametrize("family", ["qwen2", "llama31"])
def test_forward_merged_export_and_peft_export_match_transformers_peft(family, hf_model_dir,
                                                                       tmp_path):
    path = hf_model_dir(family)
    model = load_pretrained(path)
    L.add_adapters(model, L.LoraSpec(rank=4, alpha=12.0), seed=2)
    randomize_adapters(model, 3)
    ours = logits(model)
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    base_logits = hf_logits(hf_base)  # before PEFT injects adapters into hf_base
    assert rel_err(ours, base_logits) > 1e-2  # the adapters matter

    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                     "up_proj", "v_proj"] and cfg["r"] == 4
    peft_model = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    assert rel_err(ours, hf_logits(peft_model)) <= REL_TOL

    save_pretrained(model, tmp_path / "merged")  # merged: plain HF weights
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert rel_err(hf_logits(merged), hf_logits(peft_model)) <= REL_TOL
    assert rel_err(logits(L.merge_adapters(model)), ours) <= REL_TOL
    # merging leaves the adapted model as it was (no kernels folded into its own Variables)
    assert rel_err(logits(model), ours) <= REL_TOL
    assert rel_err(logits(L.strip_adapters(model)), base_logits) <= REL_TOL
    assert rel_err(logits(model), ours) <= REL_TOL


def test_peft_adapter_imports_with_subset_targets_and_rslora(hf_model_dir, tmp_path):
    path = hf_model_dir("qwen2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "down_proj"],
                          layers_to_transform=[1], use_rslora=True, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "peft")
    ref = hf_logits(pm.eval())

    model = load_pretrained(path)
    spec = load_peft_adapter(model, tmp_path / "peft")
    assert sorted(L.adapted_layer_names(model)) == ["model/layers/1/mlp/down_proj",
                                                     "model/layers/1/self_attn/q_proj"]
    assert spec.rank == 4 and spec.rslora and abs(spec.scale - 3.0) < 1e-12
    assert rel_err(logits(model), ref) <= REL_TOL
    # and back out: PEFT loads our export of it (target_modules as an exact-name regex)
    save_peft_adapter(model, tmp_path / "again")
    assert isinstance(json.loads((tmp_path / "again" / "adapter_config.json").read_text())
                      ["target_modules"], str)
    with open(tmp_path / "again" / "adapter_model.safetensors", "rb") as f:  # layer 1 only
        assert b"layers.0." not in f.read(4096)
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    again = peft.PeftModel.from_pretrained(hf2, tmp_path / "again").eval()
    assert rel_err(hf_logits(again), ref) <= REL_TOL


def test_score_model_adapter_and_head_round_trip_through_peft(hf_model_dir, tmp_path):
    path = hf_model_dir("qwen2")
    scorer = load_score_model(path, seed=1)
    L.add_adapters(scorer, L.LoraSpec(rank=2, targets="(q|v)_proj$"), seed=0)
    randomize_adapters(scorer, 1)
    scorer.score.kernel.set_value(scorer.score.kernel.get_value() * 25.0)
    ours = logits(scorer)  # the scores [B] (the jitted forward of any model)
    save_peft_adapter(scorer, tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, pad_token_id=999).eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "d").eval()
    with torch.no_grad():
        ref = pm(torch.tensor(IDS)).logits[:, 0].numpy()
    assert rel_err(ours, ref) <= REL_TOL
    save_score_model(scorer, tmp_path / "merged", pad_token_id=999)
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "merged").eval()
    with torch.no_grad():
        assert rel_err(merged(torch.tensor(IDS)).logits[:, 0].numpy(), ref) <= REL_TOL
    fresh = load_score_model(path, seed=5)  # another head: the file's replaces it
    load_peft_adapter(fresh, tmp_path / "d")
    np.testing.assert_allclose(logits(fresh), ours, rtol=1e-6, atol=1e-6)


def test_bad_peft_folders_name_the_problem(hf_model_dir, tmp_path):
    path = hf_model_dir("qwen2")
    model = load_pretrained(path)
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_peft_adapter(model, tmp_path)
    L.add_adapters(model, L.LoraSpec(rank=2, targets="q_proj$"))
    save_peft_adapter(model, tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora: DoRA is not supported"):
        load_peft_adapter(load_pretrained(path), tmp_path / "a")
    cfg_path.write_text(json.dumps({**cfg, "r": 3}))
    with pytest.raises(CheckpointError, match=r"lora_A.weight has shape \(2, 64\), expected "
                                              r"\(3, 64\)"):
        load_peft_adapter(load_pretrained(path), tmp_path / "a")
    cfg_path.write_text(json.dumps(cfg))
    from safetensors.numpy import load_file, save_file

    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = np.zeros(
        (2, 64), np.float32)
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match="unexpected tensor .*layers.7.self_attn"):
        load_peft_adapter(load_pretrained(path), tmp_path / "a")
