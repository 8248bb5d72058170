"""zinbwave's initialisation, made to scale.

As in ``zinbwave::zinbInitialize``: (1) ``L = log(y) - O_mu`` on the positive counts;
(2) ridge least squares for ``gamma_mu`` (per cell) and ``beta_mu`` (per gene) on the
positive entries, alternated twice; (3) a rank-K approximation of the residual
``D = L - X beta_mu - (V gamma_mu)'`` observed on the positive entries, with the
trace-norm penalty ``lambda = sqrt(eps_W eps_alpha)`` that softImpute uses (solved here by
alternating ridge regressions, the same objective, from a randomised SVD of the
zero-filled residual) and split into balanced ``W`` and ``alpha_mu``; (4) ridge logistic
regressions of the zero indicator for ``gamma_pi`` and ``(beta_pi, alpha_pi)``,
alternated twice; (5) ``zeta = 0``. Everything runs on the sparse non-zeros or chunk by
chunk, in the input's array namespace.
"""

from __future__ import annotations

import numpy as np

from .._backend import expit, get_namespace
from ._blocks import BlockPlan, assemble_sym, newton_direction
from ._chunks import local_chunks
from ._data import entry_rows
from ._model import Params


def _sym_pairs(U):
    xp = get_namespace(U)
    p, q = (i if xp is np else xp.asarray(i) for i in np.triu_indices(U.shape[1]))
    return U[:, p] * U[:, q]


def _ridge_sums(Pat, R, U):
    """Per row i of the sparse pattern: ``sum_j U_j U_j'`` (upper triangle) and ``sum_j U_j R_ij``."""
    return Pat @ _sym_pairs(U), R @ U


def _ridge_solve(S, g, eps):
    """Solve ``(S + diag(eps)) c = g`` for every row (``S``: the upper triangles)."""
    xp = get_namespace(g)
    H = assemble_sym(S, g.shape[1]) + xp.diag(xp.asarray(eps, dtype=float) + 1e-10)
    return xp.linalg.solve(H, g[..., None])[..., 0]


def _ridge_rows(Pat, R, U, eps):
    """Per row i of the sparse pattern: solve ``(sum_j U_j U_j' + diag(eps)) c = sum_j U_j R_ij``."""
    return _ridge_solve(*_ridge_sums(Pat, R, U), eps)


def _offset_at(off, r, c):
    if off is None:
        return 0.0
    return off[r] if off.ndim == 1 else off[r, c]


def _sparse_like(Y, data):
    """``Y``'s sparsity pattern with the values ``data`` (index arrays shared, not copied)."""
    return type(Y)((data, Y.indices, Y.indptr), shape=Y.shape)


def _pair_dot(A, r, B, c, chunk=1 << 22):
    """``(A[r] * B[c]).sum(axis=1)`` chunk by chunk (no non-zeros x width temporaries)."""
    xp = get_namespace(A)
    out = xp.empty(r.shape[0])
    for s in range(0, r.shape[0], chunk):
        out[s:s + chunk] = (A[r[s:s + chunk]] * B[c[s:s + chunk]]).sum(axis=1)
    return out


class _Block:
    """One chunk of cells during the initialisation: its non-zeros, their pattern and
    the log positive counts ``L = log(y) - O_mu`` (each chunk is rebuilt when a pass
    reaches it, so only one chunk is ever in memory)."""

    def __init__(self, chunk):
        xp = chunk.design.xp
        Y = chunk.counts.Y
        self.Y, self.X = Y, chunk.design.X
        self.r = entry_rows(Y.indptr, xp, xp.int32 if max(Y.shape[0], Y.shape[1], int(Y.nnz)) < 2**31 - 1 else xp.int64)
        self.c = Y.indices
        self.Pat = _sparse_like(Y, xp.ones_like(Y.data))
        self.L = xp.log(Y.data)
        if chunk.design.off_mu is not None:
            self.L -= _offset_at(chunk.design.off_mu, self.r, self.c)

    def minus_x_beta(self, beta_mu):
        return self.L - _pair_dot(self.X, self.r, beta_mu.T, self.c)

    def minus_v_gamma(self, res, V, gamma_mu):
        """``res - (V gamma_mu)'`` on the non-zeros (``gamma_mu`` of the chunk's cells)."""
        return res - _pair_dot(V, self.c, gamma_mu.T, self.r)

    def residual(self, V, beta_mu, gamma_mu):
        """``D = L - X beta_mu - (V gamma_mu)'`` on the non-zeros, as a sparse matrix."""
        return _sparse_like(self.Y, self.minus_v_gamma(self.minus_x_beta(beta_mu), V, gamma_mu))


def _blocks(counts, design):
    for rows, chunk in local_chunks(counts, design):
        yield rows, _Block(chunk)


def _ridge_mu(counts, design, n_repeat):
    """``gamma_mu`` (per cell, on ``V``) and ``beta_mu`` (per gene, on ``X``) by ridge
    least squares on the log positive counts, alternated ``n_repeat`` times. One pass
    over the cells per repeat: each chunk's cells get their ``gamma_mu`` from the current
    ``beta_mu``, then add their share of the per-gene normal equations."""
    xp, pen = design.xp, design.penalty
    X, V = design.X, design.V
    M, L, n, J = X.shape[1], V.shape[1], counts.n, counts.J
    beta_mu, gamma_mu = xp.zeros((M, J)), xp.zeros((L, n))
    for _ in range(n_repeat):
        S, g = xp.zeros((J, M * (M + 1) // 2)), xp.zeros((J, M))
        for rows, b in _blocks(counts, design):
            if L:
                gamma_mu[:, rows] = _ridge_rows(b.Pat, _sparse_like(b.Y, b.minus_x_beta(beta_mu)), V, pen.gamma_mu).T
            if M:
                res = _sparse_like(b.Y, b.minus_v_gamma(b.L, V, gamma_mu[:, rows]))
                dS, dg = _ridge_sums(b.Pat.T, res.T, b.X)
                S += dS
                g += dg
        if M:
            beta_mu = _ridge_solve(S, g, pen.beta_mu).T
    return beta_mu, gamma_mu


def _residual_times(counts, design, beta_mu, gamma_mu, right=None, left=None):
    """One pass over the cells: ``D @ right`` (n x k, stacked by chunk) or ``D.T @ left``
    (J x k, summed over chunks) for the residual ``D`` of :meth:`_Block.residual`."""
    xp = design.xp
    out = xp.zeros((counts.n, right.shape[1])) if right is not None else xp.zeros((counts.J, left.shape[1]))
    for rows, b in _blocks(counts, design):
        D = b.residual(design.V, beta_mu, gamma_mu[:, rows])
        if right is not None:
            out[rows] = D @ right
        else:
            out += D.T @ left[rows]
    return out


def _randomized_svd(apply, n_genes, k, ell, rng, xp, n_iter=4):
    """Rank-k SVD of the residual, by the randomised range finder (``ell`` columns,
    ``n_iter`` power iterations); ``apply(right=...)`` and ``apply(left=...)`` are its
    products (one pass over the cells each)."""
    Om = xp.asarray(rng.standard_normal((n_genes, ell)))
    Q, _ = xp.linalg.qr(apply(right=Om))
    for _ in range(n_iter):
        Z, _ = xp.linalg.qr(apply(left=Q))
        Q, _ = xp.linalg.qr(apply(right=Z))
    B = apply(left=Q).T  # (ell, J)
    Ub, s, Vt = xp.linalg.svd(B, full_matrices=False)
    return (Q @ Ub)[:, :k], s[:k], Vt[:k]


def _low_rank(counts, design, K, beta_mu, gamma_mu, rng, als_iter):
    """``W`` and ``alpha_mu``: the trace-norm-penalised rank-K fit of the residual on its
    non-zeros, from a randomised SVD, by alternating ridge regressions (one pass per
    round: each chunk's cells get their ``W`` from the current ``alpha_mu``, then add
    their share of the per-gene normal equations)."""
    xp, pen = design.xp, design.penalty
    n, J = counts.n, counts.J
    ell = min(K + 8, min(n, J))

    def apply(right=None, left=None):
        return _residual_times(counts, design, beta_mu, gamma_mu, right=right, left=left)

    U, s, Vt = _randomized_svd(apply, J, K, ell, rng, xp)
    W = U * xp.sqrt(s)
    A = Vt.T * xp.sqrt(s)  # (J, K)
    lam_vec = np.full(K, float(np.sqrt(pen.W * pen.alpha)))
    for _ in range(als_iter):
        S, g = xp.zeros((J, K * (K + 1) // 2)), xp.zeros((J, K))
        for rows, b in _blocks(counts, design):
            D = b.residual(design.V, beta_mu, gamma_mu[:, rows])
            W[rows] = _ridge_rows(b.Pat, D, A, lam_vec)
            dS, dg = _ridge_sums(b.Pat.T, D.T, W[rows])
            S += dS
            g += dg
        A = _ridge_solve(S, g, lam_vec)
    return W, A.T


def initialize(counts, design, K: int, rng, *, n_repeat: int = 2, als_iter: int = 10, logit_steps: int = 3):
    """Starting parameters, zinbwave-style (see the module docstring), by passes over
    chunks of cells (:func:`~skmixed.zinb._chunks.local_chunks`): counts on disk are read
    chunk by chunk, never whole."""
    xp = design.xp
    M, L = design.X.shape[1], design.V.shape[1]
    n, J = counts.n, counts.J
    beta_mu, gamma_mu = _ridge_mu(counts, design, n_repeat)
    W, alpha_mu = xp.zeros((n, K)), xp.zeros((K, J))
    if K:
        W, alpha_mu = _low_rank(counts, design, K, beta_mu, gamma_mu, rng, als_iter)
    zeta = xp.zeros(J)
    P = Params(
        beta_mu=beta_mu, beta_pi=xp.zeros((M, J)), gamma_mu=gamma_mu, gamma_pi=xp.zeros((L, n)),
        W=W, alpha_mu=alpha_mu, alpha_pi=xp.zeros((K, J)), zeta=zeta,
    )
    _balance(P, pen=design.penalty)
    for _ in range(n_repeat):
        if L:
            _logit_cells(counts, design, P, logit_steps)
        if M + K:
            _logit_genes(counts, design, P, logit_steps)
    return P


def _balance(P, pen):
    """Rescale ``W`` and ``alpha`` as zinbwave does after softImpute (same product)."""
    if P.W.shape[1] == 0 or pen.W <= 0 or pen.alpha <= 0:
        return
    xp = get_namespace(P.W)
    Qw, Rw = xp.linalg.qr(P.W)
    Qa, Ra = xp.linalg.qr(xp.concatenate([P.alpha_mu, P.alpha_pi], axis=1).T)
    U, s, Vt = xp.linalg.svd(Rw @ Ra.T)
    sc = (pen.W / pen.alpha) ** 0.25
    P.W = (Qw @ U) * xp.sqrt(s) / sc
    A = ((Qa @ Vt.T) * xp.sqrt(s) * sc).T
    J = P.alpha_mu.shape[1]
    P.alpha_mu, P.alpha_pi = xp.ascontiguousarray(A[:, :J]), xp.ascontiguousarray(A[:, J:])


def _zero_indicator(counts, rows, width):
    xp = counts.xp
    ri, ci, _ = counts.entries(rows)
    z = xp.ones((counts.n_rows(rows), width))
    z.reshape(-1)[ri * width + ci] = 0.0
    return z


def _logit_cells(counts, design, P, steps):
    """Ridge logistic regression of the zero indicator on ``V`` for each cell's ``gamma_pi``."""
    xp = design.xp
    V, eps = design.V, xp.asarray(design.penalty.gamma_pi)
    Vs = _sym_pairs(V)
    Lg = V.shape[1]
    for rows, chunk in local_chunks(counts, design):
        Pc, local = P.take_cells(rows), chunk.rows
        z = _zero_indicator(chunk.counts, local, counts.J)
        for _ in range(steps):
            pi = expit(chunk.design.eta(Pc, local, part="pi"))
            g = (z - pi) @ V - eps * Pc.gamma_pi.T
            H = assemble_sym((pi * (1.0 - pi)) @ Vs, Lg) + xp.diag(eps)
            Pc.gamma_pi += newton_direction(H, g, max_step=5.0).T
        P.gamma_pi[:, rows] = Pc.gamma_pi


def _logit_genes(counts, design, P, steps):
    """Ridge logistic regression of the zero indicator on ``(X, W)`` for each gene's
    ``(beta_pi, alpha_pi)``; one pass over the cells per Newton step."""
    xp = design.xp
    M, K = P.beta_pi.shape[0], P.alpha_pi.shape[0]
    plan = BlockPlan([False] * (M + K), [True] * (M + K))
    eps = xp.asarray(np.concatenate([design.penalty.beta_pi, np.full(K, design.penalty.alpha)]))
    for _ in range(steps):
        B = xp.concatenate([P.beta_pi, P.alpha_pi], axis=0).T  # (J, M + K)
        g = -eps * B
        S = xp.zeros((counts.J, plan.bb[0].size))
        for rows, chunk in local_chunks(counts, design):
            Pc, local = P.take_cells(rows), chunk.rows
            z = _zero_indicator(chunk.counts, local, counts.J)
            pi = expit(chunk.design.eta(Pc, local, part="pi"))
            A = xp.concatenate([chunk.design.X, Pc.W], axis=1)
            g += ((z - pi).T @ A)
            S += (plan.pair_designs(A, A)[2].T @ (pi * (1.0 - pi))).T
        H = plan.assemble(0 * S[:, :0], 0 * S[:, :0], S) + xp.diag(eps)
        B = B + newton_direction(H, g, max_step=5.0)
        P.beta_pi[...] = B[:, :M].T
        P.alpha_pi[...] = B[:, M:].T


def initialize_cells(counts, design, fitted):
    """Starting cell parameters of new cells, the gene parameters of ``fitted`` fixed:
    ``gamma_mu`` and ``W`` by ridge least squares on the log positive counts, then
    ``gamma_pi`` by logistic regression of the zero indicator."""
    xp = design.xp
    V, pen = design.V, design.penalty
    n = counts.n
    L, K = V.shape[1], fitted.W.shape[1]
    gamma_mu, W = xp.zeros((L, n)), xp.zeros((n, K))
    for rows, b in _blocks(counts, design):  # every cell on its own: one pass
        Lv = b.minus_x_beta(fitted.beta_mu)
        if L:
            gamma_mu[:, rows] = _ridge_rows(b.Pat, _sparse_like(b.Y, Lv), V, pen.gamma_mu).T
        if K:
            Dv = _sparse_like(b.Y, b.minus_v_gamma(Lv, V, gamma_mu[:, rows]))
            W[rows] = _ridge_rows(b.Pat, Dv, fitted.alpha_mu.T, np.full(K, max(pen.W, 1e-6)))
    P = Params(
        beta_mu=fitted.beta_mu, beta_pi=fitted.beta_pi, gamma_mu=gamma_mu, gamma_pi=xp.zeros((L, n)),
        W=W, alpha_mu=fitted.alpha_mu, alpha_pi=fitted.alpha_pi, zeta=fitted.zeta,
    )
    if L:
        _logit_cells(counts, design, P, 4)
    return P
