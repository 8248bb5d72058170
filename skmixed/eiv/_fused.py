"""GLM-EIV's passes over the cells, compiled with numba (the ``fast`` extra).

Three passes, each visiting a pair's cells once in blocks that stay in the cache, every
quantity computed in vector loops and summed per block, with no temporary the size of the
cells x pairs (or runs) arrays:

* :func:`reduced_sums`, the reduced EM's E-step for every active restart: the sums that its
  closed-form M-step and convergence check need. Float32, as the numpy reference
  (:func:`skmixed.eiv._init._dense_pass`, about a dozen passes per iteration: the linear
  predictor as a matrix product, the NB mRNA term ``(y + r) log1p(x e^b)``, ``expit`` and
  ``softplus`` from one exponential, the sums as matrix products). 2-3x faster.
* :func:`em_sums`, the full EM's E-step in float64: the posteriors, the log-likelihood and,
  as sums over the cells, everything the next M-step's first Newton step and Louis's
  information need (:class:`EMSums`), where the numpy E-step returns per-cell arrays of
  scores and informations that the M-step and :func:`skmixed.eiv._inference.louis_information`
  then reduce. The full EM of one 50,000-cell pair takes about half the time.
* :func:`glm_sums`, the pilot GLMs' Newton steps (kernel sum, gradient and Gram matrix at
  given coefficients), in float64.

numba's ``math.exp`` / ``math.log1p`` are scalar libm calls (about 6 ns each, more than
numpy's SIMD pass over a whole block) unless llvmlite was built with Intel's SVML, which the
PyPI wheels are not. The float64 pass uses :mod:`skmixed.zinb._kernels_numba`'s vectorisable
``exp``, ``log`` and ``log1p`` on [0, 1]; the float32 pass writes its own here: ``exp`` of a
non-positive argument by Cody-Waite reduction and a degree-7 Taylor polynomial, ``log1p`` by
the exponent bits and a degree-10 polynomial fitted to ``log1p`` on
``[sqrt(1/2) - 1, sqrt(2) - 1]`` (relative error 1.5e-7, a few float32 ulp). Array rows are
sliced before the loops index them from 0: an index ``s + j``, which numba must allow to be
negative, turns the loops' loads into gathers (2x slower).

``tests/test_eiv_fused.py`` holds both passes to the numpy ones. Without numba (or with
``SKMIXED_DISABLE_NUMBA`` set), or for CuPy arrays, the numpy passes run.
"""

from __future__ import annotations

import numpy as np

from .._families import NegativeBinomial

# the one optional import of numba (and its SKMIXED_DISABLE_NUMBA switch) is offset/_fused's
from ..offset._fused import numba

# float64 vectorisable exp / log / log1p on [0, 1] (the full EM's pass)
from ..zinb import _kernels_numba as _zinb

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
# cells per block: a run's block temporaries (16 KB) stay in the L2 cache; longer blocks
# than 512 measured 10-20% faster (fewer slices and calls per cell)
_W = 1024
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
    P = np.stack([pm[1], pm[2], pg[1], pg[2]], axis=1)
    if pm[0] == "nb":
        ypr, l0 = pm[4]
        NB = np.stack([pm[3], ypr, ypr * l0], axis=1)
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
    part = np.empty((int(ok.sum()), len(OUT)))
    _runs(P, NB, pair[ok].astype(np.int64), coef[ok], bool(with_ll), part)
    out[ok] = part
    return out


# -- the full EM's E-step, with the sums of the M-step and of Louis's information ------------
def sums_layout(p1):
    """Offsets of one pair's row of :func:`em_sums`' output for ``p1`` coefficients per
    modality: ``ll`` (the kernels' and softplus' sum), ``T`` (sum of posteriors), then per
    modality ``Q`` (the expected complete-data kernel), ``grad`` (p1), ``Gi`` (p1 x p1, the
    expected information's stacked Gram matrix), ``Gc`` (the observed information's), then
    ``DD`` (k x k, ``sum_i T_i (1 - T_i) d_i d_i'``)."""
    k = 1 + 2 * p1
    per = 1 + p1 + 2 * p1 * p1
    return {"ll": 0, "T": 1, "mod": (2, 2 + per), "per": per, "DD": 2 + 2 * per, "size": 2 + 2 * per + k * k}


def _nb_mean(y, eta0, mu0, f, sh, r, m, k, s, i, c, tv, tl, ib):
    """NB (size r) at the means ``f mu0`` and linear predictors ``eta0 + sh``, first ``m``
    cells: the kernel k, the score s, the expected information i and the observed one c
    (per unit of the linear predictor), as :func:`skmixed.eiv._model._from_mean` and
    :func:`skmixed.eiv._inference.observed_pieces`."""
    lr = np.log(r)
    for j in range(m):
        tv[j] = mu0[j] * f / r
    # log1p(v) = log(1 + v) + what 1 + v rounded away, over 1 + v (s and i hold the
    # correction and the log until the score and information overwrite them)
    for j in range(m):
        u = 1.0 + tv[j]
        tl[j] = u
        s[j] = (tv[j] - (u - 1.0)) / u
    _zinb._vlog(tl[:m], i[:m], ib[:m])
    for j in range(m):
        L = i[j] + s[j]
        mu = mu0[j] * f
        yy = y[j]
        k[j] = yy * (eta0[j] + sh - lr) - (yy + r) * L
        q = 1.0 / (1.0 + tv[j])
        sc = (yy - mu) * q
        inf = mu * q
        s[j] = sc
        i[j] = inf
        c[j] = inf * (1.0 + sc / r)


def _modality(y, eta0, mu0, b, eb, r, m, k0, k1, s0, i0, s1, i1, c0, c1, tv, tl, ib):
    """One modality's kernels, scores and expected and observed informations (per unit of
    the linear predictor) at p = 0 and p = 1, for the first ``m`` cells of the block."""
    if r > 0.0:
        _nb_mean(y, eta0, mu0, 1.0, 0.0, r, m, k0, s0, i0, c0, tv, tl, ib)
        _nb_mean(y, eta0, mu0, eb, b, r, m, k1, s1, i1, c1, tv, tl, ib)
    else:
        for j in range(m):
            mu = mu0[j]
            mu1 = mu * eb
            yy = y[j]
            k0[j] = yy * eta0[j] - mu
            k1[j] = yy * (eta0[j] + b) - mu1
            s0[j] = yy - mu
            s1[j] = yy - mu1
            i0[j] = mu
            i1[j] = mu1
            c0[j] = mu
            c1[j] = mu1


def _eta_mu(ob, cz, ZT, s, m, eta, mu, t, em1, ib, pb):
    """The linear predictor ``eta = o + z' cz`` (``cz`` in the design's column order) and the
    mean ``mu = exp(min(eta, 700))`` of the block's first ``m`` cells (``t``, ``em1``,
    ``ib``, ``pb``: scratch)."""
    z0 = ZT[0, s:s + m]
    for j in range(m):
        eta[j] = ob[j] + cz[0] * z0[j]
    for a in range(1, ZT.shape[0]):
        f = cz[a]
        za = ZT[a, s:s + m]
        for j in range(m):
            eta[j] += f * za[j]
    for j in range(m):
        t[j] = min(eta[j], 700.0)
    _zinb._vexp(t[:m], mu[:m], em1[:m], ib[:m], pb[:m])


def _zsums(w, ZT, s, m, zi, out, o):
    """``out[o + zi[a]] += sum_j w_j z_ja`` over the block's cells."""
    for a in range(ZT.shape[0]):
        # a row slice, indexed from 0: contiguous vector loads (an index s + j, which numba
        # must allow to be negative, makes them gathers)
        za = ZT[a, s:s + m]
        acc = 0.0
        for j in range(m):
            acc += w[j] * za[j]
        out[o + zi[a]] += acc


def _gram_zz(w, ZT, s, m, zi, out, o, p1):
    """``sum_j w_j z_ja z_jc`` added at ``out[o + zi[a] * p1 + zi[c]]`` and its mirror: the
    covariates' block of a (p1, p1) Gram matrix stored row by row at ``out[o:]``."""
    q = ZT.shape[0]
    for a in range(q):
        za = ZT[a, s:s + m]
        for c in range(a, q):
            zc = ZT[c, s:s + m]
            acc = 0.0
            for j in range(m):
                acc += w[j] * za[j] * zc[j]
            out[o + zi[a] * p1 + zi[c]] += acc
            if c != a:
                out[o + zi[c] * p1 + zi[a]] += acc


def _stacked_gram(w0, w1, ZT, s, m, zi, out, o, p1, wt):
    """The stacked design's Gram matrix with weights w0 for the cells' p = 0 rows and w1
    for their p = 1 rows (:meth:`skmixed.eiv._model.Design.stacked_gram`), added to the
    (p1, p1) matrix at ``out[o:]``: ``sum (w0 + w1) z z'`` on the covariates' positions,
    ``sum w1 z`` beside the perturbation's, ``sum w1`` on it; ``wt`` is scratch."""
    for j in range(m):
        wt[j] = w0[j] + w1[j]
    _gram_zz(wt, ZT, s, m, zi, out, o, p1)
    for a in range(ZT.shape[0]):
        za = ZT[a, s:s + m]
        acc = 0.0
        for j in range(m):
            acc += w1[j] * za[j]
        out[o + 1 * p1 + zi[a]] += acc
        out[o + zi[a] * p1 + 1] += acc
    acc = 0.0
    for j in range(m):
        acc += w1[j]
    out[o + p1 + 1] += acc


def _em_sums(ZT, Ym, Yg, Om, Og, rm, rg, cm, cg, lpi, zi, T_out, out):
    """Per pair b (rows of Ym, Yg): T_out[b] and the row out[b] laid out by
    :func:`sums_layout` (see :func:`em_sums`)."""
    q, n = ZT.shape
    p1 = q + 1
    k = 1 + 2 * p1
    per = 1 + p1 + 2 * p1 * p1
    o_dd = 2 + 2 * per
    W = 1024  # cells per block: 31 buffers of 8 KB, in the L2 cache
    buf = np.empty((24, W))
    ib = np.empty(W, np.int64)
    pb = np.empty(W, np.float64)
    D = np.empty((k, W))
    czm, czg = np.empty(q), np.empty(q)  # the coefficients in the design's column order
    for b in range(Ym.shape[0]):
        row = out[b]
        lp0, lp1 = lpi[b, 0], lpi[b, 1]
        logit = lp1 - lp0
        pi = np.exp(lp1)
        dpi = 1.0 / pi + 1.0 / (1.0 - pi)
        om = Om[b if Om.shape[0] > 1 else 0]
        og = Og[b if Og.shape[0] > 1 else 0]
        bm, bg = cm[b, 1], cg[b, 1]
        ebm, ebg = np.exp(min(bm, 700.0)), np.exp(min(bg, 700.0))
        for a in range(q):
            czm[a], czg[a] = cm[b, zi[a]], cg[b, zi[a]]
        for s in range(0, n, W):
            m = min(W, n - s)
            eta_m, mu_m, eta_g, mu_g = buf[0], buf[1], buf[2], buf[3]
            k0m, k1m, s0m, i0m, s1m, i1m, c0m, c1m = buf[4], buf[5], buf[6], buf[7], buf[8], buf[9], buf[10], buf[11]
            k0g, k1g, s0g, i0g, s1g, i1g, c0g, c1g = (buf[12], buf[13], buf[14], buf[15], buf[16], buf[17],
                                                      buf[18], buf[19])
            d, e, t1, t2 = buf[20], buf[21], buf[22], buf[23]
            Tb = T_out[b, s:s + m]
            _eta_mu(om[s:s + m], czm, ZT, s, m, eta_m, mu_m, t1, e, ib, pb)
            _eta_mu(og[s:s + m], czg, ZT, s, m, eta_g, mu_g, t1, e, ib, pb)
            _modality(Ym[b, s:s + m], eta_m, mu_m, bm, ebm, rm[b], m, k0m, k1m, s0m, i0m, s1m, i1m, c0m, c1m,
                      t1, t2, ib)
            _modality(Yg[b, s:s + m], eta_g, mu_g, bg, ebg, rg[b], m, k0g, k1g, s0g, i0g, s1g, i1g, c0g, c1g,
                      t1, t2, ib)
            # posteriors and softplus from one exponential of -|d|
            for j in range(m):
                d[j] = (k1m[j] + k1g[j]) - (k0m[j] + k0g[j]) + logit
                t1[j] = -abs(d[j])
            _zinb._vexp(t1[:m], e[:m], t2[:m], ib[:m], pb[:m])
            acc_ll = 0.0
            acc_t = 0.0
            for j in range(m):
                ee = e[j]
                inv = 1.0 / (1.0 + ee)
                T = inv if d[j] >= 0.0 else ee * inv
                Tb[j] = T
                t1[j] = T
                acc_t += T
                acc_ll += (k0m[j] + k0g[j]) + (max(d[j], 0.0) + _zinb._log1p_unit(ee))
            row[0] += acc_ll
            row[1] += acc_t
            T = t1
            for mod in range(2):
                o = 2 + mod * per
                if mod == 0:
                    k0, k1, s0, i0, s1, i1, c0, c1 = k0m, k1m, s0m, i0m, s1m, i1m, c0m, c1m
                else:
                    k0, k1, s0, i0, s1, i1, c0, c1 = k0g, k1g, s0g, i0g, s1g, i1g, c0g, c1g
                acc = 0.0
                for j in range(m):
                    acc += k0[j] + T[j] * (k1[j] - k0[j])
                row[o] += acc
                # the score (gradient): (1 - T) s0 + T s1 on the covariates, T s1 on the
                # perturbation; then the two Gram matrices, weights (1 - T) i0, T i1 (c)
                for j in range(m):
                    t2[j] = s0[j] + T[j] * (s1[j] - s0[j])
                    e[j] = T[j] * s1[j]
                _zsums(t2, ZT, s, m, zi, row, o + 1)
                acc = 0.0
                for j in range(m):
                    acc += e[j]
                row[o + 2] += acc
                for j in range(m):
                    t2[j] = (1.0 - T[j]) * i0[j]
                    e[j] = T[j] * i1[j]
                _stacked_gram(t2, e, ZT, s, m, zi, row, o + 1 + p1, p1, D[0])
                for j in range(m):
                    t2[j] = (1.0 - T[j]) * c0[j]
                    e[j] = T[j] * c1[j]
                _stacked_gram(t2, e, ZT, s, m, zi, row, o + 1 + p1 + p1 * p1, p1, D[0])
            # Louis's variance term: rows d_i scaled by sqrt(T (1 - T)), then D D'
            D0 = D[0]
            for j in range(m):
                t2[j] = np.sqrt(T[j] * (1.0 - T[j]))
                D0[j] = t2[j] * dpi
            for mod in range(2):
                o = 1 + mod * p1
                s0, s1 = (s0m, s1m) if mod == 0 else (s0g, s1g)
                Dp = D[o + 1]
                for j in range(m):
                    e[j] = t2[j] * (s1[j] - s0[j])
                    Dp[j] = t2[j] * s1[j]
                for a in range(q):
                    za, Da = ZT[a, s:s + m], D[o + zi[a]]
                    for j in range(m):
                        Da[j] = e[j] * za[j]
            for x in range(k):
                Dx = D[x]
                for y in range(x, k):
                    Dy = D[y]
                    acc = 0.0
                    for j in range(m):
                        acc += Dx[j] * Dy[j]
                    row[o_dd + x * k + y] += acc
                    if y != x:
                        row[o_dd + y * k + x] += acc


if AVAILABLE:
    _nb_mean = numba.njit(**_opts)(_nb_mean)
    _modality = numba.njit(**_opts)(_modality)
    _eta_mu = numba.njit(**_opts)(_eta_mu)
    _zsums = numba.njit(fastmath={"reassoc", "contract"}, **_opts)(_zsums)
    _gram_zz = numba.njit(fastmath={"reassoc", "contract"}, **_opts)(_gram_zz)
    _stacked_gram = numba.njit(fastmath={"reassoc", "contract"}, **_opts)(_stacked_gram)
    _em_sums = numba.njit(fastmath={"reassoc", "contract"}, **_opts)(_em_sums)


class EMSums:
    """One E-step's per-pair sums (:func:`em_sums`): what the next M-step's first Newton
    step, its line search's starting value and Louis's information need, without the
    per-cell arrays of the numpy E-step."""

    def __init__(self, rows, p1, n, pi):
        self.rows, self.p1, self.n, self.pi = rows, p1, n, pi

    def take(self, idx):
        return EMSums(self.rows[idx], self.p1, self.n, self.pi[idx])

    def put(self, idx, other):
        self.rows[idx] = other.rows
        self.pi[idx] = other.pi

    def modality(self, j):
        """``(Q, grad (B, p1), Gi (B, p1, p1), Gc (B, p1, p1))`` of modality j (0 mRNA, 1 gRNA)."""
        lay = sums_layout(self.p1)
        p1, o = self.p1, lay["mod"][j]
        r = self.rows
        B = r.shape[0]
        return (r[:, o], r[:, o + 1:o + 1 + p1], r[:, o + 1 + p1:o + 1 + p1 + p1 * p1].reshape(B, p1, p1),
                r[:, o + 1 + p1 + p1 * p1:o + lay["per"]].reshape(B, p1, p1))

    def louis(self):
        """Louis's observed information (B, k, k) and the observed score (B, k), as
        :func:`skmixed.eiv._inference.louis_information` with ``score=True``."""
        lay = sums_layout(self.p1)
        p1, B, n, pi = self.p1, self.rows.shape[0], self.n, self.pi
        k = 1 + 2 * p1
        sT = self.rows[:, lay["T"]]
        info = -self.rows[:, lay["DD"]:lay["DD"] + k * k].reshape(B, k, k)
        info[:, 0, 0] += sT / pi**2 + (n - sT) / (1.0 - pi) ** 2
        grads = []
        for j in range(2):
            _, grad, _, Gc = self.modality(j)
            sl = slice(1 + j * p1, 1 + (j + 1) * p1)
            info[:, sl, sl] += Gc
            grads.append(grad)
        S0 = (sT - n * pi) / (pi * (1.0 - pi))
        return info, np.concatenate([S0[:, None], grads[0], grads[1]], axis=1)


def em_sums(design, fm, fg, Mt, Gt, Omt, Ogt, pi, cm, cg):
    """The full EM's E-step for the pairs of ``Mt``, ``Gt`` (B, n) C-contiguous (offsets
    ``Omt``, ``Ogt`` (1 or B, n)) at ``(pi, coef_m, coef_g)``: the posteriors T (B, n), the
    log-likelihood's parameter-dependent part ``sum k0 + softplus(d)`` (B,) and the sums of
    :class:`EMSums`, in one pass over the cells."""
    B, n = Mt.shape
    p1 = cm.shape[1]
    lay = sums_layout(p1)
    rows = np.zeros((B, lay["size"]))
    T = np.empty((B, n))
    pi = np.asarray(pi, dtype=float)
    with np.errstate(divide="ignore"):
        lpi = np.ascontiguousarray(np.stack([np.log1p(-pi), np.log(pi)], axis=1))

    def size(f):
        # 0 marks Poisson
        if not isinstance(f, NegativeBinomial):
            return np.zeros(B)
        return np.broadcast_to(np.asarray(f.size, dtype=float), (B,)).copy()

    _em_sums(design.ZT, Mt, Gt, Omt, Ogt, size(fm), size(fg), np.ascontiguousarray(cm, dtype=float),
             np.ascontiguousarray(cg, dtype=float), lpi, np.asarray(design.zi, dtype=np.int64), T, rows)
    return T, rows[:, lay["ll"]].copy(), EMSums(rows, p1, n, pi.copy())


# -- the pilot GLMs' Newton steps ----------------------------------------------------------
def _glm_sums(ZT, Yt, Ot, r, coef, out):
    """Per column c of Yt: ``out[c] = [sum of kernels, gradient (q), expected information's
    Gram matrix (q x q)]`` of the GLM of Yt[c] on the design (Poisson where r[c] <= 0, else
    NB of size r[c]) at ``coef[c]`` (design order), offset Ot[c] (or Ot[0])."""
    q, n = ZT.shape
    W = 1024
    buf = np.empty((9, W))
    ib = np.empty(W, np.int64)
    pb = np.empty(W, np.float64)
    zi = np.arange(q)  # design order: the gradient at 1 + a, the Gram matrix's (a, c) at 1 + q + a q + c
    for col in range(Yt.shape[0]):
        o = Ot[col if Ot.shape[0] > 1 else 0]
        row = out[col]
        rc = r[col]
        for s in range(0, n, W):
            m = min(W, n - s)
            eta, mu, k, sc, inf, cc, t1, t2, em1 = (buf[0], buf[1], buf[2], buf[3], buf[4], buf[5], buf[6],
                                                    buf[7], buf[8])
            y = Yt[col, s:s + m]
            _eta_mu(o[s:s + m], coef[col], ZT, s, m, eta, mu, t1, em1, ib, pb)
            if rc > 0.0:
                _nb_mean(y, eta, mu, 1.0, 0.0, rc, m, k, sc, inf, cc, t1, t2, ib)
            else:
                for j in range(m):
                    k[j] = y[j] * eta[j] - mu[j]
                    sc[j] = y[j] - mu[j]
                    inf[j] = mu[j]
            acc = 0.0
            for j in range(m):
                acc += k[j]
            row[0] += acc
            _zsums(sc, ZT, s, m, zi, row, 1)
            _gram_zz(inf, ZT, s, m, zi, row, 1 + q, q)


if AVAILABLE:
    _glm_sums = numba.njit(fastmath={"reassoc", "contract"}, **_opts)(_glm_sums)


def glm_sums(design, family, Yt, Ot, coef):
    """The pilot GLMs' Newton pieces at ``coef`` (C, q) for the columns of ``Yt`` (C, n),
    offsets ``Ot`` (1 or C, n), in one pass: the kernel sums (C,), gradients (C, q) and
    expected-information Gram matrices (C, q, q) that
    :func:`skmixed.eiv._em.m_step_modality` otherwise gets from per-cell arrays."""
    C = Yt.shape[0]
    q = design.q
    r = np.broadcast_to(np.asarray(family.size, dtype=float), (C,)).copy() \
        if isinstance(family, NegativeBinomial) else np.zeros(C)
    out = np.zeros((C, 1 + q + q * q))
    _glm_sums(design.ZT, Yt, Ot, r, np.ascontiguousarray(coef, dtype=float), out)
    return out[:, 0], out[:, 1:1 + q], out[:, 1 + q:].reshape(C, q, q)
