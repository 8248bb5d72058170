"""The non-zero counts' pass of the many-gene NB GLMM, compiled with numba when it is
installed: one loop over the entries accumulating every per-(gene, pair) sum
(:meth:`skmixed.mixed._nb_multigene.BatchedNBLaplace._pair_sums` holds the formulas
and the numpy reference). Without numba (or with ``SKMIXED_DISABLE_NUMBA`` set),
:data:`AVAILABLE` is False and the numpy passes run.
"""

from __future__ import annotations

import math

# the one optional import of numba (and its SKMIXED_DISABLE_NUMBA switch) is offset/_fused's
from ..offset._fused import numba

AVAILABLE = numba is not None

# rows of the accumulator: the order of BatchedNBLaplace._pair_sums' keys
KEYS = ("s", "W", "ll", "Wd", "dl", "ds", "dW")


def entry_pass(cflat, P, rows, indptr, pair, o, y, w, phi, small, log_fact, full, out):
    """Add each non-zero entry's correction to ``out`` (G * P, 7: an entry's seven sums
    side by side in memory), for the genes ``rows`` of the block (gene ``rows[g]``'s
    entries are ``indptr[rows[g]]:indptr[rows[g] + 1]``; ``g`` indexes ``cflat``,
    ``phi`` and ``out``); with ``full`` the log-likelihood and phi derivatives too
    (those of ``small`` integer counts only: the others are added by the caller)."""
    for g in range(rows.size):
        for e in range(indptr[rows[g]], indptr[rows[g] + 1]):
            idx = g * P + pair[e]
            ce = cflat[idx] + o[e]
            ec = math.exp(min(ce, 700.0))
            q = 1.0 + ec
            we, ye = w[e], y[e]
            out[idx, 0] += we * ye / q
            out[idx, 1] += we * ye * ec / (q * q)
            if full:
                ph = phi[g]
                mu = ec / ph
                q3 = q * q * q
                out[idx, 3] += we * ye * ec * (1.0 - ec) / q3
                out[idx, 5] -= we * ye * mu / (q * q)
                out[idx, 6] += we * ye * mu * (1.0 - ec) / q3
                if small[e]:
                    ll = -log_fact[e]
                    acc = 0.0
                    for k in range(int(ye)):
                        if k:
                            ll += math.log1p(ph * k)
                        acc += (k - mu) / (1.0 + ph * k)
                    spl = ce + math.log1p(math.exp(-ce)) if ce > 0 else math.log1p(math.exp(ce))
                    out[idx, 2] += we * (ll + ye * (ce - math.log(ph) - spl))
                    out[idx, 4] += we * acc / q


if AVAILABLE:
    entry_pass = numba.njit(cache=True, nogil=True)(entry_pass)
