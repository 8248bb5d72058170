"""Benchmark sizes: a quick suite by default, the long one on request.

``asv run --quick`` over the default sizes takes a few minutes on 2 cores. The sizes
of the published figures (200,000 cells, 10,000-cell ZINB-WaVE fits) take much longer
and run with ``SKMIXED_ASV_FULL=1`` in the environment (see doc/benchmarks.rst).
"""

import os

FULL = os.environ.get("SKMIXED_ASV_FULL", "") not in ("", "0")


def sizes(quick, full):
    """``full`` when SKMIXED_ASV_FULL is set, else ``quick``."""
    return full if FULL else quick
