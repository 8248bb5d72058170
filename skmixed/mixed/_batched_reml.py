"""REML for the many-gene Poisson GLMM (glmmTMB's ``REML = TRUE``), batched over genes.

At given theta the fixed effects are integrated out with the random effects (flat
prior): the Laplace approximation is taken at the joint mode ``(u~, beta~)`` of the
penalised deviance, and the log-determinant of the joint Hessian is
``log det M + log det S``, ``S`` the Schur complement of beta (the conditional
information). The criterion's gradient in theta is exact (implicit differentiation
through the joint mode); each gene's theta follows Newton steps in log theta with
secant curvatures, from the ML fit. Mixed into
:class:`~skmixed.mixed._batched.BatchedScalarLaplace`, whose ``rates``, ``mode``,
``schur``, ``subset``, ``_rounds`` and ``_line_search`` it uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._backend import get_namespace, safe_exp


@dataclass
class BatchResult:
    theta: np.ndarray  # (G,)
    beta: np.ndarray  # (G, p)
    cov: np.ndarray  # (G, p, p) covariance of beta
    deviance: np.ndarray  # (G,) Laplace deviance without the parameter-free terms
    u: np.ndarray  # (G, L) spherical conditional modes
    M: np.ndarray  # (G, L) diagonal of M at the mode
    n_iter: int
    converged: np.ndarray  # (G,) bool


@dataclass
class RemlPoint:
    """The REML criterion of each gene at its theta, with what the next evaluation
    needs: the joint mode (beta~, u~), M there, ``S^-1``, the gradient and the slopes
    ``J = d beta~ / d theta``, ``du = d u~ / d theta``."""

    f: object
    beta: object
    u: object
    M: object
    g: object
    S_inv: object
    J: object
    du: object

    def take(self, rows):
        return RemlPoint(*(getattr(self, k)[rows] for k in self.__dataclass_fields__))

    def put(self, rows, other):
        for k in self.__dataclass_fields__:
            getattr(self, k)[rows] = getattr(other, k)

    def moved(self, slope, dt, H):
        """The point after a small move ``dt`` (G,), to first order in every field
        given their derivatives ``slope`` (second order in the criterion)."""
        out = RemlPoint(*(getattr(self, k) + _bcast(dt, getattr(self, k)) * getattr(slope, k)
                          for k in self.__dataclass_fields__))
        out.f = out.f + 0.5 * H * dt * dt
        return out

    def predict(self, dt, flip=None):
        """The joint mode predicted to first order after a move ``dt`` of theta (u's
        sign flipped where the move crosses 0: theta and -theta fit alike)."""
        beta, u = self.beta + dt[:, None] * self.J, self.u + dt[:, None] * self.du
        if flip is not None:
            u = u * (1.0 - 2.0 * flip[:, None])
        return beta, u


class ScalarRemlMixin:
    """The REML criterion, its exact gradient and its batched optimisation."""

    def frozen(self):
        """(G, p) mask of the fixed effects of indicator-like columns without counts:
        their estimate is -inf, and integrating them out over a flat prior diverges
        (log det S -> -inf), so REML keeps them where the ML fit left them."""
        xp = self.xp
        nonneg = xp.all(self.d.Xd >= 0, axis=0)[None, :]
        return nonneg & (self.XtY <= 0)

    def _masked_schur(self, S, frozen):
        """S with the frozen rows and columns replaced by those of the identity."""
        xp = self.xp
        rows = xp.flatnonzero(xp.any(frozen, axis=1))
        if rows.size == 0:
            return S
        fz = frozen[rows]
        keep = ~fz
        S = S.copy()
        S[rows] = S[rows] * (keep[:, :, None] & keep[:, None, :]) + xp.eye(self.p)[None, :, :] * fz[:, :, None]
        return S

    def joint_mode(self, theta, beta, u, max_iter=30):
        """Per gene, the joint mode ``beta~`` of the penalised deviance at ``theta``, by
        Newton steps on beta with the Schur complement (the profiled curvature; the
        problem is convex in (u, beta)); a gene leaves the loop when its Newton
        decrement is at round-off, its state evaluated at its final beta.
        Returns ``beta~``, ``(u, M)`` at the mode, S and the expected count per level."""
        xp = self.xp
        beta, u = beta.copy(), u.copy()
        M, m = xp.empty_like(u), xp.empty_like(u)
        S = xp.empty((self.G, self.p, self.p))
        act = xp.arange(self.G)
        for it in range(max_iter + 1):
            eng = self if act.size == self.G else self.subset(act)
            e_a, s_a, T_a = self.d.rates(beta[act])
            u_a, ex_a, M_a = eng.mode(theta[act], s_a, u[act])
            fz = eng.frozen()
            S_a = eng._masked_schur(eng.schur(theta[act], (u_a, ex_a, M_a, e_a, T_a)), fz)
            u[act], M[act], S[act], m[act] = u_a, M_a, S_a, s_a * ex_a
            if it == max_iter:
                break
            score = xp.where(fz, 0.0, eng.XtY - xp.sum(ex_a[:, :, None] * T_a, axis=1))  # X'(y - mu)
            step = xp.linalg.solve(S_a, score[:, :, None])[:, :, 0]
            # the Newton decrement, not the step: a cell group without counts has
            # beta -> -inf, steps of one unit and a vanishing score
            big = xp.max(xp.abs(step), axis=1)
            moving = (xp.sum(score * step, axis=1) > 1e-20) & (big > 1e-13 * (1.0 + xp.max(xp.abs(beta[act]), axis=1)))
            if not bool(xp.any(moving)):
                break
            step = step / xp.maximum(big, 1.0)[:, None]  # at most one unit on the log scale
            act = act[moving]
            beta[act] = beta[act] + step[moving]
        return beta, (u, M), S, m

    def reml_deviance(self, theta, beta, u, grad=False):
        """REML criterion per gene (the Laplace deviance at the joint mode plus
        ``log det S``), with ``beta~`` and the state there; with ``grad`` a
        :class:`RemlPoint` (criterion, gradient and slopes) instead."""
        xp = self.xp
        beta, state, S, m = self.joint_mode(theta, beta, u)
        u, M = state
        dev = -2.0 * (xp.sum(beta * self.XtY, axis=1) + xp.sum(theta[:, None] * self.ylev * u - m, axis=1))
        sign, logdet_s = xp.linalg.slogdet(S)
        dev = dev + xp.sum(u * u, axis=1) + xp.sum(xp.log(M), axis=1) + xp.where(sign > 0, logdet_s, xp.inf)
        if not grad:
            return dev, beta, state, S
        return RemlPoint(dev, beta, u, M, *self._reml_gradient(theta, beta, u, M, S))

    def _reml_gradient(self, theta, beta, u, M, S):
        """d/dtheta of the REML criterion at the joint mode, exact: the penalised
        deviance's partial derivative (it is stationary in (u, beta)), the change of
        ``log det M`` and ``tr(S^-1 dS)`` for ``log det S``, both through the mode too,
        whose slopes ``(d beta~, d u~)`` come from the implicit function theorem on the
        joint system (solved by the Schur complement, frozen effects held).
        Returns the gradient (G,), ``S^-1`` (frozen rows and columns those of the
        identity), ``d beta~ / d theta`` (G, p) and ``d u~ / d theta`` (G, L)."""
        xp, d = self.xp, self.d
        G, L, p = beta.shape[0], self.L, self.p
        t, y = theta[:, None], self.ylev
        e, s, T = d.rates(beta)
        ex = safe_exp(t * u)
        m = s * ex
        keep = ~self.frozen()
        S_inv = xp.linalg.inv(S)
        S_z = S_inv * (keep[:, :, None] & keep[:, None, :])  # the free block's inverse only
        # the joint Hessian's blocks: diag M, B = theta ex T (u, beta), S (Schur); the
        # right-hand side is minus the derivative of the score in theta
        B = (t * ex)[:, :, None] * T
        a_u = t * m * u - (y - m)
        a_b = xp.sum((ex * u)[:, :, None] * T, axis=1)
        rhs = xp.sum(B * (a_u / M)[:, :, None], axis=1) - a_b
        J = (S_z @ rhs[:, :, None])[:, :, 0]
        du = -(a_u + xp.sum(B * J[:, None, :], axis=2)) / M
        r = u + t * du  # d (theta u) / d theta
        xJ = J @ d.Xd.T  # (G, K): the change of each distinct row's linear predictor
        dm = m * r + ex * xp.sum(T * J[:, None, :], axis=2)
        dM = 2.0 * t * m + t * t * dm
        # S = sum_k nu_k x_k x_k' - sum_l w_l T_l T_l', w = theta^2 ex^2 / M
        nu = e * (d.C @ ex.T).T
        dnu = nu * xJ + e * (d.C @ (ex * r).T).T
        q = xp.sum((d.Xd[None, :, :] @ S_z) * d.Xd[None, :, :], axis=2)  # x_k' S^-1 x_k
        TS = T @ S_z
        w = t * t * ex * ex / M
        dw = 2.0 * t * ex * ex * (1.0 + t * r) / M - w * dM / M
        dT = (d.AT @ (e * xJ).T).T.reshape(G, L, p)
        trace = xp.sum(dnu * q, axis=1) - xp.sum(dw * xp.sum(TS * T, axis=2) + 2.0 * w * xp.sum(TS * dT, axis=2), axis=1)
        g = -2.0 * xp.sum(u * (y - m), axis=1) + xp.sum(dM / M, axis=1) + trace
        return g, S_inv, J, du

    def fit_reml(self, theta0, beta0, u0, *, curvature=None, max_iter=100, hessian_cov=True):
        """Minimise the REML criterion over each gene's theta, batched: Newton steps with
        backtracking (theta reflected at 0), taken in log theta where the criterion is
        closer to quadratic (``log det`` terms: its third derivative in theta is about
        ``-5 / theta`` times the second). The curvature starts as ``curvature`` (the ML
        fit's profiled one, about 0.95 of REML's) or a difference of the exact gradient,
        then follows secants (each accepted step gives the gradient at the new point:
        one evaluation per iteration); the joint mode at a trial starts where its
        slopes predict it. A step below 1e-4 is taken without a line search, at the
        centre of the two evaluations that give the final curvature."""
        xp = self.xp
        theta = xp.maximum(xp.abs(theta0), 0.05)  # theta = 0 is stationary by symmetry: start off it
        pt = self.reml_deviance(theta, beta0, u0, grad=True)
        H = xp.zeros(self.G) if curvature is None else xp.where(xp.abs(theta0) >= 0.05, curvature, 0.0)
        fd = xp.flatnonzero(~(H > 0))
        if fd.size:
            sub, h = self.subset(fd), 1e-4 * xp.maximum(1.0, theta[fd])
            H[fd] = (sub.reml_deviance(theta[fd] + h, *pt.take(fd).predict(h), grad=True).g - pt.g[fd]) / h
        done = xp.zeros(self.G, dtype=bool)
        final = xp.zeros(self.G, dtype=bool)  # the curvature is the central difference at theta
        it = 0
        for it, act, eng in self._rounds(done, max_iter):
            th, p0, Ha = theta[act], pt.take(act), H[act]
            # near the boundary the criterion is flat (quartic when its minimum is at 0)
            # and Newton creeps: try theta = 0 itself
            near = xp.flatnonzero((th < 1e-3) & (th > 0.0))
            if near.size:
                z = eng.subset(near).reml_deviance(xp.zeros(near.size), *p0.take(near).predict(-th[near]), grad=True)
                at_zero = z.f <= p0.f[near] + 1e-10 * (1.0 + xp.abs(p0.f[near]))
                rows = near[at_zero]
                th[rows] = theta[act[rows]] = 0.0
                p0.put(rows, z.take(xp.flatnonzero(at_zero)))
                pt.put(act[rows], z.take(xp.flatnonzero(at_zero)))
                Ha[rows] = 1.0
            g0 = xp.where(th == 0.0, 0.0, p0.g)  # theta = 0 is stationary
            step = _reml_step(th, g0, Ha)
            small = (xp.abs(step) <= 1e-8 * (1.0 + th)) | (xp.abs(g0 * step) < 1e-11)
            done[act[small]] = True
            # a small Newton step lands within ~1e-8 of the optimum: take it, and
            # evaluate there by the pair of points the covariance needs anyway
            jump = xp.flatnonzero(~small & (Ha > 0) & (xp.abs(step) < 1e-4 * (1.0 + th)) & (th + step > 0))
            if jump.size:
                rows = act[jump]
                theta[rows] = th[jump] + step[jump]
                pt_j, H_j, slope = self.subset(rows)._central(theta[rows], p0.take(jump), step[jump])
                # a Newton step from there below 3e-5 leaves an error of order 1e-8
                # (second order, the curvature exact), and the point after it is known
                # to first order from the two evaluations: take it without another
                s_j = -pt_j.g / xp.where(H_j > 0, H_j, xp.inf)
                last = (xp.abs(s_j) < 3e-5 * (1.0 + theta[rows])) & (theta[rows] + s_j > 0)
                s_j = xp.where(last, s_j, 0.0)
                pt.put(rows, pt_j.moved(slope, s_j, H_j))
                theta[rows] = theta[rows] + s_j
                H[rows], final[rows], done[rows] = H_j, True, last
            searching = ~small
            searching[jump] = False
            search = xp.flatnonzero(searching)
            if search.size == 0:
                continue
            sub, th, p0, g0, Ha, step = eng.subset(search), th[search], p0.take(search), g0[search], Ha[search], step[search]
            rows = act[search]

            def evaluate(r, raw):
                q = sub.subset(r).reml_deviance(  # noqa: B023
                    xp.abs(raw), *p0.take(r).predict(raw - th[r], flip=raw < 0), grad=True  # noqa: B023
                )
                return q.f, q

            trial, (_, p_new), ok = sub._line_search(
                lambda t: th + t * step,  # noqa: B023
                evaluate, p0.f, lambda r, raw: g0[r] * (raw - th[r]), xp.zeros(search.size, dtype=bool),  # noqa: B023
                xp.ones(search.size), 40,
            )
            done[rows[~ok]] = True
            move = xp.flatnonzero(ok)
            raw, rows = trial[move], rows[move]
            p_move = p_new.take(move)
            # the secant of the gradient along the step (none across theta = 0, where
            # the gradient changes sign by symmetry)
            same_side = raw > 0
            dt = xp.where(same_side, raw - th[move], 1.0)
            H[rows] = xp.where(same_side, (p_move.g - g0[move]) / dt, Ha[move])
            final[rows] = False
            theta[rows] = xp.abs(raw)
            pt.put(rows, p_move)
        # the final curvature by central differences of the gradient, for the covariance
        rest = xp.flatnonzero(~final)
        if rest.size:
            H[rest] = self.subset(rest)._central(theta[rest], pt.take(rest))[1]
        converged = done & xp.isfinite(pt.f)
        cov = pt.S_inv
        if hessian_cov:
            # glmmTMB's vcov under REML: the uncertainty of theta propagated to beta~
            live = (theta > 1e-6) & (H > 0)
            scale = xp.where(live, 2.0 / xp.where(live, H, 1.0), 0.0)
            cov = cov + scale[:, None, None] * pt.J[:, :, None] * pt.J[:, None, :]
        return BatchResult(theta, pt.beta, cov, pt.f, pt.u, pt.M, it, converged)

    def _central(self, theta, pt, moved=None):
        """The gradient's central difference at ``theta`` (h = 1e-4): the curvature, and
        ``pt`` itself, or with ``moved`` (``pt`` then holds the point ``theta - moved``)
        the point at ``theta`` interpolated from the two evaluations, to O(h^4) with
        the slopes' differences."""
        xp = self.xp
        h = 1e-4 * xp.maximum(1.0, theta)
        d0 = xp.zeros_like(theta) if moved is None else moved
        pp = self.reml_deviance(theta + h, *pt.predict(d0 + h), grad=True)
        low = theta < h  # reflected: g(-t) = -g(t), and u changes sign
        pm = self.reml_deviance(xp.abs(theta - h), *pt.predict(d0 - h, flip=low), grad=True)
        sign = xp.where(low, -1.0, 1.0)
        H = (pp.g - sign * pm.g) / (2.0 * h)
        if moved is None:
            return pt, H
        c, sg = (h / 4.0)[:, None], sign[:, None]
        mid = RemlPoint(
            0.5 * (pp.f + pm.f) - 0.25 * h * (pp.g - sign * pm.g),
            0.5 * (pp.beta + pm.beta) - c * (pp.J - sg * pm.J),
            0.5 * (pp.u + sg * pm.u) - c * (pp.du - pm.du),
            0.5 * (pp.M + pm.M), 0.5 * (pp.g + sign * pm.g), 0.5 * (pp.S_inv + pm.S_inv),
            0.5 * (pp.J + sg * pm.J), 0.5 * (pp.du + pm.du),
        )
        # derivatives in theta at the centre (the rest by the central differences)
        d = 1.0 / (2.0 * h)
        slope = RemlPoint(
            mid.g, mid.J, mid.du, d[:, None] * (pp.M - pm.M), H, d[:, None, None] * (pp.S_inv - pm.S_inv),
            d[:, None] * (pp.J - sg * pm.J), d[:, None] * (pp.du - pm.du),
        )
        return mid, H, slope

    def _profiled_curvature(self, params, state, du):
        """The Laplace deviance's curvature in theta with beta profiled out: the start of
        REML's Newton iteration (frozen fixed effects held)."""
        xp = self.xp
        Ht = self._grad_columns(params, state[0], du, 1e-5, [0])[:, :, 0]
        fz = self.frozen()
        hb = xp.where(fz, 0.0, Ht[:, 1:])
        S = self._masked_schur(self.schur(params[:, 0], state), fz)
        try:
            sol = xp.linalg.solve(2.0 * S, hb[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            return None
        return Ht[:, 0] - xp.sum(hb * sol, axis=1)


def _alloc_like(res, n, xp):
    """Empty arrays for ``n`` genes shaped as the evaluation ``res`` (arrays, tuples
    of them, :class:`RemlPoint`)."""
    if isinstance(res, RemlPoint):
        return RemlPoint(*(_alloc_like(getattr(res, k), n, xp) for k in res.__dataclass_fields__))
    if isinstance(res, (tuple, list)):
        return [_alloc_like(r, n, xp) for r in res]
    return xp.zeros((n, *res.shape[1:]), dtype=res.dtype)


def _scatter(out, rows, res, pick):
    """``out[rows] = res[pick]``, through the structure of :func:`_alloc_like`."""
    if isinstance(res, RemlPoint):
        for k in res.__dataclass_fields__:
            _scatter(getattr(out, k), rows, getattr(res, k), pick)
    elif isinstance(res, (tuple, list)):
        for o, r in zip(out, res):
            _scatter(o, rows, r, pick)
    else:
        out[rows] = res[pick]


def _bcast(v, like):
    """``v`` (G,) shaped to multiply ``like`` (G, ...)."""
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def _reml_step(theta, g, H):
    """The Newton step of each gene's theta for the REML criterion: in log theta where
    theta > 0.01 and the curvature there, ``theta^2 H + theta g``, is positive (the
    criterion is far closer to quadratic in log theta), in theta where only ``H`` is,
    else a gradient step; at most ``1 + theta`` either way."""
    xp = get_namespace(theta)
    hs = theta * theta * H + theta * g
    logn = (theta > 0.01) & (hs > 0)
    ds = xp.clip(-theta * g / xp.where(logn, hs, 1.0), -2.0, 2.0)
    newton = H > 0
    step = xp.where(newton, -g / xp.where(newton, H, 1.0), -xp.sign(g) * 0.5 * (theta + 0.1))
    step = xp.where(logn, theta * xp.expm1(ds), step)
    return xp.clip(step, -(1.0 + theta), 1.0 + theta)
