#!/usr/bin/env python
"""Plot a run's curves (D/G losses, D on real/generated, validity, diversity) to a PNG.

    python scripts/plot_metrics.py runs/sgalm [-o curves.png]

Same as ``python -m sgalm_jax.tools.plot_metrics``; needs matplotlib (``pip install -e .[plot]``).
"""

import sys

from sgalm_jax.tools.plot_metrics import main

if __name__ == "__main__":
    sys.exit(main())
