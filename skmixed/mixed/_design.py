"""Random-effects design: terms -> Z, Lambda(theta), as in lme4.

A term is one bar ``(z_1 + ... + z_k | g)``: a grouping factor with ``L`` levels and
``k`` covariate columns. Its random effects for level ``l`` are ``b_l = T u_l``
with ``u_l ~ N(0, I_k)`` and ``T`` lower triangular, so ``Cov(b_l) = T T'``.
``theta`` stacks the lower triangles of the ``T`` of all terms, column by column
(lme4's order). Columns of ``Z`` are term-major, then level-major, then covariate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass
class RandomTerm:
    """One random-effects term (one bar of an lme4 formula, ``||`` already split)."""

    group: str
    codes: np.ndarray  # (n,) int64 level index, -1 = missing/unseen level
    levels: list
    Z: np.ndarray  # (n, k) covariate columns
    names: list = field(default_factory=lambda: ["(Intercept)"])

    @property
    def k(self) -> int:
        return self.Z.shape[1]

    def subset(self, rows) -> "RandomTerm":
        return RandomTerm(self.group, self.codes[rows], self.levels, self.Z[rows], self.names)


class RandomEffectsDesign:
    """Maps ``theta`` to the sparse matrix ``A = Z Lambda(theta)`` and back."""

    def __init__(self, terms: list[RandomTerm]):
        if not terms:
            raise ValueError("at least one random-effects term is needed.")
        self.terms = terms
        self.n = terms[0].codes.shape[0]
        self.n_levels = [len(t.levels) for t in terms]
        self.ks = [t.k for t in terms]
        self.col_start = np.cumsum([0] + [L * k for L, k in zip(self.n_levels, self.ks)])
        self.q = int(self.col_start[-1])
        self.slot_start = np.cumsum([0] + self.ks)
        self.K = int(self.slot_start[-1])  # non-zeros per row of A
        # theta layout: per term, lower triangle column by column
        self.theta_index = []  # (term, row, col) of each theta entry
        for j, k in enumerate(self.ks):
            for c in range(k):
                for r in range(c, k):
                    self.theta_index.append((j, r, c))
        self.n_theta = len(self.theta_index)
        self.theta_lower = np.array([0.0 if r == c else -np.inf for _, r, c in self.theta_index])
        self.theta0 = np.array([1.0 if r == c else 0.0 for _, r, c in self.theta_index])
        # column index of every non-zero of A, row by row: (n, K)
        idx = np.empty((self.n, self.K), dtype=np.int64)
        for j, t in enumerate(terms):
            s = self.slot_start[j]
            for c in range(t.k):
                idx[:, s + c] = self.col_start[j] + t.codes * t.k + c
        self.indices = idx
        self.Zall = np.hstack([t.Z for t in terms])  # (n, K)

    # -- Lambda ----------------------------------------------------------------
    def T_blocks(self, theta) -> list[np.ndarray]:
        blocks = [np.zeros((k, k)) for k in self.ks]
        for value, (j, r, c) in zip(theta, self.theta_index):
            blocks[j][r, c] = value
        return blocks

    def A_data(self, theta) -> np.ndarray:
        """Values of ``A = Z Lambda`` at the pattern ``indices``: row i of term j is ``Z_ij T_j``."""
        out = np.empty((self.n, self.K))
        for j, T in enumerate(self.T_blocks(theta)):
            s, e = self.slot_start[j], self.slot_start[j + 1]
            out[:, s:e] = self.Zall[:, s:e] @ T
        return out

    def A_matrix(self, data, dense: bool = False):
        if dense:
            A = np.zeros((self.n, self.q))
            A[np.arange(self.n)[:, None], self.indices] = data
            return A
        indptr = np.arange(0, self.n * self.K + 1, self.K)
        return sp.csr_matrix((data.ravel(), self.indices.ravel(), indptr), shape=(self.n, self.q))

    def dA_entry(self, m: int):
        """``dA / dtheta_m`` as (slot, column of Zall): the slot ``c`` of term j gets ``Z[:, r]``."""
        j, r, c = self.theta_index[m]
        return self.slot_start[j] + c, self.slot_start[j] + r

    def b_from_u(self, theta, u) -> list[np.ndarray]:
        """Random effects ``b = Lambda u`` per term, shaped (levels, k)."""
        out = []
        for j, T in enumerate(self.T_blocks(theta)):
            uj = u[self.col_start[j] : self.col_start[j + 1]].reshape(self.n_levels[j], self.ks[j])
            out.append(uj @ T.T)
        return out


def distinct_rows(blocks):
    """Index of each row of ``hstack(blocks)`` among its distinct rows, and the first
    row of each.

    Rows are hashed by a random projection, then verified exactly; a collision (never
    seen in practice) falls back to an exact sort.
    """
    rng = np.random.default_rng(0)
    n = blocks[0].shape[0]
    proj = sum(b @ rng.standard_normal(b.shape[1]) for b in blocks)
    keys, uniques = pd.factorize(proj)
    first = _first_rows(keys, uniques.size)
    if n and not all(np.array_equal(b, b[first[keys]]) for b in blocks):
        keys = np.unique(np.hstack(blocks), axis=0, return_inverse=True)[1].reshape(-1)
        first = _first_rows(keys, int(keys.max()) + 1)
    return keys.astype(np.int64), first


def _first_rows(keys, n_keys):
    first = np.zeros(n_keys, dtype=np.int64)
    first[keys[::-1]] = np.arange(keys.size)[::-1]
    return first
