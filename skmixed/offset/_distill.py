"""The two per-unit fits of the resampling test: the *distillation* (a Poisson or NB
GLM of each gene's counts on the technical covariates, whose linear predictor is the
offset of the mean-plus-offset model) and the *treatment model* (a logistic regression
of each perturbation on the covariates, whose probabilities drive the conditional
resamples)."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.special
from sklearn.exceptions import ConvergenceWarning

from .._families import NegativeBinomial, Poisson, _trigamma
from .._parallel import Engine
from .._threads import one_blas_thread
from ..glm._newton import KernelLoglik as _KernelLoglik
from ..glm._newton import fit_glm
from . import _stream
from ._checks import as_matrix, design, treatment_matrix
from ._kernels import SIZE_MAX, moments_log_size, size_newton


# ------------------------------------------------------------------- distillation
class NoCountsWarning(UserWarning):
    """Genes without counts were left out of the distillation (NaN results)."""


@dataclass
class Distillation:
    """Per-gene GLM of counts on the technical covariates.

    Attributes
    ----------
    offsets : ndarray of shape (n_cells, n_genes)
        Fitted linear predictor, the offsets of the mean-plus-offset model
        (Fortran order: each gene's column is contiguous).
    size : ndarray of shape (n_genes,)
        NB size (``inf``: Poisson, or no overdispersion).
    coef : ndarray of shape (n_genes, 1 + n_covariates)
        Intercept and covariate coefficients.
    converged : ndarray of shape (n_genes,)

    A gene without counts has no maximum-likelihood fit (the intercept tends to
    ``-inf``): it is not fitted, its offsets, coef and NB size are NaN (its ``converged``
    True), and :func:`distill` warns.
    """

    offsets: np.ndarray
    size: np.ndarray
    coef: np.ndarray
    converged: np.ndarray


def distill(counts, covariates=None, *, family="negative_binomial", size=None, max_iter=100, max_rounds=10,
            n_jobs=None):
    """Fit ``counts[:, g] ~ family(exp([1, covariates] @ coef_g))`` for every gene.

    NB with ``size=None`` alternates, as ``MASS::glm.nb`` does, a GLM at fixed size
    (:func:`~skmixed.glm._newton.fit_glm`, started from the Poisson fit) and the
    maximum-likelihood size at fixed means, until the sizes settle.

    Parameters
    ----------
    counts : array-like of shape (n_cells, n_genes)
    covariates : array-like of shape (n_cells, n_covariates) or None
        Technical covariates (e.g. log library size, batch); an intercept is added.
    family : {"negative_binomial", "poisson"}
    size : None, float or array of shape (n_genes,)
        Fixed NB size(s); None estimates one per gene.
    max_iter : int
        Newton iterations per GLM fit.
    max_rounds : int
        GLM / size alternations.
    n_jobs : int or None
        Threads over chunks of genes (in-process; results do not depend on it).

    Returns
    -------
    Distillation
    """
    if family not in ("poisson", "negative_binomial"):
        raise ValueError(f"family must be 'poisson' or 'negative_binomial', got {family!r}.")
    Y, _ = as_matrix(counts, "counts")
    Poisson.check_response(Y, "counts")
    n, G = Y.shape
    X = design(covariates, n)
    offsets = np.empty((n, G), order="F")  # gene-major memory: a gene's offsets are contiguous
    sizes = np.full(G, np.inf)
    coefs = np.empty((G, X.shape[1]))
    converged = np.ones(G, bool)
    fixed = None if size is None else np.broadcast_to(np.asarray(size, dtype=float), (G,))

    # the log-likelihoods are concave in the coefficients: once every Newton decrement
    # is small the full step is taken unchecked (no log-likelihood pass per iteration);
    # only the coefficients are used (no log-likelihood or Hessian at the solution)
    glm = functools.partial(fit_glm, max_iter=max_iter, full_step_below=1e-3, summary=False)

    def fit_chunk(sl):
        Yc = Y[:, sl]
        # a gene without counts has no finite fit (its intercept runs off to -inf, and
        # its ~30 Newton steps would hold back the whole batch): left out, NaN
        has = np.any(Yc != 0, axis=0)
        if not has.all():
            coef, conv, r = np.full((Yc.shape[1], X.shape[1]), np.nan), np.ones(Yc.shape[1], bool), np.full(
                Yc.shape[1], np.nan if family == "negative_binomial" else np.inf)
            fit = np.flatnonzero(has)
            if fit.size:
                coef[fit], conv[fit], r[fit] = fit_columns(Yc[:, fit], None if fixed is None else fixed[sl][fit])
        else:
            coef, conv, r = fit_columns(Yc, None if fixed is None else fixed[sl])
        offsets[:, sl] = X @ coef.T
        return sl, coef, conv, r, int(np.sum(~has))

    def fit_columns(Yc, r_fixed):
        # for NB the Poisson fit is only a start (of the coefficients and the size)
        res = glm(X, Yc, _KernelLoglik(Poisson), tol=1e-6 if family == "negative_binomial" else 1e-10)
        coef, conv = res.coef, res.converged
        r = np.full(Yc.shape[1], np.inf)
        if family == "negative_binomial":
            if r_fixed is not None:
                r = r_fixed.copy()
                res = glm(X, Yc, _KernelLoglik(NegativeBinomial(r)), coef0=coef)
                coef, conv = res.coef, res.converged
            else:
                r = _profile_size(Yc, X @ coef.T, None)
                for _ in range(max_rounds):
                    res = glm(X, Yc, _KernelLoglik(NegativeBinomial(np.minimum(r, SIZE_MAX))), coef0=coef)
                    coef, conv = res.coef, res.converged
                    r_new = _profile_size(Yc, X @ coef.T, r)
                    change = np.abs(np.log(np.minimum(r_new, SIZE_MAX)) - np.log(np.minimum(r, SIZE_MAX)))
                    settled = bool(np.all(change < 1e-6))
                    r = r_new
                    if settled:
                        break
        return coef, conv, r

    chunks = _stream.column_chunks(G, n)
    # one BLAS thread: the products here are thin (n x few), and a multithreaded BLAS
    # beside the chunk threads (or other work) spins instead of computing (seconds per
    # Gram on a loaded 2-core machine, against 20 ms)
    empty = 0
    with one_blas_thread(), Engine(n_jobs=n_jobs, client=False) as pool:
        for sl, coef, conv, r, e in pool.map(fit_chunk, chunks):
            coefs[sl], converged[sl] = coef, conv
            empty += e
            if family == "negative_binomial":
                sizes[sl] = r
    if empty:
        warnings.warn(f"{empty} gene(s) have no counts: no GLM is fitted, their coef, offsets and size are NaN.",
                      NoCountsWarning, stacklevel=2)
    if not converged.all():
        warnings.warn(
            f"the distillation GLM did not converge for {int((~converged).sum())} gene(s).",
            ConvergenceWarning,
            stacklevel=2,
        )
    return Distillation(offsets=offsets, size=sizes, coef=coefs, converged=converged)


def _profile_size(Y, eta, r0, max_iter=100):
    """ML size per column of integer counts ``Y`` at fixed linear predictors ``eta``
    (``inf``: no overdispersion).

    The digamma terms of the size derivatives depend on a count only through its
    value, so they are evaluated once per distinct (column, count) pair, weighted by
    its frequency (as glmGamPoi does); the per-cell terms are rational functions.
    The split is arranged so that nothing cancels catastrophically (see
    :meth:`NegativeBinomial.size_derivatives`); ``test_offset_resampling`` checks it
    against the family's per-cell derivatives.
    """
    _n, G = Y.shape
    mu = np.exp(eta)
    Yi = Y.astype(np.int64)
    top = int(Yi.max()) + 1 if Yi.size else 1
    if G * top <= 8 * Yi.size:
        tab = np.bincount((Yi + top * np.arange(G)[None, :]).ravel(), minlength=G * top).reshape(G, top)
        gidx, v = np.nonzero(tab)
        c = tab[gidx, v].astype(float)
    else:
        keys, c = np.unique((Yi + top * np.arange(G)[None, :]).ravel(), return_counts=True)
        gidx, v = np.divmod(keys, top)
        c = c.astype(float)
    v = v.astype(float)
    sum_y = Y.sum(axis=0)
    excess = np.sum((Y - mu) ** 2 - Y, axis=0)
    u_mom = moments_log_size(excess, np.sum(mu * mu, axis=0))
    u = u_mom if r0 is None else np.log(np.minimum(r0, SIZE_MAX))

    def derivs(u):
        r = np.exp(u)
        rv = r[gidx]
        d1v, d2v = _digamma_differences(v, rv)
        S1 = np.bincount(gidx, weights=c * d1v, minlength=G)
        S2 = np.bincount(gidx, weights=c * d2v, minlength=G)
        C = r[None, :] + mu
        S1 += np.sum((mu - Y) / C - np.log1p(mu / r[None, :]), axis=0)
        S2 += np.sum((mu * mu + r[None, :] * Y) / (r[None, :] * C * C), axis=0)
        return r * S1, r * r * S2 + r * S1

    u, _, _, _ = size_newton(derivs, u, u_mom, sum_y > 0, max_iter)
    r = np.exp(u)
    r[u >= np.log(SIZE_MAX)] = np.inf
    return r


def _digamma_differences(v, r):
    """``psi(v + r) - psi(r)`` and ``psi'(v + r) - psi'(r)``; asymptotic series without
    cancellation for ``r >= 100``."""
    sp = scipy.special
    big = r >= 100.0
    rs = np.where(big, 1.0, r)
    d1 = sp.digamma(v + rs) - sp.digamma(rs)
    d2 = _trigamma(v + rs, np) - _trigamma(rs, np)
    A = r + v
    r2, A2 = r * r, A * A
    a1 = np.log1p(v / r) + v / (2.0 * r * A) + v * (r + A) / (12.0 * r2 * A2) + (1.0 / (A2 * A2) - 1.0 / (r2 * r2)) / 120.0
    a2 = (
        -v / (r * A)
        - v * (r + A) / (2.0 * r2 * A2)
        - v * (r2 + r * A + A2) / (6.0 * r2 * r * A2 * A)
        - (1.0 / (A2 * A2 * A) - 1.0 / (r2 * r2 * r)) / 30.0
    )
    return np.where(big, a1, d1), np.where(big, a2, d2)


def treatment_probabilities(treatment, covariates=None, *, max_iter=100, n_jobs=None):
    """``P(T_ip = 1 | covariates)`` from a logistic regression per perturbation.

    Parameters
    ----------
    treatment : array-like of shape (n_cells, n_perturbations), 0/1
    covariates : array-like of shape (n_cells, n_covariates) or None
    max_iter : int
        Newton iterations per perturbation.
    n_jobs : int or None
        Threads over chunks of perturbations (in-process; results do not depend on it).

    Returns
    -------
    pi : ndarray of shape (n_cells, n_perturbations)
        Fortran-ordered: each perturbation's probabilities are contiguous, as the
        conditional resampling reads them.
    """
    T, _ = treatment_matrix(treatment, None)
    pi, bad = _stream.treatment_chunks(T, design(covariates, T.shape[0]), max_iter=max_iter, n_jobs=n_jobs)
    _stream.warn_treatment(bad)
    return pi
