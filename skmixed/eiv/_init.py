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

from .._backend import expit, get_namespace
from .._families import NegativeBinomial, Poisson
from ..glm._newton import fit_glm
from ._model import kernel

# glmeiv's guess ranges
PI_RANGE = (1e-5, 0.03)
M_PERT_RANGE = (np.log(0.1), np.log(1.5))
G_PERT_RANGE = (np.log(0.5), np.log(10.0))
M_INT_RANGE = G_INT_RANGE = (np.log(1e-4), np.log(1e-1))
COV_RANGE = (np.log(0.25), np.log(2.0))


def _fit_columns(Z, Y, family, offset, coef0=None):
    """``fit_glm`` over the columns of Y; offsets shared (n, 1) or one per column (n, C)."""
    if offset.shape[1] == 1:
        return fit_glm(Z, Y, family, offset=offset[:, 0], coef0=coef0)
    coefs, lls, conv = [], [], []
    for j in range(Y.shape[1]):
        fam = family if not isinstance(family, NegativeBinomial) or family.size.ndim == 0 else NegativeBinomial(family.size[j])
        r = fit_glm(Z, Y[:, j], fam, offset=offset[:, j], coef0=None if coef0 is None else coef0[j])
        coefs.append(r.coef[0]); lls.append(r.loglik[0]); conv.append(r.converged[0])
    xp = get_namespace(Y)
    return _Res(xp.stack(coefs), xp.stack(lls), np.array(conv))


class _Res:
    def __init__(self, coef, loglik, converged):
        self.coef, self.loglik, self.converged = coef, loglik, converged


def fit_pilot(Z, Y, offset, family, size=None, *, max_outer=50):
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


def reduced_em(fm, fg, M, G, Lm, Lg, guesses, *, tol=0.5e-4, max_iter=50, min_iter=3):
    """glmeiv's ``run_reduced_em_algo`` for B pairs x K restarts at once.

    ``Lm``, ``Lg`` (n, B) are the pilot linear predictors (offsets of the reduced model);
    ``guesses`` = (pi, m_pert, g_pert), each (B, K). Returns the three parameters and the
    log-likelihood (parameter-dependent part), each (B, K).
    """
    xp = get_namespace(M)
    n, B = M.shape
    pi, bm, bg = (xp.asarray(a, dtype=float).copy() for a in guesses)
    K = pi.shape[1]
    # per-pair pieces that no restart changes
    k0m, k0g = kernel(fm, M, Lm), kernel(fg, G, Lg)
    base = xp.sum(k0m + k0g, axis=0)  # (B,)
    Em, Eg = xp.exp(Lm), xp.exp(Lg)
    ll = xp.full((B, K), -xp.inf)
    prev = xp.full((B, K), -xp.inf)
    active = xp.ones((B, K), dtype=bool)
    for it in range(1, max_iter + 1):
        d = _log_ratio(fm, M, Lm, k0m, Em, bm) + _log_ratio(fg, G, Lg, k0g, Eg, bg)  # (n, B, K)
        with np.errstate(divide="ignore"):
            d += (xp.log(pi) - xp.log1p(-pi))[None]
            ll_new = xp.sum(xp.logaddexp(0.0, d), axis=0) + n * xp.log1p(-pi) + base[:, None]
        T = expit(d)
        pi_new = xp.mean(T, axis=0)
        flip = pi_new > 0.5
        T = xp.where(flip[None], 1.0 - T, T)
        pi_new = xp.where(flip, 1.0 - pi_new, pi_new)
        bad = ~xp.isfinite(ll_new) | (pi_new <= 0)
        ll_new = xp.where(bad, -xp.inf, ll_new)
        ll = xp.where(active, ll_new, ll)
        pi = xp.where(active, pi_new, pi)
        with np.errstate(invalid="ignore"):
            rel = xp.abs(ll_new - prev) / xp.minimum(xp.abs(ll_new), xp.abs(prev))
        done = bad | ((rel < tol) & (it >= min_iter))
        active = active & ~done
        prev = ll_new
        if not bool(xp.any(active)) or it == max_iter:
            break
        # closed-form M-step (mean-plus-offset MLE, Poisson form)
        with np.errstate(divide="ignore", invalid="ignore"):
            bm_new = xp.log(xp.einsum("nbk,nb->bk", T, M)) - xp.log(xp.einsum("nbk,nb->bk", T, Em))
            bg_new = xp.log(xp.einsum("nbk,nb->bk", T, G)) - xp.log(xp.einsum("nbk,nb->bk", T, Eg))
        bm = xp.where(active, bm_new, bm)
        bg = xp.where(active, bg_new, bg)
    return pi, bm, bg, ll


def _log_ratio(fam, y, L, k0, E, b):
    """``l(y; L + b) - l(y; L)`` for every restart: (n, B, K)."""
    xp = get_namespace(y)
    if isinstance(fam, Poisson):
        return y[:, :, None] * b[None] - E[:, :, None] * xp.expm1(b)[None]
    size = fam.size
    fam3 = NegativeBinomial(size[:, None] if size.ndim else size)
    return fam3.loglik_kernel(y[:, :, None], L[:, :, None] + b[None]) - k0[:, :, None]


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
