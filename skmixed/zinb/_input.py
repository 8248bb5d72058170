"""Inputs of ZINBWaVE: the count matrix (dense, sparse, AnnData, CuPy) and covariates."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.utils.validation import check_array, validate_data

from .._backend import to_device, to_host
from .._inputs import MatrixReader, count_source, match_names, require_counts
from ._data import _is_cupy_sparse, namespace_of_counts, to_csr
from ._stream import Digest, Scan, scan


def check_count_matrix(est, Y, *, reset: bool, stream: bool = False):
    """Validate ``Y`` (cells x genes) and return ``(csr, xp, integer, gene_names)``.

    AnnData and DataFrames are read by :func:`skmixed._inputs.count_source` (the
    ``layer`` rule, unique names); genes named at fit are matched by name later
    (reordered when the same set, an error otherwise). numpy / scipy inputs go through
    scikit-learn's validation (feature counts, finiteness); CuPy inputs are checked on
    the device. With ``stream``, a backed AnnData or a dask array is checked by one pass
    over chunks of cells and comes back as a :class:`~skmixed.zinb._stream.Scan` in
    place of the CSR matrix (nothing kept in memory but per-cell and per-gene counts).
    """
    src = count_source(Y, layer=getattr(est, "layer", None), arg="Y", stream=stream)
    Y, names = src.values, src.names
    name = type(est).__name__
    if isinstance(Y, MatrixReader):
        return _check_streamed(est, src, reset)
    if src.anndata:
        # names are ours to check (scikit-learn only knows DataFrame columns)
        order = match_names(est, names, reset=reset)
        if order is not None:
            Y = Y[:, order]
            names = names[order]
    xp = namespace_of_counts(Y)
    if xp is np:
        if src.anndata:
            Y = check_array(Y, accept_sparse=("csr", "csc", "coo"), dtype=np.float64, input_name="Y")
            _check_n_genes(est, Y.shape[1], reset)
        else:
            Y = validate_data(est, Y, accept_sparse=("csr", "csc", "coo"), dtype=np.float64, reset=reset)
        Ycsr = sp.csr_matrix(Y, dtype=np.float64)
    else:
        Ycsr = to_csr(Y, xp)
        if len(Ycsr.shape) != 2:
            raise ValueError(f"Y must be 2-D (cells x genes), got shape {Ycsr.shape}.")
        _check_n_genes(est, Ycsr.shape[1], reset)
        if not bool(xp.all(xp.isfinite(Ycsr.data))):
            raise ValueError("Input Y contains NaN or infinity.")
    _check_non_negative(Ycsr.data, xp, name)
    Ycsr.eliminate_zeros()
    integer = bool(xp.all(Ycsr.data == xp.round(Ycsr.data))) if Ycsr.data.size else True
    _check_integer(src, integer)
    return Ycsr, xp, integer, names


def _check_non_negative(data, xp, name):
    if data.size and bool(xp.any(data < 0)):
        bad = float(to_host(data[data < 0][:1])[0])
        raise ValueError(f"Negative values in data passed to {name}: Y must hold non-negative counts; found {bad!r}.")


def _check_integer(src, integer):
    require_counts(src, integer)
    if not integer:
        warnings.warn(
            "Y contains non-integer values: the ZINB likelihood is extended to them through "
            "lgamma (zinbwave refuses them); check that Y holds raw counts.",
            UserWarning,
            stacklevel=4,
        )


def _check_streamed(est, src, reset):
    """The checks of the in-memory path, by one pass over chunks of cells of the reader."""
    names = src.names
    if src.anndata and match_names(est, names, reset=reset) is not None:
        raise ValueError("Y names the fitted genes in another order: read it into memory (adata.to_memory()).")
    _check_n_genes(est, src.values.shape[1], reset)
    name = type(est).__name__

    def check_block(Y):
        if not np.all(np.isfinite(Y.data)):
            raise ValueError(f"Input Y contains NaN or infinity (read from {src.where}).")
        _check_non_negative(Y.data, np, name)

    found = scan(src.values, getattr(est, "batch_size", None), check_block=check_block)
    _check_integer(src, found.integer)
    return found, np, found.integer, names


def _check_n_genes(est, J: int, reset: bool):
    if reset:
        est.n_features_in_ = J
    elif J != est.n_features_in_:
        raise ValueError(
            f"Y has {J} features, but {type(est).__name__} is expecting {est.n_features_in_} features as input."
        )


def check_nonempty(Ycsr, xp, names=None, *, genes: bool = True):
    """``ValueError`` naming the all-zero cells (and genes), as zinbwave's initialisation."""
    n, J = Ycsr.shape
    streamed = isinstance(Ycsr, Scan)
    nnz_rows = Ycsr.cell_nnz if streamed else xp.diff(Ycsr.indptr)
    empty = np.flatnonzero(to_host(nnz_rows) == 0)
    if empty.size:
        raise ValueError(
            f"Y has {empty.size} cell(s) with only zero counts (first: row {int(empty[0])}); "
            "their library size and latent factors are not identifiable: remove them."
        )
    if genes:
        per_gene = Ycsr.gene_nnz if streamed else np.bincount(to_host(Ycsr.indices), minlength=J)
        empty = np.flatnonzero(per_gene == 0)
        if empty.size:
            first = names[empty[0]] if names is not None else int(empty[0])
            raise ValueError(
                f"Y has {empty.size} gene(s) with only zero counts (first: column {first!r}); "
                "their mean is not identifiable (the MLE is -infinity): filter them out first."
            )


def check_design(D, n: int, arg: str, xp, *, default_intercept: bool = True):
    """Covariates as an (n, p) float array; ``None`` -> an intercept column."""
    if D is None:
        return xp.ones((n, 1)) if default_intercept else xp.zeros((n, 0))
    if isinstance(D, pd.Series):
        D = D.to_numpy()
    if isinstance(D, pd.DataFrame):
        D = D.to_numpy(dtype=float)
    D = D if hasattr(D, "get") and not sp.issparse(D) else np.asarray(D, dtype=float)
    if sp.issparse(D):
        D = D.toarray()
    if D.ndim == 1:
        D = D[:, None]
    if D.ndim != 2:
        raise ValueError(f"{arg} must be 1-D or 2-D, got {D.ndim} dimensions.")
    if D.shape[0] != n:
        raise ValueError(f"{arg} has {D.shape[0]} rows but Y has {n} {'cells' if arg.startswith('cell') else 'genes'}.")
    Dh = to_host(D)
    if not np.all(np.isfinite(Dh)):
        raise ValueError(f"{arg} must be finite; it contains NaN or infinite values.")
    return to_device(D.astype(float) if not hasattr(D, "get") else D, xp)


def check_offset(off, n: int, J: int, arg: str, xp):
    """``None``, a per-cell vector (n,) or a full (n, J) matrix."""
    if off is None:
        return None
    if isinstance(off, (pd.Series, pd.DataFrame)):
        off = off.to_numpy(dtype=float)
    off = off if hasattr(off, "get") else np.asarray(off, dtype=float)
    if off.ndim == 2 and off.shape[1] == 1:
        off = off[:, 0]
    if off.shape not in ((n,), (n, J)):
        raise ValueError(f"{arg} must have shape ({n},) or ({n}, {J}); got {off.shape}.")
    if not np.all(np.isfinite(to_host(off))):
        raise ValueError(f"{arg} must be finite; it contains NaN or infinite values.")
    return to_device(off, xp)


def fingerprint(Ycsr, *extras) -> str:
    """A hash of the count matrix and the per-cell inputs, to recognise the training cells
    (the same for a matrix in memory and the :class:`Scan` of the same matrix on disk)."""
    h = hashlib.blake2b(digest_size=16)
    digest = Ycsr.digest if isinstance(Ycsr, Scan) else Digest(Ycsr.shape).update(_host_csr(Ycsr))
    h.update(digest.digest())
    for a in extras:
        if a is None:
            h.update(b"none")
            continue
        arr = np.ascontiguousarray(to_host(a))
        h.update(repr((arr.shape, arr.dtype.str)).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _host_csr(Y):
    return Y if not hasattr(Y, "get") else Y.get()


__all__ = ["check_count_matrix", "check_design", "check_nonempty", "check_offset", "fingerprint", "_is_cupy_sparse"]
