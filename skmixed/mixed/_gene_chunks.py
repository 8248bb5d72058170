"""The many-gene PoissonGLMM's one pass over the counts, by chunks of genes.

Everything the fits need from the counts is a handful of per-gene sums and the
counts summed within the distinct rows of the design (``S @ Y``: n_c x G, n_c the
number of distinct (X, group) rows, hundreds where the cells are millions). So the
matrix is read once, a chunk of genes at a time, where it lives (in memory, a backed
``.h5ad`` file, a ``dask.array``: :class:`skmixed._inputs.MatrixReader`), each chunk
reduced and dropped: peak memory is one chunk, not the data set. The chunks run
through :mod:`skmixed._parallel`: on a Dask cluster a task gets the reader (a path
and a slice for a file) and returns only its chunk's sums.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .._inputs import CountSource, MatrixReader, require_counts


def check_count_values(values, where):
    """``ValueError`` naming ``where`` for NaN, infinite or negative values; returns
    whether every value is an integer (checked by blocks of rows: no full-size temporary)."""
    from ._multigene import _row_blocks  # noqa: PLC0415 (one block helper for both passes)

    # one min and one max pass: NaN propagates into both, infinities show in one of them
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{where} must be finite; it contains NaN or infinite values.")
    if lo < 0:
        raise ValueError(f"{where} must be non-negative counts; it contains negative values.")
    return all(bool(np.all(b == np.round(b))) for b in _row_blocks(values))


@dataclass
class GeneSums:
    """Per-gene results of the pass over the counts (G genes, n_c distinct rows)."""

    const: np.ndarray  # (G,) sum w (y o - lgamma(y + 1)): the parameter-free log-likelihood
    saturated: np.ndarray  # (G,) saturated log-likelihood
    Yc: np.ndarray  # (n_c, G) weighted counts summed within distinct rows
    totals: np.ndarray  # (G,) unweighted total counts
    integer: bool  # every count an integer


def _reduce_chunk(cols, reader, S, off, weights, integer, anndata):
    """The sums of the genes ``cols`` (a slice) read by ``reader``, or of the block
    ``cols`` itself when ``reader`` is None: check, reduce."""
    from ._multigene import _column_sums_lgamma_saturated  # noqa: PLC0415

    Y = cols if reader is None else reader.columns(cols)
    where = "y" if reader is None else reader.where
    if sp.issparse(Y):
        Y = sp.csc_matrix(Y, dtype=float)
        values = Y.data
    else:
        Y = np.asarray(Y, dtype=float)
        values = Y
    if integer is None:  # not checked up front (read by chunks)
        integer = check_count_values(values, where)
        require_counts(CountSource(None, None, where, anndata), integer)
    w = np.ones(Y.shape[0]) if weights is None else weights
    yo = np.asarray((off * w) @ Y).reshape(-1)
    lg, saturated = _column_sums_lgamma_saturated(Y, weights, integer)
    # a CSC matrix as the CSR matrix of its transpose
    Yc = (Y.T @ S.T).T if sp.issparse(Y) else S @ Y
    Yc = Yc.toarray() if sp.issparse(Yc) else np.asarray(Yc)
    totals = np.asarray(Y.sum(axis=0)).reshape(-1)
    return yo - lg, saturated, Yc, totals, integer


def gene_sums(Y, S, off, weights, integer, *, pool, chunk, anndata=False) -> GeneSums:
    """One pass over the columns of ``Y`` (an array or a :class:`MatrixReader`) by
    chunks of ``chunk`` genes, run by ``pool`` (a :class:`skmixed._parallel.Engine`);
    the chunks' results are joined in gene order, so the engine changes nothing."""
    if isinstance(Y, MatrixReader):  # not read yet: its values are checked chunk by chunk
        reader, integer = Y, None
    else:
        reader = MatrixReader.from_array(Y)
    G = reader.shape[1]
    chunks = [slice(s, min(s + chunk, G)) for s in range(0, G, chunk)]
    if pool.distributed and reader.kind == "memory":
        # an in-memory matrix on a cluster: each chunk's columns sent once, to two
        # workers (a copy survives the loss of one), not the whole matrix to every worker
        chunks = pool.share_each((reader.columns(c) for c in chunks), replicas=2)
        reader = None
    # a reader of a file or a dask array is small; it and the design go to each worker once
    shared = [pool.share(a) for a in (reader, S, off, weights)]
    parts = list(pool.map(_reduce_chunk, chunks, *shared, integer, anndata))
    if not parts:
        n_c = S.shape[0]
        return GeneSums(np.zeros(0), np.zeros(0), np.zeros((n_c, 0)), np.zeros(0), True)
    const, saturated, Yc, totals, ints = zip(*parts)
    if integer is None and not anndata and not all(ints):
        warnings.warn("y contains non-integer values (see the single-gene fit).", UserWarning, stacklevel=4)
    return GeneSums(np.concatenate(const), np.concatenate(saturated), np.hstack(Yc), np.concatenate(totals),
                    all(ints))
