"""Run several ``sgalm_jax.main`` commands one after another in one process (of a multi-process
launch): ``python -m tests.multihost._driver '<json list of argument lists>'``.

The multi-host tests use it to run a few short configs per launch, so that they pay the start-up
(imports, ``jax.distributed.initialize``) once. Exits with the first non-zero status.
"""

from __future__ import annotations

import json
import sys


def run(runs: list[list[str]]) -> int:
    from sgalm_jax.main import main

    for args in runs:
        code = main(["sgalm_jax.main", *args])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(run(json.loads(sys.argv[1])))
