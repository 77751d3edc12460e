"""What every training algorithm sets up first: the mesh, the tokenizer and the model's config.

One place for it, so SFT, SGALM and self-play resolve meshes, tokenizers and special token ids the
same way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
from jax.sharding import Mesh

from sgalm_jax import sharding as sh
from sgalm_jax.config import validate_for_devices
from sgalm_jax.models import ModelConfig
from sgalm_jax.training.model_setup import model_config
from sgalm_jax.training.tokenizer import BUILTIN_TINY, eos_token_id, load_tokenizer, pad_token_id

log = logging.getLogger(__name__)


def tokenizer_source(config: Any) -> str:
    """``tokenizer.path``, else the checkpoint's own directory (``model.path``)."""
    return config.tokenizer.path or config.model.path


@dataclasses.dataclass
class RunSetup:
    """The mesh, tokenizer, model config and special token ids of a run."""

    mesh: Mesh
    mesh_shape: dict[str, int]
    tokenizer: Any
    model_config: ModelConfig
    eos_id: int
    pad_id: int
    is_main: bool


def sampler_options(config: Any, default_rows: int | None = None) -> dict[str, Any]:
    """Keyword arguments of :class:`sgalm_jax.sampling.Sampler` from the config's ``sampling``
    section (defaults when the config has none).

    ``default_rows``: the algorithm's own bound on rows decoded at once (its sampling batch size),
    used when ``sampling.num_slots`` is 0; None = no bound. It becomes the continuous engine's slot
    count and the static engine's batch size, so both use the same memory.
    """
    s = config.get("sampling") if hasattr(config, "get") else getattr(config, "sampling", None)
    if s is None:
        return dict(max_batch_size=default_rows)
    return dict(engine=str(s.engine), max_batch_size=int(s.num_slots) or default_rows,
                prefill_chunk=int(s.prefill_chunk) or None, refill_min=int(s.refill_min) or None,
                min_slots=int(s.min_slots) or None,
                placement=str(s.placement), local_mesh_shape=dict(s.local_mesh) or None)


def setup_run(config: Any, workdir: str) -> RunSetup:
    """Check the config against the devices, build the mesh, load the tokenizer.

    The builtin tiny tokenizer is built deterministically; process 0 keeps a copy in the workdir.
    """
    mesh_shape = validate_for_devices(config, jax.device_count(), jax.process_count())
    mesh = sh.make_mesh(mesh_shape)
    log.info("mesh %s over %d devices (%s)", mesh_shape, jax.device_count(),
             jax.devices()[0].device_kind)
    is_main = jax.process_index() == 0
    source = tokenizer_source(config)
    cache = os.path.join(workdir, "tokenizer") if source == BUILTIN_TINY and is_main else None
    tokenizer = load_tokenizer(source, cache_dir=cache)
    mcfg = model_config(config.model)
    eos = eos_token_id(tokenizer, mcfg.eos_token_ids)
    return RunSetup(mesh=mesh, mesh_shape=mesh_shape, tokenizer=tokenizer, model_config=mcfg,
                    eos_id=eos, pad_id=pad_token_id(tokenizer, eos), is_main=is_main)
