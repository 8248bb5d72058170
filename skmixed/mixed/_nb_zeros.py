"""Sums of the NB2 zero-count terms over many cells, as functions of one number.

For a zero count the NB2 log-likelihood and every derivative the Laplace fit needs
depend on the cell only through ``x = log(phi mu) = c + o_i``, with ``o_i`` the
cell's offset and ``c = x_k' beta + theta u_l + log phi`` shared by the cells of one
*pair* (grouping level ``l``, distinct row ``k`` of ``X``). They are ``softplus(x)``,
``sigma(x)^m`` (m = 1, 2, 3) and ``softplus(x) - sigma(x)`` times powers of
``size``. Summed over the cells of a pair, each is a smooth function of ``c`` alone,
the same for every gene, so the zeros of a count matrix cost ``O(pairs)`` per gene
instead of ``O(cells)``, and only the non-zero counts are visited cell by cell.

:class:`ZeroSumTable` tabulates these functions once, on a grid of ``c`` with
spacing ``h = 0.1``, as Taylor coefficients up to order 8 (every derivative of
``sigma^m`` is a polynomial in ``sigma``, so the coefficients are exact power sums):
the relative error of a look-up is below 1e-13 (tested against
:class:`ZeroSumExact`). Beyond the grid the sums are their exact asymptotes
(two terms of their series in ``exp(-|x|)``, exact to round-off beyond
``|x| = 18``).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import scipy.special

from .._families import _log1pmx

N_BASIS = 5  # softplus, sigma, sigma^2, sigma^3, softplus - sigma


_sigma = scipy.special.expit


def softplus_minus_sigma(x):
    """``softplus(x) - sigma(x)`` without cancellation where both are ``~ exp(x)``:
    ``log1pmx(e) + e^2 / (1 + e)`` with ``e = exp(x)`` for ``x < 0``."""
    x = np.asarray(x, dtype=float)
    e = np.exp(np.minimum(x, 0.0))
    low = _log1pmx(e, np) + e * e / (1.0 + e)
    return np.where(x < 0, low, np.logaddexp(0.0, x) - _sigma(x))


def basis(x):
    """The five functions at ``x`` (any shape): stacked on a new last axis."""
    s = _sigma(x)
    return np.stack([np.logaddexp(0.0, x), s, s * s, s * s * s, softplus_minus_sigma(x)], axis=-1)


class ZeroSumExact:
    """Direct sums over the cells (``O(cells)`` per gene): the reference for the table.

    Parameters
    ----------
    pair : (n,) pair of each cell; offset, weights : (n,); n_pairs : int
    """

    def __init__(self, pair, offset, weights, n_pairs):
        self.pair, self.o = pair, offset
        self.S = sp.csr_matrix((weights, (pair, np.arange(pair.size))), shape=(n_pairs, pair.size))

    def __call__(self, c, which=range(N_BASIS)):
        """``c`` (G, P) -> (G, P, len(which)) weighted sums of the basis functions ``which``."""
        B = basis(c[:, self.pair] + self.o[None, :])  # (G, n, 5)
        return np.stack([(self.S @ B[:, :, j].T).T for j in which], axis=-1)


class ZeroSumTable:
    """Taylor tables of the pair sums on a grid of ``c``.

    Parameters
    ----------
    pair, offset, weights, n_pairs : as :class:`ZeroSumExact`
    h : grid spacing; order : Taylor order
    """

    EDGE = 18.0  # beyond, two terms of a series in exp(-|x|) are exact to round-off

    def __init__(self, pair, offset, weights, n_pairs, *, h=0.1, order=8):
        self.h, self.order, self.P = float(h), int(order), int(n_pairs)
        self.lo = -self.EDGE - float(np.max(offset))
        self.hi = self.EDGE - float(np.min(offset))
        J = int(np.ceil((self.hi - self.lo) / self.h)) + 1
        self.J = J
        nodes = self.lo + self.h * np.arange(J)
        S = sp.csr_matrix((weights, (pair, np.arange(pair.size))), shape=(n_pairs, pair.size))
        # moments for the series beyond the grid: sum w exp(k o), k = -1, 1..4
        shift = float(np.max(offset))
        self.log_moments = np.stack(
            [np.log(S @ np.exp(k * (offset - shift))) + k * shift for k in (1, 2, 3, 4)], axis=-1
        )  # (P, 4)
        self.neg_moment = S @ np.exp(-offset)
        self.wsum = np.asarray(S.sum(axis=1)).ravel()
        self.wo = S @ offset
        top = 3 + self.order  # powers of sigma the derivatives reach
        # derivative operator on coefficients over sigma^k: d sigma^k = k sigma^k - k sigma^(k+1)
        D = np.zeros((top + 1, top + 1))
        for k in range(1, top):
            D[k, k] += k
            D[k + 1, k] -= k
        # the first derivatives: softplus' = sigma, (sigma^m)' = D e_m, (softplus - sigma)' = sigma^2
        eye = np.eye(top + 1)
        starts = [eye[1], D @ eye[1], D @ eye[2], D @ eye[3], eye[2]]
        coef = np.zeros((N_BASIS, self.order + 1, top + 1))  # Taylor coefficient t of f over power sums
        for f in range(N_BASIS):
            v = starts[f]
            for t in range(1, self.order + 1):
                coef[f, t] = v / math.factorial(t)
                v = D @ v
        table = np.empty((N_BASIS, n_pairs, J, self.order + 1))
        block = max(1, 300_000 // max(pair.size, 1))  # (n, block) temporaries
        for j0 in range(0, J, block):
            x = offset[:, None] + nodes[None, j0 : j0 + block]  # (n, b)
            s = _sigma(x)
            pk = np.ones_like(x)
            psum = np.empty((n_pairs, x.shape[1], top + 1))
            for k in range(top + 1):
                psum[:, :, k] = S @ pk
                pk *= s
            table[:, :, j0 : j0 + block] = np.einsum("pbk,ftk->fpbt", psum, coef)
            table[0, :, j0 : j0 + block, 0] = S @ np.logaddexp(0.0, x)
            for m in (1, 2, 3):
                table[m, :, j0 : j0 + block, 0] = psum[:, :, m]
        # softplus - sigma at the nodes by stepping its Taylor series from the first node
        # (exact series value there): a difference of the two sums would cancel
        table[4, :, 0, 0] = self._below(np.full((1, n_pairs), self.lo))[0, :, 4]
        powers = self.h ** np.arange(self.order + 1)
        for j in range(1, J):
            table[4, :, j, 0] = table[4, :, j - 1] @ powers
        self.table = table

    def _below(self, c):
        """Sums where every ``x = c + o < -EDGE``: two terms of the series in ``exp(x)``."""
        lm = self.log_moments[None, :, :]
        e = [np.exp(k * c + lm[..., k - 1]) for k in (1, 2, 3, 4)]
        return np.stack(
            [e[0] - 0.5 * e[1], e[0] - e[1], e[1] - 2.0 * e[2], e[2] - 3.0 * e[3], 0.5 * e[1] - 2.0 / 3.0 * e[2]],
            axis=-1,
        )

    def _above(self, c):
        """Sums where every ``x > EDGE``: ``sigma = 1 - exp(-x)``, ``softplus = x + exp(-x)``."""
        w = self.wsum[None, :]
        t = np.exp(-c) * self.neg_moment[None, :]
        sp_ = w * c + self.wo[None, :] + t
        s1 = w - t
        return np.stack([sp_, s1, w - 2.0 * t, w - 3.0 * t, sp_ - s1], axis=-1)

    def __call__(self, c, which=range(N_BASIS)):
        """``c`` (G, P) -> (G, P, len(which)) weighted sums of the basis functions ``which``."""
        which = list(which)
        G, P = c.shape
        j = np.clip(np.rint((c - self.lo) / self.h), 0, self.J - 1).astype(np.int64)
        delta = (c - (self.lo + self.h * j)).ravel()
        flat = (np.arange(P)[None, :] * self.J + j).ravel()  # np.take on rows: a fast gather
        out = np.empty((G * P, len(which)))
        for i, f in enumerate(which):
            coefs = np.take(self.table[f].reshape(P * self.J, self.order + 1), flat, axis=0)
            v = coefs[:, self.order]
            for t in range(self.order - 1, -1, -1):
                v = v * delta + coefs[:, t]
            out[:, i] = v
        out = out.reshape(G, P, len(which))
        below, above = c < self.lo, c > self.hi
        if np.any(below):
            out = np.where(below[..., None], self._below(np.minimum(c, self.lo))[..., which], out)
        if np.any(above):
            out = np.where(above[..., None], self._above(np.maximum(c, self.hi))[..., which], out)
        return out
