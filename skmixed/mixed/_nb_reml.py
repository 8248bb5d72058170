"""REML for the many-gene NB GLMM (glmmTMB's ``REML = TRUE``, gene by gene).

At given ``(theta, phi)`` the fixed effects are integrated out with the random
effects (flat prior): the Laplace approximation is taken at the joint mode
``(u~, beta~)`` of the penalised deviance, and the log-determinant of the joint
Hessian is ``log det M + log det S``, ``S`` the Schur complement of beta (the
conditional information). The criterion is minimised over each gene's ``(theta, phi)``
by a batched Newton iteration (exact gradient by implicit differentiation through the
joint mode, Hessian by differences then BFGS), from the moment start; ``beta~`` follows.
This is :meth:`~skmixed.mixed._nbglmm.NBLaplaceProblem.optimise_reml` for one
response, and :meth:`~skmixed.mixed._batched.BatchedScalarLaplace.fit_reml` with the
size as a second parameter; it corrects the downward bias of the ML patient variance
with few patients, as REML does for linear mixed models.
"""

from __future__ import annotations

import numpy as np

from ._batched import BatchedScalarLaplace
from ._laplace import abs_eigen_step

TOL_STEP = 1e-7  # the joint mode's last Newton step, taken without a pass to confirm it


def quietly(eng, evaluate):
    """``evaluate(sub, trial, rows)`` on ``eng`` restricted to ``rows`` as the ``evaluate(rows,
    trial)`` of :meth:`~skmixed.mixed._batched.BatchedScalarLaplace._line_search`, with
    numpy's overflow warnings off (a trial far out may overflow: it fails the test)."""

    def run(rows, trial):
        sub = eng if rows.size == eng.G else eng.subset(rows)
        with np.errstate(over="ignore", invalid="ignore"):
            return evaluate(sub, trial, rows)

    return run


def _predict(beta, u, slope, dx):
    """First-order prediction of the joint mode ``(beta~, u~)`` after a move ``dx`` of
    ``(theta, phi)``: the start of the mode's Newton iteration there."""
    return beta + (slope[0] @ dx[:, :, None])[..., 0], u + (slope[1] @ dx[:, :, None])[..., 0]


def _flat_reml(evaluated):
    """``reml_deviance``'s answer as per-gene arrays: criterion, beta, u, gradient, slopes."""
    f, beta, u, _, slope, g = evaluated
    return f, beta, u, g, *slope


def _bfgs(H, s, y):
    """BFGS update of the Hessians ``H`` (G, 2, 2) by the steps ``s`` and gradient
    changes ``y`` (G, 2); left as they are where the curvature ``s'y`` is not positive."""
    Hs = (H @ s[:, :, None])[..., 0]
    sy, sHs = np.sum(s * y, axis=1), np.sum(s * Hs, axis=1)
    ok = (sy > 1e-12 * np.sqrt(np.sum(s * s, axis=1) * np.sum(y * y, axis=1))) & (sHs > 0)
    sy, sHs = np.where(ok, sy, 1.0), np.where(ok, sHs, 1.0)
    new = H + y[:, :, None] * y[:, None, :] / sy[:, None, None] - Hs[:, :, None] * Hs[:, None, :] / sHs[:, None, None]
    return np.where(ok[:, None, None], new, H)


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
    _line_search = BatchedScalarLaplace._line_search

    @property
    def XtY(self):
        nz = self.nz
        ypair = np.bincount(nz.gene * self.d.P + nz.pair, weights=nz.w * nz.y, minlength=self.G * self.d.P)
        return ypair.reshape(self.G, self.d.P) @ self.d.Xp

    def _frozen(self):
        """:meth:`frozen`, computed once per problem (a pass over the non-zero counts)."""
        if getattr(self, "_fz", None) is None:
            self._fz = self.frozen()
        return self._fz

    def _joint_system(self, theta, ps, fz):
        """The Hessian of half the penalised deviance in ``(u, beta)`` from the pair sums:
        its diagonal ``M`` (G, L), the coupling ``B = theta X'W A`` (G, L, p) and the
        (masked) Schur complement of beta, the blocks :meth:`_joint_solve` needs."""
        G, L, p, d = theta.size, self.L, self.p, self.d
        t = theta[:, None]
        M = 1.0 + t * t * self._level(ps["W"])
        B = t[:, :, None] * (d.to_level_x @ ps["W"].T).T.reshape(G, L, p)
        S = (ps["W"] @ d.XX).reshape(G, p, p) - np.swapaxes(B / M[:, :, None], 1, 2) @ B
        return M, B, self._masked_schur(S, fz)

    @staticmethod
    def _joint_solve(system, ru, rb, fz):
        """Solve ``[[diag M, B], [B', C]] [du; db] = [ru; rb]`` by the Schur complement
        (frozen fixed effects held: their rows are those of the identity)."""
        M, B, S = system
        rhs = np.where(fz, 0.0, rb - np.einsum("glp,gl->gp", B, ru / M))
        db = np.linalg.solve(S, rhs[:, :, None])[:, :, 0]
        return (ru - np.einsum("glp,gp->gl", B, db)) / M, db

    def _joint_newton(self, theta, phi, beta, u, fz):
        """One pass at ``(beta, u)``: the Newton step on ``(u, beta)`` and its decrement."""
        ps = self._pair_sums(self._c(theta, beta, phi, u), phi, False)
        gu = u - theta[:, None] * self._level(ps["s"])
        gb = np.where(fz, 0.0, -(ps["s"] @ self.d.Xp))
        du, db = self._joint_solve(self._joint_system(theta, ps, fz), -gu, -gb, fz)
        return du, db, -np.sum(gu * du, axis=1) - np.sum(gb * db, axis=1)

    def joint_mode(self, theta, phi, beta, u, max_iter=30):
        """Per gene, the joint mode ``(u~, beta~)`` of the penalised deviance at
        ``(theta, phi)``: Newton on ``(u, beta)`` together (the problem is convex), one
        pass over the counts per step, steps halved where the Newton decrement would
        grow (steps of the log mean capped at one unit). Genes still moving after
        ``max_iter`` steps finish by :meth:`_joint_mode_nested`."""
        beta, u = beta.copy(), u.copy()
        fz = self._frozen()
        du, db, dec = self._joint_newton(theta, phi, beta, u, fz)
        act = np.arange(self.G)
        for _ in range(max_iter):
            # a full Newton step of 1e-7 leaves an error of order 1e-14 (quadratic
            # convergence): take it without another pass to confirm
            done = np.all(np.abs(du) <= TOL_STEP * (1.0 + np.abs(u[act])), axis=1) & np.all(
                np.abs(db) <= TOL_STEP * (1.0 + np.abs(beta[act])), axis=1
            )
            u[act[done]] += du[done]
            beta[act[done]] += db[done]
            keep = ~done
            act, du, db, dec = act[keep], du[keep], db[keep], dec[keep]
            if act.size == 0:
                return beta, u
            big = np.maximum(np.max(np.abs(db), axis=1), np.max(np.abs(theta[act, None] * du), axis=1))
            lam = 1.0 / np.maximum(big, 1.0)
            out = [np.empty_like(du), np.empty_like(db), np.empty_like(dec)]
            pending = np.arange(act.size)
            for _ in range(40):
                rows = act[pending]
                sub = self if rows.size == self.G else self.subset(rows)
                ut = u[rows] + lam[pending, None] * du[pending]
                bt = beta[rows] + lam[pending, None] * db[pending]
                with np.errstate(over="ignore", invalid="ignore"):
                    res = sub._joint_newton(theta[rows], phi[rows], bt, ut, fz[rows])
                good = np.isfinite(res[2]) & (res[2] <= dec[pending] * (1.0 + 1e-8) + 1e-20)
                good |= lam[pending] < 1e-3
                hit = pending[good]
                u[act[hit]], beta[act[hit]] = ut[good], bt[good]
                for o, r in zip(out, res):
                    o[hit] = r[good]
                pending = pending[~good]
                if pending.size == 0:
                    break
                lam[pending] *= 0.5
            du, db, dec = out
            keep = np.ones(act.size, dtype=bool)
            keep[pending] = False
            act, du, db, dec = act[keep], du[keep], db[keep], dec[keep]
        if act.size:
            sub = self.subset(act)
            beta[act], u[act] = sub._joint_mode_nested(theta[act], phi[act], beta[act], u[act])
        return beta, u

    def _joint_mode_nested(self, theta, phi, beta, u, max_iter=30):
        """The joint mode by Newton steps on beta with the Schur complement, u at its
        mode (PIRLS) for each beta: slower than :meth:`joint_mode` and the fallback."""
        beta, u = beta.copy(), u.copy()
        fz = self._frozen()
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
        return beta, self.mode(theta, beta, phi, u)

    def _schur(self, theta, u, ps):
        """``X'WX - X'WA M^-1 A'WX`` per gene from the pair sums at the mode."""
        G, L, p, d = theta.size, self.L, self.p, self.d
        t = theta[:, None]
        M = 1.0 + t * t * self._level(ps["W"])
        XW = (d.to_level_x @ ps["W"].T).T.reshape(G, L, p)
        return (ps["W"] @ d.XX).reshape(G, p, p) - np.swapaxes(XW * (t * t / M)[:, :, None], 1, 2) @ XW

    def reml_deviance(self, theta, phi, beta, u, grad=False):
        """The REML criterion per gene (the Laplace deviance at the joint mode plus
        ``log det S``), ``beta~``, ``u`` and ``(M, S)`` there, the slopes of the joint
        mode in ``(theta, phi)``: ``(d beta~, d u~)``, (G, p, 2) and (G, L, 2), by the
        implicit function theorem (the starts of nearby evaluations), and with ``grad``
        the criterion's gradient (G, 2) (else None)."""
        phi = np.maximum(phi, 0.0)
        fz = self._frozen()
        beta, u = self.joint_mode(theta, phi, beta, u)
        ps = self._pair_sums(self._c(theta, beta, phi, u), phi, True)
        system = self._joint_system(theta, ps, fz)
        M, _, S = system
        sign, logdet = np.linalg.slogdet(S)
        dev = -2.0 * ps["ll"].sum(axis=1) + (u * u).sum(axis=1) + np.log(M).sum(axis=1)
        # gradient of (u - theta S_l, -X's) along theta and phi, at fixed (u, beta)
        t = theta[:, None]
        S_l, W_l = self._level(ps["s"]), self._level(ps["W"])
        XWu = np.einsum("glp,gl->gp", (self.d.to_level_x @ ps["W"].T).T.reshape(*u.shape, self.p), u)
        du_t, db_t = self._joint_solve(system, S_l - t * W_l * u, -XWu, fz)
        du_p, db_p = self._joint_solve(system, t * self._level(ps["ds"]), ps["ds"] @ self.d.Xp, fz)
        slope = (np.stack([db_t, db_p], axis=2), np.stack([du_t, du_p], axis=2))
        g = None
        if grad:
            g = self._reml_gradient(theta, u, ps, system, slope, fz)
        return dev + np.where(sign > 0, logdet, np.inf), beta, u, (M, S), slope, g

    def _reml_gradient(self, theta, u, ps, system, slope, fz):
        """d/d(theta, phi) of the criterion: the deviance's partial derivatives at the
        mode (it is stationary in (u, beta)) plus ``tr(H^-1 dH)`` for the log-determinant
        of the joint Hessian ``H = diag(1_u, 0) + sum over pairs W z z'``, ``z = (theta
        e_l, x_k)``: each pair's leverage ``z'H^-1 z`` times the total change of its
        weight (through the mode too), and along theta the change of ``z``."""
        M, B, S = system
        d, t = self.d, theta[:, None]
        lvl = d.pair_level
        keep = ~fz[:, None, :]
        Bm = np.where(keep, B / M[:, :, None], 0.0)[:, lvl, :]  # (G, P, p)
        v = np.where(keep, d.Xp[None] - t[:, :, None] * Bm, 0.0)
        Sv = v @ np.linalg.inv(S)
        Minv = 1.0 / M[:, lvl]
        lev = t * t * Minv + np.sum(Sv * v, axis=2)
        cross = t * Minv - np.sum(Bm * Sv, axis=2)
        (db, du), Wd = slope, ps["Wd"]
        dc_t = db[:, :, 0] @ d.Xp.T + t * du[:, lvl, 0] + u[:, lvl]
        dc_p = db[:, :, 1] @ d.Xp.T + t * du[:, lvl, 1]
        g_t = -2.0 * np.sum(ps["s"] * u[:, lvl], axis=1) + np.sum(lev * Wd * dc_t + 2.0 * ps["W"] * cross, axis=1)
        g_p = -2.0 * ps["dl"].sum(axis=1) + np.sum(lev * (ps["dW"] + Wd * dc_p), axis=1)
        return np.stack([g_t, g_p], axis=1)

    def _reml_curvature(self, x, beta, u, rel=1e-4, cheap=False):
        """At ``x = (theta, phi)`` (G, 2): the criterion, its gradient (G, 2), its
        Hessian (G, 2, 2) by differences of the gradient (central, one-sided second
        order along phi where a central step would cross 0; ``cheap``: forward, one
        evaluation per parameter, enough for a Newton direction), ``d beta~ / d theta``
        (G, p), ``beta~``, ``u`` and ``(M, S)`` at ``x``, and the slopes of the mode."""
        f0, b0, u0, st0, sl0, g0 = self.reml_deviance(x[:, 0], x[:, 1], beta, u, grad=True)
        h = rel * np.maximum(1.0, np.abs(x))
        H = np.empty((self.G, 2, 2))

        def grad_at(dx):
            return self.reml_deviance(*(x + dx).T, *_predict(b0, u0, sl0, dx), grad=True)[-1]

        for j in range(2):
            e = np.zeros_like(x)
            e[:, j] = h[:, j]
            gp = grad_at(e)
            if cheap:
                H[:, :, j] = (gp - g0) / h[:, j, None]
                continue
            one = (x[:, 1] < h[:, 1]) if j == 1 else np.zeros(self.G, dtype=bool)
            dx = np.where(one[:, None], 2.0 * e, -e)
            g2 = grad_at(dx)
            H[:, :, j] = np.where(one[:, None], -3.0 * g0 + 4.0 * gp - g2, gp - g2) / (2.0 * h[:, j, None])
        H = 0.5 * (H + np.swapaxes(H, 1, 2))
        return f0, g0, H, sl0[0][:, :, 0], b0, u0, st0, sl0

    def fit_reml(self, params, u, *, max_iter=100, hessian_cov=True):
        """Minimise the REML criterion over each gene's ``(theta, phi)`` from ``params``
        (theta reflected at 0, phi held at the Poisson boundary where the criterion
        rises from it): Newton steps with backtracking, the first with the Hessian by
        differences of the exact gradient, the next with its BFGS updates (each
        accepted step gives the gradient at the new point: one evaluation per step)."""
        G = self.G
        x = np.stack([np.maximum(np.abs(params[:, 0]), 0.05), params[:, -1]], axis=1)  # theta = 0 is stationary
        f, g, H, _, beta, u, _, slope = self._reml_curvature(x, params[:, 1:-1], u, cheap=True)
        slope = list(slope)
        done = np.zeros(G, dtype=bool)
        for _, act, eng in self._rounds(done, max_iter):
            xa, f0, ga, Ha = x[act], f[act], g[act], H[act].copy()
            b0, u0, sl0 = beta[act], u[act], [s[act] for s in slope]
            # near theta = 0 the criterion is flat (quartic at a minimum there): try 0 itself
            at_zero = (xa[:, 0] < 1e-3) & (xa[:, 0] > 0.0)
            if at_zero.any():
                dx = np.stack([-xa[:, 0], np.zeros(act.size)], axis=1)
                f_zero = eng.reml_deviance(np.zeros(act.size), xa[:, 1], *_predict(b0, u0, sl0, dx))[0]
                at_zero &= f_zero <= f0 + 1e-10 * (1.0 + np.abs(f0))
                xa[at_zero, 0] = x[act[at_zero], 0] = 0.0
                f0 = np.where(at_zero, f_zero, f0)
                f[act] = f0
            held = np.stack([xa[:, 0] == 0.0, (xa[:, 1] <= 0.0) & (ga[:, 1] >= 0)], axis=1)
            gh = np.where(held, 0.0, ga)
            for j in range(2):
                Ha[held[:, j], j, :] = 0.0
                Ha[held[:, j], :, j] = 0.0
                Ha[held[:, j], j, j] = 1.0
            step = abs_eigen_step(Ha, gh)
            # at most 1 + the parameter's size per iteration; the line search does the rest
            lim = np.max(np.abs(step) / (1.0 + xa), axis=1)
            step = step / np.maximum(lim, 1.0)[:, None]
            # the decrease at round-off and the step at the gradient's precision: the
            # decrement alone stops ~1e-6 short of the optimum in the flat directions
            small = (np.abs(np.sum(gh * step, axis=1)) < 1e-14 * np.maximum(1.0, np.abs(f0))) & np.all(
                np.abs(step) <= 1e-8 * (1.0 + xa), axis=1
            )
            trial, outs, ok = eng._line_search(
                lambda t: _project_reml(xa + t[:, None] * step),  # noqa: B023
                quietly(eng, lambda sub, tp, rows: _flat_reml(sub.reml_deviance(
                    *tp.T, *_predict(b0[rows], u0[rows], [s[rows] for s in sl0], tp - xa[rows]), grad=True  # noqa: B023
                ))),
                f0, lambda r, tp: np.sum(gh[r] * (tp - xa[r]), axis=1), small, np.ones(act.size), 40,  # noqa: B023
            )
            done[act] = small | ~ok
            move = ok & ~small
            rows = act[move]
            if rows.size:
                f_new, b_new, u_new, g_new, sb_new, su_new = (o[move] for o in outs)
                # a move from theta = 0 set above has no gradient at its start: keep H
                upd = ~at_zero[move]
                H[rows[upd]] = _bfgs(H[rows[upd]], trial[move][upd] - xa[move][upd], g_new[upd] - ga[move][upd])
                x[rows], f[rows], g[rows], beta[rows], u[rows] = trial[move], f_new, g_new, b_new, u_new
                slope[0][rows], slope[1][rows] = sb_new, su_new
        return self._reml_result(x, beta, u, done, hessian_cov)

    def _reml_result(self, x, beta, u, done, hessian_cov):
        """The fit at the REML optimum: covariances as the single-response fit's
        (:meth:`~skmixed.mixed._laplace.LaplaceProblem.reml_cov` for beta, twice the
        inverse Hessian over ``(theta, phi)`` for phi)."""
        G, p = beta.shape
        f, g, H, J, beta, u, (M, S), _ = self._reml_curvature(x, beta, u)
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
