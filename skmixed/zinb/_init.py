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
from ._blocks import BlockPlan, newton_direction
from ._data import entry_rows
from ._model import Params


def _sym_pairs(U):
    xp = get_namespace(U)
    p, q = (i if xp is np else xp.asarray(i) for i in np.triu_indices(U.shape[1]))
    return U[:, p] * U[:, q]


def _assemble_sym(S, P):
    xp = get_namespace(S)
    p, q = (i if xp is np else xp.asarray(i) for i in np.triu_indices(P))
    H = xp.zeros((S.shape[0], P, P))
    H[:, p, q] = S
    H[:, q, p] = S
    return H


def _ridge_rows(Pat, R, U, eps):
    """Per row i of the sparse pattern: solve ``(sum_j U_j U_j' + diag(eps)) c = sum_j U_j R_ij``."""
    xp = get_namespace(U)
    k = U.shape[1]
    H = _assemble_sym(Pat @ _sym_pairs(U), k) + xp.diag(xp.asarray(eps, dtype=float) + 1e-10)
    g = R @ U
    return xp.linalg.solve(H, g[..., None])[..., 0]


def _offset_at(off, r, c):
    if off is None:
        return 0.0
    return off[r] if off.ndim == 1 else off[r, c]


def _sparse_like(Y, data):
    """``Y``'s sparsity pattern with the values ``data`` (index arrays shared, not copied)."""
    return type(Y)((data, Y.indices, Y.indptr), shape=Y.shape)


def _entries(counts):
    """Row, column and value of every non-zero, in the order of the (canonical) CSR
    matrix's ``data``: the values and columns are views, the rows int32 where they fit
    (the initialisation's memory is a few arrays of the non-zeros' size)."""
    xp = counts.xp
    Y = counts.Y
    idx = xp.int32 if max(counts.n, counts.J, int(Y.nnz)) < 2**31 - 1 else xp.int64
    return entry_rows(Y.indptr, xp, idx), Y.indices.astype(idx, copy=False), Y.data


def _residual(L, fit):
    """``L - fit``, written over ``fit`` (one array of the non-zeros' size less)."""
    get_namespace(L).subtract(L, fit, out=fit)
    return fit


def _pair_dot(A, r, B, c, chunk=1 << 22):
    """``(A[r] * B[c]).sum(axis=1)`` chunk by chunk (no non-zeros x width temporaries)."""
    xp = get_namespace(A)
    out = xp.empty(r.shape[0])
    for s in range(0, r.shape[0], chunk):
        out[s:s + chunk] = (A[r[s:s + chunk]] * B[c[s:s + chunk]]).sum(axis=1)
    return out


def _randomized_svd(D, k, rng, xp, n_iter=4):
    n, J = D.shape
    ell = min(k + 8, min(n, J))
    Om = xp.asarray(rng.standard_normal((J, ell)))
    Q, _ = xp.linalg.qr(D @ Om)
    for _ in range(n_iter):
        Z, _ = xp.linalg.qr(D.T @ Q)
        Q, _ = xp.linalg.qr(D @ Z)
    B = (D.T @ Q).T  # (ell, J)
    Ub, s, Vt = xp.linalg.svd(B, full_matrices=False)
    return (Q @ Ub)[:, :k], s[:k], Vt[:k]


def initialize(counts, design, K: int, rng, *, n_repeat: int = 2, als_iter: int = 10, logit_steps: int = 3):
    """Starting parameters, zinbwave-style (see the module docstring)."""
    xp = design.xp
    X, V, pen = design.X, design.V, design.penalty
    n, J = counts.n, counts.J
    M, L = X.shape[1], V.shape[1]
    Y = counts.Y
    r, c, y = _entries(counts)
    Pat = _sparse_like(Y, xp.ones_like(y))
    PatT = Pat.T  # a CSC view: the per-gene sums are products with it
    Lv = xp.log(y)
    if design.off_mu is not None:
        Lv -= _offset_at(design.off_mu, r, c)

    beta_mu = xp.zeros((M, J))
    gamma_mu = xp.zeros((L, n))
    for _ in range(n_repeat):
        if L:
            res = _residual(Lv, _pair_dot(X, r, beta_mu.T, c))
            gamma_mu = _ridge_rows(Pat, _sparse_like(Y, res), V, pen.gamma_mu).T
            del res
        if M:
            res = _residual(Lv, _pair_dot(V, c, gamma_mu.T, r))
            beta_mu = _ridge_rows(PatT, _sparse_like(Y, res).T, X, pen.beta_mu).T
            del res

    W = xp.zeros((n, K))
    alpha_mu = xp.zeros((K, J))
    if K:
        Dv = _residual(Lv, _pair_dot(X, r, beta_mu.T, c))
        Dv -= _pair_dot(V, c, gamma_mu.T, r)
        del Lv, r, c
        D = _sparse_like(Y, Dv)
        DT = D.T
        lam = float(np.sqrt(pen.W * pen.alpha))
        U, s, Vt = _randomized_svd(D, K, rng, xp)
        W = U * xp.sqrt(s)
        A = (Vt.T * xp.sqrt(s))  # (J, K)
        lam_vec = np.full(K, lam)
        for _ in range(als_iter):
            W = _ridge_rows(Pat, D, A, lam_vec)
            A = _ridge_rows(PatT, DT, W, lam_vec)
        alpha_mu = A.T
    zeta = xp.zeros(J)
    P = Params(
        beta_mu=beta_mu, beta_pi=xp.zeros((M, J)), gamma_mu=gamma_mu, gamma_pi=xp.zeros((L, n)),
        W=W, alpha_mu=alpha_mu, alpha_pi=xp.zeros((K, J)), zeta=zeta,
    )
    _balance(P, pen)
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
    for rows in counts.chunks:
        z = _zero_indicator(counts, rows, counts.J)
        for _ in range(steps):
            pi = expit(design.eta(P, rows, part="pi"))
            g = (z - pi) @ V - eps * P.gamma_pi[:, rows].T
            H = _assemble_sym((pi * (1.0 - pi)) @ Vs, Lg) + xp.diag(eps)
            P.gamma_pi[:, rows] += newton_direction(H, g, max_step=5.0).T


def _logit_genes(counts, design, P, steps):
    """Ridge logistic regression of the zero indicator on ``(X, W)`` for each gene's ``(beta_pi, alpha_pi)``."""
    xp = design.xp
    M, K = P.beta_pi.shape[0], P.alpha_pi.shape[0]
    plan = BlockPlan([False] * (M + K), [True] * (M + K))
    eps = xp.asarray(np.concatenate([design.penalty.beta_pi, np.full(K, design.penalty.alpha)]))
    for _ in range(steps):
        B = xp.concatenate([P.beta_pi, P.alpha_pi], axis=0).T  # (J, M + K)
        g = -eps * B
        S = xp.zeros((counts.J, plan.bb[0].size))
        for rows in counts.chunks:
            z = _zero_indicator(counts, rows, counts.J)
            pi = expit(design.eta(P, rows, part="pi"))
            A = xp.concatenate([design.X[rows], P.W[rows]], axis=1)
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
    X, V, pen = design.X, design.V, design.penalty
    n = counts.n
    L, K = V.shape[1], fitted.W.shape[1]
    r, c, y = _entries(counts)
    Y = counts.Y
    Pat = _sparse_like(Y, xp.ones_like(y))
    Lv = xp.log(y) - _offset_at(design.off_mu, r, c) - _pair_dot(X, r, fitted.beta_mu.T, c)
    gamma_mu = xp.zeros((L, n))
    if L:
        gamma_mu = _ridge_rows(Pat, _sparse_like(Y, Lv), V, pen.gamma_mu).T
    W = xp.zeros((n, K))
    if K:
        Dv = Lv - _pair_dot(V, c, gamma_mu.T, r)
        W = _ridge_rows(Pat, _sparse_like(Y, Dv), fitted.alpha_mu.T, np.full(K, max(pen.W, 1e-6)))
    P = Params(
        beta_mu=fitted.beta_mu, beta_pi=fitted.beta_pi, gamma_mu=gamma_mu, gamma_pi=xp.zeros((L, n)),
        W=W, alpha_mu=fitted.alpha_mu, alpha_pi=fitted.alpha_pi, zeta=fitted.zeta,
    )
    if L:
        _logit_cells(counts, design, P, 4)
    return P
