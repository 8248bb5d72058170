"""The non-zero counts' pass of the many-gene NB GLMM, compiled with numba when it is
installed: one loop over the entries accumulating every per-(gene, pair) sum
(:meth:`skmixed.mixed._nb_multigene.BatchedNBLaplace._pair_sums` holds the formulas
and the numpy reference). Without numba (or with ``SKMIXED_DISABLE_NUMBA`` set),
:data:`AVAILABLE` is False and the numpy passes run.
"""

from __future__ import annotations

import math

import numpy as np

# the one optional import of numba (and its SKMIXED_DISABLE_NUMBA switch) is offset/_fused's
from ..offset._fused import numba

AVAILABLE = numba is not None

# rows of the accumulator: the order of BatchedNBLaplace._pair_sums' keys
KEYS = ("s", "W", "ll", "Wd", "dl", "ds", "dW")
SMALL = 64  # integer counts up to this have their count terms tabulated; larger ones are the caller's


def entry_pass(cflat, P, rows, indptr, pair, o, y, w, phi, small, log_fact, full, out):
    """Add each non-zero entry's correction to ``out`` (G * P, 7: an entry's seven sums
    side by side in memory), for the genes ``rows`` of the block (gene ``rows[g]``'s
    entries are ``indptr[rows[g]]:indptr[rows[g] + 1]``; ``g`` indexes ``cflat``,
    ``phi`` and ``out``); with ``full`` the log-likelihood and phi derivatives too
    (those of ``small`` integer counts only: the others are added by the caller).

    The sums over ``k < y`` of the count terms depend on the gene's phi and ``y``
    alone: ``sum log1p(phi k)``, ``sum 1 / (1 + phi k)`` and ``sum k / (1 + phi k)``
    are tabulated per gene for ``y`` up to :data:`SMALL`, so ``sum (k - mu) / (1 +
    phi k)`` is ``T1 - mu T0``."""
    lg, t0, t1 = np.zeros(SMALL + 1), np.zeros(SMALL + 1), np.zeros(SMALL + 1)
    for g in range(rows.size):
        ph = phi[g]
        if full:
            log_ph = math.log(ph)
            for k in range(SMALL):
                r = 1.0 / (1.0 + ph * k)
                lg[k + 1] = lg[k] + (math.log1p(ph * k) if k else 0.0)
                t0[k + 1] = t0[k] + r
                t1[k + 1] = t1[k] + k * r
        for e in range(indptr[rows[g]], indptr[rows[g] + 1]):
            idx = g * P + pair[e]
            ce = cflat[idx] + o[e]
            ec = math.exp(min(ce, 700.0))
            iq = 1.0 / (1.0 + ec)
            wy = w[e] * y[e]
            sc = wy * iq
            out[idx, 0] += sc
            out[idx, 1] += sc * ec * iq
            if full:
                mu = ec / ph
                wmu2 = wy * mu * iq * iq
                out[idx, 3] += wmu2 * ph * (1.0 - ec) * iq
                out[idx, 5] -= wmu2
                out[idx, 6] += wmu2 * (1.0 - ec) * iq
                if small[e]:
                    n = int(y[e])
                    # softplus(ce) = log(1 + ec) without a second exp
                    spl = math.log1p(ec) if ce < 30.0 else ce + math.log1p(1.0 / ec)
                    out[idx, 2] += w[e] * (lg[n] - log_fact[e] + y[e] * (ce - log_ph - spl))
                    out[idx, 4] += w[e] * (t1[n] - mu * t0[n]) * iq


if AVAILABLE:
    entry_pass = numba.njit(cache=True, nogil=True)(entry_pass)
