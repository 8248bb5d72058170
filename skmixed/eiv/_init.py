"""Starting values for the GLM-EIV EM.

``"accelerated"`` (seed 001, section 3; glmeiv's ``run_glmeiv_given_precomputations``):

1. pilot GLMs of every gene and every gRNA on the covariates alone (shared by every pair
   that uses them; an NB size, when estimated, comes from this fit as ``MASS::glm.nb``);
2. a reduced EM per pair in which the pilot linear predictors are offsets and the only
   parameters are ``pi`` and the two perturbation coefficients; its M-step is the closed
   form of the mean-plus-offset model (``NegBinOffsetMean``'s
   ``log(sum T y / sum T e^o)``, exact for Poisson and the large-n approximation for NB),
   run from ``n_restarts`` random starts at once;
3. the best reduced run (largest log-likelihood among runs with a plausible mRNA effect)
   with the pilot intercepts and covariate coefficients starts one full EM.

``"random"``: glmeiv's ``run_glmeiv_random_init_simulatr`` ranges for every coefficient.
"""

from __future__ import annotations

import numpy as np

from .._backend import get_namespace, to_host
from .._families import NegativeBinomial, Poisson
from . import _fused
from ._em import m_step_modality
from ._model import as_design, kernel, posterior_and_softplus

# glmeiv's guess ranges
PI_RANGE = (1e-5, 0.03)
M_PERT_RANGE = (np.log(0.1), np.log(1.5))
G_PERT_RANGE = (np.log(0.5), np.log(10.0))
M_INT_RANGE = G_INT_RANGE = (np.log(1e-4), np.log(1e-1))
COV_RANGE = (np.log(0.25), np.log(2.0))


# (cells x columns) per pilot block: small enough to stay in cache and to share among threads
_PILOT_ELEMENTS = 2**17


def fit_pilot(Z, Y, offset, family, size=None, *, map=map):  # noqa: A002
    """Covariates-only GLM of every column of Y (n, C), in blocks of columns.

    Returns ``(coef (C, q), eta (n, C), size (C,) or None, converged (C,))``. For
    ``family="negative_binomial"`` with ``size=None`` the size is the joint maximum-likelihood
    estimate with the coefficients (``MASS::glm.nb``): Poisson start, then alternate a
    fixed-size Newton fit and Newton steps on ``log(size)``.
    """
    xp = get_namespace(Y)
    n, C = Y.shape
    step = max(1, _PILOT_ELEMENTS // max(n, 1))
    if C <= step:
        return _fit_pilot(Z, Y, offset, family, size)

    def one(sl):
        o = offset if offset.shape[1] == 1 else offset[:, sl]
        return _fit_pilot(Z, Y[:, sl], o, family, None if size is None else size[sl])

    parts = list(map(one, [slice(s, min(s + step, C)) for s in range(0, C, step)]))
    coef = xp.concatenate([p[0] for p in parts])
    eta = xp.concatenate([p[1] for p in parts], axis=1)
    sz = None if parts[0][2] is None else xp.concatenate([p[2] for p in parts])
    return coef, eta, sz, np.concatenate([p[3] for p in parts])


def _fit_pilot(Z, Y, offset, family, size=None, *, max_outer=50):
    """Covariates-only GLM of every column of Y (n, C) (see :func:`fit_pilot`)."""
    xp = get_namespace(Y)
    n, C = Y.shape
    design = as_design(Z)
    Z = design.Z
    # start: the intercept-only Poisson MLE log(sum y / sum e^o)
    coef = xp.zeros((C, Z.shape[1]))
    coef[:, 0] = xp.log(xp.sum(Y, axis=0)) - xp.log(xp.sum(xp.exp(offset), axis=0))
    if family == "poisson" or size is None:
        coef, conv = m_step_modality(design, Poisson(), Y, offset, None, coef)
    if family == "poisson":
        return coef, Z @ coef.T + offset, None, np.full(C, bool(conv))
    if size is not None:
        s = xp.broadcast_to(xp.asarray(size, dtype=float), (C,)).copy()
        coef, conv = m_step_modality(design, NegativeBinomial(s), Y, offset, None, coef)
        return coef, Z @ coef.T + offset, s, np.full(C, bool(conv))
    mu = xp.exp(Z @ coef.T + offset)
    # moment start: var = mu + mu^2 / size
    excess = xp.sum((Y - mu) ** 2 - Y, axis=0)
    u = xp.log(xp.clip(xp.sum(mu**2, axis=0) / xp.maximum(excess, 1e-8), 1e-3, 1e8))
    tables = _count_tables(Y)
    for _ in range(max_outer):
        fam = NegativeBinomial(xp.exp(u))
        coef, conv = m_step_modality(design, fam, Y, offset, None, coef)
        mu = fam.mean(Z @ coef.T + offset)
        u_old = u
        u = _size_newton(Y, mu, u, tables)
        if conv and bool(xp.all(xp.abs(u - u_old) < 1e-9)):
            # the coefficients are the MLE at a size within 1e-9 (relative) of the new one:
            # a refit would move them by as little, at the cost of a pass
            return coef, Z @ coef.T + offset, xp.exp(u), np.full(C, True)
    fam = NegativeBinomial(xp.exp(u))
    coef, conv = m_step_modality(design, fam, Y, offset, None, coef)
    return coef, Z @ coef.T + offset, xp.exp(u), np.full(C, False)


def _count_tables(Y):
    """Counts of each value per column, (C, V), when Y holds integers (else None): the
    digamma sums of the NB size score over n cells become sums over the V values."""
    xp = get_namespace(Y)
    Yh = np.asarray(to_host(Y))
    if not np.all(Yh == np.round(Yh)) or Yh.max() > 1e5:
        return None
    V = int(Yh.max()) + 1
    C = Yh.shape[1]
    flat = (Yh.astype(np.int64) + V * np.arange(C)[None, :]).ravel()
    return xp.asarray(np.bincount(flat, minlength=V * C).reshape(C, V).astype(float))


def _size_newton(Y, mu, u, tables, *, max_iter=50):
    """Newton steps on ``u = log(size)`` at fixed means, every column at once: the NB size
    MLE of ``MASS::theta.ml``. The digamma/trigamma sums come from the count tables; columns
    with size >= 100 (where those differences cancel) use the family's asymptotic forms."""
    xp = get_namespace(Y)
    n = Y.shape[0]
    sp = _special_ns(xp)
    done = xp.zeros(u.shape, dtype=bool)
    for _ in range(max_iter):
        r = xp.exp(u)
        big = (r >= 100.0) if tables is not None else xp.ones(u.shape, dtype=bool)
        g = xp.zeros(u.shape)
        h = -xp.ones(u.shape)
        if tables is not None and not bool(xp.all(big)):
            g, h = _table_derivs(Y, mu, r, tables, n, sp)
        idx = xp.flatnonzero(big & ~done)
        if idx.size:
            # only the columns that need it: the elementwise asymptotic forms
            gb, hb = NegativeBinomial(r[idx]).size_derivatives(Y[:, idx], mu[:, idx])
            g[idx], h[idx] = xp.sum(gb, axis=0), xp.sum(hb, axis=0)
        g = xp.where(done, 0.0, g)
        step = xp.where(h < 0, -g / xp.where(h < 0, h, -1.0), xp.sign(g))
        step = xp.clip(step, -2.0, 2.0)
        u = xp.clip(u + step, np.log(1e-4), np.log(1e10))
        # a column at the cap has no overdispersion to estimate (the Poisson limit)
        # Newton converges quadratically: after a step below 1e-10 the next would be ~1e-20
        done = done | (xp.abs(step) < 1e-10) | (u >= np.log(1e10))
        if bool(xp.all(done)):
            break
    return u


def _table_derivs(Y, mu, r, tables, n, sp):
    """First and second derivatives of the NB log-likelihood in ``log(size)``."""
    xp = get_namespace(Y)
    v = xp.arange(tables.shape[1], dtype=float)[None, :]
    rc = r[:, None]
    A = xp.sum(tables * (sp.digamma(v + rc) - sp.digamma(rc)), axis=1)
    B = xp.sum(tables * (sp.polygamma(1, v + rc) - sp.polygamma(1, rc)), axis=1)
    rm = r[None, :] + mu
    ypr = Y + r[None, :]
    d1 = A + n * (xp.log(r) + 1.0) - xp.sum(xp.log(rm) + ypr / rm, axis=0)
    d2 = B + n / r - xp.sum((2.0 - ypr / rm) / rm, axis=0)
    return r * d1, r * r * d2 + r * d1


def _special_ns(xp):
    if xp is np:
        import scipy.special  # noqa: PLC0415

        return scipy.special
    import cupyx.scipy.special  # noqa: PLC0415

    return cupyx.scipy.special


def _ratio_pieces(fam, y, L):
    """Per-pair pieces of the reduced E-step, so that each restart costs one pass; (B, n)
    float32 arrays, pairs in rows, so that every pass and every sum runs along contiguous
    cells (numpy's sums across a few columns of an (n, C) array are 10x slower).

    Poisson: ``l(y; L + b) - l(y; L) = y b - e^L (e^b - 1)``. NB with size r:
    ``y b - (y + r) (log1p(x e^b) - log1p(x))`` with ``x = e^L / r``.
    """
    xp = get_namespace(y)
    y = y.T
    E = xp.exp(L.T)

    def f32(a):
        return xp.ascontiguousarray(a, dtype=np.float32)

    if isinstance(fam, Poisson):
        return ("poisson", f32(y), f32(E), None, None)
    r = fam.size[:, None] if fam.size.ndim else fam.size
    x = E / r
    return ("nb", f32(y), f32(E), f32(x), (f32(y + r), f32(xp.log1p(x))))


def _take(pieces, rows):
    kind, y, E, x, extra = pieces
    return (kind, y[rows], E[rows], None if x is None else x[rows],
            None if extra is None else tuple(a[rows] for a in extra))


def _log_ratio(pieces, b):
    """``l(y; L + b) - l(y; L)`` per run and cell, (C, cells), for gathered pieces and b (C,)."""
    kind, y, E, x, extra = pieces
    xp = get_namespace(y)
    b = b[:, None]
    if kind == "poisson":
        return y * b - E * xp.expm1(b)
    ypr, l0 = extra
    return y * b - ypr * (xp.log1p(x * xp.exp(b)) - l0)


def reduced_em(fm, fg, M, G, Lm, Lg, guesses, *, tol=0.5e-4, max_iter=50, min_iter=3, merge=0.1):
    """glmeiv's ``run_reduced_em_algo`` for B pairs x K restarts at once.

    ``Lm``, ``Lg`` (n, B) are the pilot linear predictors (offsets of the reduced model);
    ``guesses`` = (pi, m_pert, g_pert), each (B, K). All runs are computed as one (n, B, K)
    array (the per-pair pieces broadcast over the restarts) until fewer than half are still
    running; the survivors are then gathered into (n, C) columns. A run that comes within
    ``merge`` of another run of the same pair (in log pi and both coefficients) is dropped:
    the two would end in the same basin, and only the best run is used. 0.1 is about two
    standard errors at 50,000 cells, while distinct maxima lie far apart (pi near 0 against
    0.02, effects of opposite signs); with NB mRNA and a weak gRNA the runs of the main
    basin approach each other slowly (the closed-form M-step is approximate there) and a
    tighter 0.01 kept 15 runs a pass longer, where the full EM's Newton steps finish the
    work anyway. Returns pi, m_pert,
    g_pert and the log-likelihood (parameter-dependent part; -inf for dropped and failed runs),
    each (B, K).
    """
    xp = get_namespace(M)
    n, B = M.shape
    # the run parameters and all bookkeeping live on the host; the cells on M's device
    pi0, bm0, bg0 = (np.asarray(to_host(a), dtype=float) for a in guesses)
    K = pi0.shape[1]
    pm, pg = _ratio_pieces(fm, M, Lm), _ratio_pieces(fg, G, Lg)
    base = np.asarray(to_host(xp.sum(kernel(fm, M, Lm) + kernel(fg, G, Lg), axis=0)))  # (B,)
    pair = np.repeat(np.arange(B), K)
    pi, bm, bg = pi0.reshape(-1).copy(), bm0.reshape(-1).copy(), bg0.reshape(-1).copy()
    ll = np.full(B * K, -np.inf)
    prev = np.full(B * K, -np.inf)
    active = np.arange(B * K)
    work = active  # the runs the arrays hold
    fused = _fused.usable(xp)
    if fused:
        Pf, NBf = _fused.pieces(pm, pg)
    else:
        Ps, nbm = _dense_matrix(pm, pg)
    # per pair, the column totals: the sums of (1 - T) when a run's labels are swapped
    tot = [np.asarray(to_host(xp.sum(a, axis=1, dtype=float)), dtype=float) for a in (pm[1], pm[2], pg[1], pg[2])]
    shape = (B, K)

    def dev(a):
        return xp.asarray(a.astype(np.float32))

    for it in range(1, max_iter + 1):
        # the log-likelihood of an iteration before min_iter - 1 is never compared
        with_ll = it >= min_iter - 1 or it == max_iter
        if fused:
            # the compiled pass visits the active runs alone, pair by pair
            work = active
            pa = pi[work]
            sums = _fused.reduced_sums(Pf, NBf, pair[work], pa, bm[work], bg[work], with_ll=with_ll).T
        else:
            if shape is not None and (active.size < 0.5 * work.size or (B == 1 and active.size < work.size)):
                work = active
                if B == 1:
                    # one pair: its remaining runs stay products with P (cheaper than gathered
                    # elementwise passes, and free to shrink to); with several pairs the
                    # counts differ per pair
                    shape = (1, work.size)
                else:
                    wx = pair[work] if xp is np else xp.asarray(pair[work])
                    am, ag = _take(pm, wx), _take(pg, wx)
                    shape = None
            pa, bma, bga = pi[work], bm[work], bg[work]
            if shape is not None:
                pa, bma, bga = pa.reshape(shape), bma.reshape(shape), bga.reshape(shape)
                sums = _dense_pass(Ps, nbm, dev(pa), dev(bma), dev(bga), with_ll=with_ll)
            else:
                sums = _reduced_pass(am, ag, dev(pa), dev(bma), dev(bga))
        sp_sum, T_sum, Tym, TEm, Tyg, TEg = (np.asarray(to_host(a), dtype=float).reshape(-1) for a in sums)
        pa = pa.reshape(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ll_new = sp_sum + n * np.log1p(-pa) + base[pair[work]]
        pi_new = T_sum / n
        flip = pi_new > 0.5
        if flip.any():
            # swap the labels: sums of (1 - T) from the column totals
            Tym, TEm, Tyg, TEg = (np.where(flip, t[pair[work]] - v, v) for t, v in zip(tot, (Tym, TEm, Tyg, TEg)))
            pi_new = np.where(flip, 1.0 - pi_new, pi_new)
        pos = np.searchsorted(work, active)
        ll_h = ll_new[pos]
        bad = ~np.isfinite(ll_h) | (pi_new[pos] <= 0)
        ll_h[bad] = -np.inf
        ll[active] = ll_h
        pi[active] = pi_new[pos]
        with np.errstate(invalid="ignore"):
            rel = np.abs(ll_h - prev[active]) / np.minimum(np.abs(ll_h), np.abs(prev[active]))
        prev[active] = ll_h
        done = bad | ((rel < tol) & (it >= min_iter))
        if it == max_iter or done.all():
            break
        # closed-form M-step (mean-plus-offset MLE, Poisson form) for the runs that go on
        keep = active[~done]
        kpos = np.searchsorted(work, keep)
        with np.errstate(divide="ignore", invalid="ignore"):
            bm[keep] = np.log(Tym[kpos]) - np.log(TEm[kpos])
            bg[keep] = np.log(Tyg[kpos]) - np.log(TEg[kpos])
        active = _drop_duplicates(keep, pair, pi, bm, bg, ll, merge)
        if active.size == 0:
            break
    return pi.reshape(B, K), bm.reshape(B, K), bg.reshape(B, K), ll.reshape(B, K)


# cells per block of the reduced E-step: its (cells, runs) temporaries stay in cache
_BLOCK = 2**16


def _reduced_pass(am, ag, pa, bma, bga):
    """One reduced E-step over blocks of cells, in float32 (an initialisation: 1e-7 relative
    is ample, and float32 exp/log1p run 2-4x faster), accumulated in float64: the sums the
    convergence check and the closed-form M-step need, ``sum softplus(d)``, ``sum T``,
    ``sum T y`` and ``sum T e^L`` for both modalities, per run (C,). ``am``, ``ag``: the
    runs' gathered pieces, (C, n)."""
    xp = get_namespace(pa)
    n = am[1].shape[1]
    rows = max(64, _BLOCK // max(pa.size, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        logit = (xp.log(pa) - xp.log1p(-pa))[:, None]
    out = [xp.zeros(pa.shape) for _ in range(6)]  # float64 accumulators over the blocks
    for s in range(0, n, rows):
        bm_, bg_ = _cells(am, s, s + rows), _cells(ag, s, s + rows)
        d = _log_ratio(bm_, bma)
        d += _log_ratio(bg_, bga)
        d += logit
        T, sp = posterior_and_softplus(d)
        out[0] += xp.sum(sp, axis=1)
        out[1] += xp.sum(T, axis=1)
        for k, a in enumerate((bm_[1], bm_[2], bg_[1], bg_[2])):
            a = a * T
            out[2 + k] += xp.sum(a, axis=1)
    return out


def _dense_matrix(pm, pg):
    """Per pair, the cells' linear pieces as one (B, n, 5) float32 matrix
    ``P = [y_m, e^{L_m}, y_g, e^{L_g}, 1]``: while every restart runs, the reduced E-step's
    log-ratio (Poisson parts) and the M-step's sums are matrix products with it. For NB mRNA
    also ``x = e^{L_m} / r``, ``y + r`` and ``(y + r) log1p(x)``, each (B, n)."""
    xp = get_namespace(pm[1])
    cols = [pm[1], pm[2], pg[1], pg[2], xp.ones_like(pm[1])]
    P = xp.stack(cols, axis=2)
    nb = None
    if pm[0] == "nb":
        ypr, l0 = pm[4]
        nb = (pm[3], ypr, ypr * l0)
    return P, nb


def _dense_pass(P, nb, pa, bma, bga, with_ll=True):
    """:func:`_reduced_pass` for every restart of every pair, (B, K) runs, through matrix
    products: ``d = W' P'`` (+ the NB mRNA term), and the sums ``T P`` and ``softplus(d) 1``.

    The block temporaries are (B, K, cells): every elementwise pass, the NB term's
    broadcasts of per-cell pieces over the runs included, runs along contiguous cells (a
    (cells, K) layout broadcasts over a trailing axis of K = 15, 10x slower). They are
    allocated once per pass (a fresh 256 KB array per operation costs page faults
    comparable to the operation), and the column sums are matrix products with P's column
    of ones. ``with_ll=False``: the softplus sum (the log-likelihood) is left at 0."""
    xp = get_namespace(P)
    B, n, _ = P.shape
    K = pa.shape[1]
    f = P.dtype.type
    with np.errstate(divide="ignore", invalid="ignore"):
        logit = xp.log(pa) - xp.log1p(-pa)
    m_lin = xp.zeros_like(bma) if nb is not None else -xp.expm1(bma)
    WT = xp.stack([bma, m_lin, bga, -xp.expm1(bga), logit], axis=2)  # (B, K, 5)
    if nb is not None:
        ebm = xp.exp(bma)[:, :, None]
    rows = max(64, _BLOCK // max(B * K, 1))
    S = xp.zeros((B, K, 5))
    sp_sum = xp.zeros((B, K, 1))
    bufs = [xp.empty((B, K, min(rows, n)), dtype=P.dtype) for _ in range(3)]
    for s in range(0, n, rows):
        Pb = P[:, s:s + rows, :]
        m = Pb.shape[1]
        if m != bufs[0].shape[2]:
            # the last, shorter block: contiguous buffers of its own (CuPy's ``out=``)
            bufs = [xp.empty((B, K, m), dtype=P.dtype) for _ in range(3)]
        d, x, u = bufs
        xp.matmul(WT, Pb.transpose(0, 2, 1), out=d)
        if nb is not None:
            xb, ypr, c0 = (a[:, None, s:s + rows] for a in nb)
            xp.multiply(xb, ebm, out=x)
            xp.log1p(x, out=x)
            x *= ypr
            d += c0
            d -= x
        # T = e^d / (1 + e^d) and softplus(d) = log(1 + e^d) from one exp, as
        # posterior_and_softplus, in the preallocated buffers
        # the clip (beyond 35 both are 1 and d within float32 rounding) only when needed:
        # a max is a sixth of a minimum's pass
        big = float(xp.max(d)) > 35.0
        if big:
            xp.minimum(d, f(35.0), out=x)
            xp.exp(x, out=x)
        else:
            xp.exp(d, out=x)
        xp.add(x, f(1.0), out=u)
        xp.divide(x, u, out=u)
        S += u @ Pb
        if with_ll:
            xp.log1p(x, out=x)
            if big:
                x[...] = xp.where(d > 35.0, d, x)
            sp_sum += x @ Pb[:, :, 4:5]
    return [sp_sum[:, :, 0], S[:, :, 4], S[:, :, 0], S[:, :, 1], S[:, :, 2], S[:, :, 3]]


def _cells(pieces, s, e):
    kind, y, E, x, extra = pieces
    return (kind, y[:, s:e], E[:, s:e], None if x is None else x[:, s:e],
            None if extra is None else tuple(a[:, s:e] for a in extra))


def _drop_duplicates(active, pair, pi, bm, bg, ll, tol):
    """Drop runs whose (pair, pi, m_pert, g_pert) match an earlier active run within ``tol``
    (relative for pi); their log-likelihood is set to -inf so that the survivor stands for them."""
    if active.size < 2:
        return active
    key = np.column_stack([pair[active], np.log(np.maximum(pi[active], 1e-300)) / tol, bm[active] / tol,
                           bg[active] / tol])
    key[:, 1:] = np.round(key[:, 1:])
    # the first run of each (pair, cell) group: a stable sort, then the rows that differ
    # from their predecessor (np.unique(axis=0) takes 0.5 ms on 15 rows)
    order = np.lexsort(key.T[::-1])
    ks = key[order]
    keep = np.zeros(active.size, dtype=bool)
    keep[order[np.r_[True, np.any(ks[1:] != ks[:-1], axis=1)]]] = True
    ll[active[~keep]] = -np.inf
    return active[keep]


def select_best(pi, bm, bg, ll, m_range=M_PERT_RANGE):
    """glmeiv's ``select_best_em_run``: largest log-likelihood among the runs whose
    m_perturbation lies in ``m_range`` (all runs if none does). Host arrays in, (B,) out."""
    xp = np
    ok = (bm >= m_range[0]) & (bm <= m_range[1]) & xp.isfinite(ll)
    any_ok = xp.any(ok, axis=1, keepdims=True)
    score = xp.where(ok | ~any_ok, ll, -xp.inf)
    score = xp.where(xp.isnan(score), -xp.inf, score)
    j = xp.argmax(score, axis=1)
    r = xp.arange(ll.shape[0])
    return pi[r, j], bm[r, j], bg[r, j], ll[r, j]
