"""The data of :func:`~skmixed.offset.resampling_test`, read and fitted by chunks so
that a whole screen (200,000 cells, 2,000 genes, 6,600 perturbations) fits in memory.

* Genes: the counts of the genes in pairs are read a chunk of genes at a time (from a
  backed AnnData: only that chunk's columns of the file), distilled (the distillation
  GLM is per gene) and kept gene-major as int32 (exact for counts below 2^31: 4 bytes a
  value instead of a float64 copy) beside the float64 offsets.
* Perturbations: the treatment probabilities are fitted a round of perturbations at a
  time, and a round's pairs are tested before the next round is fitted, so the
  (cells x perturbations) matrix of probabilities never exists whole.
* Backed counts (or a dask array): the genes are not kept whole either. Conditional
  resampling keeps the treatment models' coefficients (:class:`Propensities`) and
  recomputes a perturbation's probabilities, bit for bit, in the chunk of genes where its
  pairs are tested; permutations test each chunk's pairs in that chunk. A given
  distillation is read by the same chunks (its offsets' rows beside the chunk's counts).

Chunks are whole chunks of :func:`distill` and :func:`treatment_probabilities` (the
batched Newton solvers stop per batch), so the fitted values, hence the results, are
those of the whole-matrix computation to the last digit, for every chunk budget.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pandas as pd
import scipy.sparse
import scipy.special
from sklearn.exceptions import ConvergenceWarning

from .._families import Bernoulli, Poisson
from .._inputs import MatrixReader, require_counts
from .._parallel import Engine
from .._threads import one_blas_thread
from ..glm._newton import _column_products, _weighted_gram, fit_glm

# Values (cells x genes) read and distilled at a time; the counts are read as float64,
# and the distillation holds a few arrays of that size.
READ_BUDGET = 2**24
# Probabilities (cells x perturbations) fitted at a time, tested, then freed.
ROUND_BUDGET = 2**26
# Treated (pair, cell) entries per pass of the observed statistics.
OBSERVED_BUDGET = 2**22


def column_chunks(k, n, budget=2**23):
    """The chunks of columns of the batched per-gene / per-perturbation fits."""
    per = max(1, min(k, budget // max(n, 1)))
    return [slice(s, min(s + per, k)) for s in range(0, k, per)]


def grouped(chunks, n, budget):
    """Consecutive ``chunks`` merged into groups of at most ``budget`` values (at least
    one chunk each): each group is a run of whole chunks."""
    out, cur = [], []
    for sl in chunks:
        if cur and (sl.stop - cur[0].start) * n > budget:
            out.append(slice(cur[0].start, cur[-1].stop))
            cur = []
        cur.append(sl)
    if cur:
        out.append(slice(cur[0].start, cur[-1].stop))
    return out


def tiled_transpose(A, cols=None, rows_per_tile=512, cols_per_tile=64):
    """``A[:, cols].T`` as a C-contiguous float64 array, copied tile by tile (a plain
    transposing copy of a large matrix misses the cache on every element: ~8x slower)."""
    n = A.shape[0]
    if A.flags.f_contiguous:  # e.g. a DataFrame's values: the transpose is a plain copy
        At = A.T if cols is None else A.T[cols]
        return np.ascontiguousarray(At, dtype=np.float64)
    cols = np.arange(A.shape[1]) if cols is None else np.asarray(cols)
    out = np.empty((cols.size, n))
    for g in range(0, cols.size, cols_per_tile):
        c = cols[g : g + cols_per_tile]
        sl = slice(int(c[0]), int(c[-1]) + 1) if np.all(np.diff(c) == 1) else c
        for s in range(0, n, rows_per_tile):
            out[g : g + c.size, s : s + rows_per_tile] = A[s : s + rows_per_tile, sl].T
    return out


class CountChunks:
    """Gene-major blocks of the columns of a count matrix (DataFrame, ndarray, sparse
    matrix, or a :class:`~skmixed._inputs.MatrixReader` of a backed AnnData or a dask
    array, which reads only the columns asked for), checked to be counts.

    ``view`` is the whole gene-major matrix when it is one already (an integer
    Fortran-ordered matrix, e.g. a DataFrame's values): blocks are then its rows.
    """

    def __init__(self, counts, src=None):
        self.src, self.view = src, None
        if isinstance(counts, pd.DataFrame):
            counts = counts.to_numpy()
        if scipy.sparse.issparse(counts):
            counts = scipy.sparse.csc_matrix(counts)  # once: columns are then cheap
        elif not isinstance(counts, MatrixReader):
            counts = np.asarray(counts)
            if counts.ndim == 1:
                counts = counts[:, None]
            if counts.ndim != 2:
                raise ValueError(f"counts must be 1-D or 2-D, got {counts.ndim} dimensions.")
            integer = np.issubdtype(counts.dtype, np.integer)
            if integer and counts.flags.f_contiguous:
                self.view = counts.T
                if self.view.size and self.view.min() < 0:
                    raise ValueError(f"counts must be non-negative counts; found {self.view.min()!r}.")
        self.A = counts
        self.n, self.G = counts.shape

    def block(self, cols):
        """Rows ``cols`` (sorted positions) of the gene-major matrix: integers, or
        float64 checked to be integers."""
        if self.view is not None:
            return self.view[cols]
        A = self.A
        if isinstance(A, MatrixReader):
            A = A.columns(cols)
            cols = None
            if scipy.sparse.issparse(A):
                A = scipy.sparse.csc_matrix(A)
        if scipy.sparse.issparse(A):
            sub = A if cols is None else A[:, cols]
            Yt = np.ascontiguousarray(sub.T.toarray(), dtype=np.float64)
        else:
            A = np.asarray(A)
            integer = np.issubdtype(A.dtype, np.integer) or A.dtype == bool
            Yt = tiled_transpose(A, None if cols is None or len(cols) == A.shape[1] else cols)
            if integer:
                if Yt.size and Yt.min() < 0:
                    raise ValueError(f"counts must be non-negative counts; found {Yt.min()!r}.")
                return Yt
        if not Poisson.check_response(Yt, "counts"):
            if self.src is not None:
                require_counts(self.src, False)  # AnnData: the message names the layer
            raise ValueError("counts must be integers.")
        return Yt


class CompactCounts:
    """Gene-major counts filled block by block: int32 while the counts fit (exact),
    float64 once one does not."""

    def __init__(self, G, n):
        self.values = np.empty((G, n), np.int32)

    def put(self, sl, Yc):
        if self.values.dtype == np.int32 and Yc.size and Yc.max() > np.iinfo(np.int32).max:
            self.values = self.values.astype(np.float64)
        self.values[sl] = Yc


def _logistic_newton(X, T, coef0, max_iter, tol=1e-10):
    """Newton's method for many logistic regressions sharing the design ``X`` (n, p):
    the Hessians of all responses are one matrix product ``[x_a x_b]' W`` (the p(p+1)/2
    products of design columns against the (n, G) weights) and the gradients
    ``X' (T - pi)``, so an iteration costs one ``expit`` per cell and response. No line
    search: the columns whose Newton decrement does not fall below ``tol`` within
    ``max_iter`` steps (or grows, e.g. under separation) are returned as not ``ok``, for
    :func:`~skmixed.glm._newton.fit_glm` to finish.

    Returns
    -------
    coef : (G, p), ok : (G,) bool
    """
    n, p = X.shape
    products = _column_products(X)  # (n, p(p+1)/2), shared by every iteration
    coef = np.array(coef0, dtype=float)
    G = coef.shape[0]
    ok = np.zeros(G, bool)
    last = np.full(G, np.inf)
    for _ in range(max_iter):
        mu = Bernoulli.mean(X @ coef.T)  # (n, G)
        grad = X.T @ (T - mu)  # (p, G)
        mu *= 1.0 - mu
        H = _weighted_gram(X, mu, products)
        step = np.linalg.solve(H + 1e-12 * np.eye(p)[None], grad.T[:, :, None])[:, :, 0]
        dec = 0.5 * np.sum(step * grad.T, axis=1)
        bad = ~np.isfinite(dec) | (dec > last * 1.01 + 1e-8)
        active = ~ok & ~bad
        coef[active] += step[active]
        ok |= active & (dec < tol)
        last = np.where(bad, last, dec)
        if bool(np.all(ok | bad)):
            break
    return coef, ok & np.all(np.isfinite(coef), axis=1)


def fit_treatment(Tc, X, max_iter, coefs=None):
    """Logistic regressions of the columns of ``Tc`` (n, w) float 0/1 on ``X``: the
    probabilities (n, w) and the number of fits that did not converge; ``coefs`` (a
    list): the fitted coefficients (w, p) are appended to it."""
    n = X.shape[0]
    # start at the intercept-only fit: a few Newton steps from the optimum
    frac = np.clip(Tc.mean(axis=0), 1.0 / n, 1.0 - 1.0 / n)
    coef0 = np.zeros((frac.size, X.shape[1]))
    coef0[:, 0] = np.log(frac / (1.0 - frac))
    coef, ok = _logistic_newton(X, Tc, coef0, max_iter)
    bad = 0
    if not ok.all():
        # the safeguarded solver (line search) where plain Newton steps did not settle
        idx = np.flatnonzero(~ok)
        res = fit_glm(X, Tc[:, idx], Bernoulli, coef0=coef0[idx], max_iter=max_iter)
        coef[idx] = res.coef
        bad = int((~res.converged).sum())
    if coefs is not None:
        coefs.append(coef)
    return probabilities(X, coef), bad


def probabilities(X, coef):
    """The probabilities (n, w) of the coefficients (w, p): one expression for the fit
    and for :class:`Propensities`, so that a recomputation is bit-identical."""
    return scipy.special.expit(X @ coef.T)


def treatment_chunks(T, X, cols=None, max_iter=100, n_jobs=None, store=None):
    """Probabilities of the perturbations ``T[:, cols]`` (all: None), shape (n, width),
    Fortran-ordered, fitted by the chunks of
    :func:`~skmixed.offset.treatment_probabilities` (in threads), and the number of
    fits that did not converge. ``store``: a :class:`Propensities` that keeps each
    chunk's coefficients."""
    n = T.shape[0]
    width = T.shape[1] if cols is None else len(cols)
    pi = np.empty((n, width), order="F")

    def fit_chunk(sl):
        Tc = T[:, sl] if cols is None else T[:, cols[sl]]
        coefs = []
        pi[:, sl], bad = fit_treatment(Tc.astype(np.float64), X, max_iter, coefs)
        return sl, coefs[0], bad

    chunks = column_chunks(width, n, budget=2**24)
    # one BLAS thread: the products are thin (n x few), and a multithreaded BLAS beside
    # the chunk threads spins instead of computing
    with one_blas_thread(), Engine(n_jobs=n_jobs, client=False) as pool:
        fits = list(pool.map(fit_chunk, chunks))
    if store is not None:
        for sl, coef, _ in fits:
            store.add(np.arange(width)[sl] if cols is None else cols[sl], coef)
    return pi, sum(bad for _, _, bad in fits)


class Propensities:
    """The treatment probabilities of fitted perturbations, kept as the coefficients of
    their fit chunks (chunk width x p, not cells x perturbations): a perturbation's
    column is recomputed with its chunk's expression of :func:`fit_treatment` (same
    inputs, same arithmetic, one BLAS thread: the fitted values to the last digit), the
    chunk cached until :meth:`release`."""

    def __init__(self, X):
        self.X, self.coefs, self.where, self.cache = X, [], {}, {}
        self.lock = threading.Lock()

    def add(self, cols, coef):
        for c, p in enumerate(cols):
            self.where[int(p)] = (len(self.coefs), c)
        self.coefs.append(coef)

    def column(self, p):
        k, c = self.where[int(p)]
        with self.lock:
            if k not in self.cache:
                with one_blas_thread():
                    self.cache[k] = probabilities(self.X, self.coefs[k])
            return self.cache[k][:, c]

    def release(self, keep):
        """Forget the recomputed chunks but those of the perturbations ``keep``."""
        wanted = {self.where[int(p)][0] for p in keep if int(p) in self.where}
        with self.lock:
            for k in [k for k in self.cache if k not in wanted]:
                del self.cache[k]


def warn_treatment(bad):
    if bad:
        warnings.warn(
            f"the treatment model did not converge for {bad} perturbation(s) (separation?).",
            ConvergenceWarning,
            stacklevel=3,
        )
