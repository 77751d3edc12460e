"""Decoder models: one Flax NNX transformer for Qwen2/Qwen2.5, Qwen3, Llama 3.x and Mistral, as a
causal LM or a scalar sequence scorer (GAD's discriminator), plus HF I/O, LoRA adapters
(:mod:`~sgalm_jax.models.lora`) and their PEFT-format I/O (:mod:`~sgalm_jax.models.peft`)."""

from sgalm_jax.models.config import ModelConfig
from sgalm_jax.models.transformer import CausalLM, KVCache, positions_from_mask
from sgalm_jax.models.hf import (load_pretrained, load_score_model, load_tokenizer,
                                 save_pretrained, save_score_model)
from sgalm_jax.models.score import (ScoreModel, last_token_index, make_score_fn,
                                    score_model_from_causal_lm, segment_last_index)

__all__ = [
    "CausalLM",
    "KVCache",
    "LoraSpec",
    "add_adapters",
    "load_peft_adapter",
    "merge_adapters",
    "save_peft_adapter",
    "split_adapters",
    "ModelConfig",
    "ScoreModel",
    "last_token_index",
    "load_score_model",
    "make_score_fn",
    "save_score_model",
    "score_model_from_causal_lm",
    "segment_last_index",
    "load_pretrained",
    "load_tokenizer",
    "positions_from_mask",
    "save_pretrained",
]
