"""Inference for linear mixed models: Satterthwaite degrees of freedom (lmerTest) and
likelihood-ratio tests between nested fits (lme4's ``anova``).

lmerTest (Kuznetsova, Brockhoff and Christensen 2017) parameterises the variance by
``varpar = (theta, sigma)``; ``A = 2 H^-1`` with ``H`` the Hessian of the (REML)
deviance with sigma not profiled out, and for a contrast ``l``

    df = 2 (l' C l)^2 / (g' A g),   C = sigma^2 (RX'RX)^-1,   g = d (l' C l) / d varpar.

Derivatives are by central differences with Richardson extrapolation (lmerTest uses
numDeriv's Richardson extrapolation too).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.stats

from .._threads import one_blas_thread
from . import _lmm_core as core


def _steps(x):
    """numDeriv's starting steps: ``d |x|`` with ``d = 0.1``, ``eps = 1e-4`` near zero."""
    return np.where(np.abs(x) < np.sqrt(np.finfo(float).eps / 7e-7), 1e-4, 0.1 * np.abs(x))


def _extrapolate(values):
    """Richardson table over steps halved each time (central differences: error in h^2)."""
    a = list(values)
    for m in range(1, len(a)):
        a = [(4**m * a[i + 1] - a[i]) / (4**m - 1) for i in range(len(a) - 1)]
    return a[0]


def _richardson(f, x, i, h, j=None, hj=None, r=4):
    """First (or mixed second) derivative by central differences, Richardson extrapolated
    over ``r`` halvings of the steps (numDeriv's defaults ``d = 0.1, r = 4, v = 2``)."""

    def shift(xx, k, dk):
        y = xx.copy()
        y[k] += dk
        return y

    vals = []
    for t in range(r):
        hh = h / 2**t
        if j is None:
            vals.append((f(shift(x, i, hh)) - f(shift(x, i, -hh))) / (2 * hh))
            continue
        kk = hj / 2**t
        if i == j:
            vals.append((f(shift(x, i, hh)) - 2 * f(x) + f(shift(x, i, -hh))) / hh**2)
        else:
            pp = f(shift(shift(x, i, hh), j, kk))
            pm = f(shift(shift(x, i, hh), j, -kk))
            mp = f(shift(shift(x, i, -hh), j, kk))
            mm = f(shift(shift(x, i, -hh), j, -kk))
            vals.append((pp - pm - mp + mm) / (4 * hh * kk))
    return _extrapolate(vals)


class _ThetaCache:
    """The pieces of lmerTest's ``devfun_vp`` and ``get_covbeta`` that depend on theta only.

    ``dev(theta, sigma) = A(theta) + r2(theta) / sigma^2 + n' log(2 pi sigma^2) - sum(log w)``
    and ``vcov(theta, sigma) = sigma^2 (RX'RX)^-1(theta)``: the finite differences move
    sigma for free, and every theta is solved once (the Hessian's and the Jacobian's steps
    coincide).
    """

    def __init__(self, stats, reml, col):
        self.stats, self.reml, self.col, self.memo = stats, reml, col, {}

    def at(self, theta):
        key = theta.tobytes()
        if key not in self.memo:
            sol = core.solve(self.stats, theta, cols=[self.col])
            A = sol.logdet_L + (sol.logdet_RX if self.reml else 0.0) - self.stats.sum_log_w
            RXi = np.linalg.inv(sol.RX)
            self.memo[key] = (A, float(sol.r2[0]), RXi @ RXi.T)
        return self.memo[key]

    def dev(self, vp):
        A, r2, _ = self.at(vp[:-1])
        s2 = vp[-1] ** 2
        nn = self.stats.n - self.stats.p if self.reml else self.stats.n
        return A + nn * (np.log(2 * np.pi) + np.log(s2)) + r2 / s2

    def vcov(self, vp):
        return vp[-1] ** 2 * self.at(vp[:-1])[2]


def satterthwaite(model, L, response=0):
    """Satterthwaite df of the contrasts in the rows of ``L`` (over the kept fixed effects)."""
    with one_blas_thread():
        return _satterthwaite(model, np.atleast_2d(L), response)


def _satterthwaite(model, L, response):
    stats = model._stats
    reml = bool(model.reml)
    theta = np.atleast_2d(model.theta_)[response] if model.n_responses_ else model.theta_
    sigma = float(np.atleast_1d(model.sigma_)[response])
    varpar = np.concatenate([theta, [sigma]])
    k = varpar.size
    steps = _steps(varpar)

    cache = _ThetaCache(stats, reml, response)
    H = np.empty((k, k))
    for a in range(k):
        for b in range(a, k):
            H[a, b] = H[b, a] = _richardson(cache.dev, varpar, a, steps[a], b, steps[b])
    A = 2.0 * np.linalg.pinv(H)
    C = cache.vcov(varpar)
    # Jacobian of vcov(beta) in varpar, all entries at once
    jac = [_richardson(cache.vcov, varpar, a, steps[a]) for a in range(k)]
    df = np.empty(L.shape[0])
    for r, l in enumerate(L):
        grad = np.array([float(l @ J @ l) for J in jac])
        v = float(l @ C @ l)
        df[r] = 2 * v**2 / float(grad @ A @ grad)
    return df


def anova(*models):
    """Likelihood-ratio tests between nested linear mixed models, as lme4's ``anova(m0, m1)``.

    Parameters
    ----------
    *models : LinearMixedModel
        Two or more fitted models of the same data, nested in order of their number of
        parameters, fitted by ML (``reml=False``). REML likelihoods of models with
        different fixed effects are not comparable; lme4 refits them by ML, skmixed asks
        for the ML fits.

    Returns
    -------
    DataFrame
        One row per model, sorted by number of parameters: npar, AIC, BIC, logLik,
        deviance, Chisq, Df, p_value (each row against the one above).

    Examples
    --------
    >>> from skmixed.datasets import load_sleepstudy
    >>> from skmixed.mixed import LinearMixedModel, anova
    >>> data = load_sleepstudy()
    >>> m0 = LinearMixedModel.from_formula("Reaction ~ Days + (Days || Subject)", data, reml=False)
    >>> m1 = LinearMixedModel.from_formula("Reaction ~ Days + (Days | Subject)", data, reml=False)
    >>> anova(m0, m1)[["npar", "Chisq", "p_value"]].round(3)
            npar  Chisq  p_value
    model0     5    NaN      NaN
    model1     6  0.064      0.8
    """
    if len(models) < 2:
        raise ValueError(f"anova needs at least two models, got {len(models)}.")
    fits = [_ml_version(m) for m in models]
    order = np.argsort([f.n_params_ for f in fits], kind="stable")
    rows, prev = [], None
    for i in order:
        f = fits[i]
        row = {"npar": f.n_params_, "AIC": f.aic_, "BIC": f.bic_, "logLik": f.loglik_,
               "deviance": -2 * f.loglik_, "Chisq": np.nan, "Df": np.nan, "p_value": np.nan}
        if prev is not None:
            chisq = max(2 * (f.loglik_ - prev.loglik_), 0.0)
            df = f.n_params_ - prev.n_params_
            row.update(Chisq=chisq, Df=df, p_value=scipy.stats.chi2.sf(chisq, df) if df > 0 else np.nan)
        rows.append(row)
        prev = f
    return pd.DataFrame(rows, index=[f"model{i}" for i in order])


def _ml_version(model):
    if getattr(model, "n_responses_", None) is not None:
        raise ValueError("anova compares fits of one response; this model has several.")
    if model.reml:
        raise ValueError("anova needs ML fits (reml=False): REML likelihoods of models with different "
                         "fixed effects are not comparable (lme4 refits them by ML).")
    return model
