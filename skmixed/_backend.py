"""The one place where numpy/scipy and cupy/cupyx meet.

Every numerical routine in skmixed takes its array namespace from its input through
:func:`get_namespace` and uses the helpers below for the few operations whose
spelling differs between numpy/scipy and cupy/cupyx (special functions, triangular
solves, segment sums, host transfer). No other module imports cupy.
"""

from __future__ import annotations

import functools
from types import ModuleType

import numpy as np
import scipy.linalg
import scipy.special


@functools.lru_cache(maxsize=1)
def _cupy():
    try:
        import cupy  # noqa: PLC0415

        cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no cupy, no driver or no device
        return None
    return cupy


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    return _cupy() is not None


def is_cupy_array(a) -> bool:
    cp = _cupy()
    return cp is not None and isinstance(a, cp.ndarray)


def get_namespace(*arrays) -> ModuleType:
    """``cupy`` if any argument is a CuPy array, else ``numpy``."""
    for a in arrays:
        if is_cupy_array(a):
            return _cupy()
    return np


def to_host(a):
    """A numpy copy of ``a`` (no-op for numpy arrays and Python scalars)."""
    if is_cupy_array(a):
        return a.get()
    return np.asarray(a)


def to_device(a, xp: ModuleType):
    """``a`` as an array of namespace ``xp``."""
    if xp is np:
        return to_host(a)
    return xp.asarray(a)


def _special(xp: ModuleType):
    if xp is np:
        return scipy.special
    import cupyx.scipy.special  # noqa: PLC0415

    return cupyx.scipy.special


def gammaln(x):
    xp = get_namespace(x)
    return _special(xp).gammaln(x)


def xlogy(x, y):
    """``x * log(y)`` with the convention ``0 * log(0) = 0``."""
    xp = get_namespace(x, y)
    return _special(xp).xlogy(x, y)


def logsumexp(a, axis=None):
    xp = get_namespace(a)
    if xp is np:
        return scipy.special.logsumexp(a, axis=axis)
    m = xp.max(a, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0)
    out = xp.log(xp.sum(xp.exp(a - m), axis=axis, keepdims=True)) + m
    return xp.squeeze(out, axis=axis) if axis is not None else out.reshape(())


def safe_exp(eta):
    """``exp`` with the argument capped so that it never overflows float64."""
    xp = get_namespace(eta)
    return xp.exp(xp.minimum(eta, 700.0))


def segment_sum(values, codes, n_segments: int):
    """Sum ``values`` (1-D, or 2-D along axis 0) within segments given by ``codes``."""
    xp = get_namespace(values, codes)
    if values.ndim == 1:
        return xp.bincount(codes, weights=values, minlength=n_segments)
    out = xp.zeros((n_segments,) + values.shape[1:], dtype=values.dtype)
    if xp is np:
        np.add.at(out, codes, values)
    else:
        import cupyx  # noqa: PLC0415

        cupyx.scatter_add(out, codes, values)
    return out


def cholesky(a):
    """Lower Cholesky factor; raises ``numpy.linalg.LinAlgError`` if not positive definite."""
    xp = get_namespace(a)
    if xp is np:
        return scipy.linalg.cholesky(a, lower=True, check_finite=False)
    out = xp.linalg.cholesky(a)
    if not bool(xp.all(xp.isfinite(out))):
        raise np.linalg.LinAlgError("matrix is not positive definite")
    return out


def solve_triangular(a, b, *, lower: bool = True, trans: bool = False):
    xp = get_namespace(a, b)
    if xp is np:
        return scipy.linalg.solve_triangular(
            a, b, lower=lower, trans=1 if trans else 0, check_finite=False
        )
    import cupyx.scipy.linalg  # noqa: PLC0415

    return cupyx.scipy.linalg.solve_triangular(a, b, lower=lower, trans=1 if trans else 0)


def cho_solve(chol_lower, b):
    """Solve ``(L L') x = b`` given the lower factor ``L``."""
    return solve_triangular(chol_lower, solve_triangular(chol_lower, b), trans=True)


def sparse_csr(data, rows, cols, shape, xp: ModuleType):
    """A CSR matrix of namespace ``xp`` (scipy.sparse or cupyx.scipy.sparse) from COO triplets."""
    if xp is np:
        import scipy.sparse  # noqa: PLC0415

        return scipy.sparse.csr_matrix((to_host(data), (to_host(rows), to_host(cols))), shape=shape)
    import cupyx.scipy.sparse  # noqa: PLC0415

    coo = cupyx.scipy.sparse.coo_matrix((xp.asarray(data), (xp.asarray(rows), xp.asarray(cols))), shape=shape)
    return coo.tocsr()


def expit(x):
    """The logistic function ``1 / (1 + exp(-x))``, overflow-free."""
    return _special(get_namespace(x)).expit(x)


def digamma(x):
    """The digamma function ``psi(x) = d log Gamma(x) / dx``."""
    return _special(get_namespace(x)).digamma(x)


def softplus(x):
    """``log(1 + exp(x))`` (R's ``log1pexp``), overflow-free and accurate for very negative ``x``.

    numpy's ``logaddexp(0, x)``, ``max(x, 0) + log1p(exp(-|x|))``, written as whole-array
    passes: numpy's ``logaddexp`` loop calls scalar ``exp`` and ``log1p`` per element, while
    the ``exp`` and ``log1p`` ufuncs are vectorised (4x faster; within 2 ulp of it).
    """
    xp = get_namespace(x)
    out = xp.exp(-xp.abs(x))
    xp.log1p(out, out=out)
    out += xp.maximum(x, 0.0)
    return out


def csc_matmul(data, indices, indptr, shape, X):
    """``A @ X`` for the CSC matrix ``A = (data, indices, indptr)`` of ``shape``
    (scipy.sparse or cupyx.scipy.sparse, following ``X``; ``data=None``: ones);
    ``X`` dense (n, k) or (n,)."""
    xp = get_namespace(X, indices)
    if data is None:
        data = _ones(indices.shape[0]) if xp is np else xp.ones(indices.shape[0])
    if xp is np:
        import scipy.sparse  # noqa: PLC0415

        A = scipy.sparse.csc_matrix((data, indices, indptr), shape=shape, copy=False)
        return np.asarray(A @ X)
    import cupyx.scipy.sparse  # noqa: PLC0415

    A = cupyx.scipy.sparse.csc_matrix(
        (xp.asarray(data, dtype=xp.float64), xp.asarray(indices, dtype=xp.int32), xp.asarray(indptr, dtype=xp.int32)),
        shape=shape,
    )
    return A @ X


def add_rows_at(out, index, values):
    """``out[index[e]] += values[e]`` for every ``e`` (repeated indices accumulate);
    ``out`` (m, k) and ``values`` (E, k), or both 1-D. Unlike ``numpy.add.at`` it is a
    sparse product on the CPU (one pass, no per-element Python-level dispatch) and a
    ``scatter_add`` on the GPU."""
    xp = get_namespace(out, values)
    if xp is np:
        if values.ndim == 1:
            out += np.bincount(index, weights=values, minlength=out.shape[0])
            return out
        import scipy.sparse  # noqa: PLC0415

        E = index.shape[0]
        itype = np.int32 if E < 2**31 - 1 else np.int64
        P = scipy.sparse.csc_matrix(
            (_ones(E), index.astype(itype, copy=False), _arange(E + 1, itype)), shape=(out.shape[0], E), copy=False
        )
        out += P @ values
        return out
    import cupyx  # noqa: PLC0415

    cupyx.scatter_add(out, index, values)
    return out


_BUFFERS = {}


def _ones(k):
    """A read-only numpy array of k ones, a view of a shared buffer."""
    return _shared("ones", k, np.float64, np.ones)


def _arange(k, dtype):
    """A read-only numpy ``arange(k)``, a view of a shared buffer."""
    return _shared(("arange", dtype), k, dtype, lambda m, dtype: np.arange(m, dtype=dtype))


def _shared(key, k, dtype, make):
    buf = _BUFFERS.get(key)
    if buf is None or buf.size < k:
        buf = make(max(k, 2 * (0 if buf is None else buf.size), 1024), dtype=dtype)
        buf.flags.writeable = False
        _BUFFERS[key] = buf
    return buf[:k]


def ndtr(x):
    """The standard normal CDF."""
    return _special(get_namespace(x)).ndtr(x)


def nonzero_entries(W):
    """``(rows, cols, values)`` of the non-zero entries of a 2-D dense or sparse matrix,
    on its own namespace (scipy.sparse / cupyx.scipy.sparse matrices included)."""
    if hasattr(W, "tocoo"):
        C = W.tocoo()
        keep = C.data != 0
        return C.row[keep], C.col[keep], C.data[keep]
    xp = get_namespace(W)
    r, c = xp.nonzero(W)
    return r, c, W[r, c]


def is_device_sparse(a) -> bool:
    """True for a cupyx.scipy.sparse matrix."""
    if _cupy() is None:
        return False
    import cupyx.scipy.sparse  # noqa: PLC0415

    return cupyx.scipy.sparse.issparse(a)


def gpu_namespace() -> ModuleType:
    """The ``cupy`` module (``ValueError`` without CuPy or a CUDA device)."""
    if _cupy() is None:
        raise ValueError("this needs CuPy and a CUDA device (pip install cupy-cuda12x).")
    return _cupy()
