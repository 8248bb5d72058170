"""The reduced EM's E-step sums in one compiled pass over the cells (numba, the ``fast`` extra).

:func:`skmixed.eiv._init._dense_pass` (numpy, the reference) makes about a dozen passes
over a (runs, cells) block per iteration: the linear predictor as a matrix product, the NB
mRNA term ``(y + r) log1p(x e^b)``, ``expit`` and ``softplus`` from one exponential, and
the sums as matrix products. Here each run's cells are visited in short blocks that stay in
the L1 cache, every quantity computed in float32 vector loops and summed per block into
float64, without one temporary the size of the runs x cells array: 2-3x faster on a 2-core
machine, where the reduced EM was a third of a single pair's fit.

numba's ``math.exp`` / ``math.log1p`` are scalar libm calls (about 6 ns each, more than
numpy's SIMD pass over a whole block) unless llvmlite was built with Intel's SVML, which the
PyPI wheels are not; like :mod:`skmixed.zinb._kernels_numba` (float64), this module writes
the two functions it needs as polynomials that LLVM vectorises, here in float32 (the reduced
EM runs in float32, as the numpy pass): ``exp`` of a non-positive argument by Cody-Waite
reduction and a degree-7 Taylor polynomial, ``log1p`` by the exponent bits and a degree-10
polynomial fitted to ``log1p`` on ``[sqrt(1/2) - 1, sqrt(2) - 1]`` (relative error 1.5e-7,
within a few float32 ulp). ``tests/test_eiv_fused.py`` holds the pass to the numpy one.
"""

from __future__ import annotations

import numpy as np

# the one optional import of numba (and its SKMIXED_DISABLE_NUMBA switch) is offset/_fused's
from ..offset._fused import numba

AVAILABLE = numba is not None

_F = np.float32
_LOG2E = _F(1.4426950408889634)
_LN2_HI = _F(0.693145751953125)  # ln 2 split so that n * _LN2_HI is exact in float32
_LN2_LO = _F(1.428606765330187e-06)
_SQRT2 = _F(1.4142135623730951)
_EXP_FLOOR = _F(-87.0)  # exp(-87) is about the smallest normal float32
# log1p(f) = f - f^2 / 2 + f^3 P(f) on [sqrt(1/2) - 1, sqrt(2) - 1]: P's coefficients
# (highest degree first), a least-squares fit of the relative error at Chebyshev nodes
_P = tuple(_F(c) for c in (-0.07362868, 0.12620327, -0.13202104, 0.14227114, -0.1662137,
                           0.19999827, -0.25000852, 0.33333354))
# cells per block: every temporary of a run's block stays in the L1 cache
_W = 512
# the columns of ``coef``: the linear predictor's weights of [y_m, e^Lm, y_g, e^Lg, 1],
# then e^{b_m} (the NB mRNA term's factor)
N_COEF = 6
# the columns of the output, as _dense_pass returns them
OUT = ("softplus", "T", "T y_m", "T e^Lm", "T y_g", "T e^Lg")


def _vexp_neg(a, out, ib):
    """``out = exp(a)`` for ``a <= 0`` (below -87 taken as -87: results under 2e-38,
    which the sums use only beside terms of order one)."""
    for j in range(a.shape[0]):
        x = max(a[j], _EXP_FLOOR)
        # round to nearest by truncation: x log2(e) <= 0
        ni = np.int32(x * _LOG2E - _F(0.5))
        nf = _F(ni)
        r = (x - nf * _LN2_HI) - nf * _LN2_LO
        p = _F(1.0 / 5040.0)
        p = p * r + _F(1.0 / 720.0)
        p = p * r + _F(1.0 / 120.0)
        p = p * r + _F(1.0 / 24.0)
        p = p * r + _F(1.0 / 6.0)
        p = p * r + _F(0.5)
        p = p * r + _F(1.0)
        out[j] = p * r + _F(1.0)
        ib[j] = (ni + 127) << 23
    scale = ib.view(np.float32)
    for j in range(a.shape[0]):
        out[j] *= scale[j]


def _vlog1p(v, out, ib):
    """``out = log1p(v)`` for finite ``v >= 0``; ``v`` is overwritten (with ``1 + v``)."""
    for j in range(v.shape[0]):
        u = _F(1.0) + v[j]
        # what 1 + v rounded away, divided by u (2 - u is 1 / u to within (u - 1)^2 of a
        # term of a float32 ulp; past u = 2 it is below an ulp of the result)
        c = v[j] - (u - _F(1.0))
        out[j] = c * (_F(2.0) - u) if u < _F(2.0) else _F(0.0)
        v[j] = u
    bits = v.view(np.int32)
    for j in range(v.shape[0]):
        ib[j] = (bits[j] & 0x007FFFFF) | 0x3F800000
    mant = ib.view(np.float32)
    c0, c1, c2, c3, c4, c5, c6, c7 = _P
    for j in range(v.shape[0]):
        k = _F((bits[j] >> 23) - 127)
        m = mant[j]
        big = m > _SQRT2
        m = m * _F(0.5) if big else m
        k = k + _F(1.0) if big else k
        f = m - _F(1.0)
        p = c0
        p = p * f + c1
        p = p * f + c2
        p = p * f + c3
        p = p * f + c4
        p = p * f + c5
        p = p * f + c6
        p = p * f + c7
        f2 = f * f
        out[j] += k * _LN2_HI + ((f - _F(0.5) * f2 + f2 * f * p) + k * _LN2_LO)


def _runs(P, NB, pair, coef, with_ll, out):
    n = P.shape[2]
    nb = NB.shape[1] > 0
    d = np.empty(_W, np.float32)
    e = np.empty(_W, np.float32)
    t = np.empty(_W, np.float32)
    ib = np.empty(_W, np.int32)
    for c in range(pair.shape[0]):
        b = pair[c]
        w0, w1, w2, w3, w4 = _F(coef[c, 0]), _F(coef[c, 1]), _F(coef[c, 2]), _F(coef[c, 3]), _F(coef[c, 4])
        eb = _F(coef[c, 5])
        a_sp = a_t = a_ym = a_em = a_yg = a_eg = 0.0
        for s in range(0, n, _W):
            m = min(_W, n - s)
            ym, em, yg, eg = P[b, 0, s:s + m], P[b, 1, s:s + m], P[b, 2, s:s + m], P[b, 3, s:s + m]
            for j in range(m):
                d[j] = w0 * ym[j] + w1 * em[j] + w2 * yg[j] + w3 * eg[j] + w4
            if nb:
                # - (y + r) (log1p(x e^b) - log1p(x)), the last term stored
                x, ypr, l0 = NB[b, 0, s:s + m], NB[b, 1, s:s + m], NB[b, 2, s:s + m]
                for j in range(m):
                    e[j] = x[j] * eb
                _vlog1p(e[:m], t[:m], ib[:m])
                for j in range(m):
                    d[j] += l0[j] - ypr[j] * t[j]
            # expit(d) and softplus(d) = max(d, 0) + log1p(e^-|d|) from one exponential
            for j in range(m):
                e[j] = -abs(d[j])
            _vexp_neg(e[:m], t[:m], ib[:m])
            s_t = s_ym = s_em = s_yg = s_eg = _F(0.0)
            for j in range(m):
                q = t[j]
                inv = _F(1.0) / (_F(1.0) + q)
                T = inv if d[j] >= _F(0.0) else q * inv
                s_t += T
                s_ym += T * ym[j]
                s_em += T * em[j]
                s_yg += T * yg[j]
                s_eg += T * eg[j]
            a_t += s_t
            a_ym += s_ym
            a_em += s_em
            a_yg += s_yg
            a_eg += s_eg
            if with_ll:
                _vlog1p(t[:m], e[:m], ib[:m])
                s_sp = _F(0.0)
                for j in range(m):
                    s_sp += max(d[j], _F(0.0)) + e[j]
                a_sp += s_sp
        out[c, 0], out[c, 1], out[c, 2], out[c, 3], out[c, 4], out[c, 5] = a_sp, a_t, a_ym, a_em, a_yg, a_eg


if AVAILABLE:
    # the elementwise functions without fast-math (the rounding correction of log1p must
    # not be reassociated away); the pass with reassociation only, so that its per-block
    # sums vectorise. nogil: blocks of pairs run on the callers' threads side by side
    _opts = {"nogil": True, "cache": True, "error_model": "numpy", "boundscheck": False}
    _vexp_neg = numba.njit(**_opts)(_vexp_neg)
    _vlog1p = numba.njit(**_opts)(_vlog1p)
    _runs = numba.njit(fastmath={"reassoc", "contract"}, **_opts)(_runs)


def usable(xp):
    """Whether the compiled pass applies: numba present and host (numpy) arrays."""
    return AVAILABLE and xp is np


def pieces(pm, pg):
    """The per-pair cell arrays of the pass from the reduced EM's gathered pieces
    (:func:`skmixed.eiv._init._ratio_pieces`, (B, n) float32 each): ``P`` (B, 4, n)
    ``[y_m, e^Lm, y_g, e^Lg]`` and ``NB`` (B, 3, n) ``[x, y + r, (y + r) log1p(x)]`` for NB
    mRNA, (B, 0, n) for Poisson."""
    P = np.ascontiguousarray(np.stack([pm[1], pm[2], pg[1], pg[2]], axis=1), dtype=np.float32)
    if pm[0] == "nb":
        ypr, l0 = pm[4]
        NB = np.ascontiguousarray(np.stack([pm[3], ypr, ypr * l0], axis=1), dtype=np.float32)
    else:
        NB = np.zeros((P.shape[0], 0, P.shape[2]), dtype=np.float32)
    return P, NB


def reduced_sums(P, NB, pair, pi, bm, bg, with_ll=True):
    """For runs ``c`` of pairs ``pair[c]`` at ``(pi, b_m, b_g)`` (each (C,)): the sums of the
    reduced E-step over the cells, (C, 6) float64 in the order of :data:`OUT` (the softplus
    sum left at 0 without ``with_ll``): those of :func:`skmixed.eiv._init._dense_pass`."""
    nb = NB.shape[1] > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        logit = np.log(pi) - np.log1p(-pi)
    coef = np.empty((pair.size, N_COEF))
    coef[:, 0] = bm
    coef[:, 1] = 0.0 if nb else -np.expm1(bm)
    coef[:, 2] = bg
    coef[:, 3] = -np.expm1(bg)
    coef[:, 4] = logit
    coef[:, 5] = np.exp(bm)
    # a run at pi = 0 or with an infinite coefficient has NaN sums, as in the numpy pass
    # (where its posteriors are all 0 or a product 0 * inf appears): the EM drops it
    ok = (pi > 0) & np.isfinite(logit) & np.isfinite(bm) & np.isfinite(bg)
    out = np.full((pair.size, len(OUT)), np.nan)
    if ok.all():
        _runs(P, NB, np.ascontiguousarray(pair, dtype=np.int64), coef, bool(with_ll), out)
    elif ok.any():
        part = np.empty((int(ok.sum()), len(OUT)))
        _runs(P, NB, np.ascontiguousarray(pair[ok], dtype=np.int64), np.ascontiguousarray(coef[ok]),
              bool(with_ll), part)
        out[ok] = part
    return out
