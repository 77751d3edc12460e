"""Command line: ``python -m sgalm_jax.main [--config configs/X.py] [--config.key=value ...]``.

Steps: load the config file (default: the embedded base config, whose algorithm is ``demo``) and
apply the overrides (ml_collections ``config_flags``); validate every key and type; look up
``config.algorithm`` in :mod:`sgalm_jax.algorithms`; initialise multi-host JAX when launched on
several hosts; run the algorithm's own checks (model and data paths, mesh and batch sizes); write
the resolved ``config.json`` to the run directory; run. All of this happens before anything is
compiled, and a bad config exits with status 2 and a message naming the key.

Failures end in one line on stderr, never a traceback: ``config error: ...`` (status 2) for the
config, ``error: ...`` (status 1) for everything the run meets later: a diverged loss
(:class:`~sgalm_jax.errors.NonFiniteError`), bad data, an unusable or busy run directory, a full
disk, a corrupt checkpoint. Before the message is printed, every checkpointer (Orbax threads) and
metric writer still open is closed. The run directory is checked and locked
(:mod:`sgalm_jax.training.workdir`) for the run's lifetime, so two runs never share one.

Other flags: ``--describe`` prints every config key with its default and description.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import traceback
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


def _load_config_file(spec: str) -> Any:
    """``get_config()`` of ``FILE[:ARG]``, run here first so that its failures are reported as the
    config file's (cause and line, no traceback) and not confused with a failing override."""
    import ml_collections

    path, _, arg = spec.partition(":")
    where = f"--config {path}"
    full = os.path.abspath(path)
    try:
        module_spec = importlib.util.spec_from_file_location("_sgalm_config_file", full)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{where}: the file defines no get_config() function")
        config = module.get_config(*([arg] if arg else []))
    except ConfigError as e:
        if str(e).startswith(where):
            raise
        raise ConfigError(f"{where}: {e}") from None
    except SyntaxError as e:
        raise ConfigError(f"{where}:{e.lineno}: SyntaxError: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - user code may raise anything: report it in one line
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if os.path.abspath(f.filename) == full]
        line = f" (line {frames[-1].lineno})" if frames else ""
        raise ConfigError(f"{where}: get_config() failed{line}: {type(e).__name__}: {e}") from None
    if not isinstance(config, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f"{where}: get_config() returned {type(config).__name__}, not a "
                          "ConfigDict (start from sgalm_jax.config.base_config())")
    return config


def _missing_override(config: Any, keys: Sequence[str]) -> str | None:
    """The first override key that names nothing in ``config`` (free-form sections only hold the
    keys the config file gave them, and an override cannot add one), as an error message."""
    from sgalm_jax import config as cfg

    for key in keys:
        node = config
        for i, part in enumerate(key.split(".")):
            if not hasattr(node, "keys") or part not in node.keys():
                parent = ".".join(key.split(".")[:i])
                if parent in cfg.FREE_FORM_KEYS or any(parent.startswith(f + ".")
                                                       for f in cfg.FREE_FORM_KEYS):
                    return (f"{key}: not in the config, and an override can only change a key "
                            f"that exists ({parent} is free-form and holds the keys the config "
                            f"file gives it: add {part!r} there)")
                return f"{key}: no such key in the config to override"
            node = node[part]
    return None


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
    loaded = cfg.get_config() if file_arg is None else None  # the embedded default
    if file_arg is not None:
        path = file_arg.split(":", 1)[0]
        if os.path.isdir(path):
            raise ConfigError(f"--config: {path!r} is a folder, not a config file")
        if not os.path.isfile(path):
            raise ConfigError(f"--config: config file {file_arg!r} not found")
        loaded = _load_config_file(file_arg)  # its own failures, reported as the file's

    fv = flags.FlagValues()
    flags.DEFINE_boolean("describe", False, "print every config key and exit", flag_values=fv)
    overrides = _override_keys(argv[1:])
    try:
        # Defining the flag already parses the default file with the overrides applied.
        holder = config_flags.DEFINE_config_file("config", default=_BASE_CONFIG_FILE,
                                                 flag_values=fv, lock_config=True, sys_argv=argv)
        fv(argv)
        config = holder.value
    except flags.Error as e:  # wrong type in an override: absl names the flag (--config.KEY)
        missing = _missing_override(loaded, overrides) if loaded is not None else None
        raise ConfigError(missing or str(e).replace("flag --config.", "").strip()) from None
    except Exception as e:  # noqa: BLE001 - the file loaded above, so an override is at fault
        missing = _missing_override(loaded, overrides) if loaded is not None else None
        if missing:
            raise ConfigError(missing) from None
        blame = (f"the overrides {' '.join('--config.' + k for k in overrides)}" if overrides
                 else f"--config {file_arg or _BASE_CONFIG_FILE}")
        raise ConfigError(f"{blame}: cannot apply ({type(e).__name__}: {e})") from None
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
    from sgalm_jax.training.lora_setup import check_supported

    config = parse_config(argv)
    cfg.validate_config(config)
    algorithm = get_algorithm(config.algorithm)
    check_supported(config)  # lora.enabled only for algorithms that train adapters
    maybe_initialize(config.distributed)
    if algorithm.validate is not None:
        algorithm.validate(config)
    workdir = resolve_workdir(config)
    config.unlock()
    config.workdir = workdir
    config.lock()
    return config, algorithm, workdir


def run_in_workdir(config: Any, algorithm: Any, workdir: str) -> Any:
    """Check and lock the run directory (process 0), write ``config.json``, run the algorithm."""
    import jax

    from sgalm_jax.config import save_config
    from sgalm_jax.errors import WorkdirError
    from sgalm_jax.training.multihost import broadcast_from_main
    from sgalm_jax.training.workdir import WorkdirLock, check_workdir

    lock, error = None, None
    if jax.process_index() == 0:
        try:
            check_workdir(workdir)
            lock = WorkdirLock(workdir).acquire()
        except WorkdirError as e:
            error = e
    # Every process stops with process 0 (the others would wait for it in their first collective).
    if not broadcast_from_main(error is None):
        raise error or WorkdirError(f"{workdir}: process 0 cannot use the run directory (see its "
                                    "error)")
    try:
        if lock is not None:
            save_config(config, os.path.join(workdir, "config.json"))
        log.info("algorithm %s, workdir %s", config.algorithm, workdir)
        return algorithm(config, workdir)
    finally:
        if lock is not None:
            lock.release()


def _close_everything() -> None:
    """Close checkpointers and metric writers left open by an error (quietly)."""
    ckpt = sys.modules.get("sgalm_jax.training.checkpoint")  # not imported: nothing to close
    if ckpt is not None:
        ckpt.close_all()
    metrics = sys.modules.get("sgalm_jax.training.metrics")
    if metrics is not None:
        metrics.close_all_writers()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    logging.basicConfig(level=os.environ.get("SGALM_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from sgalm_jax.fileio import describe_os_error

    try:
        config, algorithm, workdir = prepare(argv)
        run_in_workdir(config, algorithm, workdir)
        return 0
    except ConfigError as e:
        message, status = f"config error: {e}", 2
    except SgalmError as e:
        message, status = f"error: {e}", 1
    except OSError as e:  # an I/O failure no layer turned into an SgalmError: name the path
        message, status = f"error: {describe_os_error(e)}", 1
    except KeyboardInterrupt:
        message, status = "interrupted", 130
    finally:
        _close_everything()
    print(message, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
