"""The count matrix of a fit: CSR rows (scipy.sparse or cupyx), read chunk by chunk.

Only one chunk of cells is ever densified: the optimiser streams over row slices, and
every dense (cells x genes) intermediate has at most ``batch_size`` rows.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .._backend import get_namespace, is_cupy_array
from .._families import ZINB

#: default number of matrix entries (cells x genes) per chunk: ~16 MB per dense float64 array
DEFAULT_CHUNK_ENTRIES = 1 << 21

#: largest count for which the common-dispersion tables are built (entries of a table)
MAX_TABLE_COUNT = 10_000_000


def _is_cupy_sparse(Y) -> bool:
    return type(Y).__module__.startswith("cupyx.scipy.sparse")


def to_csr(Y, xp):
    """``Y`` as a float64 CSR matrix of namespace ``xp`` (dense inputs are converted)."""
    if xp is np:
        return sp.csr_matrix(Y, dtype=np.float64)
    import cupyx.scipy.sparse as csp  # noqa: PLC0415  (only reached with CuPy input)

    if _is_cupy_sparse(Y):
        return csp.csr_matrix(Y, dtype=xp.float64)
    if sp.issparse(Y):
        return csp.csr_matrix(sp.csr_matrix(Y, dtype=np.float64))
    return csp.csr_matrix(xp.asarray(Y, dtype=xp.float64))


def namespace_of_counts(Y):
    if _is_cupy_sparse(Y) or is_cupy_array(Y):
        return get_namespace(Y.data if _is_cupy_sparse(Y) else Y)
    return np


def entry_rows(indptr, xp, dtype):
    """The row of every stored entry of a CSR matrix with row pointers ``indptr``."""
    if xp is np:  # a repeat is ~10x faster than the search
        return np.repeat(np.arange(indptr.shape[0] - 1, dtype=dtype), np.diff(indptr))
    # cupy.repeat takes no array of repeats
    return (xp.searchsorted(indptr, xp.arange(int(indptr[-1])), side="right") - 1).astype(dtype)


class Counts:
    """A CSR count matrix (n cells x J genes) with its chunking."""

    def __init__(self, Y_csr, xp, batch_size=None):
        if not getattr(Y_csr, "has_canonical_format", True):
            # sorted, duplicate-free indices: the non-zeros are then in the order of
            # :meth:`entries` (a copy: the caller's matrix is left as it was)
            Y_csr = Y_csr.copy()
            Y_csr.sum_duplicates()
        self.Y = Y_csr
        self.xp = xp
        self.n, self.J = Y_csr.shape
        if batch_size is None:
            batch_size = max(1, DEFAULT_CHUNK_ENTRIES // max(self.J, 1))
        self.batch_size = int(min(batch_size, max(self.n, 1)))
        self.chunks = [slice(s, min(s + self.batch_size, self.n)) for s in range(0, self.n, self.batch_size)]
        self.n_threads = 1
        data = Y_csr.data
        self.y_max = float(data.max()) if data.size else 0.0
        self.integer = bool(xp.all(data == xp.round(data))) if data.size else True
        self._tables_key = None
        self._tables = None

    def entries(self, rows, cols=None):
        """Non-zeros of ``Y[rows][:, cols]`` as (row-in-block, column-in-block, value)."""
        xp = self.xp
        sub = self.Y[rows]
        if cols is not None:
            sub = sub[:, cols]
        sub.sort_indices()
        return entry_rows(sub.indptr, xp, xp.int64), sub.indices.astype(xp.int64), sub.data

    def n_rows(self, rows) -> int:
        if isinstance(rows, slice):
            return len(range(*rows.indices(self.n)))
        return int(rows.shape[0])


    def tables(self, zeta):
        """Count tables of :meth:`ZINB.count_tables` when the dispersion is common (all
        ``zeta`` equal) and the counts are integers; ``None`` otherwise."""
        xp = self.xp
        if not self.integer or self.y_max > MAX_TABLE_COUNT:
            return None
        z0 = float(zeta[0])
        if zeta.shape[0] > 1 and not bool(xp.all(zeta == z0)):
            return None
        if self._tables_key != z0:
            tabs = ZINB.count_tables(float(np.exp(z0)), int(self.y_max))
            self._tables = tuple(xp.asarray(t) for t in tabs)
            self._tables_key = z0
        return self._tables
