"""REML for the many-gene NB GLMM (glmmTMB's ``REML = TRUE``, gene by gene).

At given ``(theta, phi)`` the fixed effects are integrated out with the random
effects (flat prior): the Laplace approximation is taken at the joint mode
``(u~, beta~)`` of the penalised deviance, and the log-determinant of the joint
Hessian is ``log det M + log det S``, ``S`` the Schur complement of beta (the
conditional information). The criterion is minimised over each gene's ``(theta, phi)``
by a batched Newton iteration on differences, from the ML fit; ``beta~`` follows.
This is :meth:`~skmixed.mixed._nbglmm.NBLaplaceProblem.optimise_reml` for one
response, and :meth:`~skmixed.mixed._batched.BatchedScalarLaplace.fit_reml` with the
size as a second parameter; it corrects the downward bias of the ML patient variance
with few patients, as REML does for linear mixed models.
"""

from __future__ import annotations

import numpy as np

from ._batched import BatchedScalarLaplace
from ._laplace import abs_eigen_step


def backtrack(eng, x, step, t, f0, g0, small, project, evaluate, n_halvings):
    """Backtracking for every gene at once: ``t`` is halved for the genes whose trial
    ``project(x + t step)`` misses the Armijo condition; genes marked ``small`` are
    not moved. ``evaluate(sub, trial, rows)`` evaluates the problem ``sub`` restricted
    to ``rows`` at ``trial`` and returns a tuple of per-gene arrays, the criterion
    first. Returns the accepted trials, those arrays there, and the mask of genes
    that found a step (``small`` ones included)."""
    G = x.shape[0]
    trial, outs, ok = x.copy(), None, small.copy()
    pending = np.flatnonzero(~small)
    for _ in range(n_halvings):
        if pending.size == 0:
            break
        sub = eng if pending.size == G else eng.subset(pending)
        tp = project(x[pending] + t[pending, None] * step[pending])
        with np.errstate(over="ignore", invalid="ignore"):
            res = evaluate(sub, tp, pending)
        if outs is None:
            outs = [np.zeros((G, *r.shape[1:])) for r in res]
        fn = res[0]
        armijo = f0[pending] + 1e-4 * np.sum(g0[pending] * (tp - x[pending]), axis=1)
        good = np.isfinite(fn) & (fn <= armijo + 1e-13 * np.abs(f0[pending]))
        hit = pending[good]
        trial[hit], ok[hit] = tp[good], True
        for o, r in zip(outs, res):
            o[hit] = r[good]
        pending = pending[~good]
        t[pending] *= 0.5
    return trial, outs, ok


def _project_reml(x):
    """theta reflected (theta and -theta fit alike); phi below 1e-10 is the Poisson
    boundary itself."""
    return np.stack([np.abs(x[:, 0]), np.where(x[:, 1] < 1e-10, 0.0, x[:, 1])], axis=1)


class NBRemlMixin:
    """The REML criterion and its optimisation, for
    :class:`~skmixed.mixed._nb_multigene.BatchedNBLaplace` (which provides ``mode``,
    ``_pair_sums``, ``_c``, ``_level``, ``subset``, ``d`` and ``nz``)."""

    xp = np  # for the helpers borrowed from the Poisson engine
    _masked_schur = BatchedScalarLaplace._masked_schur
    frozen = BatchedScalarLaplace.frozen
    _rounds = BatchedScalarLaplace._rounds

    @property
    def XtY(self):
        nz = self.nz
        ypair = np.bincount(nz.gene * self.d.P + nz.pair, weights=nz.w * nz.y, minlength=self.G * self.d.P)
        return ypair.reshape(self.G, self.d.P) @ self.d.Xp

    def joint_mode(self, theta, phi, beta, u, max_iter=30):
        """Per gene, the joint mode ``beta~`` of the penalised deviance at ``(theta, phi)``
        by Newton steps on beta with the Schur complement (at most one unit on the log
        scale each); returns ``beta~``, the mode ``u`` and the state there."""
        beta, u = beta.copy(), u.copy()
        fz = self.frozen()
        act = np.arange(self.G)
        for _ in range(max_iter):
            eng = self if act.size == self.G else self.subset(act)
            th, ph, b = theta[act], phi[act], beta[act]
            ua = eng.mode(th, b, ph, u[act])
            u[act] = ua
            ps = eng._pair_sums(eng._c(th, b, ph, ua), ph, False)
            S = self._masked_schur(eng._schur(th, ua, ps), fz[act])
            score = np.where(fz[act], 0.0, ps["s"] @ self.d.Xp)
            step = np.linalg.solve(S, score[:, :, None])[:, :, 0]
            big = np.max(np.abs(step), axis=1)
            moving = (np.sum(score * step, axis=1) > 1e-20) & (big > 1e-13 * (1.0 + np.max(np.abs(b), axis=1)))
            if not moving.any():
                break
            step = step / np.maximum(big, 1.0)[:, None]
            act = act[moving]
            beta[act] = beta[act] + step[moving]
        return beta, u

    def _schur(self, theta, u, ps):
        """``X'WX - X'WA M^-1 A'WX`` per gene from the pair sums at the mode."""
        G, L, p, d = theta.size, self.L, self.p, self.d
        t = theta[:, None]
        M = 1.0 + t * t * self._level(ps["W"])
        XW = (d.to_level_x @ ps["W"].T).T.reshape(G, L, p)
        return (ps["W"] @ d.XX).reshape(G, p, p) - np.swapaxes(XW * (t * t / M)[:, :, None], 1, 2) @ XW

    def reml_deviance(self, theta, phi, beta, u):
        """The REML criterion per gene (the Laplace deviance at the joint mode plus
        ``log det S``), ``beta~``, ``u`` and ``(M, S)`` there."""
        phi = np.maximum(phi, 0.0)
        beta, u = self.joint_mode(theta, phi, beta, u)
        u = self.mode(theta, beta, phi, u)
        ps = self._pair_sums(self._c(theta, beta, phi, u), phi, True)
        M = 1.0 + theta[:, None] ** 2 * self._level(ps["W"])
        S = self._masked_schur(self._schur(theta, u, ps), self.frozen())
        sign, logdet = np.linalg.slogdet(S)
        dev = -2.0 * ps["ll"].sum(axis=1) + (u * u).sum(axis=1) + np.log(M).sum(axis=1)
        return dev + np.where(sign > 0, logdet, np.inf), beta, u, (M, S)

    def _reml_curvature(self, x, beta, u, rel=1e-4, cheap=False):
        """The criterion at ``x = (theta, phi)`` (G, 2), its gradient (G, 2), Hessian
        (G, 2, 2) and ``d beta~ / d theta`` (G, p) by differences on a 3 x 3 stencil
        (along phi forward, second order, where a central step would cross 0), and
        ``beta~``, ``u`` and ``(M, S)`` at ``x``. ``cheap``: the cross derivative from
        one corner (first order; enough for a Newton direction), five evaluations
        instead of eight."""
        f0, b0, u0, st0 = self.reml_deviance(x[:, 0], x[:, 1], beta, u)
        h = rel * np.maximum(1.0, np.abs(x))
        fwd = x[:, 1] < h[:, 1]
        # phi offsets (in steps) of the stencil's columns; column jc is phi itself
        offs = np.where(fwd[:, None], [0.0, 1.0, 2.0], [-1.0, 0.0, 1.0])
        jc = np.where(fwd, 0, 1)
        rows = np.arange(self.G)
        need = np.ones((self.G, 3, 3), dtype=bool)
        if cheap:
            need[:, [0, 2], :] = False
            need[rows, 0, jc] = need[rows, 2, jc] = need[rows, 2, jc + 1] = True
        need[rows, 1, jc] = False
        F = np.full((self.G, 3, 3), np.nan)
        F[rows, 1, jc] = f0
        B = np.empty((2, *b0.shape))
        for i, dt in enumerate((-1.0, 0.0, 1.0)):
            for j in range(3):
                if not need[:, i, j].any():
                    continue
                f, bb, _, _ = self.reml_deviance(x[:, 0] + dt * h[:, 0], x[:, 1] + offs[:, j] * h[:, 1], b0, u0)
                F[:, i, j] = np.where(need[:, i, j], f, F[:, i, j])
                if i != 1:
                    B[i // 2][jc == j] = bb[jc == j]
        ht, hp = h[:, 0], h[:, 1]
        Ft = F[rows, :, jc]  # (G, 3): theta moves at phi
        g_t = (Ft[:, 2] - Ft[:, 0]) / (2.0 * ht)
        H_tt = (Ft[:, 2] - 2.0 * Ft[:, 1] + Ft[:, 0]) / (ht * ht)
        c = np.where(fwd[:, None], [-1.5, 2.0, -0.5], [-0.5, 0.0, 0.5]) / hp[:, None]
        gp_rows = np.einsum("gij,gj->gi", F, c)  # d f / d phi at theta - h, theta, theta + h
        H_pp = (F[:, 1, 0] - 2.0 * F[:, 1, 1] + F[:, 1, 2]) / (hp * hp)
        if cheap:
            H_tp = (F[rows, 2, jc + 1] - F[rows, 2, jc] - F[rows, 1, jc + 1] + f0) / (ht * hp)
        else:
            H_tp = (gp_rows[:, 2] - gp_rows[:, 0]) / (2.0 * ht)
        g = np.stack([g_t, gp_rows[:, 1]], axis=1)
        H = np.stack([np.stack([H_tt, H_tp], axis=1), np.stack([H_tp, H_pp], axis=1)], axis=1)
        J = (B[1] - B[0]) / (2.0 * ht[:, None])
        return f0, g, H, J, b0, u0, st0

    def fit_reml(self, params, u, *, max_iter=100, hessian_cov=True):
        """Minimise the REML criterion over each gene's ``(theta, phi)`` (batched Newton
        on differences, theta reflected at 0, phi held at the Poisson boundary where the
        criterion rises from it, backtracking), from the ML fit ``params``."""
        G = self.G
        x = np.stack([np.maximum(np.abs(params[:, 0]), 0.05), params[:, -1]], axis=1)  # theta = 0 is stationary
        beta, u = params[:, 1:-1].copy(), u.copy()
        done = np.zeros(G, dtype=bool)
        for _, act, eng in self._rounds(done, max_iter):
            xa = x[act]
            f0, g, H, _, b0, u0, _ = eng._reml_curvature(xa, beta[act], u[act], cheap=True)
            # near theta = 0 the criterion is flat (quartic at a minimum there): try 0 itself
            at_zero = xa[:, 0] < 1e-3
            if at_zero.any():
                f_zero = eng.reml_deviance(np.zeros(act.size), xa[:, 1], b0, u0)[0]
                at_zero &= f_zero <= f0 + 1e-10 * (1.0 + np.abs(f0))
                xa[at_zero, 0] = x[act[at_zero], 0] = 0.0
                f0 = np.where(at_zero, f_zero, f0)
            held = np.stack([at_zero, (xa[:, 1] <= 0.0) & (g[:, 1] >= 0)], axis=1)
            g = np.where(held, 0.0, g)
            for j in range(2):
                H[held[:, j], j, :] = 0.0
                H[held[:, j], :, j] = 0.0
                H[held[:, j], j, j] = 1.0
            step = abs_eigen_step(H, g)
            # at most 1 + the parameter's size per iteration; the line search does the rest
            lim = np.max(np.abs(step) / (1.0 + xa), axis=1)
            step = step / np.maximum(lim, 1.0)[:, None]
            small = np.abs(np.sum(g * step, axis=1)) < 1e-14 * np.maximum(1.0, np.abs(f0))
            trial, outs, ok = backtrack(
                eng, xa, step, np.ones(act.size), f0, g, small, _project_reml,
                lambda sub, tp, rows: sub.reml_deviance(tp[:, 0], tp[:, 1], b0[rows], u0[rows])[:3],  # noqa: B023
                40,
            )
            done[act] = small | ~ok
            move = ok & ~small
            beta[act], u[act] = b0, u0
            if move.any():
                x[act[move]], beta[act[move]], u[act[move]] = trial[move], outs[1][move], outs[2][move]
        return self._reml_result(x, beta, u, done, hessian_cov)

    def _reml_result(self, x, beta, u, done, hessian_cov):
        """The fit at the REML optimum: covariances as the single-response fit's
        (:meth:`~skmixed.mixed._laplace.LaplaceProblem.reml_cov` for beta, twice the
        inverse Hessian over ``(theta, phi)`` for phi)."""
        G, p = beta.shape
        f, g, H, J, beta, u, (M, S) = self._reml_curvature(x, beta, u)
        bound = (x <= 1e-8) & (g >= 0)
        converged = done & np.isfinite(f) & (np.max(np.abs(np.where(bound, 0.0, g)), axis=1) < 1e-2)
        cov_b = np.linalg.inv(S)
        if hessian_cov:
            live = (x[:, 0] > 1e-8) & (H[:, 0, 0] > 0)
            scale = np.where(live, 2.0 / np.where(live, H[:, 0, 0], 1.0), 0.0)
            cov_b = cov_b + scale[:, None, None] * J[:, :, None] * J[:, None, :]
        cov = np.full((G, p + 2, p + 2), np.nan)
        cov[:, 1:-1, 1:-1] = cov_b
        with np.errstate(invalid="ignore", divide="ignore"):
            det = H[:, 0, 0] * H[:, 1, 1] - H[:, 0, 1] ** 2
            cov[:, -1, -1] = np.where(det != 0, 2.0 * H[:, 0, 0] / det, np.nan)
        params = np.concatenate([x[:, :1], beta, x[:, 1:]], axis=1)
        return params, cov, f, u, M, converged
