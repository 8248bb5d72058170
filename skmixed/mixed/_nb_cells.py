"""The cells of the many-gene NB GLMM: the gene-independent design (pairs of grouping
level and distinct row of X, and their zero-count sums) and the non-zero counts of a
block of genes, read in place by the compiled pass
(:mod:`skmixed.mixed._nb_fused`). Used by :mod:`skmixed.mixed._nb_multigene`.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.special

from .._backend import sparse_csr
from .._families import NegativeBinomial
from . import _nb_fused as _fused
from ._design import distinct_rows
from ._nb_zeros import ZeroSumExact, ZeroSumTable


class PairDesign:
    """The gene-independent part: pairs (level, distinct X row) and their zero sums.

    Parameters
    ----------
    X : (n, p); codes : (n,) levels 0..L-1; offset, weights : (n,);
    exact_zeros : sum the zero-count terms cell by cell (the reference) instead of
    through the table.
    """

    def __init__(self, X, codes, n_levels, offset, weights, *, exact_zeros=False):
        self.L = int(n_levels)
        keys, first = distinct_rows([X])
        self.Xd = X[first]
        self.K, self.p = self.Xd.shape
        pair_key = codes.astype(np.int64) * self.K + keys
        uniq, self.cell_pair = np.unique(pair_key, return_inverse=True)
        self.P = uniq.size
        self.pair_level, self.pair_row = np.divmod(uniq, self.K)
        self.Xp = self.Xd[self.pair_row]  # (P, p)
        self.offset, self.weights = offset, weights
        # the table holds about 150 kB per pair: beyond a few thousand pairs (hundreds of
        # patients times tens of cell groups) the direct sums take less memory
        zs = ZeroSumExact if exact_zeros or self.P > 4_000 else ZeroSumTable
        self.zeros = zs(self.cell_pair, offset, weights, self.P)
        P, p, L = self.P, self.p, self.L
        ar = np.arange(P)
        # (L, P) level sums and (L * p, P) x-weighted level sums of per-pair arrays
        self.to_level = sparse_csr(np.ones(P), self.pair_level, ar, (L, P), np)
        rows = np.repeat(self.pair_level * p, p) + np.tile(np.arange(p), P)
        self.to_level_x = sparse_csr(self.Xp.ravel(), rows, np.repeat(ar, p), (L * p, P), np)
        self.XX = (self.Xp[:, :, None] * self.Xp[:, None, :]).reshape(P, p * p)
        # sums over the cells of each pair of w exp(o) and w exp(2 o): moments for the start
        S = sp.csr_matrix((weights, (self.cell_pair, np.arange(offset.size))), shape=(P, offset.size))
        self.shift = float(np.max(offset))
        self.C1 = S @ np.exp(offset - self.shift)
        self.C2 = S @ np.exp(2.0 * (offset - self.shift))


class NonZeros:
    """The non-zero counts of a block of genes, as flat entries sorted by gene.

    A :meth:`subset` is a view: it keeps the block's arrays and the genes selected
    (``rows``), so the compiled pass reads the block in place; the flat arrays of the
    view (``gene``, ``y``, ``pair``, ``o``, ``w``) are gathered when first asked for."""

    def __init__(self, gene, cell, y, weights, design: PairDesign, G):
        self.base = {"y": y, "pair": design.cell_pair[cell], "o": design.offset[cell], "w": weights[cell]}
        self.base_indptr = np.concatenate([[0], np.cumsum(np.bincount(gene, minlength=G))])
        self.rows = np.arange(G)
        self.G = G
        self.shared = {}  # per-entry caches of the block, shared by its views
        self.flat = {}

    @classmethod
    def from_columns(cls, Yblock, weights, design):
        """``Yblock``: (n, G) dense or sparse counts of the genes of the block."""
        Yc = sp.csc_matrix(Yblock)
        Yc.eliminate_zeros()
        gene = np.repeat(np.arange(Yc.shape[1]), np.diff(Yc.indptr))
        return cls(gene, Yc.indices, Yc.data.astype(float), weights, design, Yc.shape[1])

    def _whole(self):
        return self.rows.size == self.base_indptr.size - 1

    @property
    def indptr(self):
        if "indptr" not in self.flat:
            counts = self.base_indptr[self.rows + 1] - self.base_indptr[self.rows]
            self.flat["indptr"] = np.concatenate([[0], np.cumsum(counts)])
        return self.flat["indptr"]

    def _index(self):
        """Positions of the view's entries in the block's arrays."""
        if "index" not in self.flat:
            starts, counts = self.base_indptr[self.rows], np.diff(self.indptr)
            self.flat["index"] = np.repeat(starts - self.indptr[:-1], counts) + np.arange(self.indptr[-1])
        return self.flat["index"]

    def _get(self, key):
        if key not in self.flat:
            self.flat[key] = self.base[key] if self._whole() else self.base[key][self._index()]
        return self.flat[key]

    y = property(lambda self: self._get("y"))
    pair = property(lambda self: self._get("pair"))
    o = property(lambda self: self._get("o"))
    w = property(lambda self: self._get("w"))

    @property
    def gene(self):
        if "gene" not in self.flat:
            self.flat["gene"] = np.repeat(np.arange(self.G), np.diff(self.indptr))
        return self.flat["gene"]

    @property
    def nnz(self):
        return int(self.indptr[-1])

    def base_cache(self):
        """The block's small-count mask and ``log y!`` (computed once per block), and
        its large counts: their positions and genes."""
        sh = self.shared
        if "small" not in sh:
            y = self.base["y"]
            sh["small"] = (y <= self.SMALL) & (y == np.round(y))
            sh["log_fact"] = scipy.special.gammaln(y + 1.0)
            sh["big"] = np.flatnonzero(~sh["small"])
            sh["big_gene"] = np.searchsorted(self.base_indptr, sh["big"], side="right") - 1
        return sh

    def big_entries(self):
        """The view's large counts: their positions in the block and their genes in the view."""
        sh = self.base_cache()
        local = np.full(self.base_indptr.size - 1, -1)
        local[self.rows] = np.arange(self.G)
        g = local[sh["big_gene"]]
        keep = g >= 0
        return sh["big"][keep], g[keep]

    SMALL = _fused.SMALL  # counts up to this go through the sums over k < y below

    def cache(self):
        """Which counts are small integers, and their ``log y!``, for the view."""
        if not hasattr(self, "_small"):
            sh = self.base_cache()
            whole = self._whole()
            self._small = sh["small"] if whole else sh["small"][self._index()]
            self._log_fact = sh["log_fact"] if whole else sh["log_fact"][self._index()]

    def count_terms(self, phi, mu, q):
        """Per entry: the log-normaliser ``log C(y + size - 1, y)`` plus ``y log phi``,
        and ``d (loglik(y) - loglik(0)) / d phi`` at fixed ``eta``.

        For an integer count both are sums over ``k < y``, ``sum log1p(phi k) - log y!``
        and ``sum (k - mu) / ((1 + phi mu)(1 + phi k))``, exact at ``phi = 0`` (no
        ``size`` appears); larger or non-integer counts use the family's formulas."""
        y = self.y
        self.cache()
        if not hasattr(self, "_k_rows"):
            small = self._small
            self._k_rows = [np.flatnonzero(small & (y > k)) for k in range(int(y[small].max(initial=0)))]
        ll = -self._log_fact.copy()
        acc = np.zeros_like(y)
        for k, rows in enumerate(self._k_rows):
            if k:
                ll[rows] += np.log1p(phi[rows] * k)
            acc[rows] += (k - mu[rows]) / (1.0 + phi[rows] * k)
        dl = acc / q
        big = np.flatnonzero(~self._small)
        if big.size:
            fam = NegativeBinomial(1.0 / phi[big])
            yb, mb = y[big], mu[big]
            ll[big] = fam.log_normaliser(yb) + yb * np.log(phi[big])
            dl[big] = -fam.size[...] * (fam.size_score(yb, mb) - fam.size_score(np.zeros_like(yb), mb))
        return ll, dl

    def subset(self, rows):
        out = object.__new__(NonZeros)
        out.base, out.base_indptr, out.shared = self.base, self.base_indptr, self.shared
        out.rows, out.G, out.flat = self.rows[rows], rows.size, {}
        return out
