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
(a size estimated as infinite needs no special case);
``tests/test_offset_mean.py::test_kernel_sums_are_the_family_derivatives`` checks them
against the family's methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse

from .._backend import add_rows_at, get_namespace, sparse_csr, to_host
from .._families import NegativeBinomial
from . import _fused

# size bounds of the maximum-likelihood search; reaching SIZE_MAX means "no overdispersion"
SIZE_MIN = 1e-8
SIZE_MAX = 1e8
_ELEMENT_BLOCK = 131072  # elements x genes per chunk: temporaries stay near L2 cache size
# weights at least this dense (and at most this many entries) are also kept dense, so that
# the linear sums and the information (by interpolation, :func:`information_dense`) are
# matrix products
DENSE_FRACTION = 0.25
DENSE_MAX_ENTRIES = 1 << 24
# relative error allowed to the interpolated information, and the most nodes used for it
_INTERP_TOL = 1e-14
_INTERP_MAX_NODES = 24


_UNIT = np.ones(0)


def _unit_weights(k):
    """A read-only array of k ones (a view of a shared buffer: no allocation per call)."""
    global _UNIT
    if _UNIT.size < k:
        _UNIT = np.ones(max(k, 2 * _UNIT.size))
        _UNIT.flags.writeable = False
    return _UNIT[:k]


def _csr_by_scan(A):
    """CSR matrix of a C-contiguous dense array from one scan of its non-zeros (scipy's
    conversion of a large dense matrix is several times slower)."""
    flat = np.flatnonzero(A)
    major, minor = np.divmod(flat, A.shape[1])
    indptr = np.searchsorted(major, np.arange(A.shape[0] + 1))
    return scipy.sparse.csr_matrix((A.reshape(-1)[flat], minor, indptr), shape=A.shape)


class WeightColumns:
    """The non-zero entries of a weight matrix ``W`` of shape (n, B): element ``e`` is
    cell ``rows[e]`` in column ``cols[e]`` with weight ``vals[e]``.

    Elements are best grouped by cell (gathers from per-cell arrays then stream through
    memory); any order is correct. Build with :meth:`from_sparse`, :meth:`from_dense`,
    :meth:`from_vector`, :meth:`ones`, :meth:`from_elements` or
    :meth:`from_sorted_elements`.
    """

    def __init__(self, rows, cols, vals, n, B, *, Wt=None):
        self.n, self.B = int(n), int(B)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.cols = np.asarray(cols, dtype=np.int64)
        self.vals = _unit_weights(self.rows.size) if vals is None else np.asarray(vals, dtype=np.float64)
        self.nnz = self.rows.size
        self.Wt = Wt  # (B, n) sparse (or dense for one column), for the linear sums; None: gather and reduce
        self._chunks = {}
        self._dense = False
        self._unit = vals is None or (isinstance(vals, np.ndarray) and vals.base is _UNIT)
        self.Wd = None  # (n, B) dense copy of mostly non-zero weights: BLAS products
        self._count = None
        self.col_ptr = None  # CSC column pointers when the elements are grouped by column

    @property
    def count(self):
        """Number of non-zero weights per column."""
        if self._count is None:
            self._count = np.bincount(self.cols, minlength=self.B)
        return self._count

    @classmethod
    def from_sparse(cls, W):
        """Weights of a sparse matrix without explicit zeros, read in its own layout:
        CSR (elements grouped by cell) or CSC (grouped by column); the transpose for
        the linear sums is then a view, not a conversion."""
        if not scipy.sparse.issparse(W) or W.format not in ("csr", "csc"):
            W = scipy.sparse.csr_matrix(W, dtype=np.float64)
            W.eliminate_zeros()
        n, B = W.shape
        if W.format == "csc":
            rows = W.indices
            count = np.diff(W.indptr)
            cols = np.repeat(np.arange(B, dtype=np.int64), count)
        else:
            rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(W.indptr))
            cols = W.indices
        out = cls(rows, cols, W.data, n, B, Wt=W.T)
        if W.format == "csc":
            out._count = count
            out.col_ptr = W.indptr.astype(np.int64, copy=False)
        if B > 1 and W.nnz >= DENSE_FRACTION * n * B and n * B <= DENSE_MAX_ENTRIES:
            out.Wd = W.toarray()
        return out

    @classmethod
    def from_dense(cls, W):
        """Dense weights: their non-zero entries in cell order (one scan), and the dense
        matrix itself when mostly non-zero (BLAS products)."""
        W = np.asarray(W, dtype=np.float64)
        W = W[:, None] if W.ndim == 1 else W
        n, B = W.shape
        if B > 1 and n * B <= DENSE_MAX_ENTRIES and np.count_nonzero(W) >= DENSE_FRACTION * n * B:
            return cls.from_sparse(scipy.sparse.csr_matrix(W))
        if W.flags.f_contiguous and not W.flags.c_contiguous:
            # column-major memory (e.g. a sparse matrix's toarray()): scan it as (B, n),
            # whose CSR matrix is the CSC matrix of W
            return cls.from_sparse(_csr_by_scan(W.T).T)
        return cls.from_sparse(_csr_by_scan(np.ascontiguousarray(W)))

    @classmethod
    def ones(cls, n):
        return cls.from_vector(np.ones(n))

    @classmethod
    def from_vector(cls, w):
        """One weight column: dense products (no sparse matrix to build)."""
        w = np.asarray(w, dtype=np.float64)
        rows = np.flatnonzero(w)
        out = cls(rows, np.zeros(rows.size, dtype=np.int64), w[rows], w.size, 1, Wt=w[None, :])
        out._dense = True
        return out

    @classmethod
    def from_elements(cls, rows, cols, n, B):
        """0/1 weights: ``W[rows[e], cols[e]] = 1`` (pairs distinct, any order)."""
        return cls(rows, cols, None, n, B)

    @classmethod
    def from_sorted_elements(cls, rows, cols, n, B):
        """0/1 weights with ``rows`` non-decreasing: the sparse transpose comes free, so
        the linear sums stream through the per-cell arrays without gathering."""
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        ones = _unit_weights(rows.size)
        W = scipy.sparse.csr_matrix((ones, cols, indptr), shape=(n, B), copy=False)
        return cls(rows, cols, ones, n, B, Wt=W.T)

    def linear(self, F):
        """``W.T @ F`` for ``F`` of shape (n, k): (B, k)."""
        if self.Wd is not None:
            return self.Wd.T @ F
        if self.Wt is not None:
            return np.asarray(self.Wt @ F)
        return self.map_reduce(lambda f: (f,), [F], [], 1)[0]

    def chunks(self, n_genes):
        """(start, stop, reducer, runs) per chunk of elements. ``reducer`` is a
        (B, stop - start) sparse matrix holding the weights, so that ``reducer @ V`` sums
        the rows of ``V`` into their columns; ``runs`` is ``(first cell, last cell + 1,
        elements per cell)`` when the rows are sorted (gathers are then ``np.repeat``,
        2-3x faster than fancy indexing), else None."""
        size = max(256, _ELEMENT_BLOCK // max(n_genes, 1))
        if size not in self._chunks:
            out = []
            is_sorted = self.nnz == 0 or bool(np.all(self.rows[1:] >= self.rows[:-1]))
            for s in range(0, self.nnz, size):
                e = min(s + size, self.nnz)
                if self._dense:
                    P = self.vals[None, s:e]
                elif n_genes == 1:
                    P = None  # one column: map_reduce sums by bincount
                else:
                    P = scipy.sparse.csc_matrix(
                        (self.vals[s:e], self.cols[s:e], np.arange(e - s + 1)), shape=(self.B, e - s)
                    )
                runs = None
                if is_sorted:
                    r0 = int(self.rows[s])
                    runs = (r0, int(self.rows[e - 1]) + 1, np.bincount(self.rows[s:e] - r0))
                out.append((s, e, P, runs))
            self._chunks[size] = out
        return self._chunks[size]

    def _gather_chunk(self, a, s, e, runs):
        if runs is None:
            return a[self.rows[s:e]]
        r0, r1, counts = runs
        return np.repeat(a[r0:r1], counts, axis=0)

    def gather(self, a, n_genes):
        """``a[rows]`` chunk by chunk (the chunking of ``n_genes``-wide passes), for
        reuse by several passes of :meth:`map_reduce`."""
        return _Gathered([self._gather_chunk(a, s, e, runs) for s, e, _, runs in self.chunks(n_genes)], a.shape[1])

    def map_reduce(self, fn, cell_arrays, col_arrays, n_out):
        """``sum_i W[i, b] * fn(cell_arrays[i], col_arrays[b])[k]`` for every b.

        ``cell_arrays`` have n rows (or are :meth:`gather` results), ``col_arrays`` B
        rows (or 1 row: broadcast, not gathered); ``fn`` returns ``n_out`` arrays of
        shape (chunk, G). Returns a list of ``n_out`` arrays of shape (B, G).
        """
        G = max(a.shape[1] for a in list(cell_arrays) + list(col_arrays))
        out = [np.zeros((self.B, G)) for _ in range(n_out)]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for k, (s, e, P, runs) in enumerate(self.chunks(G)):
                c = self.cols[s:e]
                cell = [a.chunks[k] if isinstance(a, _Gathered) else self._gather_chunk(a, s, e, runs) for a in cell_arrays]
                col = [a if a.shape[0] == 1 else a[c] for a in col_arrays]
                vals = fn(*cell, *col)
                for j in range(n_out):
                    if G == 1 and not self._dense:
                        # one column: bincount beats the sparse product's scattered writes
                        v = vals[j][:, 0] if self._unit else vals[j][:, 0] * self.vals[s:e]
                        out[j][:, 0] += np.bincount(c, weights=v, minlength=self.B)
                    else:
                        out[j] += P @ vals[j]
        return out


class DeviceWeightColumns:
    """:class:`WeightColumns` for CuPy arrays: the same interface, with the sums as
    ``cupyx`` sparse products and ``scatter_add`` (through :mod:`skmixed._backend`),
    in chunks of elements."""

    _CHUNK = 1 << 24  # elements x genes per chunk: large, few kernel launches

    def __init__(self, rows, cols, vals, n, B):
        xp = get_namespace(rows, cols, vals)
        self.n, self.B = int(n), int(B)
        self.rows, self.cols = rows.astype(xp.int64), cols.astype(xp.int64)
        self.vals = vals.astype(xp.float64)
        self.nnz = int(self.rows.size)
        self._Wt = sparse_csr(self.vals, self.cols, self.rows, (self.B, self.n), xp)
        self.Wt = None  # fit_offset_mean then takes the gathering passes (map_reduce)

    @property
    def count(self):
        return get_namespace(self.cols).bincount(self.cols, minlength=self.B)

    def linear(self, F):
        return self._Wt @ F

    def _ranges(self, n_genes):
        step = max(1024, self._CHUNK // max(n_genes, 1))
        return [(s, min(s + step, self.nnz)) for s in range(0, self.nnz, step)]

    def gather(self, a, n_genes):
        return _Gathered([a[self.rows[s:e]] for s, e in self._ranges(n_genes)], a.shape[1])

    def map_reduce(self, fn, cell_arrays, col_arrays, n_out):
        xp = get_namespace(self.cols)
        G = max(a.shape[1] for a in list(cell_arrays) + list(col_arrays))
        out = [xp.zeros((self.B, G)) for _ in range(n_out)]
        for k, (s, e) in enumerate(self._ranges(G)):
            c = self.cols[s:e]
            cell = [a.chunks[k] if isinstance(a, _Gathered) else a[self.rows[s:e]] for a in cell_arrays]
            col = [a if a.shape[0] == 1 else a[c] for a in col_arrays]
            vals = fn(*cell, *col)
            w = self.vals[s:e, None]
            for j in range(n_out):
                add_rows_at(out[j], c, xp.ascontiguousarray(xp.broadcast_to(vals[j] * w, (e - s, G))))
        return out


class _Gathered:
    def __init__(self, chunks, width):
        self.chunks = chunks
        self.shape = (None, width)


# ---------------------------------------------------------------------------- passes
def _information(m, t, phi):
    mu = t * m
    d = phi * mu
    d += 1.0
    mu /= d
    return (mu,)


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


def information_dense(Wd, M, t, phi):
    """``sum_i W[i, b] t M_i / (1 + phi t M_i)`` for every (b, g), the NB information at
    ``t`` (as :func:`_information` through :meth:`WeightColumns.map_reduce`), with dense
    weights ``Wd`` (n, B), by polynomial interpolation and matrix products.

    With ``Q_i = 1 / M_i`` and ``s = phi t`` the sum is ``t sum_i W[i, b] / (Q_i + s_b)``.
    Per gene, ``1 / (Q_i + s)`` is interpolated in ``s`` at ``N`` Chebyshev points of
    ``[min_b s_b, max_b s_b] = [lo, hi]``; then ``sum_i W[i, b] p_i(s_b)`` is
    ``sum_k L_k(s_b) (W.T F)[b, k]`` with ``F[i, k] = 1 / (Q_i + s_k)``: one product of
    (B, n) by (n, N) instead of a pass over the n x B weights. The interpolation error of
    ``1 / (s + Q)`` is exactly ``omega(s) / (omega(-Q) (s + Q))`` with ``omega`` the node
    polynomial, so every term's relative error is at most
    ``2 (h / (2 (Q_min + lo)))^N`` (``h`` the half-width); ``N`` is chosen to make that
    below 1e-14, and a gene that would need more than 24 nodes (very spread ``s``) is
    summed directly. The terms are positive, so the sum has the same relative bound.

    Parameters
    ----------
    Wd : ndarray (n, B)
    M : ndarray (n, 1) or (n, G), ``exp(o - shift)`` in (0, 1]
    t : ndarray (B, G), the estimates ``exp(beta + shift)``
    phi : ndarray (1, G) or (B, G)
    """
    B, G = t.shape
    phi = np.broadcast_to(phi, (B, G))
    out = np.empty((B, G))
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        Q = 1.0 / M  # >= 1; inf where M underflows (those terms are 0)
    for g in range(G):
        q = Q[:, 0] if Q.shape[1] == 1 else Q[:, g]
        tg, sg = t[:, g], phi[:, g] * t[:, g]
        if not np.all(np.isfinite(sg)):
            out[:, g] = _information_direct(Wd, q, tg, sg)
            continue
        lo, hi = float(sg.min()), float(sg.max())
        c, h = 0.5 * (lo + hi), 0.5 * (hi - lo)
        ratio = h / (2.0 * (float(q.min()) + lo))
        if ratio <= 0.0:
            nodes = 1
        else:
            nodes = int(np.ceil(np.log(0.5 * _INTERP_TOL) / np.log(ratio))) if ratio < 1.0 else _INTERP_MAX_NODES + 1
        if nodes > _INTERP_MAX_NODES:
            out[:, g] = _information_direct(Wd, q, tg, sg)
            continue
        k = np.arange(nodes)
        theta = (2 * k + 1) * np.pi / (2 * nodes)
        sk = c + h * np.cos(theta)
        F = 1.0 / (q[:, None] + sk[None, :])  # (n, N)
        S = Wd.T @ F  # (B, N)
        if nodes == 1:
            acc = S[:, 0]
        else:
            # barycentric interpolation at Chebyshev points of the first kind
            lam = (-1.0) ** k * np.sin(theta)
            diff = sg[:, None] - sk[None, :]
            hit = diff == 0.0
            with np.errstate(divide="ignore", invalid="ignore"):
                Lk = lam[None, :] / diff
            if hit.any():
                rows = hit.any(axis=1)
                Lk[rows] = hit[rows].astype(float)
            acc = (Lk * S).sum(axis=1) / Lk.sum(axis=1)
        out[:, g] = tg * acc
    return out


def _information_direct(Wd, q, t, s):
    """The sum of :func:`information_dense` for one gene, term by term."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return t * np.einsum("nb,nb->b", Wd, 1.0 / (q[:, None] + s[None, :]))


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
    return [slice(s, min(s + per, G)) for s in range(0, G, per)]


def fit_offset_mean(Y, O, cols, *, family="negative_binomial", size=None, method="closed_form",
                    max_iter=50, tol=1e-10, wald=True, score=True):
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
    wald : bool
        Compute the Fisher information at the estimate (SE and Wald z); False leaves
        them NaN and saves the one pass over the elements that is not linear.
    score : bool
        Compute the score statistic at ``beta = 0`` (NaN otherwise).

    Returns
    -------
    OffsetMeanResult
    """
    n, G = Y.shape
    B = cols.B
    shape = (G, B)
    # creation functions follow Y's namespace (numpy or cupy, NEP 35); the other numpy
    # calls below dispatch on their array arguments
    res = OffsetMeanResult(
        coef=np.empty(shape, like=Y), se=np.empty(shape, like=Y), z=np.empty(shape, like=Y),
        score_z=np.empty(shape, like=Y), size=np.empty(shape, like=Y), converged=np.ones(shape, bool, like=Y),
        boundary=np.zeros(shape, bool, like=Y), size_fallback=np.zeros(shape, bool, like=Y), n_iter=0,
    )
    O2 = O[:, None] if O.ndim == 1 else O
    fixed_phi = None
    if family == "negative_binomial" and size is not None:
        fixed_phi = 1.0 / np.broadcast_to(np.asarray(to_host(size), dtype=float), (G,))
        fixed_phi = np.asarray(fixed_phi, like=Y)
    for gs in _gene_chunks(G, n):
        Yc = np.ascontiguousarray(Y[:, gs], like=Y)
        Oc = O2 if O2.shape[1] == 1 else O2[:, gs]
        shift = np.max(Oc, axis=0)  # (1,) or (Gc,): exp(O - shift) <= 1 never overflows
        M = M_full = np.exp(Oc - shift)
        Gc = Yc.shape[1]
        # the overdispersion, when known before the fit (Poisson, fixed size)
        phi0 = np.zeros((1, Gc), like=Y) if family == "poisson" else None
        if fixed_phi is not None:
            phi0 = fixed_phi[gs][None, :]
        score_sums = None
        # one gene, CSC 0/1 weights: compiled passes (skmixed.offset._fused)
        fused = Gc == 1 and isinstance(cols, WeightColumns) and _fused.usable(cols)
        if fused:
            S = _fused.linear_pass(cols, Yc[:, 0], M[:, 0], np.exp(shift[0]), 0.0 if phi0 is None else phi0[0, 0])
            Sy, Se = S[:, :1], S[:, 1:2]
            if score and phi0 is not None:
                score_sums = S[:, 2:3], S[:, 3:4]
        elif cols.Wt is None:
            # one gathering pass for both sums; the gathered exp(o) serve the later passes
            M = cols.gather(M, Gc)
            Sy, Se = cols.map_reduce(lambda y, m: (y, m), [Yc, M], [], 2)
        else:
            # the linear sums (and the score's, when phi is known) in one pass over the weights
            parts = [Yc, M] + (list(_score_columns(Yc, M, shift, phi0)) if score and phi0 is not None else [])
            S = cols.linear(np.concatenate(parts, axis=1))
            Sy, Se = S[:, :Gc], S[:, Gc:Gc + M.shape[1]]  # (B, Gc) and (B, 1) or (B, Gc)
            if len(parts) > 2:
                score_sums = S[:, -2 * Gc:-Gc], S[:, -Gc:]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = Sy / Se  # exp(beta + shift): the closed form
            a = np.log(t)
        boundary = Sy <= 0
        if family == "poisson":
            phi = np.zeros((1, Sy.shape[1]), like=Y)
            info = Sy
            converged = np.ones_like(boundary)
            size_est = np.full(Sy.shape, np.inf, like=Y)
            fallback = np.zeros_like(boundary)
            n_iter = 0
        else:
            phi = None if fixed_phi is None else fixed_phi[gs][None, :]
            a, phi_bg, converged, fallback, n_iter = _nb_fit(
                cols, Yc, M, a, boundary, phi, method, max_iter, tol
            )
            if wald and getattr(cols, "Wd", None) is not None:
                info = information_dense(cols.Wd, M, np.exp(a), phi_bg)
            elif wald and fused:
                info = _fused.nb_information(cols, M[:, 0], np.exp(a[:, 0]), phi_bg[:, 0])[:, None]
            elif wald:
                info = cols.map_reduce(_information, [M], [np.exp(a), phi_bg], 1)[0]
            else:
                info = np.full(Sy.shape, np.nan, like=Y)
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
        if score_sums is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                res.score_z[gs] = (score_sums[0] / np.sqrt(score_sums[1])).T
        else:
            res.score_z[gs] = _score_at_zero(cols, Yc, M_full, shift, phi).T if score else np.nan
        res.coef[gs], res.se[gs], res.z[gs] = coef.T, se.T, z.T
        res.size[gs], res.converged[gs], res.boundary[gs] = size_est.T, converged.T, boundary.T
        res.size_fallback[gs] = fallback.T
        res.n_iter = max(res.n_iter, n_iter)
    return res


def _score_columns(Yc, M, shift, phi):
    """Per-cell score and information at ``beta = 0`` for a size shared by every weight
    column: ``(y - mu0) / (1 + phi mu0)`` and ``mu0 / (1 + phi mu0)``, (n, Gc) each."""
    mu0 = M * np.exp(shift)
    d = 1.0 / (1.0 + phi * mu0)
    return (Yc - mu0) * d, np.broadcast_to(mu0 * d, Yc.shape)


def _score_at_zero(cols, Yc, M, shift, phi):
    """``U / sqrt(I)`` at ``beta = 0``: the score statistic (linear in the weights when the
    size does not depend on the weight column)."""
    mu0 = M * np.exp(shift)
    if phi.shape[0] == 1:
        A, I0 = _score_columns(Yc, M, shift, phi)
        if cols.Wt is None:
            U, info = cols.map_reduce(lambda a, i: (a, i), [A, I0], [], 2)
        else:
            S = cols.linear(np.concatenate([A, I0], axis=1))  # one pass over the weights
            U, info = S[:, :A.shape[1]], S[:, A.shape[1]:]
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
    lo = np.full(a.shape, -np.inf, like=a)
    hi = np.full(a.shape, np.inf, like=a)
    active = active.copy()
    it = 0
    for it in range(1, max_iter + 1):
        U, J = cols.map_reduce(_newton, [Yc, M], [np.exp(a), phi], 2)
        step = U / J
        lo = np.where(U > 0, a, lo)
        hi = np.where(U < 0, a, hi)
        new = a + np.clip(step, -5.0, 5.0)
        # a step past the bracket is replaced by bisection (both ends are then finite)
        outside = ((new < lo) | (new > hi)) & np.isfinite(lo) & np.isfinite(hi)
        new = np.where(outside, 0.5 * (lo + hi), new)
        done = np.abs(step) <= tol * (1.0 + np.abs(a))
        a = np.where(active, new, a)
        active &= ~done
        if not active.any():
            break
    return a, ~active, it


def _size_mle(cols, Yc, M, a, u0, active, max_iter):
    """Maximum-likelihood log size at fixed means, per (b, g), starting at ``u0`` or at
    the method-of-moments estimate (see :func:`size_newton`)."""
    t = np.exp(a)
    excess, mu2 = cols.map_reduce(_moments, [Yc, M], [t], 2)
    u_mom = moments_log_size(excess, mu2)
    u = u_mom if u0 is None else np.broadcast_to(u0, u_mom.shape)

    def derivs(u):
        return cols.map_reduce(_size_derivs, [Yc, M], [t, np.exp(u)], 2)

    return size_newton(derivs, u, u_mom, active, max_iter)


def moments_log_size(excess, mu2):
    """``log r`` from the method of moments, ``1 / r = sum((y - mu)^2 - y) / sum(mu^2)``,
    clipped to the search range (no excess variance: the Poisson end)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = np.where(mu2 > 0, np.maximum(excess, 0.0) / mu2, 0.0)
        return np.clip(-np.log(phi), np.log(SIZE_MIN), np.log(SIZE_MAX))


def size_newton(derivs, u, u_mom, active, max_iter):
    """Maximise the NB likelihood over ``u = log r``, many problems at once.

    ``derivs(u)`` returns the first and second derivatives in ``u``. Newton steps
    (gradient-sign steps where the profile is not concave) inside a bracket
    ``[lo, hi]`` kept from the sign of the score, bisecting when a step leaves it: no
    likelihood evaluations, one ``derivs`` call per iteration. An estimate at
    ``SIZE_MAX`` with a positive score is the Poisson limit. Problems still moving
    after ``max_iter`` fall back to ``u_mom`` (flagged).

    Returns
    -------
    u, converged, fallback, n_iter
    """
    lmin, lmax = np.log(SIZE_MIN), np.log(SIZE_MAX)
    u = np.minimum(u.astype(float, copy=True), lmax - 1.0)  # inside: the Poisson end is re-reached if wanted
    lo = np.full(u.shape, lmin, like=u)
    hi = np.full(u.shape, lmax, like=u)
    active = np.broadcast_to(active, u.shape).copy()
    it = 0
    for it in range(1, max_iter + 1):
        g, h = derivs(u)
        lo = np.where(g > 0, u, lo)
        hi = np.where(g < 0, u, hi)
        step = np.where(h < 0, -g / np.where(h < 0, h, -1.0), 2.0 * np.sign(g))
        new = np.clip(u + np.clip(step, -3.0, 3.0), lmin, lmax)
        outside = (new < lo) | (new > hi)
        new = np.where(outside, 0.5 * (lo + hi), new)
        at_end = ((u >= lmax) & (g >= 0)) | ((u <= lmin) & (g <= 0))
        done = at_end | (np.abs(new - u) <= 1e-10 * (1.0 + np.abs(u)))
        u = np.where(active & ~at_end, new, u)
        active &= ~done
        if not active.any():
            break
    failed = active
    u = np.where(failed, u_mom, u)
    return u, ~failed, failed, it
