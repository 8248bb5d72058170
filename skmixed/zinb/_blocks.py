"""Batched second-order algebra for zinbwave's parameter blocks.

Each block (one gene's ``(beta_mu, alpha_mu, beta_pi, alpha_pi)`` or one cell's
``(gamma_mu, gamma_pi, W)``) enters the linear predictors through per-entry design
vectors: parameter ``p`` moves ``eta_mu`` by ``Umu[:, p]`` and ``eta_pi`` by
``Upi[:, p]`` along the contracted axis (cells for a gene block, genes for a cell
block). With the per-entry gradient ``(g_a, g_b)`` and observed information
``(i_aa, i_ab, i_bb)`` of the ZINB log-likelihood, the block's gradient and
information are matrix products; structurally zero pairs (a mean-model parameter with a
zero-inflation one in ``i_aa``, say) are skipped, so the cost is one GEMM per needed
pair of design vectors.
"""

from __future__ import annotations

import numpy as np

from .._backend import get_namespace


def _ix(xp, idx):
    """Index arrays in the namespace of the arrays they index (CuPy wants its own)."""
    return idx if xp is np else xp.asarray(idx)


class BlockPlan:
    """Which pairs ``(p <= q)`` of a block's parameters meet which information term."""

    def __init__(self, has_mu, has_pi):
        has_mu, has_pi = np.asarray(has_mu, bool), np.asarray(has_pi, bool)
        self.P = P = has_mu.size
        self.mu, self.pi = np.flatnonzero(has_mu), np.flatnonzero(has_pi)
        p, q = np.triu_indices(P)
        self.aa = (p[has_mu[p] & has_mu[q]], q[has_mu[p] & has_mu[q]])
        self.bb = (p[has_pi[p] & has_pi[q]], q[has_pi[p] & has_pi[q]])
        ab = (has_mu[p] & has_pi[q]) | (has_pi[p] & has_mu[q])
        self.ab = (p[ab], q[ab])

    def pair_designs(self, Umu, Upi):
        """Per-pair products of design vectors for the three information terms."""
        xp = get_namespace(Umu)
        pa, qa, pb, qb, pc, qc = (_ix(xp, i) for i in (*self.aa, *self.bb, *self.ab))
        Caa = Umu[:, pa] * Umu[:, qa]
        Cbb = Upi[:, pb] * Upi[:, qb]
        Cab = Umu[:, pc] * Upi[:, qc] + Upi[:, pc] * Umu[:, qc]
        return xp.ascontiguousarray(Caa), xp.ascontiguousarray(Cab), xp.ascontiguousarray(Cbb)

    def pair_sums(self, Umu, Upi, iaa, iab, ibb, *, units_are_rows: bool, dtype=None):
        """Information pair sums, shape (units, n_pairs) for aa, ab, bb.

        ``units_are_rows``: the units (cells) are the rows of the per-entry arrays and
        the design vectors run along their columns (genes); otherwise the units are the
        columns (genes) and the design vectors run along the rows (cells). ``dtype``
        (e.g. float32): the precision of the products, which are most of a fit's
        arithmetic; the information only steers the Newton directions.
        """
        C = self.pair_designs(Umu, Upi)
        info = (iaa, iab, ibb)
        if dtype is not None:
            C = tuple(c.astype(dtype) for c in C)
            info = tuple(i.astype(dtype) for i in info)
        if units_are_rows:
            return tuple(i @ c for i, c in zip(info, C))
        return tuple((c.T @ i).T for i, c in zip(info, C))

    def gradient(self, Umu, Upi, ga, gb, *, units_are_rows: bool):
        """Per-unit gradient; only the parameters that move a predictor take a product."""
        xp = get_namespace(Umu)
        mu, pi = _ix(xp, self.mu), _ix(xp, self.pi)
        Um, Up = Umu[:, mu], Upi[:, pi]
        if units_are_rows:
            gm, gp = ga @ Um, gb @ Up
        else:
            gm, gp = (Um.T @ ga).T, (Up.T @ gb).T
        g = xp.zeros((gm.shape[0], self.P))
        g[:, mu] = gm
        g[:, pi] += gp
        return g

    def assemble(self, Saa, Sab, Sbb):
        """Symmetric (units, P, P) information from pair sums."""
        xp = get_namespace(Saa)
        units = Saa.shape[0]
        H = xp.zeros((units, self.P, self.P))
        for (p, q), S in ((self.aa, Saa), (self.ab, Sab), (self.bb, Sbb)):
            if p.size:
                H[:, _ix(xp, p), _ix(xp, q)] += S
        iu0, iu1 = (_ix(xp, i) for i in np.triu_indices(self.P, 1))
        H[:, iu1, iu0] = H[:, iu0, iu1]
        return H


def assemble_sym(S, P):
    """Symmetric (units, P, P) matrices from their upper triangles ``S`` (units,
    P(P+1)/2), in ``numpy.triu_indices(P)`` order."""
    xp = get_namespace(S)
    p, q = (_ix(xp, i) for i in np.triu_indices(P))
    H = xp.zeros((S.shape[0], P, P), dtype=S.dtype)
    H[:, p, q] = S
    H[:, q, p] = S
    return H


def upper(H):
    """The upper triangles of symmetric (units, P, P) matrices (the inverse of
    :func:`assemble_sym`, exact: half the memory of ``H``)."""
    xp = get_namespace(H)
    p, q = (_ix(xp, i) for i in np.triu_indices(H.shape[-1]))
    return H[:, p, q]


def newton_direction(H, g, max_step: float = 10.0):
    """Solve ``H d = g`` for every unit; ``H`` need not be positive definite.

    Positive-definite batches take the Newton step; otherwise every unit takes the
    step of ``|H|`` (eigenvalues replaced by their absolute values, floored), an ascent
    direction that equals Newton's wherever ``H`` is positive definite. Steps are capped
    at ``max_step`` in the largest coordinate (the line search does the rest).
    """
    xp = get_namespace(H, g)
    d = None
    try:
        Lc = xp.linalg.cholesky(H)
        if bool(xp.all(xp.isfinite(Lc))):
            d = xp.linalg.solve(H, g[..., None])[..., 0]
    except np.linalg.LinAlgError:
        d = None
    if d is None or not bool(xp.all(xp.isfinite(d))):
        w, Q = xp.linalg.eigh(H)
        aw = xp.abs(w)
        floor = 1e-8 * xp.max(aw, axis=-1, keepdims=True) + 1e-12
        aw = xp.maximum(aw, floor)
        d = xp.einsum("...ij,...j->...i", Q, xp.einsum("...ji,...j->...i", Q, g) / aw)
    big = xp.max(xp.abs(d), axis=-1, keepdims=True)
    return d * xp.minimum(1.0, max_step / xp.maximum(big, 1e-300))
