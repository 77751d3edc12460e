"""Print a config's memory per device, full fine-tuning vs LoRA (computed, nothing compiled).

    python -m sgalm_jax.tools.memory --config configs/qwen3b_gsm8k_two_models_lora.py \
        --devices=1 --arch=qwen2.5-3b [--config.KEY=VALUE ...]

``--devices``: the device count the mesh is resolved for (default 1). ``--arch``: a preset of
:data:`sgalm_jax.config.MODEL_PRESETS` giving the model's shapes when ``model.path`` is not a
checkpoint here (default: ``model.path``'s config.json, else ``model.init``, else the config's
``model.architecture``). See
:mod:`sgalm_jax.training.memory` for what is exact and what is estimated.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from sgalm_jax.errors import ConfigError
    from sgalm_jax.main import parse_config
    from sgalm_jax.training.memory import table
    from sgalm_jax.training.model_setup import model_config

    argv = list(sys.argv if argv is None else argv)
    devices, arch, rest = 1, "", [argv[0]]
    for arg in argv[1:]:
        if arg.startswith("--devices="):
            devices = int(arg.split("=", 1)[1])
        elif arg.startswith("--arch="):
            arch = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    try:
        config = parse_config(rest)
        config.unlock()
        if not arch and not config.model.init and not os.path.isfile(
                os.path.join(config.model.path or "", "config.json")):
            arch = config.model.architecture  # the shape a config names for its checkpoint
        if arch:
            config.model.path, config.model.init = "", arch
        mcfg = model_config(config.model)
        print(table(config, mcfg, devices))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
