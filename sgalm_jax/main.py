"""Command line: ``python -m sgalm_jax.main [--config configs/X.py] [--config.key=value ...]``.

Steps: load the config file (default: the embedded base config, whose algorithm is ``demo``) and
apply the overrides (ml_collections ``config_flags``); validate every key and type; look up
``config.algorithm`` in :mod:`sgalm_jax.algorithms`; initialise multi-host JAX when launched on
several hosts; run the algorithm's own checks (model and data paths, mesh and batch sizes); write
the resolved ``config.json`` to the run directory; run. All of this happens before anything is
compiled, and a bad config exits with status 2 and a message naming the key.

Other flags: ``--describe`` prints every config key with its default and description.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Sequence

from sgalm_jax.errors import ConfigError, SgalmError

log = logging.getLogger("sgalm_jax")

_BASE_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")


def _override_keys(argv: Sequence[str]) -> list[str]:
    keys = []
    for arg in argv:
        if arg.startswith("--config."):
            keys.append(arg[len("--config."):].split("=", 1)[0])
    return keys


def parse_config(argv: Sequence[str]) -> Any:
    """The config from ``--config FILE`` and ``--config.key=value`` overrides in ``argv``.

    ``argv[0]`` is the program name. Raises ConfigError naming the key or file at fault.
    """
    from absl import flags
    from ml_collections import config_flags

    from sgalm_jax import config as cfg
    from sgalm_jax.algorithms import load_builtin_algorithms

    load_builtin_algorithms()  # their config sections: the schema the file and overrides meet
    argv = list(argv)
    for key in _override_keys(argv[1:]):
        cfg.check_key(key)
    known_prefixes = ("--config", "--describe", "--help", "-h")
    for arg in argv[1:]:
        if arg.startswith("-") and not arg.startswith(known_prefixes):
            raise ConfigError(f"{arg.split('=')[0]}: unknown flag (use --config=FILE and "
                              "--config.KEY=VALUE)")
    file_arg = None
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            file_arg = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            file_arg = argv[i + 1]
    if file_arg is not None and not os.path.isfile(file_arg.split(":", 1)[0]):
        raise ConfigError(f"--config: config file {file_arg!r} not found")

    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", default=_BASE_CONFIG_FILE, flag_values=fv,
                                             lock_config=True, sys_argv=argv)
    flags.DEFINE_boolean("describe", False, "print every config key and exit", flag_values=fv)
    try:
        fv(argv)
        config = holder.value
    except flags.Error as e:  # wrong type in an override: absl names the flag (--config.KEY)
        raise ConfigError(str(e).replace("flag --config.", "")) from None
    except (OSError, ImportError, SyntaxError, AttributeError, TypeError, KeyError) as e:
        raise ConfigError(f"--config {file_arg or _BASE_CONFIG_FILE}: cannot load the config "
                          f"({type(e).__name__}: {e})") from None
    if fv["describe"].value:
        print(cfg.describe())
        raise SystemExit(0)
    return config


def resolve_workdir(config: Any) -> str:
    """``config.workdir`` or ``runs/<algorithm>``, absolute."""
    return os.path.abspath(config.workdir or os.path.join("runs", config.algorithm))


def prepare(argv: Sequence[str]) -> tuple[Any, Any, str]:
    """Parse and validate; returns ``(config, algorithm, workdir)``. Initialises multi-host JAX."""
    from sgalm_jax import config as cfg
    from sgalm_jax.algorithms import get_algorithm
    from sgalm_jax.training.distributed import maybe_initialize

    config = parse_config(argv)
    cfg.validate_config(config)
    algorithm = get_algorithm(config.algorithm)
    maybe_initialize(config.distributed)
    if algorithm.validate is not None:
        algorithm.validate(config)
    workdir = resolve_workdir(config)
    config.unlock()
    config.workdir = workdir
    config.lock()
    return config, algorithm, workdir


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    logging.basicConfig(level=os.environ.get("SGALM_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config, algorithm, workdir = prepare(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    import jax

    from sgalm_jax.config import save_config

    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        save_config(config, os.path.join(workdir, "config.json"))
    log.info("algorithm %s, workdir %s", config.algorithm, workdir)
    try:
        algorithm(config, workdir)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except SgalmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
