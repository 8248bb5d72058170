"""Fused passes over the non-zero weights of one response, compiled with numba when it is
installed (the ``fast`` extra).

For one gene, the sums of :func:`skmixed.offset._kernels.fit_offset_mean` are a handful of
products per non-zero weight; in numpy each is a separate pass that gathers the per-cell
arrays again (and allocates an element-sized temporary). Here one compiled loop reads each
element once: the linear sums in one pass, the NB information at the estimates in a second
(the estimates are only known after the first). The loops follow the column pointers of a
CSC weight matrix (SCEPTRE's resampled indicators) and keep each column's sums in registers.
Without numba (or with ``SKMIXED_DISABLE_NUMBA`` set), :data:`AVAILABLE` is False and the
callers keep their numpy passes, which the tests compare with these.
"""

from __future__ import annotations

import os

import numpy as np

try:  # numba is optional: the numpy passes are the reference implementation
    if os.environ.get("SKMIXED_DISABLE_NUMBA"):
        raise ImportError
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

AVAILABLE = numba is not None


def _linear_pass(rows, ptr, w, y, m, scale, phi):
    out = np.zeros((ptr.size - 1, 4))
    for c in range(ptr.size - 1):
        # scalar accumulators: the sums stay in registers (4x faster than out[c, j] += ...)
        sy = se = su = si = 0.0
        for e in range(ptr[c], ptr[c + 1]):
            r = rows[e]
            yr, mr, we = y[r], m[r], w[e]
            mu0 = scale * mr
            d = we / (1.0 + phi * mu0)
            sy += we * yr
            se += we * mr
            su += (yr - mu0) * d
            si += mu0 * d
        out[c, 0], out[c, 1], out[c, 2], out[c, 3] = sy, se, su, si
    return out


def _nb_information(rows, ptr, w, m, t, phi):
    out = np.zeros(t.size)
    for c in range(t.size):
        pc = phi[c] * t[c]
        # four partial sums: the divisions of a long column overlap
        a0 = a1 = a2 = a3 = 0.0
        e, e1 = ptr[c], ptr[c + 1]
        while e + 4 <= e1:
            m0, m1, m2, m3 = m[rows[e]], m[rows[e + 1]], m[rows[e + 2]], m[rows[e + 3]]
            a0 += w[e] * m0 / (1.0 + pc * m0)
            a1 += w[e + 1] * m1 / (1.0 + pc * m1)
            a2 += w[e + 2] * m2 / (1.0 + pc * m2)
            a3 += w[e + 3] * m3 / (1.0 + pc * m3)
            e += 4
        while e < e1:
            m0 = m[rows[e]]
            a0 += w[e] * m0 / (1.0 + pc * m0)
            e += 1
        out[c] = t[c] * ((a0 + a1) + (a2 + a3))
    return out


def _dense_scan(A, rows_per_block):
    n, B = A.shape
    indptr = np.zeros(n + 1, dtype=np.int64)
    cap = max(1024, (n * B) // 64)
    indices = np.empty(cap, dtype=np.int64)
    data = np.empty(cap, dtype=np.float64)
    ok = True
    nnz = 0
    for r0 in range(0, n, rows_per_block):
        r1 = min(r0 + rows_per_block, n)
        # the block is read from memory once: counting and checking bring it into the
        # cache, where the copy of its non-zeros reads it again
        k = 0
        for i in range(r0, r1):
            for j in range(B):
                v = A[i, j]
                if not (v >= 0.0 and v <= 1.0):  # NaN fails both
                    ok = False
                if v != 0.0:
                    k += 1
        if not ok:
            return indptr, indices[:0], data[:0], False
        if nnz + k > cap:
            cap = max(2 * cap, nnz + k)
            grown_i = np.empty(cap, dtype=np.int64)
            grown_d = np.empty(cap, dtype=np.float64)
            grown_i[:nnz] = indices[:nnz]
            grown_d[:nnz] = data[:nnz]
            indices, data = grown_i, grown_d
        for i in range(r0, r1):
            for j in range(B):
                v = A[i, j]
                if v != 0.0:
                    indices[nnz] = j
                    data[nnz] = v
                    nnz += 1
            indptr[i + 1] = nnz
    return indptr, indices[:nnz], data[:nnz], True


if AVAILABLE:
    # nogil: callers' threads may run these side by side
    _linear_pass = numba.njit(cache=True, nogil=True)(_linear_pass)
    _nb_information = numba.njit(cache=True, nogil=True)(_nb_information)
    _dense_scan = numba.njit(cache=True, nogil=True)(_dense_scan)


def dense_to_csr(A):
    """The CSR matrix of a dense weight matrix ``A`` (n, B), C-contiguous float64, read from
    memory once, and whether every value lies in [0, 1] (None when not: the caller then
    finds and reports the offending value)."""
    import scipy.sparse  # noqa: PLC0415

    n, B = A.shape
    indptr, indices, data, ok = _dense_scan(A, max(1, (1 << 17) // max(B, 1)))
    if not ok:
        return None
    return scipy.sparse.csr_matrix((data, indices, indptr), shape=(n, B))


def usable(cols):
    """Whether the fused passes apply to ``cols``: numba present, and the weights grouped by
    column (a CSC matrix), whose column pointers the loops follow."""
    return AVAILABLE and getattr(cols, "col_ptr", None) is not None


def linear_pass(cols, y, m, scale, phi):
    """For one gene: per weight column b, the sums over its cells of ``y``, ``m``, and of the
    score and information at ``beta = 0`` with ``mu0 = scale m`` (size ``1 / phi``):
    ``(y - mu0) / (1 + phi mu0)`` and ``mu0 / (1 + phi mu0)``. Returns (B, 4)."""
    return _linear_pass(cols.rows, cols.col_ptr, cols.vals, _f64(y), _f64(m), float(scale), float(phi))


def nb_information(cols, m, t, phi):
    """``sum_i W[i, b] t_b m_i / (1 + phi_b t_b m_i)`` for one gene: ``m`` (n,), ``t`` and
    ``phi`` (B,) (``phi`` = 0: Poisson). Returns (B,)."""
    t = _f64(t)
    return _nb_information(cols.rows, cols.col_ptr, cols.vals, _f64(m), t, _f64(np.broadcast_to(phi, t.shape)))


def _f64(a):
    return np.ascontiguousarray(a, dtype=np.float64)
