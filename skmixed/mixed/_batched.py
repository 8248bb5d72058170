"""Laplace fits of many Poisson GLMMs at once: one per column of a count matrix.

All genes share the fixed-effects design ``X``, the offset and one scalar
random-effects term (a random intercept, ``z = 1``, or a single random slope);
each gene has its own ``(theta, beta)``. With one scalar term the Hessian ``M`` of
the penalised log-likelihood in ``u`` is diagonal, so PIRLS, the Laplace deviance
and its exact gradient (the formulas of :mod:`skmixed.mixed._laplace` specialised
to ``k = 1``) are elementwise operations and segment sums over levels, vectorised
across genes: arrays are ``(G, n)`` and ``(G, L)``. The outer optimisation is a
Newton iteration per gene, batched, with the same approximate Hessian and
stopping rule as the single-gene optimiser, so each gene's answer is that of
:class:`~skmixed.PoissonGLMM` fitted to it alone.

Array namespace: numpy here; every operation goes through ``xp`` so that CuPy
arrays run the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._backend import get_namespace, sparse_csr, to_host


@dataclass
class BatchResult:
    theta: np.ndarray  # (G,)
    beta: np.ndarray  # (G, p)
    cov: np.ndarray  # (G, p, p) covariance of beta
    deviance: np.ndarray  # (G,) Laplace deviance (without the collapse constants)
    u: np.ndarray  # (G, L)
    M: np.ndarray  # (G, L) diagonal of M at the mode
    n_iter: int
    converged: np.ndarray  # (G,) bool


class BatchedScalarLaplace:
    """Laplace deviance of ``G`` Poisson GLMMs with one scalar random-effects term.

    Parameters
    ----------
    X : (n, p) shared fixed-effects design
    Y : (G, n) counts, one row per gene
    codes : (n,) level of each row, 0..L-1
    z : (n,) covariate of the random term (ones for a random intercept)
    offset, weights : (n,) shared
    """

    def __init__(self, X, Y, codes, n_levels, z, offset, weights, family):
        self.xp = xp = get_namespace(Y)
        self.X, self.Y, self.codes, self.L = X, Y, codes, int(n_levels)
        self.z, self.off, self.w, self.fam = z, offset, weights, family
        self.G, self.n = Y.shape
        self.p = X.shape[1]
        self.log_norm = xp.sum(family.log_normaliser(Y, weights[None, :]), axis=1)
        # segment sums over levels as a product with the (n, L) indicator matrix, and
        # the products with X that the gradient and the Schur complement need, as
        # sparse (n, L p) and (n, p p) matrices: W[i, l p + j] = [l_i = l] X_ij and
        # Q[i, j p + k] = X_ij X_ik, so that weighted sums are one matrix product
        self.S = xp.zeros((self.n, self.L))
        self.S[xp.arange(self.n), codes] = 1.0
        p = self.p
        Xh, ch = to_host(X), to_host(codes)
        rows = np.repeat(np.arange(self.n), p)
        self.W = sparse_csr(Xh.ravel(), rows, (ch[:, None] * p + np.arange(p)).ravel(), (self.n, self.L * p), xp)
        XX = (Xh[:, :, None] * Xh[:, None, :]).reshape(self.n, p * p)
        nz = np.nonzero(XX)
        self.Q = sparse_csr(XX[nz], nz[0], nz[1], (self.n, p * p), xp)

    def subset(self, rows) -> "BatchedScalarLaplace":
        """The same problem for the genes ``rows`` only (shares the design)."""
        sub = object.__new__(BatchedScalarLaplace)
        sub.__dict__.update(self.__dict__)
        sub.Y, sub.log_norm, sub.G = self.Y[rows], self.log_norm[rows], int(rows.size)
        return sub

    def seg(self, x):
        """Sum over the rows of each level: (G, n) -> (G, L), or (G, n, p) -> (G, L, p)."""
        if x.ndim == 2:
            return x @ self.S
        return self.xp.swapaxes(self.xp.swapaxes(x, 1, 2) @ self.S, 1, 2)

    def seg_X(self, x):
        """``sum_{i in l} x_gi X_ij`` for every gene, level and column: (G, n) -> (G, L, p)."""
        return (self.W.T @ x.T).T.reshape(x.shape[0], self.L, self.p)

    def _loglik(self, eta):
        return self.xp.sum(self.fam.loglik_kernel(self.Y, eta, self.w[None, :]), axis=1) + self.log_norm

    # -- PIRLS, all genes at once ------------------------------------------------
    def mode(self, theta, beta, u, max_iter=50):
        xp, fam = self.xp, self.fam
        a = theta[:, None] * self.z[None, :]
        fixed = beta @ self.X.T + self.off[None, :]
        eta = fixed + a * u[:, self.codes]
        obj = self._loglik(eta) - 0.5 * xp.sum(u * u, axis=1)
        active = xp.ones(self.G, dtype=bool)
        for _ in range(max_iter):
            mu = fam.mean(eta)
            grad = self.seg(a * fam.score(self.Y, mu, self.w[None, :])) - u
            M = 1.0 + self.seg(a * a * fam.information(mu, self.w[None, :]))
            step = grad / M
            dec = xp.sum(grad * step, axis=1)
            final = active & (dec < 1e-10 * (1.0 + xp.abs(obj)))
            # genes in the quadratic region take one last full step and stop
            u = xp.where(final[:, None], u + step, u)
            active = active & ~final
            if not bool(xp.any(active)):
                break
            t = xp.ones(self.G)
            with np.errstate(over="ignore"):
                for _ in range(40):
                    u_new = u + (t * active)[:, None] * step
                    eta_new = fixed + a * u_new[:, self.codes]
                    obj_new = self._loglik(eta_new) - 0.5 * xp.sum(u_new * u_new, axis=1)
                    ok = ~active | (obj_new >= obj - 1e-13 * xp.abs(obj))
                    if bool(xp.all(ok)):
                        break
                    t = xp.where(ok, t, 0.5 * t)
            u = xp.where(active[:, None], u_new, u)
            obj = xp.where(active, obj_new, obj)
            eta = fixed + a * u[:, self.codes]
        eta = fixed + a * u[:, self.codes]
        mu = fam.mean(eta)
        M = 1.0 + self.seg(a * a * fam.information(mu, self.w[None, :]))
        return u, eta, mu, M

    # -- deviance and exact gradient ------------------------------------------------
    def evaluate(self, theta, beta, u):
        """Laplace deviance (G,), gradient (G, 1 + p), the state at the mode and the
        derivative of the mode with respect to the parameters."""
        xp, fam = self.xp, self.fam
        u, eta, mu, M = self.mode(theta, beta, u)
        w = self.w[None, :]
        dev = -2.0 * self._loglik(eta) + xp.sum(u * u, axis=1) + xp.sum(xp.log(M), axis=1)
        r = fam.score(self.Y, mu, w)
        v = fam.information(mu, w)
        a = theta[:, None] * self.z[None, :]
        Mi = (1.0 / M)[:, self.codes]  # (G, n): 1 / M of each row's level
        hv = a * a * Mi * fam.information_deriv(mu, w)
        # theta: direct effect z u on eta, and on A through z
        E_t = self.z[None, :] * u[:, self.codes]
        du_t = (self.seg(self.z[None, :] * r) - self.seg(a * v * E_t)) / M
        deta_t = E_t + a * du_t[:, self.codes]
        g_t = -2.0 * xp.sum(r * E_t, axis=1) + 2.0 * xp.sum(v * a * self.z[None, :] * Mi, axis=1)
        g_t = g_t + xp.sum(hv * deta_t, axis=1)
        # beta: direct effect X on eta; deta = X + a du[level], so that
        # sum_i hv_i deta_i = hv X + sum_l (sum_{i in l} hv_i a_i) du_l
        du_b = -self.seg_X(a * v) / M[:, :, None]  # (G, L, p)
        g_b = (hv - 2.0 * r) @ self.X + (self.seg(hv * a)[:, None, :] @ du_b)[:, 0, :]
        grad = xp.concatenate([g_t[:, None], g_b], axis=1)
        # dû/dparams (G, L, 1 + p): predicts the mode at nearby parameters
        du = xp.concatenate([du_t[:, :, None], du_b], axis=2)
        return dev, grad, (u, mu, M, a), du

    def schur(self, mu, M, a):
        """``X'VX - X'VA M^-1 A'VX`` per gene: (G, p, p), the conditional information."""
        xp = self.xp
        v = self.fam.information(mu, self.w[None, :])
        XtVX = (self.Q.T @ v.T).T.reshape(-1, self.p, self.p)
        AVX = self.seg_X(a * v)  # (G, L, p)
        return XtVX - xp.swapaxes(AVX / M[:, :, None], 1, 2) @ AVX

    def _grad_columns(self, params, u, du, h_rel, cols):
        """Central differences of the gradient along the parameters in ``cols``; PIRLS
        starts from the mode predicted to first order (``u +- h du``)."""
        xp = self.xp
        P = params.shape[1]
        H = xp.zeros((self.G, P, len(cols)))
        for j, c in enumerate(cols):
            h = h_rel * xp.maximum(1.0, xp.abs(params[:, c]))
            e = xp.zeros_like(params)
            e[:, c] = h
            shift = h[:, None] * du[:, :, c]
            gp = self.evaluate(params[:, 0] + e[:, 0], params[:, 1:] + e[:, 1:], u + shift)[1]
            gm = self.evaluate(params[:, 0] - e[:, 0], params[:, 1:] - e[:, 1:], u - shift)[1]
            H[:, :, j] = (gp - gm) / (2.0 * h[:, None])
        return H

    # -- outer optimisation, all genes at once ---------------------------------------
    def _newton_step(self, params, g, u, du, mu, M, a, f):
        """Projected Newton step per gene and its decrement (same rule as the
        single-gene optimiser; |eigenvalues| where theta's curvature is negative)."""
        xp = self.xp
        P = params.shape[1]
        H = xp.empty((self.G, P, P))
        Ht = self._grad_columns(params, u, du, 1e-5, [0])[:, :, 0]
        H[:, :, 0] = Ht
        H[:, 0, 1:] = Ht[:, 1:]
        H[:, 1:, 1:] = 2.0 * self.schur(mu, M, a)
        # theta on its bound with an outward gradient stays there
        fixed_t = (params[:, 0] <= 1e-12) & (g[:, 0] > 0)
        H[fixed_t, 0, 1:] = 0.0
        H[fixed_t, 1:, 0] = 0.0
        H[fixed_t, 0, 0] = 1.0
        gg = xp.where(fixed_t[:, None] & (xp.arange(P) == 0)[None, :], 0.0, g)
        lam, V = xp.linalg.eigh(0.5 * (H + xp.swapaxes(H, 1, 2)))
        lam = xp.maximum(xp.abs(lam), 1e-8 * xp.maximum(1.0, xp.max(xp.abs(lam), axis=1, keepdims=True)))
        step = -(V @ ((xp.swapaxes(V, 1, 2) @ gg[:, :, None]) / lam[:, :, None]))[:, :, 0]
        dec = -xp.sum(gg * step, axis=1)
        return step, dec < 1e-15 * xp.maximum(1.0, xp.abs(f))

    def fit(self, theta0, beta0, *, max_iter=200, hessian_cov=True):
        xp = self.xp
        params = xp.concatenate([xp.maximum(theta0, 0.0)[:, None], beta0], axis=1)
        P = params.shape[1]
        f, g, (u, mu, M, a), du = self.evaluate(params[:, 0], params[:, 1:], xp.zeros((self.G, self.L)))
        done = xp.zeros(self.G, dtype=bool)
        it = 0
        for it in range(1, max_iter + 1):
            act = xp.flatnonzero(~done)
            if act.size == 0:
                break
            eng = self if act.size == self.G else self.subset(act)
            pa, fa, ga, ua = params[act], f[act], g[act], u[act]
            step, small = eng._newton_step(pa, ga, ua, du[act], mu[act], M[act], a[act], fa)
            t = xp.where(small, 0.0, 1.0)
            for _ in range(40):
                trial = pa + t[:, None] * step
                trial[:, 0] = xp.maximum(trial[:, 0], 0.0)
                f_new, g_new, st_new, du_new = eng.evaluate(trial[:, 0], trial[:, 1:], ua)
                ok = small | (f_new <= fa + 1e-4 * t * xp.sum(ga * (trial - pa), axis=1) + 1e-13 * xp.abs(fa))
                if bool(xp.all(ok)):
                    break
                t = xp.where(ok, t, 0.5 * t)
            # no descent along the Newton direction: at round-off, stop there
            done[act] = small | ~ok
            move = ok & ~small
            rows = act[move]
            params[rows], f[rows], g[rows] = trial[move], f_new[move], g_new[move]
            u[rows], mu[rows], M[rows], a[rows] = (x[move] for x in st_new)
            du[rows] = du_new[move]
        is_t = (xp.arange(P) == 0)[None, :]
        free_g = xp.where(((params[:, 0] <= 1e-12) & (g[:, 0] > 0))[:, None] & is_t, 0.0, g)
        converged = done & (xp.max(xp.abs(free_g), axis=1) < 1e-2)
        f, g, (u, mu, M, a), du = self.evaluate(params[:, 0], params[:, 1:], u)
        if hessian_cov:
            H = self._grad_columns(params, u, du, 1e-4, list(range(P)))
            H = 0.5 * (H + xp.swapaxes(H, 1, 2))
            cov = 2.0 * xp.linalg.inv(H)[:, 1:, 1:]
        else:
            cov = xp.linalg.inv(self.schur(mu, M, a))
        return BatchResult(params[:, 0], params[:, 1:], cov, f, u, M, it, converged)
