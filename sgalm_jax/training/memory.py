"""Memory per device of a config's roles, computed from shapes and shardings (nothing compiled).

For each role layout (full fine-tuning, or LoRA adapters on one shared frozen base) this adds up,
per device: the weights each role holds (sharded by the same logical-axis rules the run uses, on a
mesh of the config's shape), their gradients and optimizer state, frozen copies (a KL reference
snapshot), and an estimate of the activations of one micro-batch and of the sampler's KV cache.
Weights, gradients and optimizer state are exact for the params' shapes and dtypes; activations and
the KV cache are estimates (formulas below) and say so. ``python -m sgalm_jax.tools.memory`` prints
the table for a config file; docs/lora.md lists it for the shipped configs.

Role layouts (what each algorithm holds on the devices):

- ``sgalm``: one learner (variant ``full``/``d_only``/``g_only``) or two (``two_models``);
- ``grpo``: the policy, plus a frozen reference snapshot when ``grpo.beta > 0``;
- ``selfplay``: the policy (the reference is a view: scored once per iteration, no copy);
- ``sft``: one learner;
- ``gad``: student and discriminator (a scorer: the same body, a scalar head), plus a frozen
  reference snapshot of the student in its GAD stage (``gad.beta > 0``); with LoRA the reference
  is counted as a snapshot of the student's adapters (what a stage started from a warmup holds;
  without a warmup it is the base itself, no weights).

With LoRA the base is held once (``lora.base_dtype``), each learner is its adapters (plus a
scorer's head) with gradients and optimizer state for those only, a reference of the start model
is the base itself (no weights) and a snapshot of a learner copies its adapters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
from flax import nnx

from sgalm_jax.config import resolve_mesh
from sgalm_jax.models import CausalLM, ModelConfig, ScoreModel
from sgalm_jax.models import lora as L
from sgalm_jax.models.config import resolve_dtype
from sgalm_jax.sharding import logical_to_spec

GiB = 2 ** 30
# Optimizer state per param, in units of the param's own size.
_OPT_SLOTS = {"adamw": 2, "rmsprop": 1, "sgd": 0}


@dataclasses.dataclass
class _Mesh:
    """Enough of a Mesh for logical_to_spec (axis sizes only; no devices needed)."""

    shape: dict[str, int]


@dataclasses.dataclass
class Line:
    role: str
    part: str
    bytes: float  # per device
    exact: bool = True


def _per_device(state: Any, mesh: _Mesh, dtype: Any = None) -> float:
    total = 0.0
    for _, var in nnx.to_flat_state(state):
        value = var.get_value()
        axes = var.get_metadata().get("logical_axes")
        spec = logical_to_spec(axes, value.shape, mesh) if axes else ()
        split = 1
        for entry in spec:
            for axis in (entry if isinstance(entry, tuple) else (entry,)):
                split *= mesh.shape[axis] if axis else 1
        size = jnp.dtype(dtype or value.dtype).itemsize
        total += math.prod(value.shape) * size / split
    return total


def _abstract(cls: type, mcfg: ModelConfig, spec: L.LoraSpec | None) -> nnx.State:
    def make():
        model = cls(mcfg, rngs=nnx.Rngs(0))
        if spec is not None:
            L.add_adapters(model, spec)
        return model

    return nnx.state(nnx.eval_shape(make), nnx.Param)


def roles_of(config: Any) -> tuple[list[tuple[str, str]], list[str]]:
    """([(learner name, 'lm' or 'scorer')], [frozen snapshot names of the first learner])."""
    algo = config.algorithm
    if algo == "sgalm":
        two = config.sgalm.variant == "two_models"
        return ([("generator", "lm"), ("discriminator", "lm")] if two else [("model", "lm")]), []
    if algo == "grpo":
        return [("policy", "lm")], (["reference"] if config.grpo.beta > 0 else [])
    if algo == "gad":
        ref = config.gad.stage == "gad" and config.gad.beta > 0
        return [("student", "lm"), ("discriminator", "scorer")], (["reference"] if ref else [])
    return [("policy" if algo == "selfplay" else "model", "lm")], []


def _tokens(config: Any) -> int:
    if config.algorithm == "grpo":
        return int(config.grpo.max_prompt_length + config.grpo.max_new_tokens)
    return int(config.data.max_length)


def _step_rows(config: Any) -> tuple[int, int, int]:
    """(sequences per micro-batch through the layers, sequences whose log-probs are computed,
    log-prob chunk length; 0 = every position), over all devices."""
    algo, micro = config.algorithm, config.train.batch_size // config.train.grad_accum_steps
    if algo == "sgalm":  # D step: every row, one position through the head; G step: half
        return micro, micro // 2, int(config.sgalm.logprob_chunk_size)
    if algo == "selfplay":  # pairs: the real and the synthetic response of each
        k = 1 + int(config.selfplay.num_samples)
        return micro * k, micro * k, int(config.selfplay.logprob_chunk_size)
    if algo == "grpo":
        return micro, micro, int(config.grpo.logprob_chunk_size)
    if algo == "gad":  # the larger of the student's micro-batch and D's (prompt groups of 1 + G)
        g = config.gad
        prompts = config.train.batch_size * g.num_minibatches // g.num_generations
        d_micro = prompts // (int(g.d_grad_accum_steps) or config.train.grad_accum_steps)
        return max(micro, d_micro * (1 + g.num_generations)), micro, int(g.logprob_chunk_size)
    return micro, micro, int(config.sft.logits_chunk_size)


def activation_estimate(config: Any, mcfg: ModelConfig, mesh: _Mesh) -> float:
    """Bytes per device of one micro-batch's activations in a train step (an estimate, the same
    with and without LoRA): with remat, every layer's input [B, T, D] plus one layer's working set
    (projections, MLP, the attention probabilities [B, H, T, T] in float32 as XLA's attention
    materialises them); without remat, every layer's working set; plus the log-prob chunk's float32
    logits and their gradient. B: the micro-batch's rows on one device."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    tp = mesh.shape["tensor"]
    rows, lp_rows, chunk = _step_rows(config)
    rows, lp_rows = max(1, math.ceil(rows / dp)), max(1, math.ceil(lp_rows / dp))
    t, d, n = _tokens(config), mcfg.hidden_size, mcfg.num_hidden_layers
    act = jnp.dtype(resolve_dtype(config.model.dtype)).itemsize
    q = mcfg.num_attention_heads * mcfg.head_dim
    kv = mcfg.num_key_value_heads * mcfg.head_dim
    layer = rows * t * (4 * d + (2 * q + 2 * kv + 3 * mcfg.intermediate_size) / tp) * act
    layer += rows * mcfg.num_attention_heads / tp * t * t * 4
    saved = n * rows * t * d * act
    logits = 2 * lp_rows * (chunk or t) * mcfg.vocab_size / tp * 4
    return (saved + layer if config.model.remat != "none" else n * layer) + logits


def kv_cache_estimate(config: Any, mcfg: ModelConfig, mesh: _Mesh) -> float:
    """Bytes per device of the sampler's KV cache for one generation batch (an estimate)."""
    algo = config.algorithm
    if algo == "grpo":
        rows = config.train.batch_size * config.grpo.num_minibatches
    elif algo == "sgalm":
        rows = config.sgalm.sample_batch_size
    elif algo == "selfplay":
        rows = config.selfplay.generation_batch_size
    elif algo == "gad":
        rows = config.gad.rollout_batch_size or config.train.batch_size * config.gad.num_minibatches
    else:
        return 0.0
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    kv_split = mesh.shape["tensor"] if mcfg.num_key_value_heads % mesh.shape["tensor"] == 0 else 1
    act = jnp.dtype(resolve_dtype(config.model.dtype)).itemsize
    per_token = 2 * mcfg.num_hidden_layers * mcfg.num_key_value_heads * mcfg.head_dim * act
    return math.ceil(rows / dp) * _tokens(config) * per_token / kv_split


def estimate(config: Any, mcfg: ModelConfig, num_devices: int, *, lora: bool) -> list[Line]:
    """Per-device memory of ``config``'s role states (full fine-tuning, or LoRA with ``lora``):
    exact for the params' shapes, dtypes and shardings."""
    mesh = _Mesh(resolve_mesh(config, num_devices))
    param_dtype = resolve_dtype(config.model.param_dtype)
    slots = _OPT_SLOTS[config.optimizer.name] + (1 if config.optimizer.momentum else 0)
    accum = config.train.grad_accum_steps > 1
    learners, snapshots = roles_of(config)
    lines: list[Line] = []
    mcfg_p = dataclasses.replace(mcfg, param_dtype=param_dtype)

    def trained(name: str, state: nnx.State) -> None:
        w = _per_device(state, mesh)
        lines.append(Line(name, "trained weights", w))
        lines.append(Line(name, "gradients" + (" (+ fp32 accumulator)" if accum else ""),
                          w + (_per_device(state, mesh, jnp.float32) if accum else 0.0)))
        lines.append(Line(name, f"optimizer state ({config.optimizer.name})", slots * w))

    if not lora:
        for name, kind in learners:
            trained(name, _abstract(ScoreModel if kind == "scorer" else CausalLM, mcfg_p, None))
        for name in snapshots:
            lines.append(Line(name, "frozen copy", _per_device(_abstract(CausalLM, mcfg_p, None),
                                                                mesh)))
        return lines
    spec = L.LoraSpec(rank=int(config.lora.rank), alpha=float(config.lora.alpha),
                      targets=str(config.lora.targets))
    base_dtype = resolve_dtype(config.lora.base_dtype or config.model.param_dtype)
    base = _abstract(CausalLM, dataclasses.replace(mcfg, param_dtype=base_dtype), None)
    lines.append(Line("base", f"frozen base ({jnp.dtype(base_dtype).name}, shared)",
                      _per_device(base, mesh)))
    for name, kind in learners:
        full = _abstract(ScoreModel if kind == "scorer" else CausalLM, mcfg_p, spec)
        adapters, rest = L.split_adapters(full)
        head = nnx.from_flat_state({p: v for p, v in nnx.to_flat_state(rest) if p[0] == "score"})
        trained(name, nnx.merge_state(adapters, head))
    for name in snapshots:  # GAD's reference copies the student's adapters; GRPO's is the base
        if config.algorithm == "gad":
            adapters = L.split_adapters(_abstract(CausalLM, mcfg_p, spec))[0]
            lines.append(Line(name, "frozen adapters", _per_device(adapters, mesh)))
        else:
            lines.append(Line(name, "view of the base (no weights)", 0.0))
    return lines


def total(lines: list[Line]) -> float:
    return sum(x.bytes for x in lines)


def table(config: Any, mcfg: ModelConfig, num_devices: int) -> str:
    """A markdown table: full fine-tuning vs LoRA, GiB per device, for ``num_devices``."""
    full = estimate(config, mcfg, num_devices, lora=False)
    lora = estimate(config, mcfg, num_devices, lora=True)
    mesh = _Mesh(resolve_mesh(config, num_devices))
    act = activation_estimate(config, mcfg, mesh)
    kv = kv_cache_estimate(config, mcfg, mesh)
    out = [f"Memory per device (GiB), computed from shapes and shardings (not compiled): "
           f"{num_devices} device(s), mesh {mesh.shape}", "",
           "| layout | role | part | GiB |", "|---|---|---|---|"]
    for name, lines in (("full", full), ("LoRA", lora)):
        for x in lines:
            out.append(f"| {name} | {x.role} | {x.part} | {x.bytes / GiB:.3f} |")
        out.append(f"| {name} | **states** | weights, gradients, optimizer state | "
                   f"**{total(lines) / GiB:.2f}** |")
    out.append(f"| both | (step) | activations of one micro-batch (estimate) | {act / GiB:.2f} |")
    if kv:
        out.append(f"| both | (sampler) | KV cache of one generation batch (estimate) | "
                   f"{kv / GiB:.2f} |")
    saved = total(full) - total(lora)
    out += ["", f"LoRA saves {saved / GiB:.2f} GiB per device of role states "
                f"({100 * saved / total(full):.0f}%); with the activation and KV-cache estimates "
                f"the totals are {(total(full) + act + kv) / GiB:.1f} GiB (full) and "
                f"{(total(lora) + act + kv) / GiB:.1f} GiB (LoRA)."]
    return "\n".join(out)


__all__ = ["Line", "activation_estimate", "estimate", "kv_cache_estimate", "roles_of", "table",
           "total"]
