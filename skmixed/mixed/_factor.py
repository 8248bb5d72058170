"""Factorisations of ``M = I + A' V A``, the Hessian of the penalised log-likelihood
in the spherical random effects ``u``.

``M`` is assembled from the ``K`` non-zeros of each row of ``A`` by one ``bincount``
over precomputed index pairs. With one random-effects term ``M`` is block diagonal
(one ``k x k`` block per level) and is factorised block by block, so models with
thousands of levels cost ``O(q k^2)``; with several terms (crossed or nested) it is
factorised as a dense ``q x q`` matrix.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg.lapack

from ._design import RandomEffectsDesign


class DenseFactor:
    """Cholesky factor of a dense ``M``."""

    def __init__(self, M):
        L, info = scipy.linalg.lapack.dpotrf(M, lower=1, clean=1)
        if info != 0:
            raise np.linalg.LinAlgError("M = I + A'VA is not positive definite")
        self.L = L
        self._diag = np.diag(M).copy()
        self._inv = None

    def logdet(self) -> float:
        return 2.0 * float(np.sum(np.log(np.diag(self.L))))

    def solve(self, b):
        return scipy.linalg.lapack.dpotrs(self.L, b, lower=1)[0]

    def diag(self):
        return self._diag

    def inverse(self):
        if self._inv is None:
            Linv = scipy.linalg.lapack.dtrtri(self.L, lower=1)[0]
            self._inv = Linv.T @ Linv
        return self._inv

    def inv_gather(self, idx):
        """``M^-1[idx[r, s], idx[r, t]]`` for each row ``r`` of ``idx``: shape (m, K, K)."""
        return self.inverse()[idx[:, :, None], idx[:, None, :]]


class BlockFactor:
    """``M`` block diagonal with ``L`` blocks of size ``k`` (one random-effects term)."""

    def __init__(self, blocks):
        self.M = blocks
        try:
            self.L = np.linalg.cholesky(blocks)
        except np.linalg.LinAlgError as err:
            raise np.linalg.LinAlgError("M = I + A'VA is not positive definite") from err
        self.k = blocks.shape[1]
        self._inv = None

    def logdet(self) -> float:
        return 2.0 * float(np.sum(np.log(np.diagonal(self.L, axis1=1, axis2=2))))

    def solve(self, b):
        shape = b.shape
        rb = b.reshape(self.M.shape[0], self.k, -1)
        if self.k == 1:
            return (rb / self.M).reshape(shape)
        return np.linalg.solve(self.M, rb).reshape(shape)

    def diag(self):
        return np.diagonal(self.M, axis1=1, axis2=2).reshape(-1)

    def inverse_blocks(self):
        if self._inv is None:
            self._inv = 1.0 / self.M if self.k == 1 else np.linalg.inv(self.M)
        return self._inv

    def inv_gather(self, idx):
        # every row of idx lies inside one block: the block of its first column
        return self.inverse_blocks()[idx[:, 0] // self.k]


class Assembler:
    """Builds and factorises ``M = I + A' V A`` for a fixed sparsity pattern."""

    def __init__(self, design: RandomEffectsDesign):
        idx = design.indices
        self.block = len(design.terms) == 1
        if self.block:
            self.k, self.L = design.ks[0], design.n_levels[0]
            self._codes = idx[:, 0] // self.k
        else:
            self.q = design.q
            self._pair = (idx[:, :, None] * self.q + idx[:, None, :]).ravel()

    def __call__(self, Adata, v):
        wA = Adata * np.sqrt(v)[:, None]
        if self.block:
            k = self.k
            M = np.empty((self.L, k, k))
            for s in range(k):
                for t in range(s, k):
                    M[:, s, t] = M[:, t, s] = np.bincount(self._codes, wA[:, s] * wA[:, t], minlength=self.L)
                M[:, s, s] += 1.0
            return BlockFactor(M)
        M = np.bincount(
            self._pair, weights=(wA[:, :, None] * wA[:, None, :]).ravel(), minlength=self.q * self.q
        ).reshape(self.q, self.q)
        M[np.diag_indices(self.q)] += 1.0
        return DenseFactor(M)
