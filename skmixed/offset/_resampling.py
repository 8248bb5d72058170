"""SCEPTRE-style resampling tests of perturbation effects, built on the
mean-plus-offset model.

For a gene ``g`` and a perturbation ``p``:

1. *Distillation*: a Poisson or NB GLM of the gene's counts on the technical
   covariates (no treatment), fitted once per gene with :func:`skmixed.glm._newton.fit_glm`;
   its linear predictor is the offset ``o_i`` and its size the NB size.
2. *Statistic*: the NB (or Poisson) mean-plus-offset fit on the treated cells, that is
   :class:`~skmixed.offset.NegBinOffsetMean` with ``sample_weight`` = the treatment
   indicator: the Wald ``z`` of the closed-form estimate (default), or the score
   statistic at ``beta = 0``.
3. *Resamples*: the treatment indicator is redrawn ``B`` times, by permutation or
   (SCEPTRE) conditionally on the covariates, ``T*_i ~ Bernoulli(pi_i)`` with ``pi_i``
   from a logistic regression of the treatment on the covariates.
4. *p-values*: empirical, ``(1 + #{z* <= z}) / (B + 1)`` (per side), and from a
   skew-normal fitted to the ``B`` resampled statistics (method of moments), which
   resolves p-values below ``1 / (B + 1)``.

Resamples are shared wherever their law allows (see :mod:`skmixed.offset._engine`):

* permutations: the null of a pair depends only on its number ``k`` of treated cells,
  so one set of ``B`` ordered samples of cells serves every pair, a pair using the
  first ``k`` cells of each (SCEPTRE's reuse of resamples across pairs, extended to
  every ``k`` by the prefix property of :func:`~skmixed.offset._engine.permutation_orderings`);
* conditional resampling: the pairs of one perturbation share its resamples; a
  perturbation with fewer than 8 pairs is packed with others of similar treatment
  probabilities, and they share common random numbers ``U[i, b]``
  (``T*_p[i, b] = 1{U[i, b] < pi_p[i]}``): each perturbation's resamples are still
  independent Bernoulli draws, the packed perturbations' resamples are dependent.

The statistics of a block of pairs over all ``B`` resamples are sums over the
(cell, resample) elements, at a cost proportional to the number of treated cells
summed over the resamples, shared by the block's pairs.

Memory (see :mod:`skmixed.offset._stream`): the genes in pairs are read (from a backed
AnnData: a chunk of columns of the file at a time), checked and distilled by chunks, and
kept as int32 counts beside float64 offsets, 12 bytes per cell and gene; the treatment
models are fitted a round of perturbations at a time, whose pairs are tested before the
next round is fitted. From a backed AnnData (conditional resampling) the gene data are
not kept whole: the treatment models are fitted first and keep their coefficients, then
each chunk of genes is distilled and the blocks of pairs whose last gene it holds are
tested, with the rows carried over for blocks that straddle chunks
(``_streamed_test``). No (cells x perturbations) array of floats is held, and the
chunks do not change the results.
"""

from __future__ import annotations

import functools
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse
import scipy.special
import scipy.stats
from sklearn.exceptions import ConvergenceWarning

from .._backend import (
    gpu_namespace,
    is_cupy_array,
    is_device_sparse,
    to_device,
    to_host,
)
from .._families import NegativeBinomial, Poisson, _trigamma
from .._inputs import MatrixReader, count_source
from .._parallel import Engine, call_item
from .._progress import check_verbose, logger, progress
from .._threads import one_blas_thread
from ..glm._newton import KernelLoglik as _KernelLoglik
from ..glm._newton import fit_glm
from . import _stream
from ._engine import (
    Elements,
    block_statistics,
    column_tables,
    orderings_to_elements,
    permutation_orderings,
)
from ._kernels import (
    SIZE_MAX,
    moments_log_size,
    size_newton,
)

_ALTERNATIVES = ("two-sided", "less", "greater")


# ------------------------------------------------------------------ input handling
def _matrix(a, name, n=None, dtype=None):
    """A 2-D ndarray (``dtype`` None: as given) and column labels, with the shape checks."""
    labels = None
    if isinstance(a, pd.Series):
        a = a.to_frame()
    if isinstance(a, pd.DataFrame):
        labels = [str(c) for c in a.columns]
        a = a.to_numpy()
    elif scipy.sparse.issparse(a):
        a = a.toarray()
    a = np.asarray(a, dtype=dtype)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D, got {a.ndim} dimensions.")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} rows but the counts have {n}.")
    return a, labels or list(range(a.shape[1]))


def _as_matrix(a, name, n=None):
    """Dense finite float matrix and column labels."""
    a, labels = _matrix(a, name, n, np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite; found {a[~np.isfinite(a)][0]!r}.")
    return a, labels


def _treatment_matrix(treatment, n):
    """Boolean treatment indicators (n, P) and labels, checked without a float copy
    (the matrix of a large screen has 1e8-1e9 entries)."""
    T, labels = _matrix(treatment, "treatment", n)
    if T.dtype != bool:
        if not np.issubdtype(T.dtype, np.number):
            T = T.astype(np.float64)
        if not np.all((T == 0) | (T == 1)):
            raise ValueError("treatment must hold 0/1 indicators.")
        T = T != 0
    return T, labels


def _indicator_csc(T):
    """``scipy.sparse.csc_matrix(T)`` of a boolean (n, P) matrix in one scan of its
    transpose (contiguous for a DataFrame's Fortran-ordered values): 7x faster than
    the general conversion on a 200,000 x 1,000 screen."""
    n, P = T.shape
    flat = np.flatnonzero(T.T)  # perturbation-major, cells ascending within one
    p, cells = np.divmod(flat, n)
    idx = np.int32 if max(flat.size, n) < 2**31 - 1 else np.int64
    indptr = np.zeros(P + 1, idx)
    np.cumsum(np.bincount(p, minlength=P), out=indptr[1:])
    return scipy.sparse.csc_matrix((np.ones(flat.size, bool), cells.astype(idx), indptr), shape=(n, P))


def _count_labels(counts):
    if isinstance(counts, pd.DataFrame):
        return [str(c) for c in counts.columns], counts.shape[0]
    shape = counts.shape if hasattr(counts, "shape") else np.shape(counts)
    if len(shape) == 1:
        return [0], shape[0]
    return list(range(shape[1])), shape[0]


def _design(covariates, n):
    if covariates is None:
        return np.ones((n, 1))
    C, _ = _as_matrix(covariates, "covariates", n)
    return np.column_stack([np.ones(n), C])


# ------------------------------------------------------------------- distillation
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
    Y, _ = _as_matrix(counts, "counts")
    Poisson.check_response(Y, "counts")
    n, G = Y.shape
    X = _design(covariates, n)
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
        # for NB the Poisson fit is only a start (of the coefficients and the size)
        res = glm(X, Yc, _KernelLoglik(Poisson), tol=1e-6 if family == "negative_binomial" else 1e-10)
        coef, conv = res.coef, res.converged
        r = np.full(Yc.shape[1], np.inf)
        if family == "negative_binomial":
            if fixed is not None:
                r = fixed[sl].copy()
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
        offsets[:, sl] = X @ coef.T
        return sl, coef, conv, r

    chunks = _stream.column_chunks(G, n)
    # one BLAS thread: the products here are thin (n x few), and a multithreaded BLAS
    # beside the chunk threads (or other work) spins instead of computing (seconds per
    # Gram on a loaded 2-core machine, against 20 ms)
    with one_blas_thread(), Engine(n_jobs=n_jobs, client=False) as pool:
        for sl, coef, conv, r in pool.map(fit_chunk, chunks):
            coefs[sl], converged[sl] = coef, conv
            if family == "negative_binomial":
                sizes[sl] = r
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
    T, _ = _treatment_matrix(treatment, None)
    pi, bad = _stream.treatment_chunks(T, _design(covariates, T.shape[0]), max_iter=max_iter, n_jobs=n_jobs)
    _stream.warn_treatment(bad)
    return pi


# ---------------------------------------------------------------------- resamples
def conditional_resamples(pi, n_resamples, rng):
    """Cells and resample indices of ``T*[i, b] ~ Bernoulli(pi_i)``, all independent.

    Cost proportional to the number of treated cells: cells are grouped by ``pi``
    into bins ``(2^-(j+1)/4, 2^-j/4]``; within a bin the successes of a Bernoulli process
    at the bin's upper bound ``p`` over the (cell, resample) grid are reached by
    geometric skips, then thinned with probability ``pi_i / p`` (accepting at least
    84% of them). The grid has a power-of-two number of columns, so that a position
    splits into (cell, resample) by a shift and a mask.

    Returns
    -------
    rows, cols : int arrays
        Treated (cell, resample) pairs, grouped by bin, by cell within a bin.
    """
    order, rows, cols = _binned_resamples(pi, n_resamples, rng)
    return order[rows], cols


def _binned_resamples(pi, n_resamples, rng, uniforms=False):
    """:func:`conditional_resamples` with cells renumbered in bin order: returns the
    cell order and the treated pairs' positions in it, non-decreasing; with
    ``uniforms=True`` also each treated pair's uniform ``U < pi_i`` (the common random
    number of :func:`resampling_test`: ``T*[i, b] = 1{U[i, b] < pi_i}``, so a probability
    below ``pi_i`` treats a subset)."""
    pi = np.asarray(pi, dtype=np.float64)
    B = int(n_resamples)
    bits = max(int(np.ceil(np.log2(B))), 0)
    mask = (1 << bits) - 1
    level = np.minimum(np.floor(-4.0 * np.log2(np.maximum(pi, 2.0**-40))), 160).astype(np.int16)
    level[pi <= 0] = -1
    order = np.argsort(level, kind="stable")  # radix sort: by bin, by cell within a bin
    sorted_level = level[order]
    starts = np.flatnonzero(np.r_[True, sorted_level[1:] != sorted_level[:-1]])
    levels = sorted_level[starts]
    bounds = np.append(starts, order.size)
    pi_sorted = pi[order]
    rows, cols, us = [], [], []
    for lev, s, e in zip(levels, bounds[:-1], bounds[1:]):
        if lev < 0:
            continue
        p = min(2.0 ** (-float(lev) / 4.0), 1.0)
        N = (e - s) << bits
        pos = np.arange(N, dtype=np.int64) if p >= 1.0 else _bernoulli_positions(N, p, rng)
        idx = pos >> bits
        u = rng.random(pos.size)
        u *= p
        keep = u < pi_sorted[s:e][idx]
        b = pos & mask
        if mask + 1 != B:
            keep &= b < B
        sel = np.flatnonzero(keep)
        idx = idx[sel]
        idx += s
        rows.append(idx)
        cols.append(b[sel])
        if uniforms:
            us.append(u[sel])
    if not rows:
        out = (order, np.zeros(0, np.int64), np.zeros(0, np.int64))
        return out + (np.zeros(0),) if uniforms else out
    out = (order, np.concatenate(rows), np.concatenate(cols))
    return out + (np.concatenate(us),) if uniforms else out


def _bernoulli_positions(N, p, rng):
    """Sorted positions of the successes of N Bernoulli(p) trials (geometric gaps)."""
    scale = -1.0 / np.log1p(-p)
    out = []
    last = -1
    while True:
        expected = (N - 1 - last) * p
        m = int(expected + 6.0 * np.sqrt(expected) + 32)
        e = rng.standard_exponential(m)
        e *= scale
        pos = e.astype(np.int64)  # floor of a geometric(p) gap minus one
        pos += 1
        np.cumsum(pos, out=pos)
        pos += last
        if pos[-1] >= N:
            out.append(pos[: np.searchsorted(pos, N)])
            break
        out.append(pos)
        last = int(pos[-1])
    return out[0] if len(out) == 1 else np.concatenate(out)


def permutation_resamples(treated, n_resamples, rng):
    """Cells and resample indices of ``B`` random permutations of the treatment: each
    resample treats ``k = sum(treated)`` cells drawn without replacement (the first
    ``k`` cells of :func:`~skmixed.offset._engine.permutation_orderings`).

    Returns
    -------
    rows, cols : int arrays, sorted by cell
    """
    n = treated.size
    k = int(np.sum(treated))
    B = int(n_resamples)
    el = orderings_to_elements(permutation_orderings(n, k, B, rng), n)
    return el.rows(), el.cols


# ------------------------------------------------------------------- skew-normal
_SN_MAX_SKEW = 0.99  # the skew-normal's skewness is below 0.9953


def skewnorm_moments(S):
    """Method-of-moments skew-normal fit to each row of ``S`` (rows finite).

    Returns
    -------
    shape, loc, scale : ndarrays (``scipy.stats.skewnorm`` parameters ``a, loc, scale``)
    """
    S = np.asarray(S, dtype=np.float64)
    m = S.mean(axis=1)
    d = S - m[:, None]
    s2 = np.mean(d**2, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.mean(d**3, axis=1) / s2**1.5
    g = np.clip(np.nan_to_num(g), -_SN_MAX_SKEW, _SN_MAX_SKEW)
    ag = np.abs(g) ** (2.0 / 3.0)
    delta = np.sign(g) * np.sqrt(np.pi / 2 * ag / (ag + ((4 - np.pi) / 2) ** (2.0 / 3.0)))
    shape = delta / np.sqrt(1 - delta**2)
    scale = np.sqrt(s2 / (1 - 2 * delta**2 / np.pi))
    loc = m - scale * delta * np.sqrt(2 / np.pi)
    return shape, loc, scale


def _sided(left, right, alternative):
    if alternative == "less":
        return left
    if alternative == "greater":
        return right
    return np.minimum(1.0, 2.0 * np.minimum(left, right))


def resampling_pvalues(observed, resampled, alternative="two-sided", ks_level=0.01):
    """Empirical and skew-normal p-values of ``observed[k]`` against ``resampled[k]``.

    The skew-normal p-value is used (``pvalue``) where every resampled statistic is
    finite and a Kolmogorov-Smirnov test of the fit does not reject at ``ks_level``;
    elsewhere ``pvalue`` is the empirical one, ``(1 + #{resamples at least as
    extreme}) / (1 + #{defined resamples})``: NaN resampled statistics are left out,
    ``-inf`` ones (treated counts all zero) are the most extreme on the left, ties
    count as extreme, and a NaN observed statistic gets NaN p-values.

    Returns
    -------
    DataFrame with columns p_empirical, p_skewnorm, pvalue, skewnorm_ok, sn_shape,
    sn_loc, sn_scale
    """
    obs = np.asarray(observed, dtype=np.float64)
    S = np.asarray(resampled, dtype=np.float64)
    K, B = S.shape
    # NaN never counts as extreme: an undefined observed statistic has no p-value, and
    # undefined resampled ones (no treated cell in that resample) are left out
    n_valid = np.sum(~np.isnan(S), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        left = (1.0 + np.sum(S <= obs[:, None], axis=1)) / (n_valid + 1.0)
        right = (1.0 + np.sum(S >= obs[:, None], axis=1)) / (n_valid + 1.0)
    p_emp = np.where(np.isnan(obs) | (n_valid == 0), np.nan, _sided(left, right, alternative))
    finite = np.all(np.isfinite(S), axis=1) & np.isfinite(obs)
    shape = np.full(K, np.nan)
    loc = np.full(K, np.nan)
    scale = np.full(K, np.nan)
    p_sn = np.full(K, np.nan)
    ok = np.zeros(K, bool)
    if finite.any():
        a, lo, sc = skewnorm_moments(S[finite])
        good = sc > 0
        idx = np.flatnonzero(finite)[good]
        a, lo, sc = a[good], lo[good], sc[good]
        shape[idx], loc[idx], scale[idx] = a, lo, sc
        dist = scipy.stats.skewnorm(a[:, None], lo[:, None], sc[:, None])
        cdf = dist.cdf(np.sort(S[idx], axis=1))
        i = np.arange(1, B + 1)
        D = np.maximum(np.max(i / B - cdf, axis=1), np.max(cdf - (i - 1) / B, axis=1))
        ok[idx] = scipy.stats.kstwo.sf(D, B) > ks_level
        o = obs[idx][:, None]
        p_sn[idx] = _sided(dist.cdf(o)[:, 0], dist.sf(o)[:, 0], alternative)
    pvalue = np.where(ok, p_sn, p_emp)
    return pd.DataFrame(
        {"p_empirical": p_emp, "p_skewnorm": p_sn, "pvalue": pvalue, "skewnorm_ok": ok,
         "sn_shape": shape, "sn_loc": loc, "sn_scale": scale}
    )


# -------------------------------------------------------------------------- test
def resampling_test(
    counts,
    treatment,
    covariates=None,
    *,
    pairs=None,
    n_resamples=500,
    resampling="conditional",
    statistic="wald",
    family="negative_binomial",
    size=None,
    alternative="two-sided",
    distillation=None,
    propensity=None,
    n_jobs=1,
    device=None,
    random_state=None,
    return_resampled=False,
    min_treated=7,
    layer=None,
    verbose=0,
):
    """SCEPTRE-style test of every (gene, perturbation) pair.

    Parameters
    ----------
    counts : array-like of shape (n_cells, n_genes)
        Counts (DataFrame, ndarray or sparse).
    treatment : array-like of shape (n_cells, n_perturbations)
        0/1 (or bool) treatment indicators, e.g. thresholded gRNA counts.
    covariates : array-like of shape (n_cells, n_covariates), optional
        Technical covariates (an intercept is added), used by the distillation GLM and
        the treatment model.
    pairs : array-like of shape (n_pairs, 2), optional
        (gene, perturbation) pairs, as column labels of DataFrames or integer
        positions; default every combination.
    n_resamples : int, default=500
    resampling : {"conditional", "permutation"}, default="conditional"
        Conditional resampling from a logistic treatment model (SCEPTRE), or
        permutations (valid when treatment is independent of the covariates).
        Resamples are shared among pairs: permutations by every pair (a pair with
        ``k`` treated cells uses the first ``k`` cells of shared ordered samples);
        conditional resamples by a perturbation's pairs, and through common random
        numbers by perturbations with fewer than 8 pairs (each perturbation's
        resamples keep their law; see the user guide).
    statistic : {"wald", "score"}, default="wald"
        Wald z of the closed-form estimate on the treated cells (where the treated
        counts are all zero the estimate is ``-inf`` and so is the statistic), or the
        score statistic for ``beta = 0`` (linear in the treatment: cheaper, no
        boundary, monotone in the treated counts).
    family : {"negative_binomial", "poisson"}, default="negative_binomial"
    size : None, float or array of shape (n_genes,)
        NB sizes; None estimates them in the distillation.
    alternative : {"two-sided", "less", "greater"}
    distillation : Distillation, optional
        Precomputed :func:`distill` result for all genes (skips that fit).
    propensity : array-like of shape (n_cells, n_perturbations), optional
        Precomputed treatment probabilities (:func:`treatment_probabilities`) for the
        conditional resamples (skips that fit). Without it the probabilities are fitted
        a round of perturbations at a time and never held whole (a screen of 200,000
        cells and 6,600 perturbations would need 10.6 GB for them).
    n_jobs : int, default=1
        Threads over blocks of pairs (results do not depend on it). Within
        ``skmixed.parallel_config(client=...)`` the blocks run on that Dask cluster
        instead (same results).
    device : {None, "cpu", "gpu"}, default=None
        Where the resampled statistics are computed. ``"gpu"`` runs the block sums on
        CuPy arrays (through :mod:`skmixed._backend`); None follows the counts (CuPy
        counts: GPU). Input checks, the draws (numpy generators: the resamples, hence
        the results, are those of the CPU), the observed statistics and the p-values
        stay on the host; the returned table is on the host.
    random_state : int, numpy Generator or None
    return_resampled : bool
        Also return the resampled statistics, shape (n_pairs, n_resamples).
    min_treated : int, default=7
        Pairs whose perturbation has fewer treated cells, or fewer untreated cells, are
        not tested (SCEPTRE's quality control also asks for 7): their p-values are NaN
        and ``flag`` says why.
    layer : str or None, default=None
        For AnnData counts: the layer with the raw counts (None: ``layers["counts"]``
        when present, else ``.X``). Gene names come from ``var_names``.
    verbose : int, default=0
        ``verbose >= 1`` shows a progress bar of the pairs tested (tqdm, advanced
        block by block, with an ETA); 0 is silent.

    Returns
    -------
    results : DataFrame, one row per pair
        gene, perturbation, n_treated, coef (closed-form ``beta`` on the treated
        cells), statistic, p_empirical, p_skewnorm, pvalue (skew-normal where its fit
        passes a KS check, else empirical), skewnorm_ok, sn_shape, sn_loc, sn_scale,
        size (of the gene), flag (``""`` for a tested pair; ``"no_treated_cells"``,
        ``"too_few_treated_cells"``, ``"no_control_cells"`` or ``"too_few_control_cells"``:
        p-values NaN). A pair whose treated counts are all
        zero has Wald statistic ``-inf``, the most extreme value on the left: its
        empirical p-value counts the resamples that are also ``-inf`` (ties count as
        extreme), and the skew-normal is not used.
    resampled : ndarray of shape (n_pairs, n_resamples)
        Only with ``return_resampled=True``.

    Examples
    --------
    >>> from skmixed.offset import make_perturbation_screen, resampling_test
    >>> counts, treatment, covariates, _ = make_perturbation_screen(800, 3, 2, random_state=0)
    >>> res = resampling_test(counts, treatment, covariates, n_resamples=99, random_state=0)
    >>> res.shape[0]
    6
    """
    if resampling not in ("conditional", "permutation"):
        raise ValueError(f"resampling must be 'conditional' or 'permutation', got {resampling!r}.")
    if statistic not in ("wald", "score"):
        raise ValueError(f"statistic must be 'wald' or 'score', got {statistic!r}.")
    if family not in ("poisson", "negative_binomial"):
        raise ValueError(f"family must be 'poisson' or 'negative_binomial', got {family!r}.")
    if alternative not in _ALTERNATIVES:
        raise ValueError(f"alternative must be one of {_ALTERNATIVES}, got {alternative!r}.")
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 2:
        raise ValueError(f"n_resamples must be an integer >= 2, got {n_resamples!r}.")
    if not isinstance(min_treated, (int, np.integer)) or isinstance(min_treated, bool) or min_treated < 1:
        raise ValueError(f"min_treated must be an integer >= 1, got {min_treated!r}.")
    verbose = check_verbose(verbose)
    src = count_source(counts, layer=layer, arg="counts", stream=True)  # backed: read later, genes in pairs only
    counts = src.values
    xp_dev = _device_namespace(device, counts)
    counts, treatment, covariates, propensity = (
        None if a is None else _host(a) for a in (counts, treatment, covariates, propensity))
    genes, n = _count_labels(counts)
    if src.names is not None:
        genes = list(src.names)
    G = len(genes)
    T, perts = _treatment_matrix(treatment, n)
    gi, pj = _pair_indices(pairs, genes, perts)
    used, gpos = np.unique(gi, return_inverse=True)  # genes in pairs; pair -> position
    X = _design(covariates, n)
    used_p = np.unique(pj)
    if resampling == "conditional" and propensity is not None:
        propensity = propensity.to_numpy() if isinstance(propensity, pd.DataFrame) else np.asarray(propensity)
        propensity = propensity.astype(np.float64, copy=False)
        if propensity.shape != T.shape:
            raise ValueError(f"propensity must be probabilities of shape {T.shape}, got {propensity.shape}.")
        if propensity.size and not (0.0 <= float(np.min(propensity)) and float(np.max(propensity)) <= 1.0):
            raise ValueError(f"propensity must be probabilities of shape {T.shape} (in [0, 1]).")  # NaN fails too

    B = int(n_resamples)
    K = gi.size
    Tcsc = _indicator_csc(T)
    n_treated = np.diff(Tcsc.indptr)[pj]
    # the pert's children seed its resamples; the extra last child seeds the permutations
    seeds = np.random.SeedSequence(_entropy(random_state)).spawn(T.shape[1] + 1)
    stats = np.empty((K, B + 1))
    reader = _stream.CountChunks(counts, src)
    # a backed AnnData (or dask array): the gene data are held a chunk at a time
    streamed = (resampling == "conditional" and distillation is None and isinstance(reader.A, MatrixReader)
                and len(_gene_groups(used.size, n)) > 1)
    if streamed:
        logger.info("resampling_test: %d pairs (%d genes, %d perturbations), %d resamples, genes by chunks",
                    K, used.size, used_p.size, B)
        bar = progress(total=K, desc="resampling_test pairs", unit="pair", verbose=verbose)
        coef, sizes = _streamed_test(reader, used, gpos, pj, X, T, Tcsc, covariates, family, size, propensity,
                                     seeds, statistic, xp_dev, n_jobs, stats, bar, G)
    else:
        Yt, Ot, sizes = _gene_data(reader, used, covariates, family, size, distillation, n_jobs, G, n)
        if family == "poisson":
            sizes = np.full(used.size, np.inf)
        phi = np.where(np.isfinite(sizes), 1.0 / sizes, 0.0)[gpos]  # per pair; 0: Poisson
        gshift = np.max(Ot, axis=1) if Ot.shape[1] else np.zeros(Ot.shape[0])
        coef, stats[:, 0] = _observed_statistics(Yt, Ot, gshift, gpos, pj, phi, Tcsc, statistic)
        if resampling == "permutation":
            rounds = iter([_permutation_blocks(n_treated, B, seeds[-1], n)[0]])
        else:
            # the treatment models are fitted round by round of perturbations, each round's
            # pairs tested before the next round is fitted (see _stream)
            logger.info("resampling_test: treatment model of %d perturbations", used_p.size)
            rounds = _conditional_rounds(pj, T, X, propensity, seeds, B, n_jobs)
        logger.info("resampling_test: %d pairs (%d genes, %d perturbations), %d resamples",
                    K, used.size, used_p.size, B)
        bar = progress(total=K, desc="resampling_test pairs", unit="pair", verbose=verbose)
        run = functools.partial(_run_block, Yt, Ot, gshift, gpos, phi, statistic, xp_dev)
        # blocks through skmixed._parallel: n_jobs threads, or the Dask client of
        # parallel_config (the GPU path stays in-process); run and the gene data it closes
        # over go to a cluster once, a round's blocks once, the tasks get block numbers
        with Engine(n_jobs=n_jobs, client=None if xp_dev is np else False) as pool:
            run_h = pool.share(run)
            for blocks in rounds:
                _run_blocks(pool, run_h, blocks, stats, bar)
                del blocks  # this round's probabilities go before the next round is fitted
    bar.close()
    stats[n_treated == 0, 0] = np.nan

    n_control = n - n_treated
    flag = np.select(
        [n_treated == 0, n_treated < min_treated, n_control == 0, n_control < min_treated],
        ["no_treated_cells", "too_few_treated_cells", "no_control_cells", "too_few_control_cells"],
        default="",
    )
    untested = flag != ""
    pv = resampling_pvalues(np.where(untested, np.nan, stats[:, 0]), stats[:, 1:], alternative)
    out = pd.DataFrame(
        {"gene": [genes[i] for i in gi], "perturbation": [perts[j] for j in pj], "n_treated": n_treated,
         "coef": coef, "statistic": stats[:, 0]}
    )
    out = pd.concat([out, pv], axis=1)
    out["size"] = sizes[gpos]
    out["flag"] = flag
    if untested.any():
        warnings.warn(
            f"{int(untested.sum())} of {K} pairs were not tested (fewer than min_treated={min_treated} "
            f"treated or untreated cells; {int(np.sum(n_treated == 0))} with no treated cell, "
            f"{int(np.sum(n_control == 0))} with no untreated cell): their p-values are NaN, see the 'flag' column.",
            UserWarning,
            stacklevel=2,
        )
    if return_resampled:
        return out, stats[:, 1:]
    return out


def _gene_groups(m, n):
    """The chunks of genes read, checked and distilled together: runs of whole
    :func:`distill` chunks, so the fits are those of one call on every gene."""
    return _stream.grouped(_stream.column_chunks(m, n), n, _stream.READ_BUDGET)


def _gene_data(reader, used, covariates, family, size, distillation, n_jobs, G, n):
    """Gene-major counts (compact) and offsets of the genes ``used``, and their sizes:
    read, checked and distilled a chunk of genes at a time (:func:`_gene_groups`)."""
    m = used.size
    whole = reader.view is not None and m == reader.G
    Yt = reader.view if whole else _stream.CompactCounts(m, n)
    if distillation is not None:
        if distillation.offsets.shape != (n, G):
            raise ValueError(f"distillation.offsets has shape {distillation.offsets.shape}, expected {(n, G)}.")
        if not whole:
            for sl in _gene_groups(m, n):
                Yt.put(sl, reader.block(used[sl]))
        Ot = distillation.offsets.T if m == G else distillation.offsets.T[used]
        return _compact(Yt), np.ascontiguousarray(Ot), np.asarray(distillation.size)[used]
    logger.info("resampling_test: distillation (%s GLM) of %d genes on %d cells", family, m, n)
    Ot = np.empty((m, n))
    sizes = np.empty(m)
    bad = 0
    for sl in _gene_groups(m, n):
        Yc, Ot[sl], sizes[sl], b = _distill_chunk(reader, used, sl, covariates, family, size, n_jobs, G)
        if not whole:
            Yt.put(sl, Yc)
        bad += b
    _warn_distillation(bad)
    return _compact(Yt), Ot, sizes


def _distill_chunk(reader, used, sl, covariates, family, size, n_jobs, G):
    """Counts and offsets (gene-major), sizes and number of unconverged fits of the
    genes ``used[sl]``, a chunk of :func:`_gene_groups`."""
    Yc = reader.block(used[sl])
    fixed = None if size is None else np.broadcast_to(size, (G,))[used[sl]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # one warning for all chunks
        sub = distill(Yc.T, covariates, family=family, size=fixed, n_jobs=n_jobs)
    return Yc, sub.offsets.T, sub.size, int((~sub.converged).sum())


def _warn_distillation(bad):
    if bad:
        warnings.warn(f"the distillation GLM did not converge for {bad} gene(s).", ConvergenceWarning, stacklevel=4)


def _run_blocks(pool, run_h, blocks, stats, bar):
    for idx, S in pool.map(call_item, range(len(blocks)), run_h, pool.share(blocks)):
        stats[idx, 1:] = S.T
        bar.update(len(idx))


def _streamed_test(reader, used, gpos, pj, X, T, Tcsc, covariates, family, size, propensity, seeds, statistic,
                   xp_dev, n_jobs, stats, bar, G):
    """Conditional resampling with the gene data held a chunk of genes at a time.

    The treatment models are fitted first, by the rounds of :func:`_conditional_rounds`,
    keeping their coefficients (:class:`~skmixed.offset._stream.Propensities`). Then the
    genes are read and distilled chunk by chunk (:func:`_distill_chunk`); a block of pairs
    runs, whole, in the chunk of its last gene, its perturbation's probabilities
    recomputed from the coefficients; the rows of genes whose blocks are still to run are
    carried to the next chunk, the others dropped. Every number is computed by the
    arithmetic of the resident path (same blocks, same fits): the results are the same
    to the last digit. Fills ``stats``; returns the pairs' estimates and genes' sizes."""
    m, n, K = used.size, X.shape[0], gpos.size
    chunk_of = np.empty(m, np.int64)
    for c, sl in enumerate(_gene_groups(m, n)):
        chunk_of[sl] = c
    store = _stream.Propensities(X)
    logger.info("resampling_test: treatment model of %d perturbations", np.unique(pj).size)
    blocks = [b for r in _conditional_rounds(pj, T, X, propensity, seeds, stats.shape[1] - 1, n_jobs, store)
              for b in r]
    run_at = np.array([int(chunk_of[gpos[idx]].max()) for idx, _, _ in blocks], np.int64)
    last_use = np.full(m, -1)  # the last chunk whose blocks read a gene's row
    for (idx, _, _), c in zip(blocks, run_at):
        np.maximum.at(last_use, gpos[idx], c)
    sizes, phi, coef = np.empty(m), np.zeros(K), np.empty(K)
    obs, obs_poisson = np.empty(K), np.empty(K)
    rows, Y, O, shift = np.zeros(0, np.int64), np.zeros((0, n), np.int32), np.zeros((0, n)), np.zeros(0)
    bad = 0
    logger.info("resampling_test: distillation (%s GLM) of %d genes on %d cells", family, m, n)
    with Engine(n_jobs=n_jobs, client=None if xp_dev is np else False) as pool:
        for c, sl in enumerate(_gene_groups(m, n)):
            Yc, Oc, sc, b = _distill_chunk(reader, used, sl, covariates, family, size, n_jobs, G)
            bad += b
            sizes[sl] = np.inf if family == "poisson" else sc
            compact = _stream.CompactCounts(*Yc.shape)
            compact.put(slice(None), Yc)
            del Yc  # the float64 block: only the compact counts stay
            shift = np.concatenate([shift, np.max(Oc, axis=1) if n else np.zeros(Oc.shape[0])])
            rows = np.concatenate([rows, np.arange(sl.start, sl.stop)])
            if Y.shape[0]:
                Y, O = np.concatenate([Y, compact.values]), np.concatenate([O, Oc])
            else:  # nothing carried: the chunk's arrays, not copies
                Y, O = compact.values, Oc
            del compact, Oc
            local = np.full(m, -1)
            local[rows] = np.arange(rows.size)
            gloc = local[gpos]
            here = np.flatnonzero(chunk_of[gpos] == c)
            s_here = sizes[gpos[here]]
            phi[here] = np.where(np.isfinite(s_here), 1.0 / s_here, 0.0)
            args = (Y, O, shift, gloc[here], pj[here], phi[here], Tcsc, statistic)
            coef[here], obs[here] = _observed_statistics(*args, nb=family != "poisson")
            if family != "poisson" and not np.any(phi[here] > 0):
                # the Wald formula of the resident path is that of all pairs: Poisson's if
                # no gene is overdispersed, known once every chunk is distilled
                obs_poisson[here] = _observed_statistics(*args, nb=False)[1]
            _run_blocks(pool, pool.share(functools.partial(_run_block, Y, O, shift, gloc, phi, statistic, xp_dev)),
                        [b for b, r in zip(blocks, run_at) if r == c], stats, bar)
            later = [b for b, r in zip(blocks, run_at) if r > c]
            store.release({int(pj[idx[0]]) for idx, _, _ in later})
            keep = last_use[rows] > c
            rows, Y, O, shift = rows[keep], Y[keep], O[keep], shift[keep]
    _warn_distillation(bad)
    stats[:, 0] = obs if family == "poisson" or np.any(phi > 0) else obs_poisson
    return coef, sizes


def _compact(Yt):
    return Yt.values if isinstance(Yt, _stream.CompactCounts) else Yt


def _run_block(Yt, Ot, gshift, gpos, phi, statistic, xp_dev, block):
    """The resampled statistics (B, columns) of one block of pairs."""
    idx, parts, order = block
    if callable(parts):
        parts, order = parts()
    g = gpos[idx]
    if xp_dev is np:
        size = 2 * Yt.shape[1] * idx.size
        buf = getattr(_TABLES, "buffer", None)
        if buf is None or buf.size < size:
            buf = _TABLES.buffer = np.empty(size)
        cols = column_tables(Yt, Ot, gshift[g], phi[idx], statistic, order=order, rows=g, out=buf)
        return idx, block_statistics(parts, cols)
    parts = [(el.to(xp_dev), _to(thr, xp_dev), _to(cthr, xp_dev)) for el, thr, cthr in parts]
    cols = column_tables(*(to_device(a, xp_dev) for a in (Yt[g], Ot[g], gshift[g], phi[idx])), statistic)
    return idx, to_host(block_statistics(parts, cols))


# Columns per block: wide enough that the per-element work is shared by many columns,
# narrow enough that the per-cell tables (n x columns) stay moderate.
_MAX_COLUMNS = 32
# Conditional resampling: perturbations with fewer pairs than this are drawn together
# with common random numbers (one union of resamples, masked per perturbation).
_MIN_COLUMNS = 8
_TRANSPOSE_LOCK = threading.Lock()
# per thread: the buffer of the blocks' per-cell tables (see column_tables)
_TABLES = threading.local()


def _transpose_lock():
    # looked up by name where a block runs: a closure shipped to a Dask worker
    # (cloudpickle) cannot carry the lock itself, but can carry this function
    return _TRANSPOSE_LOCK


def _permutation_blocks(k, B, seed, n):
    """Blocks of pairs for permutation resamples: every pair uses the first ``k`` cells
    of the same ordered resamples, so pairs are grouped by ``k`` (at most
    ``_MAX_COLUMNS``, and ``k`` within a few percent). A block's elements below its
    smallest ``k`` need no mask; the few above it are masked per column."""
    k_max = int(k.max()) if k.size else 0
    C = permutation_orderings(n, k_max, B, perturbation_rng(seed))
    full = orderings_to_elements(C, n)
    order = np.argsort(k, kind="stable")
    blocks, start = [], 0
    while start < order.size:
        stop = start + 1
        k0 = int(k[order[start]])
        while stop < order.size and stop - start < _MAX_COLUMNS and k[order[stop]] <= 1.03 * k0 + 8:
            stop += 1
        idx = order[start:stop]
        start = stop

        def parts(kb=k[idx]):
            k_lo, k_hi = int(kb.min()), int(kb.max())
            r = full.rank
            main = r < k_lo
            out = [(full.select(main), None, None)]
            if k_hi > k_lo:
                out.append((full.select((r < k_hi) ^ main), kb, None))
            return out, None

        blocks.append((idx, parts, None))
    return blocks, C


def _conditional_rounds(pj, T, X, propensity, seeds, B, n_jobs, store=None):
    """Blocks of pairs for conditional resamples, yielded round by round of
    perturbations. A perturbation with at least ``_MIN_COLUMNS`` pairs is a block (its
    exact Bernoulli resamples, from its own seed), yielded with its round; smaller
    ones, in order of mean propensity, are packed together at the end and share common
    random numbers: one union of resamples drawn at the largest of their
    probabilities, each uniform ``U`` kept with the probability of the perturbation it
    is compared with (``U < pi``). Only a round's probabilities and those of the small
    perturbations are held (``propensity`` None: fitted by rounds of whole chunks of
    :func:`treatment_probabilities`, so they are its values). With a ``store``
    (:class:`~skmixed.offset._stream.Propensities`) the blocks hold no probabilities:
    a perturbation's are recomputed from its stored coefficients when its block runs."""
    n = T.shape[0]
    order = np.argsort(pj, kind="stable")
    used_p, starts = np.unique(pj[order], return_index=True)
    pair_sets = np.split(order, starts[1:]) if order.size else []
    small = np.array([i.size < _MIN_COLUMNS for i in pair_sets], bool)
    pi_small = np.empty((n, int(small.sum())), order="F")
    bad = 0
    for sl in _stream.grouped(_stream.column_chunks(used_p.size, n, budget=2**24), n, _stream.ROUND_BUDGET):
        cols = used_p[sl]
        if propensity is None:
            pi, b = _stream.treatment_chunks(T, X, cols, n_jobs=n_jobs, store=store)
            bad += b
        else:
            pi = propensity[:, cols]
        pos = np.flatnonzero(small[: sl.start])
        pi_small[:, pos.size : pos.size + int(small[sl].sum())] = pi[:, small[sl]]
        if store is None:
            yield [(pair_sets[j], functools.partial(_exact_parts, pi[:, j - sl.start], seeds[used_p[j]], n, B), None)
                   for j in range(sl.start, sl.stop) if not small[j]]
        else:
            source = store.column if propensity is None else functools.partial(_column, propensity)
            yield [(pair_sets[j], functools.partial(_stored_parts, source, int(used_p[j]), seeds[used_p[j]], n, B),
                    None) for j in range(sl.start, sl.stop) if not small[j]]
        del pi
    _stream.warn_treatment(bad)
    if not small.any():
        return
    groups = [(int(p), i) for p, i, s in zip(used_p, pair_sets, small) if s]
    # the order of the means of the whole matrix (a column mean per perturbation is strided)
    if propensity is None:
        # as the column means of a C-ordered (cells x perturbations) matrix: the order
        # of near-equal means, hence the packs, is that of treatment_probabilities's
        mean_pi = np.concatenate([np.ascontiguousarray(pi_small[:, s : s + 64]).mean(axis=0)
                                  for s in range(0, pi_small.shape[1], 64)])
    else:
        mean_pi = propensity.mean(axis=0)[used_p[small]]
    column = {p: j for j, (p, _) in enumerate(groups)}
    groups.sort(key=lambda gr: float(mean_pi[column[gr[0]]]))
    packs, cur, width = [], [], 0
    for gr in groups:
        if cur and width + gr[1].size > _MAX_COLUMNS:
            packs.append(cur)
            cur, width = [], 0
        cur.append(gr)
        width += gr[1].size
    if cur:
        packs.append(cur)
    blocks = []
    cache = []

    def pi_t():
        """The probabilities perturbation-major, transposed once for all packs (a
        perturbation's column of the (cells x perturbations) matrix is strided)."""
        if not cache:
            with _transpose_lock():
                if not cache:
                    cache.append(_stream.tiled_transpose(pi_small))
        return cache[0]

    for pack in packs:
        perts = [p for p, _ in pack]
        idx = np.concatenate([i for _, i in pack])
        if len(perts) == 1:
            blocks.append((idx, functools.partial(_exact_parts, pi_small[:, column[perts[0]]], seeds[perts[0]], n, B),
                           None))
            continue
        col_pert = np.concatenate([np.full(i.size, column[p]) for p, i in pack])

        def union(perts=perts, col_pert=col_pert):
            thr_t = pi_t()[col_pert]  # (columns, n): each column's probabilities
            lo, hi = thr_t.min(axis=0), thr_t.max(axis=0)
            thr = thr_t.T
            order, rows, cols, u = _binned_resamples(hi, B, perturbation_rng(seeds[perts[0]]), uniforms=True)
            el = Elements.from_rows(rows, cols, n, B, rank=u).renumbered(order)
            # below every column's probability: no mask (most elements, the perturbations
            # of a pack having similar probabilities)
            core = el.rank < lo[el.cells]
            return [(el.select(core), None, None), (el.select(~core), None, thr)], None

        blocks.append((idx, union, None))
    yield blocks


def _stored_parts(source, p, seed, n, B):
    """:func:`_exact_parts` of perturbation ``p``, its probabilities ``source(p)``."""
    return _exact_parts(source(p), seed, n, B)


def _column(a, p):
    return a[:, p]


def _exact_parts(pi, seed, n, B):
    """The exact Bernoulli resamples of one perturbation, as one element set."""
    order, rows, cols = _binned_resamples(pi, B, perturbation_rng(seed))
    return [(Elements.from_rows(rows, cols, n, B).renumbered(order), None, None)], None


def _device_namespace(device, counts):
    if device not in (None, "cpu", "gpu"):
        raise ValueError(f"device must be None, 'cpu' or 'gpu', got {device!r}.")
    if device == "cpu" or (device is None and not is_cupy_array(counts) and not is_device_sparse(counts)):
        return np
    return gpu_namespace()


def _host(a):
    """Host copy of a CuPy array (dense or cupyx sparse); other inputs unchanged."""
    if is_cupy_array(a):
        return to_host(a)
    if is_device_sparse(a):
        return a.get()
    return a


def _to(a, xp):
    return None if a is None else to_device(a, xp)


def _observed_statistics(Yt, Ot, gshift, gpos, pj, phi, Tcsc, statistic, nb=None):
    """Closed-form estimate and statistic of every pair on its treated cells, with the
    formulas of :func:`~skmixed.offset._engine.block_statistics`, by runs of pairs of
    about ``_stream.OBSERVED_BUDGET`` treated cells (a pair's sums do not depend on the
    runs). ``nb``: the NB Wald formula (None: if any pair's ``phi`` is positive)."""
    K = gpos.size
    coef, z = np.empty(K), np.empty(K)
    ends = np.cumsum(np.diff(Tcsc.indptr)[pj])
    if nb is None:
        nb = bool(np.any(phi > 0))  # of every pair: the runs use one formula
    start = 0
    while start < K:
        stop = max(start + 1, int(np.searchsorted(ends, ends[start] + _stream.OBSERVED_BUDGET, side="right")))
        sl = slice(start, min(stop, K))
        coef[sl], z[sl] = _observed_run(Yt, Ot, gshift, gpos[sl], pj[sl], phi[sl], Tcsc, statistic, nb)
        start = sl.stop
    return coef, z


def _observed_run(Yt, Ot, gshift, gpos, pj, phi, Tcsc, statistic, nb):
    K = gpos.size
    lens = np.diff(Tcsc.indptr)[pj]
    pair = np.repeat(np.arange(K), lens)
    within = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    cells = Tcsc.indices[np.repeat(Tcsc.indptr[pj], lens) + within]
    g = gpos[pair]
    y = Yt[g, cells]
    d = Ot[g, cells] - gshift[g]
    Sy = np.bincount(pair, weights=y, minlength=K)
    Se = np.bincount(pair, weights=np.exp(d), minlength=K)
    shift = gshift[gpos]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = Sy / Se
        coef = np.log(t) - shift
        if statistic == "score":
            mu0 = np.exp(d + gshift[g])
            dd = 1.0 / (1.0 + phi[pair] * mu0)
            U = np.bincount(pair, weights=(y - mu0) * dd, minlength=K)
            info0 = np.bincount(pair, weights=mu0 * dd, minlength=K)
            return np.where(lens > 0, coef, np.nan), U / np.sqrt(info0)
        if nb:
            acc = np.bincount(pair, weights=1.0 / (np.exp(-d) + phi[pair] * t[pair]), minlength=K)
            info = t * acc
        else:
            info = Sy
        z = coef * np.sqrt(info)
    z = np.where(Sy <= 0, -np.inf, z)
    return np.where(lens > 0, coef, np.nan), z


def perturbation_rng(seed_sequence):
    """A generator of resamples, driving SFC64 (a fast bit generator). Child ``p`` of
    ``SeedSequence(random_state).spawn(n_perturbations + 1)`` draws perturbation
    ``p``'s conditional resamples (a pack of small perturbations: its first
    perturbation's child), the last child the shared permutations. The resamples do
    not depend on ``n_jobs``; those of a perturbation with at least 8 pairs, and the
    permutations of a pair, do not depend on the other pairs either."""
    return np.random.Generator(np.random.SFC64(seed_sequence))


def _entropy(random_state):
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(2**63))
    if random_state is None:
        return None
    return int(random_state)


def _pair_indices(pairs, genes, perts):
    G, P = len(genes), len(perts)
    if pairs is None:
        gi, pj = np.meshgrid(np.arange(G), np.arange(P), indexing="ij")
        return gi.ravel(), pj.ravel()
    arr = np.asarray(pairs, dtype=object)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"pairs must have shape (n_pairs, 2), got {arr.shape}.")
    gpos = {g: i for i, g in enumerate(genes)}
    ppos = {p: i for i, p in enumerate(perts)}

    def lookup(values, pos, n, name):
        out = np.empty(len(values), np.int64)
        for k, v in enumerate(values):
            key = v.item() if isinstance(v, np.generic) else v
            if key in pos:
                out[k] = pos[key]
            elif isinstance(key, (int, np.integer)) and 0 <= key < n:
                out[k] = key
            else:
                raise ValueError(f"pairs names {name} {v!r}, which is not a column of the {name}s.")
        return out

    return lookup(arr[:, 0], gpos, G, "gene"), lookup(arr[:, 1], ppos, P, "perturbation")
