"""ZINB log-likelihood and derivatives on a block of the count matrix.

The block is evaluated densely with the zero-count formulas, then the entries with a
positive count are recomputed with the positive-count formulas and scattered back:
scRNA-seq matrices are mostly zeros, so the costlier terms are paid only on the
non-zeros, and with a common dispersion and integer counts they are table look-ups.
On the CPU the dense part runs in cache-sized row blocks, spread over threads (numpy
releases the GIL inside its loops). With numba installed (the ``fast`` extra), numpy
arrays go through the fused kernel of :mod:`._kernels_numba` instead: one pass over the
block computes every output, zeros and non-zeros alike; :func:`use_kernel` chooses.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .._families import ZINB
from . import _kernels_numba

#: "numba" (the fused kernel, CPU arrays only) or "numpy"; see :func:`use_kernel`
KERNEL = "numba" if _kernels_numba.available() else "numpy"

#: matrix entries per cache block of the dense part (~256 kB per float64 array)
BLOCK_ENTRIES = 1 << 15

_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(n_threads: int) -> ThreadPoolExecutor:
    if n_threads not in _POOLS:
        _POOLS[n_threads] = ThreadPoolExecutor(n_threads, thread_name_prefix="skmixed-zinb")
    return _POOLS[n_threads]


def _dense_part(xp, a, b, zrow, fn, n_out, n_threads):
    nr, w = a.shape
    if xp is not np:
        return tuple(xp.ascontiguousarray(o) for o in fn(a, b, zrow))
    out = [np.empty((nr, w)) for _ in range(n_out)]
    step = max(1, BLOCK_ENTRIES // max(w, 1))
    blocks = [slice(s, min(s + step, nr)) for s in range(0, nr, step)]

    def work(s):
        for o, v in zip(out, fn(a[s], b[s], zrow)):
            o[s] = v

    if n_threads > 1 and len(blocks) > 1:
        list(_pool(n_threads).map(work, blocks))
    else:
        for s in blocks:
            work(s)
    return tuple(out)


def use_kernel(name: str) -> str:
    """Select the CPU kernel of :func:`evaluate` (``"numba"`` or ``"numpy"``); returns the
    previous one. ``"numba"`` needs numba (the ``fast`` extra)."""
    global KERNEL
    if name not in ("numba", "numpy"):
        raise ValueError(f"kernel must be 'numba' or 'numpy', got {name!r}.")
    if name == "numba" and not _kernels_numba.available():
        raise ValueError("kernel='numba' needs numba: pip install 'skmixed[fast]'.")
    previous, KERNEL = KERNEL, name
    return previous


def _csr_block(counts, rows, cols):
    """CSR arrays holding the block's rows, and the row of the block's first row in them
    (the full matrix's arrays, uncopied, for a slice of rows and all columns)."""
    if cols is None and isinstance(rows, slice):
        Y = counts.Y
        return Y.indptr, Y.indices, Y.data, rows.indices(counts.n)[0]
    sub = counts.Y[rows]
    if cols is not None:
        sub = sub[:, cols]
    sub.sort_indices()
    return sub.indptr, sub.indices, sub.data, 0


def _evaluate_numba(counts, P, a, b, z, rows, cols, derivs, zeta):
    mode = (_kernels_numba.DERIVS_ZETA if zeta else _kernels_numba.DERIVS) if derivs else _kernels_numba.LOGLIK
    indptr, indices, data, row0 = _csr_block(counts, rows, cols)
    tab = counts.tables(P.zeta)
    out, fused = _kernels_numba.block(a, b, z, indptr, indices, data, row0, tab, mode, n_threads=counts.n_threads)
    return tuple(out), fused, tab


def evaluate(design, counts, P, rows, cols=None, *, derivs: bool = True, zeta: bool = False):
    """Per-entry ``ll`` (and derivatives) of ``Y[rows][:, cols]`` at parameters ``P``.

    Returns a tuple of (n_rows, n_cols) arrays: ``(ll,)`` or
    ``(ll, g_a, g_b, i_aa, i_ab, i_bb[, g_z, i_zz])``.
    """
    xp = design.xp
    a, b = design.predictors(P, rows, cols)
    z = P.zeta if cols is None else P.zeta[cols]
    if xp is np and KERNEL == "numba":
        out, fused, tab = _evaluate_numba(counts, P, a, b, z, rows, cols, derivs, zeta)
        if fused:
            return out
        return _add_positive(xp, counts, P, out, a, b, z, rows, cols, derivs, zeta, tab)
    if derivs:
        n_out = 8 if zeta else 6

        def fn(a_, b_, z_):
            return ZINB.derivatives_zero(a_, b_, z_, zeta=zeta)
    else:
        n_out = 1

        def fn(a_, b_, z_):
            return (ZINB.loglik_zero(a_, b_, z_),)

    out = _dense_part(xp, a, b, z[None, :], fn, n_out, counts.n_threads)
    return _add_positive(xp, counts, P, out, a, b, z, rows, cols, derivs, zeta, counts.tables(P.zeta))


def _add_positive(xp, counts, P, out, a, b, z, rows, cols, derivs, zeta, tab):
    """The positive-count formulas at the non-zeros of the block, written into ``out``."""
    ri, ci, yv = counts.entries(rows, cols)
    if yv.size == 0:
        return out
    flat = ri * a.shape[1] + ci
    af, bf = a.reshape(-1)[flat], b.reshape(-1)[flat]
    zf = z[ci]
    extra = {}
    if tab is not None:
        yi = yv.astype(xp.int64)
        extra = {"lognorm": tab[0][yi]}
        if derivs and zeta:
            extra.update(dpsi=tab[1][yi], dtri=tab[2][yi])
    if derivs:
        def pfn(yv_, af_, bf_, zf_, **kw):
            return ZINB.derivatives_positive(yv_, af_, bf_, zf_, zeta=zeta, **kw)
    else:
        def pfn(yv_, af_, bf_, zf_, **kw):
            return (ZINB.loglik_positive(yv_, af_, bf_, zf_, **kw),)

    flat_out = [o.reshape(-1) for o in out]
    _positive_part(xp, pfn, flat, flat_out, (yv, af, bf, zf), extra, counts.n_threads)
    return out


def _positive_part(xp, fn, flat, flat_out, args, extra, n_threads):
    """``flat_out[k][flat] = fn(*args, **extra)[k]``; on the CPU in contiguous pieces
    of the non-zeros spread over threads (the formulas are elementwise)."""
    nnz = flat.shape[0]
    if xp is not np or n_threads <= 1 or nnz < 4 * BLOCK_ENTRIES:
        for o, v in zip(flat_out, fn(*args, **extra)):
            o[flat] = v
        return
    step = -(-nnz // (4 * n_threads))
    pieces = [slice(s, min(s + step, nnz)) for s in range(0, nnz, step)]

    def work(sl):
        vals = fn(*(a[sl] for a in args), **{k: v[sl] for k, v in extra.items()})
        idx = flat[sl]
        for o, v in zip(flat_out, vals):
            o[idx] = v

    list(_pool(n_threads).map(work, pieces))
