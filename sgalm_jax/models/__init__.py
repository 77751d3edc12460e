"""Decoder models: one Flax NNX transformer for Qwen2/Qwen2.5, Qwen3 and Llama 3.x, plus HF I/O."""

from sgalm_jax.models.config import ModelConfig
from sgalm_jax.models.transformer import CausalLM, KVCache, positions_from_mask
from sgalm_jax.models.hf import load_pretrained, load_tokenizer, save_pretrained

__all__ = [
    "CausalLM",
    "KVCache",
    "ModelConfig",
    "load_pretrained",
    "load_tokenizer",
    "positions_from_mask",
    "save_pretrained",
]
