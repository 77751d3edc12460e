"""HF checkpoint import/export: round trips, sharded files, mesh placement, bf16, and bad input."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sgalm_jax.errors import CheckpointError, ConfigError
from sgalm_jax.models import CausalLM, ModelConfig, load_pretrained, load_tokenizer, save_pretrained
from sgalm_jax.models.hf import expand_table
from sgalm_jax.sharding import make_mesh
from tests.conftest import make_hf_model

IDS = np.random.RandomState(3).randint(0, 1000, size=(2, 64))


@jax.jit
def _logits(model, ids):
    return model(ids)


def _hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama31", "mistral"])
def test_export_loads_in_transformers_with_same_logits(family, hf_model_dir, tmp_path):
    ours = load_pretrained(hf_model_dir(family))
    save_pretrained(ours, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    err = np.abs(_hf_logits(reloaded) - np.asarray(_logits(ours, IDS))).max()
    assert err <= 1e-4, err


def test_export_from_scratch_model_and_sharded_reimport(tmp_path):
    """A randomly initialised model exports sharded files; both transformers and we reload them."""
    from flax import nnx

    config = ModelConfig(model_type="llama", attention_bias=False, tie_word_embeddings=False,
                         rope_type="llama3", rope_factor=8.0, eos_token_id=[1, 2])
    model = CausalLM(config, rngs=nnx.Rngs(7))
    save_pretrained(model, tmp_path / "m", max_shard_size="40KB")
    files = os.listdir(tmp_path / "m")
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert hf.config.rope_scaling["rope_type"] == "llama3" or hf.config.rope_parameters["rope_type"] == "llama3"
    err = np.abs(_hf_logits(hf) - np.asarray(_logits(model, IDS))).max()
    assert err <= 1e-4, err
    again = load_pretrained(tmp_path / "m")
    np.testing.assert_array_equal(_logits(again, IDS), _logits(model, IDS))
    # Re-exporting into the same directory with one file replaces the old shards completely.
    save_pretrained(model, tmp_path / "m")
    assert sorted(f for f in os.listdir(tmp_path / "m") if "safetensors" in f) == ["model.safetensors"]


def test_sharded_hf_checkpoint_loads(tmp_path):
    model = make_hf_model("qwen3")
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_pretrained(tmp_path)
    assert np.abs(_hf_logits(model) - np.asarray(_logits(ours, IDS))).max() <= 1e-4


def test_load_onto_mesh_places_each_param_in_its_sharding(hf_model_dir):
    path = hf_model_dir("qwen2")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = load_pretrained(path, mesh=mesh)
    q = sharded.model.layers.self_attn.q_proj.kernel[...]  # stacked [L, hidden, heads]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 32, 32)
    emb = sharded.model.embed_tokens.embedding[...]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    plain = load_pretrained(path)
    np.testing.assert_allclose(_logits(sharded, IDS), _logits(plain, IDS), atol=1e-5)


def test_bf16_load_is_close_to_fp32_reference(hf_model_dir):
    """bf16 weights and compute: per-token KL(fp32 || bf16) over a 512-token prompt stays small."""
    path = hf_model_dir("llama32")
    ids = np.random.RandomState(4).randint(0, 1000, size=(2, 512))
    ref = jax.nn.log_softmax(_logits(load_pretrained(path), ids))
    bf16 = load_pretrained(path, dtype="bfloat16")
    assert bf16.model.layers.mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    got = jax.nn.log_softmax(_logits(bf16, ids))
    kl = np.asarray(jnp.sum(jnp.exp(ref) * (ref - got), axis=-1))
    # Bound: mean KL <= 1e-3 and max <= 1e-2 nats/token (MaxText uses ~0.015 for real models).
    assert kl.mean() <= 1e-3 and kl.max() <= 1e-2, (kl.mean(), kl.max())


def test_bf16_checkpoint_roundtrip(tmp_path, hf_model_dir):
    bf16 = load_pretrained(hf_model_dir("qwen2"), dtype="bfloat16")
    save_pretrained(bf16, tmp_path / "bf16")
    assert json.load(open(tmp_path / "bf16" / "config.json"))["torch_dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert next(hf.parameters()).dtype == torch.bfloat16
    again = load_pretrained(tmp_path / "bf16")
    assert again.config.param_dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda v: v, bf16)),
                    jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


# ------------------------------------------------------------------------------ bad input
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_checkpoint_is_an_error_naming_the_file(hf_model_dir, tmp_path):
    path = _copy(hf_model_dir("qwen2"), tmp_path / "trunc")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(path)


def test_missing_shard_is_an_error(tmp_path):
    make_hf_model("qwen2").save_pretrained(tmp_path, max_shard_size="50KB")
    victim = sorted(p for p in os.listdir(tmp_path) if p.startswith("model-"))[1]
    os.remove(tmp_path / victim)
    with pytest.raises(CheckpointError, match=victim):
        load_pretrained(tmp_path)


def test_missing_and_unexpected_tensors_are_named(hf_model_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = _copy(hf_model_dir("llama31"), tmp_path / "bad")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_pretrained(path)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((128, 64), np.float32)
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros((3,), np.float32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra"):
        load_pretrained(path)


def test_shape_mismatch_is_named(hf_model_dir, tmp_path):
    path = _copy(hf_model_dir("qwen2"), tmp_path / "shape")
    cfg = json.load(open(path / "config.json"))
    cfg["intermediate_size"] = 96
    json.dump(cfg, open(path / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"mlp\.down_proj\.weight' has shape \(64, 128\).*expects \(64, 96\)"):
        load_pretrained(path)


def test_unsupported_architecture_and_rope(hf_model_dir, tmp_path):
    path = _copy(hf_model_dir("qwen2"), tmp_path / "arch")
    cfg = json.load(open(path / "config.json"))
    json.dump({**cfg, "model_type": "gemma2"}, open(path / "config.json", "w"))
    with pytest.raises(ConfigError, match="model_type 'gemma2' is not supported"):
        load_pretrained(path)
    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    json.dump({**cfg, "rope_parameters": yarn}, open(path / "config.json", "w"))
    with pytest.raises(ConfigError, match="rope type 'yarn' is not supported"):
        load_pretrained(path)
    json.dump({**cfg, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
              open(path / "config.json", "w"))
    with pytest.raises(ConfigError, match="rope_scaling says rope type 'linear'"):
        load_pretrained(path)


def test_json_of_the_wrong_shape_is_named(hf_model_dir, tmp_path):
    """A config.json that is not an object, or a folder; an index whose weight_map is not a
    mapping: each a clear error naming the file (no raw AttributeError / TypeError)."""
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match=rf"^{path}/config.json: expected a JSON object"):
        load_pretrained(path)
    (path / "config.json").write_text('{"model_type": "llama", "hidden_size": "big", '
                                      '"num_attention_heads": 2}')
    with pytest.raises(ConfigError, match=rf"^{path}/config.json: malformed model config"):
        load_pretrained(path)
    os.remove(path / "config.json")
    (path / "config.json").mkdir()
    with pytest.raises(ConfigError, match=rf"^{path}/config.json: cannot read"):
        load_pretrained(path)

    sharded = tmp_path / "sharded"
    make_hf_model("qwen2").save_pretrained(sharded, max_shard_size="50KB")
    index = sharded / "model.safetensors.index.json"
    for bad in ({"weight_map": ["model-00001-of-00002.safetensors"]}, ["weight_map"],
                {"weight_map": {"lm_head.weight": 3}}):
        index.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=rf"^{index}: "):
            load_pretrained(sharded)


def test_export_is_readable_as_the_umask_allows(tmp_path):
    """Exported folders and files get 0777/0666 minus the umask (group-readable under 022/027),
    not the 0700/0600 of tempfile and safetensors."""
    import stat

    from flax import nnx

    model = CausalLM(ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=16,
                                 intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1), rngs=nnx.Rngs(0))
    old = os.umask(0o027)
    try:
        save_pretrained(model, tmp_path / "export")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "export") == 0o750
    assert {f: mode(tmp_path / "export" / f) for f in os.listdir(tmp_path / "export")} == {
        "config.json": 0o640, "model.safetensors": 0o640}


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_pretrained(tmp_path / "nope")


# ------------------------------------------------------------------------------ config layouts
def test_config_reads_v4_and_v5_layouts():
    v4 = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
          "rope_theta": 500000.0, "torch_dtype": "bfloat16",
          "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "torch_dtype", "rope_scaling")}
    v5["dtype"] = "bfloat16"
    v5["rope_parameters"] = {"rope_theta": 500000.0, **v4["rope_scaling"]}
    a, b = ModelConfig.from_hf(v4), ModelConfig.from_hf(v5)
    assert a == b
    assert a.rope_type == "llama3" and a.rope_factor == 32.0 and a.rope_theta == 500000.0
    assert a.param_dtype == jnp.bfloat16 and a.head_dim == 4
    qwen3 = ModelConfig.from_hf({**v5, "model_type": "qwen3", "head_dim": 24})
    assert qwen3.qk_norm and qwen3.head_dim == 24 and not qwen3.attention_bias
    assert ModelConfig.from_hf({**v5, "model_type": "qwen2"}).attention_bias


def test_real_model_configs_parse(shared_data):
    for name in ("Qwen2.5-0.5B-Instruct.json", "Llama-3.2-1B-Instruct.json"):
        config = ModelConfig.from_hf(shared_data / "model_configs" / name)
        hf_count = {"qwen2": 494032768, "llama": 1235814400}[config.model_type]
        assert config.num_params() == hf_count, (name, config.num_params())
        assert len(expand_table(config)) == {"qwen2": 290, "llama": 146}[config.model_type]


def test_tokenizer_is_copied_on_export(hf_model_dir, qwen_tokenizer, tmp_path):
    ours = load_pretrained(hf_model_dir("qwen2"))
    save_pretrained(ours, tmp_path / "with_tok", tokenizer=qwen_tokenizer)
    tok = load_tokenizer(tmp_path / "with_tok")
    text = "Natalia sold 48/2 = <<48/2=24>>24 clips in May."
    assert tok(text)["input_ids"] == qwen_tokenizer(text)["input_ids"]
