"""Counts left where they live: a backed AnnData's file or a dask array, read by chunks of cells.

A fit given ``anndata.read_h5ad(path, backed="r")`` or a ``dask.array`` never holds the
count matrix: :func:`scan` reads it once, chunk by chunk, for the checks of the in-memory
path (finite, non-negative, integer, no empty cell or gene) and the fingerprint of the
training cells; :class:`StreamedCounts` then stands for the matrix in the fit, and every
pass over the cells (initialisation included) reads each chunk when it reaches it, in
the process or on the Dask worker that runs the chunk. Memory: one chunk of counts, plus
per-cell and per-gene vectors (the parameters' size).

Chunks are rows (cells): store the file's matrix as CSR (scanpy's default); a CSC
matrix is read by scanning every column block for each chunk (correct, but each pass
then reads the whole file once per chunk).
"""

from __future__ import annotations

import hashlib

import numpy as np
import scipy.sparse as sp

from ._data import DEFAULT_CHUNK_ENTRIES


def csr_block(block):
    """A block read from a :class:`~skmixed._inputs.MatrixReader` as the canonical float64
    CSR matrix the in-memory path builds (explicit zeros dropped, indices sorted)."""
    Y = sp.csr_matrix(block, dtype=np.float64, copy=True)  # in place below: never the caller's arrays
    Y.sum_duplicates()
    Y.eliminate_zeros()
    return Y


def default_batch(n: int, J: int, batch_size=None) -> int:
    """Cells per chunk, as :class:`~skmixed.zinb._data.Counts` chooses them."""
    if batch_size is None:
        batch_size = max(1, DEFAULT_CHUNK_ENTRIES // max(J, 1))
    return int(min(batch_size, max(n, 1)))


class StreamedCounts:
    """The count matrix of a fit as a reader and its chunks of cells (what the chunk
    loops need of :class:`~skmixed.zinb._data.Counts`, without the matrix)."""

    streamed = True

    def __init__(self, reader, batch_size=None, n_threads: int = 1):
        self.reader = reader
        self.xp = np
        self.n, self.J = reader.shape
        self.batch_size = default_batch(self.n, self.J, batch_size)
        self.chunks = [slice(s, min(s + self.batch_size, self.n)) for s in range(0, self.n, self.batch_size)]
        self.n_threads = n_threads

    def read(self, rows):
        """The cells ``rows`` (a slice or sorted positions) as a canonical CSR matrix."""
        return csr_block(self.reader.rows(rows))


class Digest:
    """A hash of a CSR matrix fed chunk of rows by chunk of rows: the row lengths, the
    column indices and the values each go to their own hash, so the result does not
    depend on the chunks (the whole matrix in one piece gives the same digest)."""

    def __init__(self, shape):
        self.shape = tuple(int(v) for v in shape)
        self.parts = [hashlib.blake2b(digest_size=16) for _ in range(3)]

    def update(self, Ycsr):
        arrays = (np.diff(np.asarray(Ycsr.indptr)), np.asarray(Ycsr.indices), np.asarray(Ycsr.data))
        for h, a, dtype in zip(self.parts, arrays, (np.int64, np.int64, np.float64)):
            step = 1 << 20  # bounded temporaries for the casts
            for s in range(0, a.shape[0], step):
                h.update(np.ascontiguousarray(a[s:s + step], dtype=dtype).tobytes())
        return self

    def digest(self) -> bytes:
        return repr(self.shape).encode() + b"".join(h.digest() for h in self.parts)


class Scan:
    """What one pass over a streamed matrix found (see :func:`scan`)."""

    def __init__(self, reader, batch_size):
        self.reader = reader
        self.shape = reader.shape
        self.batch_size = batch_size
        self.cell_nnz = np.zeros(self.shape[0], dtype=np.int64)
        self.gene_nnz = np.zeros(self.shape[1], dtype=np.int64)
        self.integer = True
        self.digest = Digest(self.shape)


def scan(reader, batch_size=None, *, check_block):
    """Read ``reader`` once by chunks of cells: ``check_block(csr)`` on every chunk (the
    in-memory path's value checks), the non-zeros per cell and per gene, whether every
    value is an integer, and the chunk-independent :class:`Digest`."""
    n, J = reader.shape
    out = Scan(reader, default_batch(n, J, batch_size))
    for s in range(0, n, out.batch_size):
        rows = slice(s, min(s + out.batch_size, n))
        Y = csr_block(reader.rows(rows))
        check_block(Y)
        out.cell_nnz[rows] = np.diff(Y.indptr)
        out.gene_nnz += np.bincount(Y.indices, minlength=J)
        out.integer = out.integer and bool(np.all(Y.data == np.round(Y.data)))
        out.digest.update(Y)
    return out
