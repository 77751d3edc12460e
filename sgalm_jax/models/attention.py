"""Self-attention kernels chosen by platform: XLA everywhere, splash (Pallas) on TPU, cuDNN on GPU.

``model.attention`` (:class:`~sgalm_jax.models.config.ModelConfig`) picks one:

``auto`` (default)
    TPU: splash attention; GPU: cuDNN flash attention (bf16/fp16); CPU: XLA. Where the chosen
    kernel does not cover a case (see below), XLA.
``xla``
    ``jax.nn.dot_product_attention`` with a dense [B, 1, T, S] boolean mask: it materialises the
    [B, H, T, S] float32 scores (and their gradient).
``splash``
    ``jax.experimental.pallas.ops.tpu.splash_attention``: blockwise, never materialises the scores,
    and skips fully masked blocks. Every mask of the training path is expressed as its mask object
    plus segment ids: causal (``CausalMask``), or a sliding window as ``LocalMask((window - 1, 0))``;
    padding and packed examples as ``SegmentIds`` (the model's ``attention_mask`` segment ids: 0 =
    padding, k = packed example k). Padding tokens then attend among themselves instead of to
    nothing; their outputs are never read (every loss and score masks them), and real tokens see
    exactly the keys the XLA mask gives them. Needs the sequence length to be a multiple of 128
    (the kernel's block size); other lengths use XLA. On CPU it runs in Pallas interpret mode
    (slow; for tests). Under a multi-device mesh the kernel must run inside ``shard_map``: it is
    wrapped automatically when the mesh is set as JAX's context mesh (``jax.set_mesh``; the train
    steps and scorers of this library do so, see :func:`sgalm_jax.sharding.jit_on_mesh`), batch
    over ``('data', 'fsdp')`` and heads over ``'tensor'``; on several TPU devices without a context
    mesh, XLA attention is used instead (with a warning).
``cudnn``
    ``jax.nn.dot_product_attention(implementation="cudnn")`` with the same dense mask as XLA (cuDNN
    turns it into a bias), for bf16/fp16 compute and head_dim <= 128; otherwise XLA. **Untested
    here** (no GPU on the development machines): its selection logic is tested, the kernel is not.

The decode and prefill paths with a KV cache always use the XLA attention of
:mod:`sgalm_jax.models.transformer` (one query block against the whole cache).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sgalm_jax.errors import ConfigError

log = logging.getLogger(__name__)

from sgalm_jax.models.config import ATTENTION_IMPLS  # noqa: E402  (re-exported)
from sgalm_jax.models.partitioning import LOGICAL_RULES  # noqa: E402
# The mesh axes a shard_mapped kernel splits the batch and the heads over (the logical rules).
BATCH_MESH_AXES = LOGICAL_RULES["batch"]
HEAD_MESH_AXIS = LOGICAL_RULES["heads"]
SPLASH_BLOCK = 128  # the sequence length must be a multiple of this


def current_platform() -> str:
    """The platform programs are being built for: the context mesh's (``jax.set_mesh``, e.g. a TPU
    topology compiled for on a CPU host), else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        platform = getattr(getattr(mesh, "abstract_device", None), "platform", None)
        if platform:
            return str(platform)
    return jax.default_backend()


_warned: set[tuple] = set()


def _fallback(requested: str, why: str) -> str:
    if (requested, why) not in _warned:
        _warned.add((requested, why))
        log.warning("model.attention=%r: %s; using XLA attention", requested, why)
    return "xla"


def resolve_attention(requested: str, *, platform: str, dtype: Any, seq_len: int, head_dim: int
                      ) -> str:
    """The kernel that runs: ``'xla'``, ``'splash'`` or ``'cudnn'`` (see the module docstring).

    ``requested`` is ``model.attention``; ``platform`` 'cpu', 'gpu'/'cuda'/'rocm' or 'tpu'. An
    explicit request a case cannot use (wrong platform, dtype or shape) falls back to XLA with a
    warning (once per reason); ``auto`` falls back silently.
    """
    if requested not in ATTENTION_IMPLS:
        raise ConfigError(f"model.attention: {requested!r} is not one of {ATTENTION_IMPLS}")
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    if requested == "xla":
        return "xla"
    if requested == "auto":
        requested_kind = {"tpu": "splash", "gpu": "cudnn"}.get(platform)
        if requested_kind is None:
            return "xla"
        quiet = True
    else:
        requested_kind, quiet = requested, False
    if requested_kind == "splash":
        if platform not in ("tpu", "cpu"):
            why = f"splash attention is a TPU kernel (platform {platform})"
        elif seq_len % SPLASH_BLOCK:
            why = f"sequence length {seq_len} is not a multiple of {SPLASH_BLOCK}"
        else:
            return "splash"
    else:  # cudnn
        if platform != "gpu":
            why = f"cuDNN attention needs a GPU (platform {platform})"
        elif jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            why = f"cuDNN flash attention needs bf16/fp16 compute, not {jnp.dtype(dtype).name}"
        elif head_dim > 128 or head_dim % 8:
            why = f"head_dim {head_dim} is not a multiple of 8 up to 128"
        else:
            return "cudnn"
    return "xla" if quiet else _fallback(requested, why)


# ------------------------------------------------------------------------------------ splash
def _splash_kernel(seq_len: int, num_heads: int, window: int | None, block: int,
                   interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk, splash_attention_mask as sm)

    shape = (seq_len, seq_len)
    if window:  # keys k with q - window < k <= q
        one = sm.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    else:
        one = sm.CausalMask(shape)
    mask = sm.MultiHeadMask([one] * num_heads)
    # Built per trace, not cached: the kernel holds its mask tables as arrays of the trace (under
    # shard_map they are values of the manual computation).
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _splash_block(seq_len: int) -> int:
    for b in (512, 256, SPLASH_BLOCK):
        if seq_len % b == 0:
            return b
    raise ValueError(f"splash attention: sequence length {seq_len} is not a multiple of "
                     f"{SPLASH_BLOCK}")


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *,
                     scale: float, sliding_window: int | None = None,
                     interpret: bool | None = None, block: int | None = None) -> jax.Array:
    """Causal (or sliding-window) attention of q [B, T, H, D] over k, v [B, T, KV, D] with segment
    ids [B, T] (0 = padding, k = packed example k): tokens attend only within their segment.

    Returns [B, T, H, D] in q's dtype. ``interpret`` defaults to True off TPU (Pallas interpret
    mode). Inside a context mesh with more than one device the kernel runs under ``shard_map``
    (batch over ('data', 'fsdp'), heads over 'tensor' where they divide).
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    if interpret is None:
        interpret = current_platform() != "tpu"
    block = block or _splash_block(t)
    segments = segments.astype(jnp.int32)

    def local(q, k, v, seg):
        from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

        kernel = _splash_kernel(t, q.shape[2], sliding_window, block, bool(interpret))
        qh = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)  # [B, H, T, D]
        kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, SegmentIds(q=s1, kv=s1)))(
            qh, kh, vh, seg)
        return out.transpose(0, 2, 1, 3).astype(q.dtype)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, segments)
    from jax.sharding import PartitionSpec as P

    batch_axes = tuple(a for a in BATCH_MESH_AXES if a in mesh.shape and mesh.shape[a] > 1)
    if batch_axes and b % int(np.prod([mesh.shape[a] for a in batch_axes])):
        batch_axes = ()
    tp = mesh.shape.get(HEAD_MESH_AXIS, 1)
    head_axis = HEAD_MESH_AXIS if tp > 1 and h % tp == 0 and kvh % tp == 0 else None
    batch_spec = batch_axes or None
    qspec = P(batch_spec, None, head_axis, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(qspec, qspec, qspec, P(batch_spec, None)),
                         out_specs=qspec, check_vma=False)(q, k, v, segments)


# ------------------------------------------------------------------------------------ dispatch
def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array,
                   segments: jax.Array, scale: float, sliding_window: int | None,
                   requested: str) -> jax.Array:
    """Attention of the uncached (training, scoring) forward: q [B, T, H, D], k/v [B, T, KV, D].

    ``mask`` [B, 1, T, T] is the dense boolean mask (causal, window, padding, segments) the XLA and
    cuDNN paths use; ``segments`` [B, T] the segment ids splash uses instead.
    """
    platform = current_platform()
    impl = resolve_attention(requested, platform=platform, dtype=q.dtype,
                             seq_len=q.shape[1], head_dim=q.shape[-1])
    if (impl == "splash" and platform == "tpu" and jax.sharding.get_abstract_mesh().empty
            and jax.device_count() > 1):
        # A Pallas TPU kernel cannot be partitioned by GSPMD: without a context mesh to shard_map
        # over, several devices would fail to compile. Jitted callers should use jit_on_mesh.
        impl = _fallback(requested, "no context mesh (jax.set_mesh / sharding.jit_on_mesh) to "
                                    "run the kernel per device on")
    if impl == "splash":
        return splash_attention(q, k, v, segments, scale=scale, sliding_window=sliding_window)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                            implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
