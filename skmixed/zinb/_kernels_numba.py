"""Fused CPU kernel of the ZINB log-likelihood and derivatives on a block of cells.

:func:`skmixed.zinb._evaluate.evaluate` in numpy makes one pass over the block per
elementwise operation (about forty for the derivatives) and a second, scattered pass
for the non-zero counts. This kernel visits each cell's row of the block once: every
quantity of :class:`skmixed._families.ZINB`'s zero-count formulas is computed over the
row in short vector loops that stay in the L1 cache, then the row's non-zeros (its CSR
entries) are overwritten with the positive-count formulas, which reuse the row's
``exp(-|t|)``, ``log1p(exp(-|t|))`` and ``exp(-|b|)``. Rows run in parallel.

numba's ``math.exp`` / ``math.log1p`` are scalar libm calls (10-20 ns each, about as
much as all of numpy's SIMD passes together) unless llvmlite was built with Intel's
SVML, which the PyPI wheels are not. The few transcendental functions the formulas
need are therefore written here as polynomials that LLVM vectorises: ``exp`` / ``expm1``
by Cody-Waite reduction and a degree-13 Taylor polynomial, ``log`` by the exponent bits
and a degree-23 ``atanh`` series, each within a few ulp of libm. The formulas are
:class:`~skmixed._families.ZINB`'s (``_zero_core``, ``_zero_loglik_and_r``,
``derivatives_zero``, ``derivatives_positive``) entry by entry, and
``tests/test_zinb_numba.py`` holds the kernel to the numpy family at 1e-12 relative on
grids that cross every branch. numba is optional (the ``fast`` extra): without it, or
for CuPy arrays, the numpy / CuPy path runs.
"""

from __future__ import annotations

import numpy as np

try:  # the `fast` extra
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

#: ``mode`` of :func:`block`: outputs ``(ll,)``, ``(ll, g_a, g_b, i_aa, i_ab, i_bb)`` or
#: those and ``(g_z, i_zz)``
LOGLIK, DERIVS, DERIVS_ZETA = 0, 1, 2
N_OUT = {LOGLIK: 1, DERIVS: 6, DERIVS_ZETA: 8}

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that n * _LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
_SQRT2 = 1.4142135623730951
_EXP_FLOOR = -708.0  # exp(-708) is the smallest normal result: below, 2^n would underflow
_MANT = 0x000FFFFFFFFFFFFF
_ONE_BITS = 0x3FF0000000000000


def available() -> bool:
    return numba is not None


# -- vectorisable elementary functions (1-D arrays in, 1-D arrays out) -------------------
def _expm1_poly(r):
    """``exp(r) - 1`` for ``|r| <= ln(2) / 2`` (Taylor to degree 13, error < 1e-17)."""
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    return p * r


def _vexp(x, e, em1, ibuf, pbuf):
    """``e = exp(x)`` and ``em1 = expm1(x)`` of ``x <= 0`` (``x < -708`` taken as -708:
    results below 1e-307, which the formulas use only beside terms of order one)."""
    for j in range(x.shape[0]):
        xx = max(x[j], _EXP_FLOOR)
        n = np.floor(xx * _LOG2E + 0.5)
        r = (xx - n * _LN2_HI) - n * _LN2_LO
        pbuf[j] = _expm1_poly(r)
        ibuf[j] = (np.int64(n) + 1023) << 52
    scale = ibuf.view(np.float64)
    for j in range(x.shape[0]):
        s = scale[j]
        p = pbuf[j]
        e[j] = s + s * p
        em1[j] = s * p + (s - 1.0)


def _atanh_series(s):
    """``2 atanh(s) = log((1 + s) / (1 - s))`` for ``|s| <= 0.1716`` (degree 23)."""
    s2 = s * s
    p = 1.0 / 23.0
    p = p * s2 + 1.0 / 21.0
    p = p * s2 + 1.0 / 19.0
    p = p * s2 + 1.0 / 17.0
    p = p * s2 + 1.0 / 15.0
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    p = p * s2 + 1.0
    return 2.0 * s * p


def _log1p_unit(x):
    """``log1p(x)`` for ``0 <= x <= 1`` (no exponent extraction: ``1 + x`` is in [1, 2])."""
    u = 1.0 + x
    big = u > _SQRT2
    m = u * 0.5 if big else u
    k = 1.0 if big else 0.0
    c = (x - (u - 1.0)) / u  # the part of x that 1 + x rounded away
    return k * _LN2_HI + (_atanh_series((m - 1.0) / (m + 1.0)) + (k * _LN2_LO + c))


def _vlog(v, out, ibuf):
    """``out = log(v)`` for positive normal ``v``."""
    bits = v.view(np.int64)
    for j in range(v.shape[0]):
        ibuf[j] = (bits[j] & _MANT) | _ONE_BITS
    mant = ibuf.view(np.float64)
    for j in range(v.shape[0]):
        k = np.float64((bits[j] >> 52) - 1023)
        m = mant[j]
        big = m > _SQRT2
        m = m * 0.5 if big else m
        k = k + 1.0 if big else k
        out[j] = k * _LN2_HI + (_atanh_series((m - 1.0) / (m + 1.0)) + k * _LN2_LO)


def _log1pmx_series(x):
    return x * x * (-1 / 2 + x * (1 / 3 + x * (-1 / 4 + x * (1 / 5 + x * (-1 / 6 + x * (1 / 7 - x / 8))))))


# -- the kernel ---------------------------------------------------------------------------
def _row(ai, bi, z, theta, cols, ys, lognorm, dpsi, dtri, mode, fuse, out, i, s):
    """Row ``i`` of the block; ``cols``/``ys``: the row's non-zeros; ``s``: scratch (14, w)."""
    w = ai.shape[0]
    t, x, e, em1, L, eb, l0, p0, ll, r = s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9]
    ibuf = s[10].view(np.int64)
    pbuf = s[11]
    for j in range(w):
        t[j] = ai[j] - z[j]
        x[j] = -abs(t[j])
    _vexp(x, e, em1, ibuf, pbuf)
    for j in range(w):
        L[j] = _log1p_unit(e[j])
        x[j] = -abs(bi[j])
    _vexp(x, eb, em1, ibuf, pbuf)
    for j in range(w):
        l0[j] = -theta[j] * (max(t[j], 0.0) + L[j])
    _vexp(l0, x, em1, ibuf, pbuf)  # em1 = expm1(l0)
    for j in range(w):
        invb = 1.0 / (1.0 + eb[j])
        omp = eb[j] * invb if bi[j] >= 0.0 else invb
        p0[j] = 1.0 + omp * em1[j]
        x[j] = max(p0[j], 1e-3)  # below, the log-space branch replaces log(p0)
    _vlog(x, ll, ibuf)
    small = False
    for j in range(w):
        small = small or p0[j] < 1e-3
    rs = s[12]
    if small:
        # the log-space form where P(0) < 1e-3, vectorised over the row:
        # l0 + softplus(b - l0) - softplus(b), and r = expit(b - l0)
        for j in range(w):
            x[j] = -abs(bi[j] - l0[j])
        _vexp(x, em1, s[13], ibuf, pbuf)  # em1 = exp(-|d|)
        for j in range(w):
            d = bi[j] - l0[j]
            ed = em1[j]
            sp_d = max(d, 0.0) + _log1p_unit(ed)
            sp_b = max(bi[j], 0.0) + _log1p_unit(eb[j])
            if p0[j] < 1e-3:
                ll[j] = l0[j] + sp_d - sp_b
            rs[j] = 1.0 / (1.0 + ed) if d >= 0.0 else ed / (1.0 + ed)
    out[0, i, :] = ll
    if mode != LOGLIK:
        _derivs_loop(ai, bi, t, e, eb, p0, rs, theta, r, out, i)
        if mode == DERIVS_ZETA:
            _zeta_loop(t, e, L, l0, theta, r, out, i)
    if fuse:
        _positive_loop(cols, ys, bi, theta, t, e, L, eb, lognorm, dpsi, dtri, mode, out, i)


def _derivs_loop(ai, bi, t, e, eb, p0, rs, theta, r, out, i):
    """``g_a, g_b, i_aa, i_ab, i_bb`` of zeros (``r``: the dropout posterior, stored;
    ``rs``: its log-space value, used where ``P(0) < 1e-3``)."""
    for j in range(ai.shape[0]):
        inv = 1.0 / (1.0 + e[j])
        sig = inv if t[j] >= 0.0 else e[j] * inv
        invb = 1.0 / (1.0 + eb[j])
        pos_b = bi[j] >= 0.0
        pi = invb if pos_b else eb[j] * invb
        omp = eb[j] * invb if pos_b else invb
        rj = pi / p0[j] if p0[j] >= 1e-3 else rs[j]
        r[j] = rj
        nr = 1.0 - rj
        rr = rj * nr
        q = -theta[j] * sig
        out[1, i, j] = nr * q
        out[2, i, j] = rj - pi
        out[3, i, j] = nr * (theta[j] * sig * (1.0 - sig)) - rr * q * q
        out[4, i, j] = rr * q
        out[5, i, j] = pi * omp - rr


def _zeta_loop(t, e, L, l0, theta, r, out, i):
    """``g_z, i_zz`` of zeros (``derivatives_zero``'s ``log1pmx`` form where ``t < -5``)."""
    for j in range(t.shape[0]):
        inv = 1.0 / (1.0 + e[j])
        sig = inv if t[j] >= 0.0 else e[j] * inv
        nr = 1.0 - r[j]
        rr = r[j] * nr
        xt = e[j]  # = exp(t) where t < 0
        lmx = _log1pmx_series(xt) if xt < 1e-2 else L[j] - xt
        g0 = theta[j] * (-xt * xt / (1.0 + xt) - lmx) if t[j] < -5.0 else theta[j] * sig + l0[j]
        h0 = g0 + theta[j] * sig * sig
        out[6, i, j] = nr * g0
        out[7, i, j] = -(nr * h0 + rr * g0 * g0)


def _positive_loop(cols, ys, bi, theta, t, e, L, eb, lognorm, dpsi, dtri, mode, out, i):
    """``ZINB.derivatives_positive`` at the row's non-zeros (counts ``ys`` in columns
    ``cols``; table values by count), from the row's ``t``, ``exp(-|t|)``, ``log1p`` of it
    and ``exp(-|b|)``."""
    for k in range(cols.shape[0]):
        j = cols[k]
        y = ys[k]
        yi = int(y)
        tj, ej, thj, b, ebj = t[j], e[j], theta[j], bi[j], eb[j]
        sp_t = max(tj, 0.0) + L[j]
        sp_b = max(b, 0.0) + _log1p_unit(ebj)
        out[0, i, j] = lognorm[yi] - y * (sp_t - tj) - thj * sp_t - sp_b
        if mode == LOGLIK:
            continue
        inv = 1.0 / (1.0 + ej)
        sig = inv if tj >= 0.0 else ej * inv
        osig = ej * inv if tj >= 0.0 else inv
        invb = 1.0 / (1.0 + ebj)
        pi = invb if b >= 0.0 else ebj * invb
        omp = ebj * invb if b >= 0.0 else invb
        out[1, i, j] = y * osig - thj * sig
        out[2, i, j] = -pi
        out[3, i, j] = (y + thj) * sig * osig
        out[4, i, j] = 0.0
        out[5, i, j] = pi * omp
        if mode == DERIVS_ZETA:
            gz = thj * dpsi[yi] - thj * sp_t + thj * sig - y * osig
            hz = thj * thj * dtri[yi] + thj - 2.0 * thj * osig + (y + thj) * osig * osig + gz
            out[6, i, j] = gz
            out[7, i, j] = -hz


def _block(a, b, z, theta, indptr, indices, data, row0, lognorm, dpsi, dtri, mode, fuse, out, n_tasks):
    nr, w = a.shape
    per = (nr + n_tasks - 1) // n_tasks
    for task in _prange(n_tasks):
        s = np.empty((14, w))
        for i in range(task * per, min(nr, (task + 1) * per)):
            lo, hi = indptr[row0 + i], indptr[row0 + i + 1]
            _row(a[i], b[i], z, theta, indices[lo:hi], data[lo:hi], lognorm, dpsi, dtri, mode, fuse, out, i, s)


if numba is not None:
    _prange = numba.prange
    _opts = {"nogil": True, "cache": True, "error_model": "numpy", "boundscheck": False}
    _expm1_poly = numba.njit(inline="always", **_opts)(_expm1_poly)
    _atanh_series = numba.njit(inline="always", **_opts)(_atanh_series)
    _log1p_unit = numba.njit(inline="always", **_opts)(_log1p_unit)
    _log1pmx_series = numba.njit(inline="always", **_opts)(_log1pmx_series)
    _vexp = numba.njit(**_opts)(_vexp)
    _vlog = numba.njit(**_opts)(_vlog)
    _derivs_loop = numba.njit(**_opts)(_derivs_loop)
    _zeta_loop = numba.njit(**_opts)(_zeta_loop)
    _positive_loop = numba.njit(**_opts)(_positive_loop)
    _row = numba.njit(**_opts)(_row)
    _block_serial = numba.njit(**_opts)(_block)
    _block_parallel = numba.njit(parallel=True, **_opts)(_block)
else:  # the pure-Python functions stay importable without numba
    _prange = range
    _block_serial = _block_parallel = _block


def block(a, b, z, indptr, indices, data, row0, tables, mode, *, n_threads=1):
    """Outputs of ``mode`` for the block ``(a, b)`` (rows x cols) with per-column ``z``;
    returns an ``(N_OUT[mode], rows, cols)`` array and whether the non-zeros are in it
    (``False``: the caller applies the positive-count formulas).

    ``indptr[row0 + i]`` starts the CSR entries of the block's row ``i`` (columns
    ``indices``, sorted, counts ``data``). The non-zeros are fused when ``tables``
    (``ZINB.count_tables``) are given and, for the dispersion derivatives, every
    ``theta < 100`` (the family's condition for its ``dpsi`` form).
    """
    a = np.ascontiguousarray(a, dtype=np.float64)
    b = np.ascontiguousarray(b, dtype=np.float64)
    z = np.ascontiguousarray(np.broadcast_to(z, (a.shape[1],)), dtype=np.float64)
    theta = np.exp(z)
    fuse = tables is not None and not (mode == DERIVS_ZETA and not bool(np.all(theta < 100.0)))
    if tables is None:
        lognorm = dpsi = dtri = np.zeros(1)
    else:
        lognorm, dpsi, dtri = tables
    out = np.empty((N_OUT[mode], *a.shape))
    if n_threads > 1 and numba is not None and a.shape[0] > 1:
        numba.set_num_threads(min(int(n_threads), numba.config.NUMBA_NUM_THREADS))
        kernel, n_tasks = _block_parallel, min(a.shape[0], 4 * int(n_threads))
    else:
        kernel, n_tasks = _block_serial, 1
    kernel(a, b, z, theta, indptr, indices, data, np.int64(row0), lognorm, dpsi, dtri,
           np.int64(mode), bool(fuse), out, np.int64(n_tasks))
    return out, fuse
