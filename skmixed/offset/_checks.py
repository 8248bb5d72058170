"""Input handling of :func:`~skmixed.offset.resampling_test`: the matrices, the pairs,
the device and the seed, checked once with messages that name the argument."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse

from .._backend import (
    gpu_namespace,
    is_cupy_array,
    is_device_sparse,
    to_device,
    to_host,
)

ALTERNATIVES = ("two-sided", "less", "greater")


# ------------------------------------------------------------------ input handling
def matrix(a, name, n=None, dtype=None):
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


def as_matrix(a, name, n=None):
    """Dense finite float matrix and column labels."""
    a, labels = matrix(a, name, n, np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite; found {a[~np.isfinite(a)][0]!r}.")
    return a, labels


def treatment_matrix(treatment, n):
    """Boolean treatment indicators (n, P) and labels, checked without a float copy
    (the matrix of a large screen has 1e8-1e9 entries)."""
    T, labels = matrix(treatment, "treatment", n)
    if T.dtype != bool:
        if not np.issubdtype(T.dtype, np.number):
            T = T.astype(np.float64)
        if not np.all((T == 0) | (T == 1)):
            raise ValueError("treatment must hold 0/1 indicators.")
        T = T != 0
    return T, labels


def indicator_csc(T):
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


def count_labels(counts):
    if isinstance(counts, pd.DataFrame):
        return [str(c) for c in counts.columns], counts.shape[0]
    shape = counts.shape if hasattr(counts, "shape") else np.shape(counts)
    if len(shape) == 1:
        return [0], shape[0]
    return list(range(shape[1])), shape[0]


def design(covariates, n):
    if covariates is None:
        return np.ones((n, 1))
    C, _ = as_matrix(covariates, "covariates", n)
    return np.column_stack([np.ones(n), C])


def device_namespace(device, counts):
    if device not in (None, "cpu", "gpu"):
        raise ValueError(f"device must be None, 'cpu' or 'gpu', got {device!r}.")
    if device == "cpu" or (device is None and not is_cupy_array(counts) and not is_device_sparse(counts)):
        return np
    return gpu_namespace()


def host(a):
    """Host copy of a CuPy array (dense or cupyx sparse); other inputs unchanged."""
    if is_cupy_array(a):
        return to_host(a)
    if is_device_sparse(a):
        return a.get()
    return a


def to_namespace(a, xp):
    return None if a is None else to_device(a, xp)


def entropy(random_state):
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(2**63))
    if random_state is None:
        return None
    return int(random_state)


def pair_indices(pairs, genes, perts):
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
