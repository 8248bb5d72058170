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
from ..glm._newton import fit_glm
from ._model import kernel, posterior_and_softplus

# glmeiv's guess ranges
PI_RANGE = (1e-5, 0.03)
M_PERT_RANGE = (np.log(0.1), np.log(1.5))
G_PERT_RANGE = (np.log(0.5), np.log(10.0))
M_INT_RANGE = G_INT_RANGE = (np.log(1e-4), np.log(1e-1))
COV_RANGE = (np.log(0.25), np.log(2.0))


class _KernelFamily:
    """A family whose ``loglik`` is only the parameter-dependent kernel: ``fit_glm``'s line
    search compares log-likelihoods, and the NB normaliser (a ``betaln`` per count) would be
    recomputed at every trial point for nothing. The pilot does not use the returned value."""

    def __init__(self, family):
        self.family = family
        self.size = getattr(family, "size", None)

    def loglik(self, y, eta, weights=None):
        ll = kernel(self.family, y, eta)
        return ll if weights is None else weights * ll

    def mean(self, eta):
        return self.family.mean(eta)

    def score(self, y, mu, weights=None):
        return self.family.score(y, mu, weights)

    def information(self, mu, weights=None):
        return self.family.information(mu, weights)


def _fit_columns(Z, Y, family, offset, coef0=None):
    """``fit_glm`` over the columns of Y; offsets shared (n, 1) or one per column (n, C)."""
    if offset.shape[1] == 1:
        return fit_glm(Z, Y, _KernelFamily(family), offset=offset[:, 0], coef0=coef0)
    coefs, lls, conv = [], [], []
    for j in range(Y.shape[1]):
        fam = family if not isinstance(family, NegativeBinomial) or family.size.ndim == 0 else NegativeBinomial(family.size[j])
        r = fit_glm(Z, Y[:, j], _KernelFamily(fam), offset=offset[:, j], coef0=None if coef0 is None else coef0[j])
        coefs.append(r.coef[0]); lls.append(r.loglik[0]); conv.append(r.converged[0])
    xp = get_namespace(Y)
    return _Res(xp.stack(coefs), xp.stack(lls), np.array(conv))


class _Res:
    def __init__(self, coef, loglik, converged):
        self.coef, self.loglik, self.converged = coef, loglik, converged


# columns per pilot block: fit_glm holds (columns, p, n) arrays
_PILOT_ELEMENTS = 2**21


def fit_pilot(Z, Y, offset, family, size=None):
    """Covariates-only GLM of every column of Y (n, C), in blocks of columns.

    Returns ``(coef (C, q), eta (n, C), size (C,) or None, converged (C,))``. For
    ``family="negative_binomial"`` with ``size=None`` the size is the joint maximum-likelihood
    estimate with the coefficients (``MASS::glm.nb``): Poisson start, then alternate a
    fixed-size Newton fit and Newton steps on ``log(size)``.
    """
    xp = get_namespace(Y)
    n, C = Y.shape
    step = max(1, _PILOT_ELEMENTS // max(n * Z.shape[1], 1))
    if C <= step:
        return _fit_pilot(Z, Y, offset, family, size)
    parts = []
    for s in range(0, C, step):
        sl = slice(s, min(s + step, C))
        o = offset if offset.shape[1] == 1 else offset[:, sl]
        parts.append(_fit_pilot(Z, Y[:, sl], o, family, None if size is None else size[sl]))
    coef = xp.concatenate([p[0] for p in parts])
    eta = xp.concatenate([p[1] for p in parts], axis=1)
    sz = None if parts[0][2] is None else xp.concatenate([p[2] for p in parts])
    return coef, eta, sz, np.concatenate([p[3] for p in parts])


def _fit_pilot(Z, Y, offset, family, size=None, *, max_outer=50):
    """Covariates-only GLM of every column of Y (n, C).

    Returns ``(coef (C, q), eta (n, C), size (C,) or None, converged (C,))``. For
    ``family="negative_binomial"`` with ``size=None`` the size is the joint maximum-likelihood
    estimate with the coefficients (``MASS::glm.nb``): Poisson start, then alternate a
    fixed-size Newton fit and Newton steps on ``log(size)``.
    """
    xp = get_namespace(Y)
    C = Y.shape[1]
    if family == "poisson":
        r = _fit_columns(Z, Y, Poisson(), offset)
        return r.coef, Z @ r.coef.T + offset, None, np.asarray(r.converged)
    if size is not None:
        s = xp.broadcast_to(xp.asarray(size, dtype=float), (C,)).copy()
        r = _fit_columns(Z, Y, NegativeBinomial(s), offset)
        return r.coef, Z @ r.coef.T + offset, s, np.asarray(r.converged)
    r = _fit_columns(Z, Y, Poisson(), offset)
    coef = r.coef
    mu = xp.exp(Z @ coef.T + offset)
    # moment start: var = mu + mu^2 / size
    excess = xp.sum((Y - mu) ** 2 - Y, axis=0)
    u = xp.log(xp.clip(xp.sum(mu**2, axis=0) / xp.maximum(excess, 1e-8), 1e-3, 1e8))
    converged = np.zeros(C, dtype=bool)
    for _ in range(max_outer):
        fam = NegativeBinomial(xp.exp(u))
        r = _fit_columns(Z, Y, fam, offset, coef0=coef)
        coef = r.coef
        mu = fam.mean(Z @ coef.T + offset)
        u_old = u.copy()
        for _ in range(50):
            g, h = NegativeBinomial(xp.exp(u)).size_derivatives(Y, mu)
            g, h = xp.sum(g, axis=0), xp.sum(h, axis=0)
            step = xp.where(h < 0, -g / xp.where(h < 0, h, -1.0), xp.sign(g))
            u = xp.clip(u + xp.clip(step, -2.0, 2.0), np.log(1e-4), np.log(1e10))
            if bool(xp.all(xp.abs(step) < 1e-12)):
                break
        if bool(xp.all(xp.abs(u - u_old) < 1e-10)):
            converged[:] = True
            break
    fam = NegativeBinomial(xp.exp(u))
    r = _fit_columns(Z, Y, fam, offset, coef0=coef)
    converged &= np.asarray(r.converged)
    return r.coef, Z @ r.coef.T + offset, xp.exp(u), converged


def _uniform(rng, lo_hi, shape):
    return rng.uniform(lo_hi[0], lo_hi[1], size=shape)


def _ratio_pieces(fam, y, L):
    """Per-pair pieces of the reduced E-step, so that each restart costs one pass.

    Poisson: ``l(y; L + b) - l(y; L) = y b - e^L (e^b - 1)``. NB with size r:
    ``y b - (y + r) (log1p(x e^b) - log1p(x))`` with ``x = e^L / r``.
    """
    xp = get_namespace(y)
    E = xp.exp(L)
    if isinstance(fam, Poisson):
        return ("poisson", y, E, None, None)
    r = fam.size[None, :] if fam.size.ndim else fam.size
    x = E / r
    return ("nb", y, E, x, (y + r, xp.log1p(x)))


def _take(pieces, cols):
    kind, y, E, x, extra = pieces
    return (kind, y[:, cols], E[:, cols], None if x is None else x[:, cols],
            None if extra is None else tuple(a[:, cols] for a in extra))


def _dense(pieces):
    """The pieces as (n, B, 1): every restart of a pair broadcasts against them, no copies."""
    kind, y, E, x, extra = pieces
    return (kind, y[:, :, None], E[:, :, None], None if x is None else x[:, :, None],
            None if extra is None else tuple(a[:, :, None] for a in extra))


def _log_ratio(pieces, b):
    """``l(y; L + b) - l(y; L)`` per cell and run: (n, B, K) for dense pieces and b (B, K),
    (n, C) for gathered pieces and b (C,)."""
    kind, y, E, x, extra = pieces
    xp = get_namespace(y)
    if kind == "poisson":
        return y * b[None] - E * xp.expm1(b)[None]
    ypr, l0 = extra
    return y * b[None] - ypr * (xp.log1p(x * xp.exp(b)[None]) - l0)


def reduced_em(fm, fg, M, G, Lm, Lg, guesses, *, tol=0.5e-4, max_iter=50, min_iter=3, merge=1e-2):
    """glmeiv's ``run_reduced_em_algo`` for B pairs x K restarts at once.

    ``Lm``, ``Lg`` (n, B) are the pilot linear predictors (offsets of the reduced model);
    ``guesses`` = (pi, m_pert, g_pert), each (B, K). All runs are computed as one (n, B, K)
    array (the per-pair pieces broadcast over the restarts) until fewer than half are still
    running; the survivors are then gathered into (n, C) columns. A run that comes within
    ``merge`` of another run of the same pair (in log pi and both coefficients) is dropped:
    the two would end in the same basin, and only the best run is used. Returns pi, m_pert,
    g_pert and the log-likelihood (parameter-dependent part; -inf for dropped and failed runs),
    each (B, K).
    """
    xp = get_namespace(M)
    n, B = M.shape
    pi0, bm0, bg0 = (xp.asarray(a, dtype=float) for a in guesses)
    K = pi0.shape[1]
    pm, pg = _ratio_pieces(fm, M, Lm), _ratio_pieces(fg, G, Lg)
    base = xp.sum(kernel(fm, M, Lm) + kernel(fg, G, Lg), axis=0)  # (B,)
    pair = np.repeat(np.arange(B), K)
    pi, bm, bg = pi0.reshape(-1).copy(), bm0.reshape(-1).copy(), bg0.reshape(-1).copy()
    ll = np.full(B * K, -np.inf)
    prev = np.full(B * K, -np.inf)
    active = np.arange(B * K)
    work = active  # the runs the arrays hold
    am, ag = _dense(pm), _dense(pg)
    basew = xp.repeat(base, K)
    shape = (B, K)
    for it in range(1, max_iter + 1):
        if shape is not None and active.size < 0.5 * work.size:
            work = active
            wx = pair[work] if xp is np else xp.asarray(pair[work])
            am, ag = _take(pm, wx), _take(pg, wx)
            basew = base[wx]
            shape = None
        wx = work if xp is np else xp.asarray(work)
        pa, bma, bga = pi[wx], bm[wx], bg[wx]
        if shape is not None:
            pa3, bma3, bga3 = pa.reshape(shape), bma.reshape(shape), bga.reshape(shape)
        else:
            pa3, bma3, bga3 = pa, bma, bga
        sums = _reduced_pass(am, ag, pa3, bma3, bga3)
        sp_sum, T_sum, Tym, TEm, Tyg, TEg = (a.reshape(-1) for a in sums)
        with np.errstate(divide="ignore", invalid="ignore"):
            ll_new = sp_sum + n * xp.log1p(-pa) + basew
        pi_new = T_sum / n
        flip = pi_new > 0.5
        if bool(xp.any(flip)):
            # swap the labels: sums of (1 - T) from the column totals
            tot = [xp.sum(a, axis=0).reshape(-1) if shape is None else
                   xp.broadcast_to(xp.sum(a, axis=0), shape).reshape(-1) for a in (am[1], am[2], ag[1], ag[2])]
            Tym, TEm, Tyg, TEg = (xp.where(flip, t - v, v) for t, v in zip(tot, (Tym, TEm, Tyg, TEg)))
            pi_new = xp.where(flip, 1.0 - pi_new, pi_new)
        # bookkeeping on the host, for the runs still active
        pos = np.searchsorted(work, active)
        ll_h = np.asarray(to_host(ll_new), dtype=float)[pos]
        bad = ~np.isfinite(ll_h) | (np.asarray(to_host(pi_new))[pos] <= 0)
        ll_h[bad] = -np.inf
        ll[active] = ll_h
        pi[active] = to_host(pi_new)[pos] if xp is np else pi_new[xp.asarray(pos)]
        with np.errstate(invalid="ignore"):
            rel = np.abs(ll_h - prev[active]) / np.minimum(np.abs(ll_h), np.abs(prev[active]))
        prev[active] = ll_h
        done = bad | ((rel < tol) & (it >= min_iter))
        if it == max_iter or done.all():
            break
        # closed-form M-step (mean-plus-offset MLE, Poisson form) for every held run
        with np.errstate(divide="ignore", invalid="ignore"):
            bm_w = xp.log(Tym) - xp.log(TEm)
            bg_w = xp.log(Tyg) - xp.log(TEg)
        keep = active[~done]
        kpos = np.searchsorted(work, keep)
        kx = kpos if xp is np else xp.asarray(kpos)
        ax = keep if xp is np else xp.asarray(keep)
        bm[ax] = bm_w[kx]
        bg[ax] = bg_w[kx]
        active = _drop_duplicates(keep, pair, to_host(pi), to_host(bm), to_host(bg), ll, merge)
        if active.size == 0:
            break
    out = [np.asarray(to_host(a)).reshape(B, K) for a in (pi, bm, bg)]
    return (*[xp.asarray(a) for a in out], xp.asarray(ll.reshape(B, K)))


# cells per block of the reduced E-step: its (cells, runs) temporaries stay in cache
_BLOCK = 2**16


def _reduced_pass(am, ag, pa, bma, bga):
    """One reduced E-step over blocks of cells: the sums the convergence check and the
    closed-form M-step need, ``sum softplus(d)``, ``sum T``, ``sum T y`` and ``sum T e^L`` for
    both modalities, per run (shape of ``pa``)."""
    xp = get_namespace(pa)
    n = am[1].shape[0]
    width = int(np.prod(pa.shape))
    rows = max(64, _BLOCK // max(width, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        logit = (xp.log(pa) - xp.log1p(-pa))[None]
    out = [xp.zeros(pa.shape) for _ in range(6)]
    for s in range(0, n, rows):
        bm_, bg_ = _rows(am, s, s + rows), _rows(ag, s, s + rows)
        d = _log_ratio(bm_, bma)
        d += _log_ratio(bg_, bga)
        d += logit
        T, sp = posterior_and_softplus(d)
        out[0] += xp.sum(sp, axis=0)
        out[1] += xp.sum(T, axis=0)
        out[2] += xp.sum(T * bm_[1], axis=0)
        out[3] += xp.sum(T * bm_[2], axis=0)
        out[4] += xp.sum(T * bg_[1], axis=0)
        out[5] += xp.sum(T * bg_[2], axis=0)
    return out


def _rows(pieces, s, e):
    kind, y, E, x, extra = pieces
    return (kind, y[s:e], E[s:e], None if x is None else x[s:e],
            None if extra is None else tuple(a[s:e] for a in extra))


def _drop_duplicates(active, pair, pi, bm, bg, ll, tol):
    """Drop runs whose (pair, pi, m_pert, g_pert) match an earlier active run within ``tol``
    (relative for pi); their log-likelihood is set to -inf so that the survivor stands for them."""
    if active.size < 2:
        return active
    key = np.column_stack([pair[active], np.log(np.maximum(pi[active], 1e-300)), bm[active], bg[active]])
    q = np.round(key[:, 1:] / tol)
    _, first = np.unique(np.column_stack([key[:, :1], q]), axis=0, return_index=True)
    keep = np.zeros(active.size, dtype=bool)
    keep[first] = True
    ll[active[~keep]] = -np.inf
    return active[keep]


def select_best(pi, bm, bg, ll, m_range=M_PERT_RANGE):
    """glmeiv's ``select_best_em_run``: largest log-likelihood among the runs whose
    m_perturbation lies in ``m_range`` (all runs if none does). Returns (B,) arrays."""
    xp = get_namespace(ll)
    ok = (bm >= m_range[0]) & (bm <= m_range[1]) & xp.isfinite(ll)
    any_ok = xp.any(ok, axis=1, keepdims=True)
    score = xp.where(ok | ~any_ok, ll, -xp.inf)
    score = xp.where(xp.isnan(score), -xp.inf, score)
    j = xp.argmax(score, axis=1)
    r = xp.arange(ll.shape[0])
    return pi[r, j], bm[r, j], bg[r, j], ll[r, j]
