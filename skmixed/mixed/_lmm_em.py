"""EM and MacKay's recipe for the variance components of a linear mixed model.

Both iterate on ``(Sigma_j, sigma^2)`` (``Sigma_j`` the covariance of the random effects
of term ``j``, ``sigma^2`` the residual variance) around the same inner solve: the
conditional mean ``b_hat = E[b | y]`` and the fixed effects for the current variances
(the profiled solution of :mod:`._lmm_core`). They differ in the M-step.

EM (Dempster, Laird and Rubin 1977; Laird, Lange and Stram 1987) maximises the expected
complete-data log-likelihood, i.e. coordinate ascent on the ELBO with the exact
posterior of ``b`` (of ``(b, beta)`` under a flat prior on ``beta`` for REML):

    Sigma_j   <- mean_l ( b_hat_l b_hat_l' + Var(b_l | y) )
    sigma^2   <- ( |e|^2 + tr(Z'WZ Var(b | y)) ) / n

MacKay's recipe keeps only the first terms: the variance of the predictions and the
mean squared residual. By the law of total variance,
``Var(b) = E[Var(b | y)] + Var(E[b | y])``, the recipe leaves out ``E[Var(b | y)]`` and
its fixed point has variance components biased towards zero.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from . import _lmm_core as core


def _theta_from(Sigmas, sigma2, design):
    """theta (design order) of the relative covariance factors ``chol(Sigma_j / sigma^2)``."""
    theta = np.empty(design.n_theta)
    for m, (j, r, c) in enumerate(design.theta_index):
        theta[m] = 0.0
    for j, S in enumerate(Sigmas):
        T = np.linalg.cholesky(S / sigma2 + 1e-300 * np.eye(S.shape[0]))
        for m, (jj, r, c) in enumerate(design.theta_index):
            if jj == j:
                theta[m] = T[r, c]
    return theta


def _residual_ss(stats, beta, b, g):
    """``|y - X beta - Z b|_W^2`` from the cross-products (internal column order)."""
    Cb = core._cb(stats, b)
    return float(
        stats.yty[g] - 2 * stats.XtY[:, g] @ beta - 2 * stats.ZtY[:, g] @ b
        + beta @ stats.XtX @ beta + 2 * beta @ (stats.ZtX.T @ b) + b @ Cb
    )


def fit_em(stats, g, *, reml, mackay=False, covariance="diagonal", max_iter=1000, tol=1e-10,
           theta0=None):
    """EM (or MacKay) iterations for response ``g``; returns a dict with theta, sigma2, trace."""
    design = stats.design
    n, p = stats.n, stats.p
    # start: theta = 1 (lme4's start), sigma^2 from the profiled solution there
    theta = design.theta0.copy() if theta0 is None else np.asarray(theta0, float).copy()
    sol = core.solve(stats, theta, cols=[g])
    sigma2 = float(sol.r2[0] / n)
    Ts = design.T_blocks(theta)
    Sigmas = [sigma2 * T @ T.T for T in Ts]
    trace = []
    converged, collapsed, message = False, False, ""
    it = 0
    for it in range(1, max_iter + 1):
        sol = core.solve(stats, theta, cols=[g])
        u, b = core.spherical_modes(stats, sol)
        beta = sol.beta[:, 0]
        e2 = _residual_ss(stats, beta, b[:, 0], g)
        if mackay:
            new_sigma2 = e2 / n
        else:
            # diagonal blocks of H^-1_uu (= M^-1, plus V V' for REML with V = L^-T RZX RX^-1),
            # per term and level: all EM needs, without forming a q x q inverse
            blocks = core.cond_var_blocks(stats, sol.factor)
            if reml:
                V = sol.factor.solve_Lt(stats, scipy.linalg.solve_triangular(sol.RX, sol.RZX.T, trans="T").T)
            tr_huu = 0.0
            for pos in range(len(blocks)):
                s, e_ = stats.col_start[pos], stats.col_start[pos + 1]
                k, L = stats.ks[pos], stats.nlev[pos]
                if reml:
                    Vl = V[s:e_].reshape(L, k, -1)
                    blocks[pos] = blocks[pos] + np.einsum("lap,lbp->lab", Vl, Vl)
                tr_huu += float(np.einsum("laa->", blocks[pos]))
            new_sigma2 = (e2 + sigma2 * (stats.q + (p if reml else 0) - tr_huu)) / n
        new_Sigmas = [None] * len(Sigmas)
        for pos, j in enumerate(stats.order):
            s, e_ = stats.col_start[pos], stats.col_start[pos + 1]
            k, L = stats.ks[pos], stats.nlev[pos]
            bl = b[s:e_, 0].reshape(L, k)
            S = bl.T @ bl / L
            if not mackay:
                # mean over levels of Var(b_l | y) = sigma^2 T H^-1_uu[l] T'
                T = sol.factor.Ts[pos]
                S = S + sigma2 * T @ blocks[pos].mean(axis=0) @ T.T
            if mackay and covariance == "diagonal":
                S = np.diag(np.diag(S))
            new_Sigmas[j] = S
        change = max(
            abs(new_sigma2 - sigma2) / max(sigma2, 1e-300),
            max(np.max(np.abs(Sn - So)) / max(np.max(np.abs(So)), 1e-300) for Sn, So in zip(new_Sigmas, Sigmas)),
        )
        Sigmas, sigma2 = new_Sigmas, new_sigma2
        trace.append((sigma2, [S.copy() for S in Sigmas]))
        try:
            theta = _theta_from(Sigmas, sigma2, design)
        except np.linalg.LinAlgError:
            collapsed = True
        if not collapsed and mackay and covariance == "full":
            for S in Sigmas:
                ev = np.linalg.eigvalsh(S)
                if ev[0] <= 1e-8 * max(ev[-1], 1e-300):
                    collapsed = True
        if collapsed:
            message = (f"MacKay's recipe with a full covariance collapsed at iteration {it}: the "
                       "covariance of the predicted effects became singular (correlation +-1)")
            break
        if change < tol:
            converged = True
            break
    if not converged and not collapsed:
        message = f"{'MacKay' if mackay else 'EM'} did not converge in {max_iter} iterations (relative change {change:.2g})"
    return {"theta": theta, "sigma2": sigma2, "n_iter": it, "converged": converged,
            "collapsed": collapsed, "message": message, "Sigmas": Sigmas, "trace": trace}
