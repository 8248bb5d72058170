"""Vectorised fits of the mean-plus-offset model ``y_i ~ F(exp(beta + o_i))``.

Many responses (columns ``g`` of ``Y``) and many weight vectors (columns ``b`` of a
sparse ``W``) at once; every ``beta[g, b]`` is a separate fit. The work is
proportional to the number of non-zero weights:

* sums that are linear in the weights (``sum_i T_i y_i``, ``sum_i T_i e^{o_i}``, the
  score statistic at ``beta = 0``) are one sparse product ``W.T @ F``;
* sums that are not (the NB information at ``beta[g, b]``, Newton steps, the size)
  are evaluated on the non-zero entries of ``W`` only, in cache-sized chunks taken in
  cell order, and reduced into the ``(B, G)`` table by a precomputed sparse matrix.

The NB derivatives are those of :class:`skmixed._families.NegativeBinomial`, written
with the overdispersion ``phi = 1 / size`` so that ``phi = 0`` is the Poisson model
(a size estimated as infinite needs no special case); ``tests/test_offset_kernels.py``
checks every sum against the family's methods.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import scipy.special

from .._families import NegativeBinomial

# size bounds of the maximum-likelihood search; reaching SIZE_MAX means "no overdispersion"
SIZE_MIN = 1e-8
SIZE_MAX = 1e8
_ELEMENT_BLOCK = 65536  # elements x genes per chunk: temporaries stay in L2 cache


class WeightColumns:
    """The non-zero entries of a weight matrix ``W`` of shape (n, B), in cell order.

    Parameters
    ----------
    W : scipy.sparse matrix of shape (n, B)
        Non-negative weights; converted to CSR (explicit zeros dropped).
    """

    def __init__(self, W):
        W = scipy.sparse.csr_matrix(W, dtype=np.float64)
        W.eliminate_zeros()
        W.sort_indices()
        self.n, self.B = W.shape
        self.W = W
        self.Wt = W.T.tocsc() if not isinstance(W.T, scipy.sparse.csc_matrix) else W.T
        self.nnz = W.nnz
        self.rows = np.repeat(np.arange(self.n, dtype=np.int64), np.diff(W.indptr))
        self.cols = W.indices.astype(np.int64, copy=False)
        self.vals = W.data
        self.count = np.bincount(self.cols, minlength=self.B)
        self.weight_sum = np.bincount(self.cols, weights=self.vals, minlength=self.B)
        self._chunks = {}

    @classmethod
    def from_dense(cls, W):
        W = np.asarray(W, dtype=np.float64)
        return cls(scipy.sparse.csr_matrix(W[:, None] if W.ndim == 1 else W))

    @classmethod
    def ones(cls, n):
        return cls(scipy.sparse.csr_matrix((np.ones(n), np.zeros(n, dtype=np.int64), np.arange(n + 1)), shape=(n, 1)))

    def linear(self, F):
        """``W.T @ F`` for ``F`` of shape (n, k): (B, k)."""
        return np.asarray(self.Wt @ F)

    def chunks(self, n_genes):
        """(start, stop, reducer) with reducer a (B, stop - start) sparse matrix holding
        the weights, so that ``reducer @ V`` sums the rows of ``V`` into their columns."""
        size = max(256, _ELEMENT_BLOCK // max(n_genes, 1))
        if size not in self._chunks:
            out = []
            for s in range(0, self.nnz, size):
                e = min(s + size, self.nnz)
                P = scipy.sparse.csc_matrix(
                    (self.vals[s:e], self.cols[s:e], np.arange(e - s + 1)), shape=(self.B, e - s)
                )
                out.append((s, e, P))
            self._chunks[size] = out
        return self._chunks[size]

    def map_reduce(self, fn, cell_arrays, col_arrays, n_out):
        """``sum_i W[i, b] * fn(cell_arrays[i], col_arrays[b])[k]`` for every b.

        ``cell_arrays`` have n rows, ``col_arrays`` B rows (or 1 row: broadcast, not
        gathered); ``fn`` returns ``n_out`` arrays of shape (chunk, G). Returns a list
        of ``n_out`` arrays of shape (B, G).
        """
        G = max(a.shape[1] for a in list(cell_arrays) + list(col_arrays))
        out = [np.zeros((self.B, G)) for _ in range(n_out)]
        for s, e, P in self.chunks(G):
            r, c = self.rows[s:e], self.cols[s:e]
            cell = [a[r] for a in cell_arrays]
            col = [a if a.shape[0] == 1 else a[c] for a in col_arrays]
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                vals = fn(*cell, *col)
            for k in range(n_out):
                out[k] += P @ vals[k]
        return out


# ---------------------------------------------------------------------------- passes
def _information(m, t, phi):
    mu = t * m
    return (mu / (1.0 + phi * mu),)


def _newton(y, m, t, phi):
    mu = t * m
    d = 1.0 / (1.0 + phi * mu)
    score = (y - mu) * d
    info_obs = mu * (1.0 + phi * y) * d * d
    return score, info_obs


def _moments(y, m, t):
    mu = t * m
    return (y - mu) ** 2 - y, mu * mu


def _size_derivs(y, m, t, r):
    return NegativeBinomial(r).size_derivatives(y, t * m)


def _size_loglik(y, m, t, r):
    return (NegativeBinomial(r).loglik(y, np.log(np.maximum(t * m, 1e-300))),)


# ------------------------------------------------------------------------- results
@dataclass
class OffsetMeanResult:
    """Per (response g, weight column b) results, arrays of shape (G, B)."""

    coef: np.ndarray
    se: np.ndarray
    z: np.ndarray
    score_z: np.ndarray
    size: np.ndarray  # inf: Poisson (fixed or estimated without overdispersion); nan: undefined
    converged: np.ndarray
    boundary: np.ndarray  # sum_i T_i y_i == 0: coef = -inf
    size_fallback: np.ndarray  # size by the method of moments (likelihood search failed)
    n_iter: int


def _gene_chunks(G, n_rows):
    """Genes per chunk so that (n, chunk) copies stay moderate."""
    per = max(1, min(G, int(2**24 // max(n_rows, 1))))
    return [np.arange(s, min(s + per, G)) for s in range(0, G, per)]


def fit_offset_mean(Y, O, cols, *, family="negative_binomial", size=None, method="closed_form",
                    max_iter=50, tol=1e-10):
    """Fit ``beta[g, b]`` for every response column g of ``Y`` and weight column b.

    Parameters
    ----------
    Y : ndarray of shape (n, G)
        Non-negative counts.
    O : ndarray of shape (n,) or (n, G)
        Offsets, shared by the responses or one column per response.
    cols : WeightColumns
        The weights.
    family : {"poisson", "negative_binomial"}
    size : None, float or ndarray of shape (G,)
        NB size; None estimates it for every (g, b) by maximum likelihood.
    method : {"closed_form", "mle"}
        NB estimate: the closed form ``log(sum T y / sum T e^o)`` or the exact MLE.
    max_iter, tol : Newton iterations and step tolerance (on beta and log size).

    Returns
    -------
    OffsetMeanResult
    """
    n, G = Y.shape
    B = cols.B
    shape = (G, B)
    res = OffsetMeanResult(
        coef=np.empty(shape), se=np.empty(shape), z=np.empty(shape), score_z=np.empty(shape),
        size=np.empty(shape), converged=np.ones(shape, bool), boundary=np.zeros(shape, bool),
        size_fallback=np.zeros(shape, bool), n_iter=0,
    )
    O2 = O[:, None] if O.ndim == 1 else O
    fixed_phi = None
    if family == "negative_binomial" and size is not None:
        fixed_phi = 1.0 / np.broadcast_to(np.asarray(size, dtype=float), (G,))
    for gs in _gene_chunks(G, n):
        Yc = np.ascontiguousarray(Y[:, gs])
        Oc = O2 if O2.shape[1] == 1 else O2[:, gs]
        shift = np.max(Oc, axis=0)  # (1,) or (Gc,): exp(O - shift) <= 1 never overflows
        M = np.exp(Oc - shift)
        Sy = cols.linear(Yc)  # (B, Gc)
        Se = cols.linear(M)  # (B, 1) or (B, Gc)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = Sy / Se  # exp(beta + shift): the closed form
            a = np.log(t)
        boundary = Sy <= 0
        if family == "poisson":
            phi = np.zeros((1, Sy.shape[1]))
            info = Sy
            converged = np.ones_like(boundary)
            size_est = np.full(Sy.shape, np.inf)
            fallback = np.zeros_like(boundary)
            n_iter = 0
        else:
            phi = None if fixed_phi is None else fixed_phi[gs][None, :]
            a, phi_bg, converged, fallback, n_iter = _nb_fit(
                cols, Yc, M, a, boundary, phi, method, max_iter, tol
            )
            t = np.exp(a)
            info = cols.map_reduce(_information, [M], [t, phi_bg], 1)[0]
            with np.errstate(divide="ignore"):
                size_est = np.broadcast_to(1.0 / phi_bg, Sy.shape).copy()
            phi = phi_bg
        with np.errstate(divide="ignore", invalid="ignore"):
            coef = a - shift
            se = 1.0 / np.sqrt(info)
            z = np.where(boundary, np.nan, coef / se)
        se = np.where(boundary, np.inf, se)
        if family != "poisson" and size is None:
            size_est[boundary] = np.nan  # no counts: every size fits equally well
        res.score_z[gs] = _score_at_zero(cols, Yc, M, shift, phi).T
        res.coef[gs], res.se[gs], res.z[gs] = coef.T, se.T, z.T
        res.size[gs], res.converged[gs], res.boundary[gs] = size_est.T, converged.T, boundary.T
        res.size_fallback[gs] = fallback.T
        res.n_iter = max(res.n_iter, n_iter)
    return res


def _score_at_zero(cols, Yc, M, shift, phi):
    """``U / sqrt(I)`` at ``beta = 0``: the score statistic (linear in the weights when the
    size does not depend on the weight column)."""
    mu0 = M * np.exp(shift)
    if phi.shape[0] == 1:
        d = 1.0 / (1.0 + phi * mu0)
        U = cols.linear((Yc - mu0) * d)
        info = cols.linear(np.broadcast_to(mu0 * d, Yc.shape))
    else:
        U, info = cols.map_reduce(
            lambda y, m, p: ((y - m) / (1.0 + p * m), m / (1.0 + p * m)), [Yc, mu0], [phi], 2
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        return U / np.sqrt(info)


def _nb_fit(cols, Yc, M, a0, boundary, phi, method, max_iter, tol):
    """NB estimates on the log scale ``a = beta + shift``; ``phi`` (1, Gc) fixed or None."""
    a = np.where(boundary, 0.0, a0)  # boundary entries: placeholder, restored at the end
    active = ~boundary
    n_iter = 0
    fallback = np.zeros_like(boundary)
    converged = np.ones_like(boundary)
    if phi is not None:
        if method == "mle":
            a, conv_a, n_iter = _newton_beta(cols, Yc, M, a, phi, active, max_iter, tol)
            converged &= conv_a | boundary
        return np.where(boundary, -np.inf, a), phi, converged, fallback, n_iter
    # estimated size: profile at the closed form, then (mle) alternate beta and size
    u, conv_u, fallback, it_u = _size_mle(cols, Yc, M, a, None, active, max_iter)
    n_iter = it_u
    if method == "mle":
        for _ in range(max_iter):
            phi_bg = _phi_from_log_size(u)
            a_new, conv_a, it_a = _newton_beta(cols, Yc, M, a, phi_bg, active, max_iter, tol)
            u_new, conv_u, fallback, it_u = _size_mle(cols, Yc, M, a_new, u, active, max_iter)
            n_iter += it_a + it_u
            moved = np.abs(a_new - a) > 1e3 * tol * (1 + np.abs(a))
            moved |= np.abs(u_new - u) > 1e-8
            a, u = a_new, u_new
            if not np.any(moved & active):
                break
        else:
            conv_u = conv_u & ~(moved & active)
        converged &= conv_a | boundary
    converged &= conv_u | boundary
    phi_bg = _phi_from_log_size(u)
    phi_bg = np.where(boundary, 0.0, phi_bg)
    return np.where(boundary, -np.inf, a), phi_bg, converged, fallback, n_iter


def _phi_from_log_size(u):
    return np.where(u >= np.log(SIZE_MAX), 0.0, np.exp(-u))


def _newton_beta(cols, Yc, M, a, phi, active, max_iter, tol):
    """Safeguarded Newton for the concave NB log-likelihood in ``a``: a bracket from the
    sign of the score, bisection whenever a step leaves it."""
    lo = np.full(a.shape, -np.inf)
    hi = np.full(a.shape, np.inf)
    active = active.copy()
    it = 0
    for it in range(1, max_iter + 1):
        U, J = cols.map_reduce(_newton, [Yc, M], [np.exp(a), phi], 2)
        step = U / J
        lo = np.where(U > 0, a, lo)
        hi = np.where(U < 0, a, hi)
        new = a + np.clip(step, -5.0, 5.0)
        outside = (new <= lo) | (new >= hi)
        new = np.where(outside, 0.5 * (lo + hi), new)
        done = np.abs(step) <= tol * (1.0 + np.abs(a))
        a = np.where(active, new, a)
        active &= ~done
        if not active.any():
            break
    return a, ~active, it


def _size_mle(cols, Yc, M, a, u0, active, max_iter):
    """Maximum-likelihood log size at fixed means, per (b, g).

    Starts at ``u0`` or at the method-of-moments estimate; Newton steps on ``log r``
    (gradient steps where the profile is not concave) with backtracking. An estimate
    that reaches ``SIZE_MAX`` is the Poisson limit. Entries whose search fails fall back
    to the method of moments (flagged).
    """
    t = np.exp(a)
    lmin, lmax = np.log(SIZE_MIN), np.log(SIZE_MAX)
    excess, mu2 = cols.map_reduce(_moments, [Yc, M], [t], 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        phi_mom = np.where(mu2 > 0, np.maximum(excess, 0.0) / mu2, 0.0)
        u_mom = np.clip(-np.log(phi_mom), lmin, lmax)
    u = u_mom.copy() if u0 is None else u0.copy()
    # start strictly inside: the Poisson end is re-reached if the likelihood wants it
    u = np.minimum(u, lmax - 1.0)
    active = active.copy()
    ll = cols.map_reduce(_size_loglik, [Yc, M], [t, np.exp(u)], 1)[0]
    it = 0
    for it in range(1, max_iter + 1):
        g, h = cols.map_reduce(_size_derivs, [Yc, M], [t, np.exp(u)], 2)
        step = np.where(h < 0, -g / np.where(h < 0, h, -1.0), np.sign(g))
        step = np.clip(step, -3.0, 3.0)
        at_top = (u >= lmax) & (g >= 0)
        done = (np.abs(step) <= 1e-10) | at_top
        active &= ~done
        if not active.any():
            break
        scale = np.ones_like(u)
        for _ in range(40):
            trial = np.where(active, np.clip(u + scale * step, lmin, lmax), u)
            ll_trial = cols.map_reduce(_size_loglik, [Yc, M], [t, np.exp(trial)], 1)[0]
            ok = ~active | (ll_trial >= ll - 1e-12 * np.abs(ll))
            if ok.all():
                break
            scale = np.where(ok, scale, 0.5 * scale)
        stuck = active & ~ok
        u = np.where(active & ok, trial, u)
        ll = np.where(active & ok, ll_trial, ll)
        active &= ~stuck  # no ascent along the step: a stationary point to round-off
    failed = active
    u = np.where(failed, u_mom, u)
    return u, ~failed, failed, it


def warn_fallback(n):
    warnings.warn(
        f"the size search did not converge for {n} fit(s); they use the method-of-moments size "
        "(size_fallback_ marks them).",
        UserWarning,
        stacklevel=3,
    )
