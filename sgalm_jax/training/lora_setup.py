"""LoRA runs from the config: the ``lora`` section, the shared frozen base and the adapter roles.

With ``lora.enabled``, an algorithm declares one frozen role ``base`` (``model.path`` or
``model.init``, stored in ``lora.base_dtype``, never checkpointed: it is read again on resume) and
its learners as adapter sets on it (:meth:`LoraSetup.learner`); a KL reference is a view of the
base (the adapters switched off, no weights of its own). What each role trains, stores in
checkpoints and keeps optimizer state for is its adapters (and a scorer's head) only; see
:mod:`sgalm_jax.training.roles` and docs/lora.md.

    lora = LoraSetup(config, mesh, model_config)
    lora.declare_base(roles)                                   # "base": frozen, saved=False
    lora.learner(roles, "policy", optimizer, schedule=lr, seed=config.seed)
    roles.view("reference", of="base")
    ...
    lora.export(roles["policy"].model(), workdir, "export", tokenizer=tok)   # merged + PEFT
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from sgalm_jax import sharding as sh
from sgalm_jax.config import register_section
from sgalm_jax.errors import ConfigError
from sgalm_jax.models import CausalLM, ModelConfig, ScoreModel
from sgalm_jax.models import lora as L
from sgalm_jax.models.config import resolve_dtype
from sgalm_jax.models.peft import PeftAdapter, read_peft_adapter, save_peft_adapter
from sgalm_jax.models.score import init_head_kernel
from sgalm_jax.training.state import split_model

log = logging.getLogger(__name__)

register_section("lora", {
    "enabled": (False, "train LoRA adapters on a frozen base instead of every weight; the "
                       "run's roles share that one base (docs/lora.md)"),
    "rank": (8, "adapter rank r"),
    "alpha": (16.0, "adapter scale: the update is (alpha / rank) * x A B"),
    "dropout": (0.0, "dropout on the adapters' input in train steps (0 = off; sampling and "
                     "scoring never drop)"),
    "targets": (L.TARGETS_ALL, "regex searched in linear-layer paths such as "
                               "model/layers/3/self_attn/q_proj; matching layers get adapters "
                               "(heads cannot)"),
    "rslora": (False, "scale alpha / sqrt(rank) (rank-stabilised LoRA) instead of "
                      "alpha / rank"),
    "base_dtype": ("", "storage dtype of the frozen base ('' = model.param_dtype); bfloat16 "
                       "halves it while the adapters keep model.param_dtype"),
    "adapter_path": ("", "a PEFT adapter folder (adapter_config.json + "
                         "adapter_model.safetensors) to start from; its rank, alpha and layers "
                         "replace lora.rank, lora.alpha and lora.targets"),
    "export_adapter": (True, "at the end also write each trained adapter set in PEFT's format "
                             "(workdir/export_adapter, ...) besides the merged HF export"),
}, owner=__name__)

# Algorithms whose roles are built with LoraSetup (others reject lora.enabled before compiling).
_SUPPORTED: set[str] = {"sgalm", "selfplay", "grpo"}


def mark_supported(algorithm: str) -> None:
    """Declare that ``algorithm`` builds its roles with :class:`LoraSetup` (``lora.enabled``
    is then accepted for it)."""
    _SUPPORTED.add(algorithm)


def check_supported(config: Any) -> None:
    """ConfigError when ``lora.enabled`` is set for an algorithm that does not use it."""
    if config.lora.enabled and config.algorithm not in _SUPPORTED:
        raise ConfigError(f"lora.enabled: algorithm {config.algorithm!r} does not train LoRA "
                          f"adapters (those that do: {sorted(_SUPPORTED)})")


def lora_spec(config: Any) -> L.LoraSpec:
    """The :class:`~sgalm_jax.models.lora.LoraSpec` of the ``lora`` section (ConfigError naming
    the key)."""
    c = config.lora
    return L.LoraSpec(rank=int(c.rank), alpha=float(c.alpha), dropout=float(c.dropout),
                      targets=str(c.targets), rslora=bool(c.rslora))


def validate(config: Any, model_config: ModelConfig) -> None:
    """The ``lora`` section against the model (before anything is compiled)."""
    check_supported(config)
    if not config.lora.enabled:
        return
    spec = lora_spec(config)
    if config.lora.base_dtype:
        resolve_dtype(config.lora.base_dtype, "lora.base_dtype")
    abstract = nnx.eval_shape(lambda: CausalLM(model_config, rngs=nnx.Rngs(0)))
    if config.lora.adapter_path:
        if not os.path.isdir(config.lora.adapter_path):
            raise ConfigError(f"lora.adapter_path: {config.lora.adapter_path!r} is not a "
                              "directory")
        read_peft_adapter(config.lora.adapter_path, abstract)
    else:
        L.add_adapters(abstract, spec)


def _model_section(config: Any, param_dtype: str) -> Any:
    section = ml_collections.ConfigDict(config.model.to_dict())
    section.param_dtype = param_dtype
    return section


@dataclasses.dataclass
class LoraSetup:
    """One run's LoRA pieces: the base (graph, shapes, loader) and the adapted graphs.

    Attributes:
      spec: the adapters' :class:`LoraSpec` (from ``lora.adapter_path`` when set).
      base_graphdef, base_abstract: the plain :class:`CausalLM`'s graph and params shapes, in
        ``lora.base_dtype``: what the frozen ``base`` role holds.
      graphdef, abstract: the adapted causal LM's graph and (whole) params shapes.
    """

    config: Any
    mesh: Mesh | None
    model_config: ModelConfig
    spec: L.LoraSpec = None
    peft: PeftAdapter | None = None
    base_graphdef: Any = None
    base_abstract: Any = None
    graphdef: Any = None
    abstract: Any = None

    def __post_init__(self):
        cfg = self.config
        base_dtype = cfg.lora.base_dtype or cfg.model.param_dtype
        self.base_model_config = dataclasses.replace(
            self.model_config, param_dtype=resolve_dtype(base_dtype, "lora.base_dtype"))
        self.base_graphdef, self.base_abstract = split_model(
            nnx.eval_shape(lambda: CausalLM(self.base_model_config, rngs=nnx.Rngs(0))))
        self.spec = lora_spec(cfg)
        if cfg.lora.adapter_path:
            plain = nnx.eval_shape(lambda: CausalLM(self.model_config, rngs=nnx.Rngs(0)))
            self.peft = read_peft_adapter(cfg.lora.adapter_path, plain)
            self.spec = dataclasses.replace(self.peft.spec, dropout=float(cfg.lora.dropout))
            log.info("LoRA: starting from the PEFT adapter %s (r=%d, alpha=%g, %d layers)",
                     cfg.lora.adapter_path, self.spec.rank, self.spec.alpha,
                     len(self.peft.paths))
        self.graphdef, self.abstract = self.adapted(CausalLM, self.model_config)

    # ---------------------------------------------------------------- graphs
    def adapted(self, cls: type = CausalLM, model_config: ModelConfig | None = None
                ) -> tuple[Any, Any]:
        """``(graphdef, abstract params)`` of ``cls`` (CausalLM or ScoreModel) with this run's
        adapters."""
        mcfg = model_config or self.model_config
        paths = self.peft.paths if self.peft is not None else None

        def make():
            model = cls(mcfg, rngs=nnx.Rngs(0))
            L.add_adapters(model, self.spec, paths=paths)
            return model

        return split_model(nnx.eval_shape(make))

    def _shardings(self, tree: Any) -> Any:
        return None if self.mesh is None else sh.state_shardings(tree, self.mesh)

    # ---------------------------------------------------------------- values
    def load_base(self) -> Any:
        """The base params: ``model.path`` (or ``model.init`` from ``seed``) in
        ``lora.base_dtype``, placed in their shardings; bit-identical every time (resume)."""
        from sgalm_jax.training.model_setup import build_model

        cfg = self.config
        dtype = cfg.lora.base_dtype or cfg.model.param_dtype
        model = build_model(_model_section(cfg, dtype), mesh=self.mesh, seed=cfg.seed)
        return split_model(model)[1]

    def init_adapters(self, abstract: Any, seed: int) -> Any:
        """Adapter values for ``abstract`` (an adapter state): from ``lora.adapter_path`` when
        set, else fresh (PEFT's A init from ``seed``, B = 0), in their shardings."""
        adapters, _ = L.split_adapters(abstract)
        shardings = self._shardings(adapters)
        if self.peft is None:
            return L.init_adapters(adapters, seed, shardings)
        flat = []
        shard_flat = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
        for path, var in nnx.to_flat_state(adapters):
            want = var.get_value()
            value = jax.numpy.asarray(self.peft.values[path], want.dtype)
            if path in shard_flat:
                value = jax.device_put(value, shard_flat[path].get_value())
            flat.append((path, var.replace(value)))
        return nnx.from_flat_state(flat)

    # ---------------------------------------------------------------- roles
    def declare_base(self, roles: Any, name: str = "base") -> Any:
        """The frozen, unsaved base role (read again from ``model.path`` on resume)."""
        return roles.frozen(name, self.base_graphdef, self.base_abstract, saved=False,
                            init=self.load_base)

    def learner(self, roles: Any, name: str, optimizer: Any, *, schedule: Any = None,
                seed: int = 0, base: str = "base") -> Any:
        """A causal-LM learner made of adapters on ``base`` (fresh from ``seed``, or the PEFT
        adapter of ``lora.adapter_path``)."""
        return roles.learner(name, self.graphdef, self.abstract, optimizer, schedule=schedule,
                             seed=seed, base=base,
                             init=lambda: self.init_adapters(self.abstract, seed))

    def scorer(self, roles: Any, name: str, optimizer: Any, *, schedule: Any = None,
               seed: int = 0, base: str = "base",
               head: Callable[[], jax.Array] | None = None) -> Any:
        """A :class:`ScoreModel` learner (GAD's discriminator) on ``base``: its body is the
        base's (a causal-LM base's ``lm_head`` is not read), its own params are adapters (fresh
        from ``seed``) and the scalar head (``head()``, default normal(0, 0.02) from ``seed``,
        as :func:`~sgalm_jax.models.score.init_head_kernel`)."""
        graphdef, abstract = self.adapted(ScoreModel)

        def init():
            adapters = self.init_adapters(abstract, seed)
            _, rest = L.split_adapters(abstract)
            head_state = nnx.from_flat_state({p: v for p, v in nnx.to_flat_state(rest)
                                              if p[0] == "score"})
            kernel = head() if head is not None else init_head_kernel(self.model_config, seed)
            sharding = self._shardings(head_state)
            if sharding is not None:
                kernel = jax.device_put(kernel, sharding["score"]["kernel"].get_value())
            head_state["score"]["kernel"] = head_state["score"]["kernel"].replace(kernel)
            return nnx.merge_state(adapters, head_state)

        return roles.learner(name, graphdef, abstract, optimizer, schedule=schedule, seed=seed,
                             base=base, init=init)

    # ---------------------------------------------------------------- export
    def export_adapter(self, model: nnx.Module, path: str) -> str | None:
        """Write ``model``'s adapters in PEFT's format to ``path`` (when ``lora.export_adapter``);
        returns the path written, or None."""
        if not self.config.lora.export_adapter:
            return None
        save_peft_adapter(model, path, base_model_name_or_path=self.config.model.path)
        log.info("exported the adapters in PEFT's format to %s", path)
        return path


__all__ = ["LoraSetup", "check_supported", "lora_spec", "mark_supported", "validate"]
