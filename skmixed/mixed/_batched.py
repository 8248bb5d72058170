"""Laplace fits of many random-intercept Poisson GLMMs at once: one per gene.

All genes share the fixed-effects design ``X``, the offsets and one grouping
factor with a random intercept; each gene has its own ``(theta, beta)``.

For this model the data enter the likelihood only through sufficient statistics.
With ``eta_i = x_i' beta + o_i + theta u_l(i)``, the rate of row ``i`` is
``e_k(i) c_i exp(theta u_l)`` where ``e_k = exp(x_k' beta)`` depends only on the
distinct row ``k`` of ``X`` and ``c_i = w_i exp(o_i)`` only on the row. So

* the counts enter through ``X'y`` (per gene, ``p`` numbers) and their sums per
  level ``y_l``;
* the rates enter through ``C[l, k] = sum of c_i over the rows of level l whose X
  row is k``, shared by every gene.

PIRLS is then ``L`` independent one-dimensional Newton problems per gene, and the
Laplace deviance and its exact gradient (the formulas of
:mod:`skmixed.mixed._laplace` specialised to a scalar term) cost
``O(K L p)`` per gene instead of ``O(n)``, with ``K`` distinct rows of ``X`` (the
cell groups). The outer optimisation is a Newton iteration per gene, batched,
with the same approximate Hessian, reflection at theta = 0 and stopping rule as
the single-gene optimiser, so each gene's answer is that of :class:`~skmixed.PoissonGLMM`
fitted to it alone. (Exact: the full-data fit is the same function of these
statistics.)

Array namespace: every operation goes through ``xp`` so that CuPy arrays run the
same code.
"""

from __future__ import annotations

import numpy as np

from .._backend import get_namespace, safe_exp, sparse_csr, to_device
from ._batched_reml import BatchResult, ScalarRemlMixin, _alloc_like, _scatter
from ._design import distinct_rows
from ._laplace import abs_eigen_step


class LevelDesign:
    """The gene-independent part: distinct rows of ``X`` and the rate weights ``C``.

    Parameters
    ----------
    X : (n, p) host array; codes : (n,) level of each row, 0..L-1;
    offset, weights : (n,) host arrays; xp : namespace to hold the tables in.
    """

    def __init__(self, X, codes, n_levels, offset, weights, xp=np):
        self.xp, self.L = xp, int(n_levels)
        self.keys, self.first = keys, first = distinct_rows([X])
        Xd = X[first]
        self.K, self.p = Xd.shape
        # rates are exp(x_k' beta + shift) * C[l, k] with C scaled so it cannot overflow
        self.shift = float(np.max(offset)) if offset.size else 0.0
        c = weights * np.exp(offset - self.shift)
        lk = codes.astype(np.int64) * self.K + keys
        C = np.bincount(lk, weights=c, minlength=self.L * self.K)
        ll, kk = np.divmod(np.flatnonzero(C), self.K)
        cv = C[ll * self.K + kk]
        p, L, K = self.p, self.L, self.K
        self.Xd = to_device(Xd, xp)
        # s = e @ C' (G, L); T[g, l, j] = sum_k C[l, k] x_kj e_gk; nu_k = e_k sum_l C[l, k] ex_l
        self.CT = sparse_csr(cv, ll, kk, (L, K), xp)  # products (L, K) @ (K, G)
        self.C = sparse_csr(cv, kk, ll, (K, L), xp)  # products (K, L) @ (L, G)
        rows = np.repeat(ll * p, p) + np.tile(np.arange(p), ll.size)
        self.AT = sparse_csr((cv[:, None] * Xd[kk]).ravel(), rows, np.repeat(kk, p), (L * p, K), xp)
        self.XX = to_device((Xd[:, :, None] * Xd[:, None, :]).reshape(K, p * p), xp)

    def rates(self, beta):
        """``e`` (G, K), the level totals ``s`` (G, L) and ``T`` (G, L, p) at ``beta``."""
        e = safe_exp(beta @ self.Xd.T + self.shift)
        s = (self.CT @ e.T).T
        T = (self.AT @ e.T).T.reshape(e.shape[0], self.L, self.p)
        return e, s, T


class BatchedScalarLaplace(ScalarRemlMixin):
    """Laplace deviance of ``G`` random-intercept Poisson GLMMs sharing ``design``.

    Parameters
    ----------
    design : LevelDesign
    XtY : (G, p) ``X'y`` per gene (weighted); ylev : (G, L) counts per level (weighted)
    """

    def __init__(self, design, XtY, ylev):
        self.d, self.xp = design, get_namespace(XtY)
        self.XtY, self.ylev = XtY, ylev
        self.G, self.L, self.p = XtY.shape[0], design.L, design.p

    def subset(self, rows) -> "BatchedScalarLaplace":
        """The same problem for the genes ``rows`` only."""
        return BatchedScalarLaplace(self.d, self.XtY[rows], self.ylev[rows])

    def start_theta(self, beta):
        """A moment estimate of theta from a fit without random effects: the variance of
        the log ratios of observed to expected counts per level, less their Poisson
        noise (about 1 / count), floored at 0.1 (a cheap start; Newton does the rest)."""
        xp = self.xp
        s = self.d.rates(beta)[1]
        y = self.ylev
        lr = xp.log((y + 0.5) / (s + 0.5))
        excess = xp.var(lr, axis=1) - xp.mean(1.0 / (y + 0.5), axis=1)
        return xp.sqrt(xp.maximum(excess, 0.01))

    # -- PIRLS: one concave scalar problem per gene and level ---------------------------
    def mode(self, theta, s, u, max_iter=60):
        """Maximise ``theta y_l u - s_l exp(theta u) - u^2 / 2`` over every ``u_l``.

        Newton steps with halving where the objective would drop (an overshoot from
        the left of the root); converged elements take one last full step."""
        xp, t, y = self.xp, theta[:, None], self.ylev

        def objective(v):
            m = s * safe_exp(t * v)
            return t * y * v - m - 0.5 * v * v, m

        h, m = objective(u)
        for _ in range(max_iter):
            step = (t * (y - m) - u) / (1.0 + t * t * m)
            done = xp.abs(step) <= 1e-11 * (1.0 + xp.abs(u))
            if bool(xp.all(done)):
                u = u + step
                break
            lam = xp.ones_like(u)
            for _ in range(60):
                u_new = u + lam * step
                h_new, m_new = objective(u_new)
                ok = done | (h_new >= h - 1e-13 * xp.abs(h))
                if bool(xp.all(ok)):
                    break
                lam = xp.where(ok, lam, 0.5 * lam)
            u = xp.where(done, u + step, u_new)
            h, m = objective(u)
        ex = safe_exp(t * u)
        return u, ex, 1.0 + t * t * s * ex

    # -- deviance and exact gradient ------------------------------------------------
    def evaluate(self, theta, beta, u):
        """Laplace deviance (G,), gradient (G, 1 + p), the state at the mode and the
        derivative of the mode with respect to the parameters."""
        xp = self.xp
        e, s, T = self.d.rates(beta)
        u, ex, M = self.mode(theta, s, u)
        t = theta[:, None]
        m = s * ex  # expected count per level
        y = self.ylev
        dev = -2.0 * (xp.sum(beta * self.XtY, axis=1) + xp.sum(t * y * u - m, axis=1))
        dev = dev + xp.sum(u * u, axis=1) + xp.sum(xp.log(M), axis=1)
        # theta: d u / d theta from the mode equation, then d log M / d theta
        du_t = ((y - m) - t * m * u) / M
        g_t = -2.0 * xp.sum(u * (y - m), axis=1)
        g_t = g_t + xp.sum((2.0 * t * m + t * t * m * (u + t * du_t)) / M, axis=1)
        # beta: tX[l, j] = sum over level l of x_ij mu_i; d u_l / d beta_j = -theta tX / M
        tX = ex[:, :, None] * T
        g_b = -2.0 * (self.XtY - xp.sum(tX, axis=1)) + xp.sum((t * t / (M * M))[:, :, None] * tX, axis=1)
        grad = xp.concatenate([g_t[:, None], g_b], axis=1)
        # d u / d params (G, L, 1 + p): predicts the mode at nearby parameters
        du_b = -(t / M)[:, :, None] * tX
        du = xp.concatenate([du_t[:, :, None], du_b], axis=2)
        return dev, grad, (u, ex, M, e, T), du

    def schur(self, theta, state):
        """``X'VX - X'VA M^-1 A'VX`` per gene: (G, p, p), the conditional information."""
        xp = self.xp
        u, ex, M, e, T = state
        nu = e * (self.d.C @ ex.T).T  # expected count per distinct row of X
        XtVX = (nu @ self.d.XX).reshape(-1, self.p, self.p)
        AVX = theta[:, None, None] * ex[:, :, None] * T  # (G, L, p)
        return XtVX - xp.swapaxes(AVX / M[:, :, None], 1, 2) @ AVX

    # -- REML (glmmTMB's REML = TRUE; see LaplaceProblem.joint_mode) ----------------
    def _line_search(self, trial_at, evaluate, f0, decrease, small, t, n_halvings):
        """Backtracking for every gene at once: ``t`` is halved where the trial point
        ``trial_at(t)`` misses the Armijo condition ``f <= f0 + 1e-4 decrease(rows,
        trial)`` (or whose criterion is not finite); only those genes are evaluated again (``evaluate(rows, trial)``
        evaluates the genes ``rows`` at their trials, ``f`` first); genes marked
        ``small`` are not evaluated and accept any step. Returns the last trials, the
        evaluations (None if no gene was evaluated; rows of ``small`` genes unset) and
        the mask of genes that succeeded."""
        xp = self.xp
        ok, out = small.copy(), None
        pending = xp.flatnonzero(~small)
        trial = trial_at(t)
        for _ in range(n_halvings):
            if pending.size == 0:
                break
            tp = trial[pending]
            res = evaluate(pending, tp)
            if out is None:
                out = _alloc_like(res, t.shape[0], xp)
            f0p = f0[pending]
            good = xp.isfinite(res[0]) & (res[0] <= f0p + 1e-4 * decrease(pending, tp) + 1e-13 * xp.abs(f0p))
            hit = xp.flatnonzero(good)
            ok[pending[hit]] = True
            _scatter(out, pending[hit], res, hit)
            pending = pending[~good]
            t[pending] = 0.5 * t[pending]
            trial = trial_at(t)
        return trial, out, ok

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
    def _rounds(self, done, max_iter):
        """Iterations of a batched optimiser: the iteration number, the genes not
        ``done`` yet and the problem restricted to them; ends when none is left."""
        for it in range(1, max_iter + 1):
            act = self.xp.flatnonzero(~done)
            if act.size == 0:
                return
            yield it, act, (self if act.size == self.G else self.subset(act))

    def _newton_step(self, params, g, du, state, f):
        """Projected Newton step per gene and its decrement (same rule as the
        single-gene optimiser; |eigenvalues| where theta's curvature is negative)."""
        xp = self.xp
        P = params.shape[1]
        H = xp.empty((self.G, P, P))
        Ht = self._grad_columns(params, state[0], du, 1e-5, [0])[:, :, 0]
        H[:, :, 0] = Ht
        H[:, 0, 1:] = Ht[:, 1:]
        H[:, 1:, 1:] = 2.0 * self.schur(params[:, 0], state)
        # theta at 0 stays there where the deviance curves upwards along it; where it
        # curves downwards 0 is a saddle (the gradient vanishes by symmetry): leave it
        at_zero = params[:, 0] <= 1e-12
        escape = at_zero & (Ht[:, 0] < 0)
        fixed_t = at_zero & (g[:, 0] >= 0) & ~escape
        H[fixed_t, 0, 1:] = 0.0
        H[fixed_t, 1:, 0] = 0.0
        H[fixed_t, 0, 0] = 1.0
        gg = xp.where(fixed_t[:, None] & (xp.arange(P) == 0)[None, :], 0.0, g)
        step = _newton_direction(0.5 * (H + xp.swapaxes(H, 1, 2)), gg)
        step[:, 0] = xp.where(escape, 0.1, step[:, 0])  # the line search sizes it
        dec = -xp.sum(gg * step, axis=1)
        return step, (dec < 1e-15 * xp.maximum(1.0, xp.abs(f))) & ~escape

    def fit(self, theta0, beta0, *, max_iter=200, hessian_cov=True, reml=False):
        """Laplace fits of every gene (maximum likelihood), refined by
        :meth:`fit_reml` under ``reml``."""
        xp = self.xp
        params = xp.concatenate([xp.maximum(theta0, 0.0)[:, None], beta0], axis=1)
        P = params.shape[1]
        f, g, state, du = self.evaluate(params[:, 0], params[:, 1:], xp.zeros((self.G, self.L)))
        state = list(state)
        done = xp.zeros(self.G, dtype=bool)
        it = 0
        for it, act, eng in self._rounds(done, max_iter):
            pa, fa, ga = params[act], f[act], g[act]
            st = [x[act] for x in state]
            step, small = eng._newton_step(pa, ga, du[act], st, fa)
            # theta moves at most by 1 + its size at first; the line search does the rest
            t = xp.minimum(1.0, (1.0 + pa[:, 0]) / xp.maximum(xp.abs(step[:, 0]), 1e-300))
            t = xp.where(small, 0.0, t)

            def trial_at(t):
                trial = pa + t[:, None] * step  # noqa: B023
                trial[:, 0] = xp.abs(trial[:, 0])  # reflected: theta and -theta fit alike
                return trial

            trial, out, ok = eng._line_search(
                trial_at, lambda r, trial: eng.subset(r).evaluate(trial[:, 0], trial[:, 1:], st[0][r]),  # noqa: B023
                fa, lambda r, trial: xp.sum(ga[r] * (trial - pa[r]), axis=1), small, t, 60,  # noqa: B023
            )
            # no descent along the Newton direction: at round-off, stop there
            done[act] = small | ~ok
            move = ok & ~small
            if out is None:
                continue
            f_new, g_new, st_new, du_new = out
            rows = act[move]
            params[rows], f[rows], g[rows], du[rows] = trial[move], f_new[move], g_new[move], du_new[move]
            for x, x_new in zip(state, st_new):
                x[rows] = x_new[move]
        is_t = (xp.arange(P) == 0)[None, :]
        free_g = xp.where(((params[:, 0] <= 1e-12) & (g[:, 0] >= 0))[:, None] & is_t, 0.0, g)
        converged = done & (xp.max(xp.abs(free_g), axis=1) < 1e-2)
        u, M = state[0], state[2]
        if reml:
            res = self.fit_reml(params[:, 0], params[:, 1:], u, curvature=self._profiled_curvature(params, state, du),
                                hessian_cov=hessian_cov)
            res.converged = res.converged & converged
            res.n_iter += it
            return res
        if hessian_cov:
            H = self._grad_columns(params, u, du, 1e-4, list(range(P)))
            H = 0.5 * (H + xp.swapaxes(H, 1, 2))
            cov = 2.0 * xp.linalg.inv(H)[:, 1:, 1:]
        else:
            cov = xp.linalg.inv(self.schur(params[:, 0], state))
        return BatchResult(params[:, 0], params[:, 1:], cov, f, u, M, it, converged)


def _newton_direction(H, g):
    """``-H^-1 g`` per gene where ``H`` is positive definite; elsewhere the step of the
    modified Hessian with |eigenvalues| (floored at 1e-8 of the largest).

    The beta block of ``H`` (twice the conditional information) is positive definite,
    so ``H`` is iff the Schur complement of that block in theta's curvature is positive:
    a batched solve decides, and only the other genes need an eigendecomposition."""
    xp = get_namespace(H)
    Hbb, hb, gt = H[:, 1:, 1:], H[:, 1:, :1], g[:, :1]
    rhs = xp.concatenate([hb, g[:, 1:, None]], axis=2)
    try:
        sol = xp.linalg.solve(Hbb, rhs)
    except np.linalg.LinAlgError:  # a singular beta block somewhere: decide gene by gene below
        sol = xp.full(rhs.shape, xp.nan)
    hbb_inv_hb, hbb_inv_gb = sol[:, :, 0], sol[:, :, 1]
    schur = H[:, 0, 0] - xp.sum(hb[:, :, 0] * hbb_inv_hb, axis=1)
    scale = xp.maximum(1.0, xp.max(xp.abs(H), axis=(1, 2)))
    pd = xp.isfinite(schur) & (schur > 1e-8 * scale) & xp.all(xp.isfinite(sol), axis=(1, 2))
    safe = xp.where(pd, schur, 1.0)
    step_t = -(gt[:, 0] - xp.sum(hb[:, :, 0] * hbb_inv_gb, axis=1)) / safe
    step_b = -(hbb_inv_gb + hbb_inv_hb * step_t[:, None])
    step = xp.concatenate([step_t[:, None], step_b], axis=1)
    bad = xp.flatnonzero(~pd)
    if bad.size:
        step[bad] = abs_eigen_step(H[bad], g[bad])
    return step
