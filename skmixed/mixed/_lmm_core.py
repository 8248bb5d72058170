"""Profiled (REML) deviance of a linear mixed model from sufficient statistics.

Notation follows lme4 (Bates, Maechler, Bolker and Walker 2015, JSS 67(1), section 3):
``y = X beta + Z Lambda(theta) u + e``, ``u ~ N(0, sigma^2 I_q)``, ``e ~ N(0, sigma^2 W^-1)``.
With ``C = Z'WZ`` and the blocked Cholesky factor

    [[Lambda' C Lambda + I, Lambda' Z'WX], [X'WZ Lambda, X'WX]] = [[L, 0], [RZX', RX']] [[L', RZX], [0, RX]],

``cu = L^-1 Lambda' Z'Wy``, ``cb = RX^-T (X'Wy - RZX' cu)``, ``beta = RX^-1 cb`` and the penalised
residual sum of squares ``r2 = y'Wy - |cu|^2 - |cb|^2``, the profiled deviances are

    ML:   log|L|^2 + n (1 + log(2 pi r2 / n)) - sum(log w)
    REML: log|L|^2 + log|RX|^2 + (n - p) (1 + log(2 pi r2 / (n - p))) - sum(log w)

Every quantity is built from ``C, Z'WX, X'WX, Z'Wy, X'Wy, y'Wy``, computed once, so an
evaluation costs nothing in ``n``. ``L`` is factorised blockwise (MixedModels.jl's
blocked Cholesky): the random-effects term with most levels comes first, its block of
``Lambda'C Lambda + I`` is block diagonal (one ``k x k`` block per level) and is
factorised level by level; the Schur complement of the remaining terms (for InstEval
1,142 columns) is dense. With a single term nothing is dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.sparse as sp

from ._design import RandomEffectsDesign
from ._laplace import central_gradient

_LOG2PI = float(np.log(2 * np.pi))


def _chol_blocks(M):
    """Lower Cholesky factors of a stack of ``k x k`` blocks, k = 1 without LAPACK."""
    if M.shape[1] == 1:
        return np.sqrt(M)
    return np.linalg.cholesky(M)


def _tri_solve_blocks(L, b, trans=False):
    """``L^-1 b`` (or ``L^-T b``) blockwise; ``b`` of shape (levels, k, m)."""
    if L.shape[1] == 1:
        return b / L
    if trans:
        L = np.swapaxes(L, 1, 2)
    # k is small (a handful of random-effect columns): np.linalg.solve is fine
    return np.linalg.solve(L, b)


class SufficientStats:
    """Cross-products of ``[Z, X, Y]`` with weights, in the blocked layout.

    The term with most columns (levels x k) is put first (``order``); the columns of
    ``Z`` follow that order internally.
    """

    def __init__(self, X, Y, design: RandomEffectsDesign, weights=None):
        X = np.asarray(X, dtype=float)
        Y = np.asarray(Y, dtype=float)
        if Y.ndim == 1:
            Y = Y[:, None]
        n = X.shape[0]
        w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
        self.n, self.p, self.G = n, X.shape[1], Y.shape[1]
        self.sum_log_w = float(np.sum(np.log(w)))
        terms = design.terms
        sizes = [len(t.levels) * t.k for t in terms]
        self.order = [int(j) for j in np.argsort(sizes, kind="stable")[::-1]]
        self.ks = [terms[j].k for j in self.order]
        self.nlev = [len(terms[j].levels) for j in self.order]
        widths = [k * L for k, L in zip(self.ks, self.nlev)]
        self.col_start = np.cumsum([0] + widths)
        self.q = int(self.col_start[-1])
        self.q1 = widths[0]
        self.k1, self.L1 = self.ks[0], self.nlev[0]
        # sparse Z (n x q) in the internal order, with sqrt(w) folded in
        sw = np.sqrt(w)
        rows, cols, vals = [], [], []
        for pos, j in enumerate(self.order):
            t = terms[j]
            for c in range(t.k):
                rows.append(np.arange(n))
                cols.append(self.col_start[pos] + t.codes * t.k + c)
                vals.append(t.Z[:, c] * sw)
        Z = sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, self.q)
        )
        Xw = X * sw[:, None]
        Yw = Y * sw[:, None]
        k1, L1, q1 = self.k1, self.L1, self.q1
        # first block (L1, k1, k1), by level: every row has one level of the first term
        t1 = terms[self.order[0]]
        Z1w = t1.Z * sw[:, None]
        C11 = np.empty((L1, k1, k1))
        for a in range(k1):
            for b in range(a, k1):
                C11[:, a, b] = C11[:, b, a] = np.bincount(t1.codes, Z1w[:, a] * Z1w[:, b], minlength=L1)
        self.C11 = C11
        Zc = Z.tocsc()
        Zr = Zc[:, q1:]
        C21 = (Zr.T @ Zc[:, :q1]).tocsr() if self.q > q1 else sp.csr_matrix((0, q1))
        C22 = (Zr.T @ Zr).toarray() if self.q > q1 else np.zeros((0, 0))
        self.C21 = C21  # sparse (q2, q1)
        self.C22 = C22
        self.ZtX = np.asarray(Z.T @ Xw)
        self.ZtY = np.asarray(Z.T @ Yw)
        self.XtX = Xw.T @ Xw
        self.XtY = Xw.T @ Yw
        self.yty = np.einsum("ij,ij->j", Yw, Yw)
        self.q2 = self.q - q1
        # theta bookkeeping in the caller's (design) order
        self.design = design
        self.scalar = all(k == 1 for k in self.ks)
        self._pairs = self._schur_pairs() if (self.scalar and self.q2 > 0) else None

    def _schur_pairs(self):
        """Index pairs of ``C21 diag(d) C21'`` (scalar terms): for every level ``l`` of the
        first term, every pair ``(a >= b)`` of non-zeros of column ``l`` of ``C21`` (the lower
        triangle), so that one ``bincount`` per theta gives the product."""
        C = self.C21.tocsc()
        C.sort_indices()
        lens = np.diff(C.indptr)
        col_of = np.repeat(np.arange(self.q1, dtype=np.int32), lens)  # column of every non-zero
        rank = np.arange(C.nnz, dtype=np.int64) - np.repeat(C.indptr[:-1], lens)  # position in column
        reps = rank + 1  # entry ``a`` pairs with the entries at positions 0..a of its column
        ia = np.repeat(np.arange(C.nnz, dtype=np.int64), reps)
        start = np.repeat(np.cumsum(reps) - reps, reps)
        ib = np.repeat(C.indptr[:-1][col_of], reps) + (np.arange(ia.size, dtype=np.int64) - start)
        ra, rb = C.indices[ia], C.indices[ib]  # ra >= rb: indices sorted within columns
        return ra.astype(np.int64) * self.q2 + rb, col_of[ia], C.data[ia] * C.data[ib]

    def schur_product(self, d):
        """Lower triangle (upper part zero) of ``C21 diag(d) C21'`` (q2 x q2), scalar terms."""
        target, col, prod = self._pairs
        return np.bincount(target, prod * d[col], minlength=self.q2 * self.q2).reshape(self.q2, self.q2)

    def lambda_blocks(self, theta):
        """``T`` of each term, internal order."""
        Ts = self.design.T_blocks(theta)
        return [Ts[j] for j in self.order]


@dataclass
class Factorization:
    """The blocked Cholesky factor at one theta, and the solves that share it."""

    L11: np.ndarray  # (L1, k1, k1)
    L21: object  # sparse (q2, q1) or None
    U22: np.ndarray  # (q2, q2) upper, Fortran order: L22' (LAPACK works on it without copies)
    Ts: list
    logdet_L: float

    def solve_L(self, stats, r):
        """``L^-1 r`` for r of shape (q, m)."""
        k1, L1, q1 = stats.k1, stats.L1, stats.q1
        m = r.shape[1]
        c1 = _tri_solve_blocks(self.L11, r[:q1].reshape(L1, k1, m)).reshape(q1, m)
        if stats.q2 == 0:
            return c1
        rhs = r[q1:] - self.L21 @ c1
        c2 = scipy.linalg.solve_triangular(self.U22, rhs, lower=False, trans="T", check_finite=False)
        return np.vstack([c1, c2])

    def solve_Lt(self, stats, c):
        """``L^-T c``."""
        k1, L1, q1 = stats.k1, stats.L1, stats.q1
        m = c.shape[1]
        if stats.q2 == 0:
            return _tri_solve_blocks(self.L11, c.reshape(L1, k1, m), trans=True).reshape(q1, m)
        x2 = scipy.linalg.solve_triangular(self.U22, c[q1:], lower=False, check_finite=False)
        rhs1 = c[:q1] - self.L21.T @ x2
        x1 = _tri_solve_blocks(self.L11, rhs1.reshape(L1, k1, m), trans=True).reshape(q1, m)
        return np.vstack([x1, x2])


def lambda_t_times(stats, Ts, r):
    """``Lambda' r`` (r of shape (q, m)) in the internal column order."""
    out = np.empty_like(r)
    for pos, T in enumerate(Ts):
        s, e = stats.col_start[pos], stats.col_start[pos + 1]
        k, L = stats.ks[pos], stats.nlev[pos]
        block = r[s:e].reshape(L, k, -1)
        out[s:e] = np.einsum("ba,lbm->lam", T, block).reshape(e - s, -1)
    return out


def lambda_times(stats, Ts, u):
    """``Lambda u``."""
    out = np.empty_like(u)
    for pos, T in enumerate(Ts):
        s, e = stats.col_start[pos], stats.col_start[pos + 1]
        k, L = stats.ks[pos], stats.nlev[pos]
        out[s:e] = np.einsum("ab,lbm->lam", T, u[s:e].reshape(L, k, -1)).reshape(e - s, -1)
    return out


def _rest_lambda(stats, Ts):
    """Block-diagonal ``Lambda_2`` of the terms after the first, dense (q2 x q2)."""
    q2 = stats.q2
    Lam = np.zeros((q2, q2))
    off = stats.q1
    for pos in range(1, len(Ts)):
        s, e = stats.col_start[pos] - off, stats.col_start[pos + 1] - off
        L = stats.nlev[pos]
        Lam[s:e, s:e] = np.kron(np.eye(L), Ts[pos])
    return Lam


def factorize(stats: SufficientStats, theta) -> Factorization:
    """Blocked Cholesky factor of ``Lambda' C Lambda + I`` at ``theta``."""
    Ts = stats.lambda_blocks(theta)
    T1 = Ts[0]
    M11 = np.einsum("ba,lbc,cd->lad", T1, stats.C11, T1)
    M11[:, np.arange(stats.k1), np.arange(stats.k1)] += 1.0
    L11 = _chol_blocks(M11)
    logdet = 2.0 * float(np.sum(np.log(np.diagonal(L11, axis1=1, axis2=2))))
    if stats.q2 == 0:
        return Factorization(L11, None, np.zeros((0, 0)), Ts, logdet)
    if stats.scalar:
        # Lambda diagonal: L21 = lam2 C21 (t1 / l11); Schur = lam2 (C22 - C21 diag(t1^2/m11) C21') lam2 + I
        t1 = float(T1[0, 0])
        m11 = M11[:, 0, 0]
        lam2 = np.concatenate(
            [np.full(stats.nlev[pos], float(Ts[pos][0, 0])) for pos in range(1, len(Ts))]
        )
        L21 = (sp.diags(lam2) @ stats.C21 @ sp.diags(t1 / L11[:, 0, 0])).tocsr()
        S = stats.C22 - stats.schur_product(t1 * t1 / m11)
        S *= lam2[:, None]
        S *= lam2[None, :]
        S[np.diag_indices_from(S)] += 1.0
        # S is C-ordered with a valid lower triangle: its transpose is Fortran-ordered with a
        # valid upper triangle, factorised in place (no 10 MB copy per evaluation)
        U22, info = scipy.linalg.lapack.dpotrf(S.T, lower=0, clean=1, overwrite_a=1)
        if info != 0:
            raise np.linalg.LinAlgError("Lambda'Z'Z Lambda + I is not positive definite")
        logdet += 2.0 * float(np.sum(np.log(np.diag(U22))))
        return Factorization(L11, L21, U22, Ts, logdet)
    # L21 = Lambda2' C21 Lambda1 L11^-T (sparse, the pattern of C21 at level-block resolution)
    G1 = np.swapaxes(_tri_solve_blocks(L11, np.broadcast_to(T1.T, M11.shape).copy()), 1, 2)
    # G1[l] = (L11_l^-1 T1')' = T1 L11_l^-T
    G1s = sp.block_diag(list(G1), format="csr") if stats.k1 > 1 else sp.diags(G1[:, 0, 0])
    Lam2 = _rest_lambda(stats, Ts)
    if all(k == 1 for k in stats.ks[1:]):
        L21 = sp.diags(np.diag(Lam2)) @ (stats.C21 @ G1s)
    else:
        L21 = sp.csr_matrix(Lam2.T) @ (stats.C21 @ G1s)
    L21 = L21.tocsr()
    S = Lam2.T @ stats.C22 @ Lam2
    S[np.diag_indices_from(S)] += 1.0
    S -= (L21 @ L21.T).toarray()
    U22, info = scipy.linalg.lapack.dpotrf(np.asfortranarray(S), lower=0, clean=1, overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError("Lambda'Z'Z Lambda + I is not positive definite")
    logdet += 2.0 * float(np.sum(np.log(np.diag(U22))))
    return Factorization(L11, L21, U22, Ts, logdet)


@dataclass
class Solution:
    """Everything the profiled deviance leaves behind at one theta (all responses)."""

    factor: Factorization
    RZX: np.ndarray  # (q, p)
    RX: np.ndarray  # (p, p) upper
    cu: np.ndarray  # (q, G)
    beta: np.ndarray  # (p, G)
    r2: np.ndarray  # (G,)
    logdet_L: float
    logdet_RX: float
    theta: np.ndarray = None
    cols: list = None


def solve(stats: SufficientStats, theta, cols=None) -> Solution:
    """Profiled solution at ``theta`` for the responses ``cols`` (default all)."""
    fac = factorize(stats, theta)
    ZtY = stats.ZtY if cols is None else stats.ZtY[:, cols]
    XtY = stats.XtY if cols is None else stats.XtY[:, cols]
    yty = stats.yty if cols is None else stats.yty[cols]
    p = stats.p
    rhs = lambda_t_times(stats, fac.Ts, np.hstack([stats.ZtX, ZtY]))
    c = fac.solve_L(stats, rhs)
    RZX, cu = c[:, :p], c[:, p:]
    A = stats.XtX - RZX.T @ RZX
    RX, info = scipy.linalg.lapack.dpotrf(A, lower=0, clean=1)
    if info != 0:
        raise np.linalg.LinAlgError("X'X - RZX'RZX is not positive definite")
    cb = scipy.linalg.solve_triangular(RX, XtY - RZX.T @ cu, trans="T", check_finite=False)
    beta = scipy.linalg.solve_triangular(RX, cb, check_finite=False)
    r2 = yty - np.sum(cu**2, axis=0) - np.sum(cb**2, axis=0)
    r2 = np.maximum(r2, 1e-300)
    logdet_RX = 2.0 * float(np.sum(np.log(np.abs(np.diag(RX)))))
    return Solution(fac, RZX, RX, cu, beta, r2, fac.logdet_L, logdet_RX,
                    np.array(theta, dtype=float), None if cols is None else list(cols))


def solution_at(stats: SufficientStats, theta, col):
    """``solve(stats, theta, [col])``, reusing the optimiser's last evaluation when it was at
    ``theta``; also returns the inverse Schur complement computed there (or None)."""
    last = getattr(stats, "_last", None)
    stats._last = None
    if last is not None:
        sol, sinv = last
        if sol.theta.tobytes() == np.asarray(theta, dtype=float).tobytes() and sol.cols == [col]:
            return sol, sinv
    return solve(stats, theta, cols=[col]), None


def deviance_from(stats: SufficientStats, sol: Solution, reml: bool):
    """Profiled deviance (ML) or REML criterion, one per response."""
    n, p = stats.n, stats.p
    if reml:
        nr = n - p
        return sol.logdet_L + sol.logdet_RX + nr * (1.0 + _LOG2PI + np.log(sol.r2 / nr)) - stats.sum_log_w
    return sol.logdet_L + n * (1.0 + _LOG2PI + np.log(sol.r2 / n)) - stats.sum_log_w


def sigma2_from(stats, sol: Solution, reml: bool):
    return sol.r2 / (stats.n - stats.p if reml else stats.n)


def spherical_modes(stats, sol: Solution):
    """Conditional modes ``u`` (q, G) and ``b = Lambda u`` in the internal order."""
    u = sol.factor.solve_Lt(stats, sol.cu - sol.RZX @ sol.beta)
    return u, lambda_times(stats, sol.factor.Ts, u)


def cond_var_blocks(stats, fac: Factorization, sinv_upper=None):
    """Diagonal blocks of ``M^-1`` per term (internal order): list of (levels, k, k).

    ``sinv_upper``: the upper triangle of the inverse Schur complement (LAPACK ``dpotri`` on
    ``fac.U22``, Fortran order) when the caller already has it.
    """
    k1, L1, q1 = stats.k1, stats.L1, stats.q1
    eye = np.broadcast_to(np.eye(k1), (L1, k1, k1)).copy()
    Li = _tri_solve_blocks(fac.L11, eye)  # L11^-1 per level
    out1 = np.einsum("lba,lbc->lac", Li, Li)
    if stats.q2 == 0:
        return [out1]
    # L^-1 = [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]]; M^-1 = L^-T L^-1
    if stats.scalar:
        # sum_i Q_il^2 = B_l' S^-1 B_l with B = lam2 C21 diag(t1 / m11): a gather over C21's pairs
        Sinv = scipy.linalg.lapack.dpotri(fac.U22, lower=0)[0] if sinv_upper is None else sinv_upper
        t1 = float(fac.Ts[0][0, 0])
        lam2 = np.concatenate([np.full(stats.nlev[i], float(fac.Ts[i][0, 0])) for i in range(1, len(fac.Ts))])
        target, col, prod = stats._pairs
        a, b = np.divmod(target, stats.q2)
        # pairs have a >= b; S^-1[a, b] = upper[b, a], at offset a * q2 + b = target in Fortran order
        sab = np.asfortranarray(Sinv).ravel(order="F")[target]
        vals = prod * (lam2[a] * lam2[b] * sab) * np.where(a == b, 1.0, 2.0)
        quad = np.bincount(col, vals, minlength=L1) * (t1 / fac.L11[:, 0, 0] ** 2) ** 2
        blocks = [out1 + quad[:, None, None]]
        for pos in range(1, len(stats.ks)):
            s, e = stats.col_start[pos] - q1, stats.col_start[pos + 1] - q1
            blocks.append(np.diag(Sinv)[s:e, None, None].copy())
        return blocks
    L22i = scipy.linalg.solve_triangular(fac.U22, np.eye(stats.q2), lower=False, trans="T", check_finite=False)
    Li1 = sp.block_diag(list(Li), format="csr") if k1 > 1 else sp.diags(Li[:, 0, 0])
    Q = -(L22i @ (fac.L21 @ Li1).toarray())  # (q2, q1): lower-left block of L^-1
    idx = np.arange(L1)[:, None] * k1 + np.arange(k1)[None, :]
    QtQ = np.einsum("ila,ilb->lab", Q[:, idx], Q[:, idx])
    blocks = [out1 + QtQ]
    M22i = L22i.T @ L22i
    for pos in range(1, len(stats.ks)):
        s, e = stats.col_start[pos] - q1, stats.col_start[pos + 1] - q1
        k, L = stats.ks[pos], stats.nlev[pos]
        idx = s + np.arange(L)[:, None] * k + np.arange(k)[None, :]
        blocks.append(M22i[idx[:, :, None], idx[:, None, :]])
    return blocks


# ----------------------------------------------------------------------------- gradient
def _term_sums(stats, v):
    """Sum of ``v`` (length q) within each term, internal order."""
    return np.array([v[stats.col_start[i] : stats.col_start[i + 1]].sum() for i in range(len(stats.ks))])


def deviance_and_gradient(stats: SufficientStats, theta, reml: bool, col: int = 0):
    """Profiled deviance and its exact gradient in ``theta`` (scalar terms only).

    With ``theta_j`` scaling the columns of term ``j`` and ``H`` the full
    ``(q + p)`` matrix of the blocked factorisation,
    ``d log|H| / d theta_j = 2 (q_j - tr_j(H^-1)_uu) / theta_j`` (``H^-1_uu = M^-1`` for ML,
    ``M^-1 + V V'`` with ``V = L^-T RZX RX^-1`` for REML), and by the envelope theorem
    ``d r2 / d theta_j = -2 sum_{i in j} (Z'W e)_i u_i`` with ``e`` the residual.
    """
    sol = solve(stats, theta, cols=[col])
    dev = float(deviance_from(stats, sol, reml)[0])
    fac = sol.factor
    q1 = stats.q1
    m11 = fac.L11[:, 0, 0] ** 2
    diag_minv = np.empty(stats.q)
    diag_minv[:q1] = 1.0 / m11
    if stats.q2:
        # triangles only: sum(S^-1 * K2) = 2 sum(lower) - sum(diag); dpotri leaves the upper
        # triangle of S^-1 (Fortran order, zeros below), K2 is the lower triangle (C order)
        Sinv = scipy.linalg.lapack.dpotri(fac.U22, lower=0, overwrite_c=0)[0]
        t1 = float(fac.Ts[0][0, 0])
        lam2 = np.concatenate([np.full(stats.nlev[i], float(fac.Ts[i][0, 0])) for i in range(1, len(fac.Ts))])
        K2 = stats.schur_product(t1 * t1 / m11**2)
        K2 *= lam2[:, None]
        K2 *= lam2[None, :]
        dS = np.diag(Sinv)
        first_extra = 2.0 * float(np.einsum("ij,ij->", Sinv.T, K2)) - float(dS @ np.diag(K2))
        stats._last = (sol, Sinv)  # the final fit reuses both (see solution_at)
        diag_minv[q1:] = dS
    else:
        first_extra = 0.0
    tr = _term_sums(stats, diag_minv)
    tr[0] += first_extra
    if reml:
        V = sol.factor.solve_Lt(stats, scipy.linalg.solve_triangular(sol.RX, sol.RZX.T, trans="T").T)
        tr += _term_sums(stats, np.sum(V**2, axis=1))
    u, b = spherical_modes(stats, sol)
    u, b = u[:, 0], b[:, 0]
    Cb = np.empty(stats.q)
    Cb[:q1] = stats.C11[:, 0, 0] * b[:q1]
    if stats.q2:
        Cb[:q1] += stats.C21.T @ b[q1:]
        Cb[q1:] = stats.C21 @ b[:q1] + stats.C22 @ b[q1:]
    zte = stats.ZtY[:, col] - stats.ZtX @ sol.beta[:, 0] - Cb
    dr2 = -2.0 * _term_sums(stats, zte * u)
    nn = stats.n - stats.p if reml else stats.n
    th = np.array([float(T[0, 0]) for T in fac.Ts])
    qj = np.array(stats.nlev, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        g_logdet = np.where(th != 0, 2.0 * (qj - tr) / th, 0.0)
    g_int = g_logdet + nn / sol.r2[0] * dr2
    grad = np.empty_like(g_int)
    grad[np.asarray(stats.order)] = g_int  # back to the design's theta order
    return dev, grad


def _cb(stats, b):
    """``C b`` (q,) in the internal order."""
    q1 = stats.q1
    Cb = np.empty(stats.q)
    Cb[:q1] = np.einsum("lab,lb->la", stats.C11, b[:q1].reshape(stats.L1, stats.k1)).reshape(-1)
    if stats.q2:
        Cb[:q1] += stats.C21.T @ b[q1:]
        Cb[q1:] = stats.C21 @ b[:q1] + stats.C22 @ b[q1:]
    return Cb


def deviance_and_gradient_blocks(stats: SufficientStats, theta, reml: bool, col: int = 0):
    """Profiled deviance and exact gradient for any terms, ``T`` of every term invertible.

    With ``D = diag(Lambda, I)``, ``H = D' K D + diag(I, 0)`` and ``dLambda = E_m`` (entry
    ``(r, c)`` of ``T_j`` on every level), ``d log|H| = 2 tr(H^-1 [Lambda'C; X'WZ] E_m)`` and
    ``H^-1 [Lambda'C; X'WZ] Lambda = [I; 0] - H^-1[:, u]``, so only the diagonal blocks of
    ``H^-1_uu`` are needed: ``d log|H| / d theta_m = 2 sum_l ((I - H^-1_uu[l]) T_j^-1)[c, r]``.
    The envelope theorem gives ``d r2 / d theta_m = -2 sum_l (Z'W e)_(l, r) u_(l, c)``.
    """
    sol = solve(stats, theta, cols=[col])
    dev = float(deviance_from(stats, sol, reml)[0])
    fac = sol.factor
    blocks = cond_var_blocks(stats, fac)
    if reml:
        V = fac.solve_Lt(stats, scipy.linalg.solve_triangular(sol.RX, sol.RZX.T, trans="T").T)
    u, b = spherical_modes(stats, sol)
    u, b = u[:, 0], b[:, 0]
    zte = stats.ZtY[:, col] - stats.ZtX @ sol.beta[:, 0] - _cb(stats, b)
    nn = stats.n - stats.p if reml else stats.n
    design = stats.design
    grad = np.zeros(design.n_theta)
    per_term = {}
    for pos, j in enumerate(stats.order):
        s, e = stats.col_start[pos], stats.col_start[pos + 1]
        k, L = stats.ks[pos], stats.nlev[pos]
        Huu = blocks[pos]
        if reml:
            Vl = V[s:e].reshape(L, k, -1)
            Huu = Huu + np.einsum("lap,lbp->lab", Vl, Vl)
        Tinv = np.linalg.inv(fac.Ts[pos])
        B = np.einsum("lab,bc->ac", np.eye(k)[None] - Huu, Tinv)  # sum over levels
        R = zte[s:e].reshape(L, k).T @ u[s:e].reshape(L, k)  # [r, c] = sum_l zte_(l,r) u_(l,c)
        per_term[j] = (B, R)
    for m, (j, r, c) in enumerate(design.theta_index):
        B, R = per_term[j]
        grad[m] = 2.0 * B[c, r] - 2.0 * nn / sol.r2[0] * R[r, c]
    return dev, grad


class _Stagnation(Exception):
    """Raised inside the objective to end a line search that only meets rounding noise."""


def optimize_theta(stats, reml, col=0, theta0=None, max_iter=500, tol=1e-12):
    """Minimise the profiled deviance over theta (L-BFGS-B with bounds theta_jj >= 0).

    Returns theta, deviance, number of iterations, evaluations, converged, message.
    """
    design = stats.design
    x0 = design.theta0.copy() if theta0 is None else np.asarray(theta0, dtype=float).copy()
    bounds = [(0.0, None) if np.isfinite(lo) else (None, None) for lo in design.theta_lower]
    n_eval = [0]

    def dev(th):
        n_eval[0] += 1
        try:
            return float(deviance_from(stats, solve(stats, th, cols=[col]), reml)[0])
        except np.linalg.LinAlgError:
            return np.inf

    diag_m = np.array([r == c for _, r, c in design.theta_index])

    if stats.scalar:
        def fg(th):
            n_eval[0] += 1
            return deviance_and_gradient(stats, th, reml, col)
    else:
        def fg(th):
            # exact gradient while every T is invertible; central differences on the boundary
            if np.all(np.abs(th[diag_m]) > 1e-6):
                n_eval[0] += 1
                try:
                    return deviance_and_gradient_blocks(stats, th, reml, col)
                except np.linalg.LinAlgError:
                    return np.inf, np.zeros_like(th)
            return dev(th), central_gradient(dev, th, rel=1e-6)

    def bounded(start):
        r = scipy.optimize.minimize(
            fg, start, jac=True, method="L-BFGS-B", bounds=bounds,
            options={"maxiter": max_iter, "ftol": tol, "gtol": 1e-8, "maxls": 50},
        )
        return r.x, float(r.fun), np.asarray(r.jac), bool(r.success), int(r.nit), str(r.message)

    if stats.scalar and np.all(x0 > 0):
        # scalar terms: BFGS on log(theta) (scale-free: fewer evaluations than a bounded
        # search from theta = 1); if a theta heads for zero, or BFGS stops on precision
        # loss, the bounded L-BFGS-B in theta finishes
        cache = {}
        best = {"f": np.inf, "stale": 0}

        def fg_log(phi):
            key = phi.tobytes()
            if key not in cache:  # the first point is evaluated twice otherwise
                th = np.exp(phi)
                f, g = fg(th)
                cache.clear()
                cache[key] = (f, g * th)
                # a line search at the optimum can thrash on rounding noise for dozens of
                # evaluations: stop once the deviance has not improved for several and the
                # gradient is at its rounding floor
                if f < best["f"] - 1e-13 * abs(best["f"]) or not np.isfinite(best["f"]):
                    best.update(f=f, x=phi.copy(), g=g * th, stale=0)
                else:
                    best["stale"] += 1
                    if best["stale"] >= 6 and np.max(np.abs(best["g"])) < 100 * gtol:
                        raise _Stagnation
            return cache[key]

        # the gradient's rounding noise grows with the size of the terms (~ n, |deviance|):
        # an absolute gtol below it ends in "precision loss" after wasted line searches
        gtol = np.inf
        f0 = fg_log(np.log(x0))[0]
        gtol = 1e-8 * max(float(stats.n), abs(f0)) if np.isfinite(f0) else 1e-6

        def stop_near_zero(intermediate_result):
            if np.any(intermediate_result.x < np.log(1e-4)):
                raise StopIteration

        try:
            pre = scipy.optimize.minimize(
                fg_log, np.log(x0), jac=True, method="BFGS", callback=stop_near_zero,
                options={"maxiter": max_iter, "gtol": gtol},
            )
            theta, nit = np.exp(pre.x), int(pre.nit)
            f, g, success, message = float(pre.fun), pre.jac / theta, bool(pre.success), str(pre.message)
            jac = pre.jac
        except _Stagnation:
            theta, nit = np.exp(best["x"]), n_eval[0]
            f, g, success, message = best["f"], best["g"] / theta, True, ""
            jac = best["g"]
        # "precision loss" with a gradient near its rounding floor is convergence
        if not success and np.all(np.isfinite(jac)) and np.max(np.abs(jac)) < 100 * gtol:
            success = True
        # near zero the log-scale gradient g * theta is small whatever g: finish bounded
        if not success or np.any(theta < 1e-2):
            theta, f, g, success, it, message = bounded(theta)
            nit += it
    else:
        theta, f, g, success, nit, message = bounded(x0)
    # theta_j = 0 is a stationary point of the profiled deviance (its gradient vanishes there
    # by symmetry), where a projected-gradient method can stop although the deviance falls
    # away from it: probe along each zero diagonal and restart from the best probe
    for _ in range(3):
        zero = [m for m, b in enumerate(bounds) if b[0] == 0.0 and theta[m] == 0.0]
        best = None
        for m in zero:
            for step in (0.05, 0.3, 1.0):
                trial = theta.copy()
                trial[m] = step
                ft = dev(trial)
                if ft < f - 1e-10 * max(1.0, abs(f)) and (best is None or ft < best[0]):
                    best = (ft, trial)
        if best is None:
            break
        theta, f, g, success, it, message = bounded(best[1])
        nit += it
    # the stopping rules are on f and the (projected) gradient; an ABNORMAL line search at
    # the optimum (deviance flat to rounding) is success when the gradient is small
    free = ~((theta <= 0) & np.array([b[0] == 0.0 for b in bounds]) & (g > 0))
    gmax = float(np.max(np.abs(g[free]))) if np.any(free) else 0.0
    converged = bool(success or gmax < 1e-4 * max(1.0, abs(f)) ** 0.5)
    message = "" if converged else f"{message} (|gradient| {gmax:.2g})"
    return theta, f, nit, n_eval[0], converged, message
