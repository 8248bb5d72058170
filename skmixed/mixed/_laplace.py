"""Penalised iteratively reweighted least squares (PIRLS), the Laplace deviance and
its exact gradient, adaptive Gauss-Hermite quadrature, and the outer optimisation.

Notation follows lme4 (Bates et al., ``glmer`` vignette): spherical random effects
``u ~ N(0, I_q)``, ``b = Lambda(theta) u``, ``A = Z Lambda``, linear predictor
``eta = X beta + A u + offset``. For fixed ``(theta, beta)`` PIRLS finds the
conditional mode ``u_hat`` of ``loglik(y | eta) - |u|^2 / 2``; with
``M = I + A' V A`` (``V`` the Fisher weights at ``u_hat``) and ``M = L L'``,

    Laplace deviance  f(theta, beta) = -2 loglik(y | eta_hat) + |u_hat|^2 + 2 sum(log diag L),

the quantity ``glmer(nAGQ = 1)`` minimises jointly over ``(theta, beta)``.

Gradient. With ``r = w (y - mu)`` and ``v = w mu`` at the mode, ``h_i = (A M^-1 A')_ii``
and, for a parameter ``p`` with direct effect ``d eta / dp = e_p`` (``X[:, j]`` for
``beta_j``, ``dA u_hat`` for ``theta_m``), the envelope theorem and implicit
differentiation of the mode (``M du = dA' r - A' (v e_p)``) give

    df/dp = -2 r' e_p + 2 tr(M^-1 A' V dA) + sum_i h_i v_i (e_p + A du)_i

(the middle term for ``theta`` only; for Poisson ``dv/deta = v``). Checked against
finite differences in the tests.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.linalg.lapack
import scipy.optimize
import scipy.special
from sklearn.exceptions import ConvergenceWarning

from .._backend import get_namespace
from ._design import RandomEffectsDesign
from ._factor import Assembler


@dataclass
class ModeState:
    """Everything PIRLS leaves behind at the conditional mode."""

    u: np.ndarray
    eta: np.ndarray
    mu: np.ndarray
    Adata: np.ndarray
    A: object  # ndarray or scipy.sparse.csr_matrix
    factor: object  # DenseFactor or BlockFactor of M = I + A' V A at the mode
    loglik: float  # sum of w * loglik (without the collapse constant)
    converged: bool


def central_gradient(f, x, rel=1e-5):
    """Gradient of ``f`` at ``x`` by central differences with steps ``rel * max(1, |x_i|)``."""
    g = np.empty_like(x)
    for i in range(x.size):
        h = rel * max(1.0, abs(x[i]))
        xp_, xm = x.copy(), x.copy()
        xp_[i] += h
        xm[i] -= h
        g[i] = (f(xp_) - f(xm)) / (2.0 * h)
    return g


class LaplaceProblem:
    """The marginal likelihood of a GLMM as a function of ``(theta, beta)``."""

    def __init__(self, X, y, design: RandomEffectsDesign, family, *, offset=None, weights=None):
        self.X = np.asarray(X, dtype=float)
        self.y = np.asarray(y, dtype=float)
        self.design = design
        self.family = family
        n = self.y.shape[0]
        self.offset = np.zeros(n) if offset is None else np.asarray(offset, dtype=float)
        self.w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
        self.p = self.X.shape[1]
        self.n_theta = design.n_theta
        self._u_start = np.zeros(design.q)
        self._assemble = Assembler(design)
        # small problems (and collapsed ones) run faster with a dense A
        self._dense = n * design.q <= 2_000_000
        self.n_pirls_fail = 0
        self._log_norm = float(np.sum(family.log_normaliser(self.y, self.w)))

    # -- PIRLS -----------------------------------------------------------------
    def _loglik(self, eta):
        return float(np.sum(self.family.loglik_kernel(self.y, eta, self.w))) + self._log_norm

    def _penalised(self, eta, u):
        return self._loglik(eta) - 0.5 * float(u @ u)

    def mode(self, theta, beta, u0=None, *, max_iter=50) -> ModeState:
        """Conditional mode of ``u`` by Newton steps with step halving."""
        design, fam = self.design, self.family
        Adata = design.A_data(theta)
        A = design.A_matrix(Adata, dense=self._dense)
        fixed = self.X @ beta + self.offset
        u = (self._u_start if u0 is None else u0).copy()
        eta = fixed + A @ u
        obj = self._penalised(eta, u)
        converged = False
        for _ in range(max_iter):
            mu = fam.mean(eta)
            grad = A.T @ fam.score(self.y, mu, self.w) - u
            factor = self._assemble(Adata, fam.information(mu, self.w))
            step = factor.solve(grad)
            decrement = float(grad @ step)
            if decrement < 1e-10 * (1.0 + abs(obj)):
                # Inside the region of quadratic convergence one full step reaches
                # round-off; the gradient of the Laplace deviance is first-order in
                # the error of u, so we do not stop earlier.
                u = u + step
                eta = fixed + A @ u
                converged = True
                break
            t = 1.0
            with np.errstate(over="ignore"):  # an overshooting trial step is simply rejected
                for _ in range(40):
                    u_new = u + t * step
                    eta_new = fixed + A @ u_new
                    obj_new = self._penalised(eta_new, u_new)
                    if obj_new >= obj - 1e-13 * abs(obj):
                        break
                    t *= 0.5
            u, eta, obj = u_new, eta_new, obj_new
        mu = fam.mean(eta)
        factor = self._assemble(Adata, fam.information(mu, self.w))
        if not converged:
            self.n_pirls_fail += 1
        ll = self._loglik(eta)
        return ModeState(u, eta, mu, Adata, A, factor, ll, converged)

    def split(self, params):
        return params[: self.n_theta], params[self.n_theta :]

    def state(self, params) -> ModeState:
        theta, beta = self.split(params)
        st = self.mode(theta, beta)
        self._u_start = st.u  # warm start for the next evaluation
        return st

    # -- Laplace deviance and its gradient ------------------------------------
    @staticmethod
    def laplace_deviance(st: ModeState) -> float:
        return -2.0 * st.loglik + float(st.u @ st.u) + st.factor.logdet()

    def _leverage_blocks(self, st: ModeState):
        """``B[i, s] = (A M^-1)[i, indices[i, s]]`` for the non-zeros of each row."""
        # B[i, t] = sum_s A[i, s] Minv[idx[i, s], idx[i, t]]
        return np.einsum("is,ist->it", st.Adata, st.factor.inv_gather(self.design.indices))

    def deviance_and_gradient(self, params):
        st = self.state(params)
        return self.laplace_deviance(st), self.gradient(params, st)

    def gradient(self, params, st: ModeState):
        design, fam = self.design, self.family
        theta, _ = self.split(params)
        r = fam.score(self.y, st.mu, self.w)
        v = fam.information(st.mu, self.w)
        B = self._leverage_blocks(st)
        h = np.sum(B * st.Adata, axis=1)
        # d log det M = sum_i h_i dv_i, with dv_i = (dv/deta)_i deta_i
        hv = h * fam.information_deriv(st.mu, self.w)
        # direct effects of each parameter on eta: (n, n_theta + p)
        E = np.empty((self.y.shape[0], self.n_theta + self.p))
        trace = np.zeros(self.n_theta + self.p)
        dAtr = np.zeros((design.q, self.n_theta))
        u_rows = st.u[design.indices]  # (n, K): u at each row's non-zeros
        for m in range(self.n_theta):
            slot, zc = design.dA_entry(m)
            zcol = design.Zall[:, zc]
            E[:, m] = zcol * u_rows[:, slot]
            trace[m] = 2.0 * float(np.sum(v * B[:, slot] * zcol))
            dAtr[:, m] = np.bincount(design.indices[:, slot], weights=zcol * r, minlength=design.q)
        E[:, self.n_theta :] = self.X
        rhs = st.A.T @ (v[:, None] * E)
        rhs[:, : self.n_theta] = dAtr - rhs[:, : self.n_theta]
        rhs[:, self.n_theta :] *= -1.0
        du = st.factor.solve(rhs)
        deta = E + st.A @ du
        return -2.0 * (r @ E) + trace + hv @ deta

    # -- adaptive Gauss-Hermite quadrature (single scalar term) ---------------------
    def agq_deviance(self, params, nagq: int) -> float:
        """lme4's AGQ deviance, on the scale of the Laplace one (``-2 loglik`` based)."""
        return self.agq_deviance_and_gradient(params, nagq, gradient=False)[0]

    def agq_deviance_and_gradient(self, params, nagq: int, gradient: bool = True):
        """AGQ deviance for one scalar term, and its exact gradient.

        Per level ``l`` with mode ``u_l``, ``M_l = 1 + sum a_i^2 v_i`` and nodes
        ``u_lk = u_l + z_k / sqrt(M_l)``:
        ``F_l = log M_l - 2 logsumexp_k(-D_lk / 2 + c_k)`` with
        ``D_lk = -2 sum_i loglik_i(u_lk) + u_lk^2`` and ``c_k`` from the
        Gauss-Hermite weights (lme4's ``GHrule``) and the N(0, 1) density.
        The gradient differentiates through the mode and the node positions.
        """
        design, fam = self.design, self.family
        st = self.state(params)
        codes = design.terms[0].codes
        L = design.n_levels[0]
        z, wq = np.polynomial.hermite_e.hermegauss(nagq)
        # GHrule weights (summing to 1), and the N(0, 1) density of u: 1 / sqrt(2 pi) twice
        c = np.log(wq / (2.0 * np.pi)) + 0.5 * z**2 + 0.5 * np.log(2.0 * np.pi)
        Mdiag = st.factor.diag()  # M is diagonal for one scalar term
        sd = 1.0 / np.sqrt(Mdiag)
        a = st.Adata[:, 0]
        base = st.eta - a * st.u[codes]
        U = st.u[None, :] + z[:, None] * sd[None, :]  # (K, L) nodes
        eta_k = base[None, :] + a[None, :] * U[:, codes]  # (K, n)
        ll = fam.loglik(self.y[None, :], eta_k, self.w[None, :])
        D = np.stack([-2.0 * np.bincount(codes, weights=row, minlength=L) for row in ll]) + U**2
        logits = -0.5 * D + c[:, None]
        lse = scipy.special.logsumexp(logits, axis=0)
        f = float(np.sum(np.log(Mdiag)) - 2.0 * np.sum(lse))
        if not gradient:
            return f, None
        pi = np.exp(logits - lse[None, :])  # (K, L) posterior weights of the nodes
        zcol = design.Zall[:, 0]
        v = fam.information(st.mu, self.w)
        dv = fam.information_deriv(st.mu, self.w)
        r0 = fam.score(self.y, st.mu, self.w)
        rk = fam.score(self.y[None, :], fam.mean(eta_k), self.w[None, :])  # (K, n)
        seg = lambda x: np.bincount(codes, weights=x, minlength=L)  # noqa: E731
        # node-weighted residual sums: sum_k pi_lk r_i(u_lk) and sum_k pi_lk z_k r_i(u_lk)
        pr = np.sum(pi[:, codes] * rk, axis=0)
        pzr = np.sum((pi * z[:, None])[:, codes] * rk, axis=0)
        # dD_lk/du at the node, weighted: sum_k pi (-2 sum a r + 2 u), and with z_k
        dDdu = -2.0 * seg(a * pr) + 2.0 * np.sum(pi * U, axis=0)
        dDdu_z = -2.0 * seg(a * pzr) + 2.0 * np.sum(pi * z[:, None] * U, axis=0)
        n_par = params.size
        grad = np.empty(n_par)
        # direct effects on eta at fixed u: theta -> z_i u, beta_j -> x_ij; on a: theta -> z_i
        for m in range(n_par):
            if m < self.n_theta:
                deta_u = zcol * st.u[codes]  # at the mode
                da = zcol
                # direct dD/dtheta at each node: -2 sum_i r_i(u_lk) z_i u_lk
                direct = -2.0 * seg(zcol * np.sum(pi[:, codes] * rk * U[:, codes], axis=0))
            else:
                xj = self.X[:, m - self.n_theta]
                deta_u, da = xj, None
                direct = -2.0 * seg(xj * pr)
            rhs = -seg(a * v * deta_u)
            if da is not None:
                rhs += seg(da * r0)
            du = rhs / Mdiag
            deta_hat = deta_u + a * du[codes]
            dM = seg(a * a * dv * deta_hat)
            if da is not None:
                dM += seg(2.0 * a * da * v)
            dsd = -0.5 * dM / Mdiag**1.5
            grad[m] = float(np.sum(dM / Mdiag) + np.sum(direct + dDdu * du + dDdu_z * dsd))
        return f, grad

    # -- conditional (RX-based) covariance of beta --------------------------------
    def schur(self, st: ModeState):
        """Schur complement ``X'VX - X'VA M^-1 A'VX``: the conditional information of beta."""
        v = self.family.information(st.mu, self.w)
        VX = v[:, None] * self.X
        AtVX = st.A.T @ VX
        return self.X.T @ VX - AtVX.T @ st.factor.solve(AtVX)

    def conditional_cov(self, st: ModeState):
        """Inverse Schur complement (lme4 ``use.hessian = FALSE``)."""
        return np.linalg.inv(self.schur(st))

    # -- REML: the fixed effects integrated out as well -------------------------------
    # glmmTMB's ``REML = TRUE``: beta joins u among the integrated parameters (flat
    # prior), so at given theta the Laplace approximation is taken at the joint mode
    # (u~, beta~) of the penalised deviance, and the log-determinant of the joint
    # Hessian is log det M + log det S, S the Schur complement (conditional
    # information of beta). Minimising it over theta alone corrects the downward
    # bias of the ML variance, as REML does for linear mixed models.
    def joint_mode(self, theta, beta, *, max_iter=50):
        """``(beta~, state, S)``: the joint mode of the penalised deviance at ``theta``."""
        st = self.mode(theta, beta, self._u_start)
        for _ in range(max_iter):
            S = self.schur(st)
            step = np.linalg.solve(S, self.X.T @ self.family.score(self.y, st.mu, self.w))
            pen = self._penalised(st.eta, st.u)
            t = 1.0
            for _ in range(30):  # halve an overshooting step (far from the mode only)
                trial = self.mode(theta, beta + t * step, st.u)
                if self._penalised(trial.eta, trial.u) >= pen - 1e-12 * abs(pen):
                    break
                t *= 0.5
            beta, st = beta + t * step, trial
            if np.max(np.abs(t * step)) <= 1e-11 * (1.0 + np.max(np.abs(beta))):
                break
        self._u_start = st.u
        return beta, st, self.schur(st)

    def reml_deviance(self, theta, beta):
        """REML criterion at ``theta`` (``-2`` times glmmTMB's REML log-likelihood, less
        ``p log(2 pi)``) and the joint mode's ``(beta~, state, S)``."""
        beta, st, S = self.joint_mode(theta, beta)
        sign, logdet_s = np.linalg.slogdet(S)
        f = self.laplace_deviance(st) + (logdet_s if sign > 0 else np.inf)
        return f, (beta, st, S)

    def optimise_reml(self, theta0, beta0, *, max_iter=500):
        """Minimise the REML criterion over theta (bounded L-BFGS-B on central-difference
        gradients; theta is short). Returns (theta, beta, f, n_iter, converged, message)."""
        beta_box = [np.asarray(beta0, dtype=float)]

        def fun(theta):
            f, (beta, _, _) = self.reml_deviance(theta, beta_box[0])
            beta_box[0] = beta
            return f

        def fun_grad(theta):
            return fun(theta), central_gradient(fun, theta, rel=1e-6)

        diag = np.isfinite(self.design.theta_lower)
        # theta = 0 is a stationary point of the criterion (by the sign symmetry): start off it
        theta0 = np.where(diag, np.maximum(np.abs(theta0), 0.05), theta0)
        bounds = [(0.0, None) if d else (None, None) for d in diag]
        res = scipy.optimize.minimize(
            fun_grad, theta0, jac=True, method="L-BFGS-B", bounds=bounds,
            options={"maxiter": max_iter, "ftol": 1e-15, "gtol": 1e-7},
        )
        theta = res.x
        f, (beta, _, _) = self.reml_deviance(theta, beta_box[0])
        g = central_gradient(fun, theta, rel=1e-6)
        free = ~(diag & (theta <= 1e-8) & (g >= 0))
        gnorm = float(np.max(np.abs(g[free]))) if free.any() else 0.0
        converged = gnorm < 1e-2
        message = "" if converged else f"REML gradient at the optimum is {gnorm:.3g} ({res.message})"
        return theta, beta, f, int(res.nit), converged, message

    def reml_cov(self, theta, beta, *, hessian=True, rel=1e-4):
        """Covariance of beta~ under REML: ``S^-1`` (``hessian=False``), plus, as
        glmmTMB's ``vcov``, the propagated uncertainty of theta, ``J V J'`` with
        ``J = d beta~ / d theta`` and ``V`` twice the inverse Hessian of the criterion."""
        f0, (beta, _, S) = self.reml_deviance(theta, beta)
        cov = np.linalg.inv(S)
        diag = np.isfinite(self.design.theta_lower)
        live = ~(diag & (np.abs(theta) <= 1e-8))  # at theta = 0, J = 0 by symmetry
        if not hessian or not live.any():
            return cov
        idx = np.flatnonzero(live)
        k = idx.size
        J = np.empty((self.p, k))
        H = np.empty((k, k))
        steps = rel * np.maximum(1.0, np.abs(theta[idx]))
        fs = {}

        def at(shift):
            key = tuple(np.round(shift / steps, 6))
            if key not in fs:
                th = theta.copy()
                th[idx] += shift
                fs[key] = self.reml_deviance(th, beta)
            return fs[key]

        for a in range(k):
            ea = np.zeros(k)
            ea[a] = steps[a]
            (fp, (bp, _, _)), (fm, (bm, _, _)) = at(ea), at(-ea)
            J[:, a] = (bp - bm) / (2 * steps[a])
            H[a, a] = (fp - 2 * f0 + fm) / steps[a] ** 2
            for c in range(a):
                ec = np.zeros(k)
                ec[c] = steps[c]
                fpp, fpm, fmp, fmm = (at(ea + ec)[0], at(ea - ec)[0], at(-ea + ec)[0], at(-ea - ec)[0])
                H[a, c] = H[c, a] = (fpp - fpm - fmp + fmm) / (4 * steps[a] * steps[c])
        try:
            V = 2.0 * np.linalg.inv(H)
        except np.linalg.LinAlgError:
            return cov
        if not np.all(np.isfinite(V)) or np.any(np.diag(V) <= 0):
            return cov
        return cov + J @ V @ J.T

    # -- outer optimisation --------------------------------------------------------------
    def bounds(self):
        lo = list(self.design.theta_lower) + [-np.inf] * self.p
        return [(None if np.isinf(b) else b, None) for b in lo]

    def objective(self, nagq: int):
        """(f, grad) callable for the optimiser, with the exact gradient."""
        if nagq <= 1:
            return self.deviance_and_gradient
        return lambda params: self.agq_deviance_and_gradient(params, nagq)

    @staticmethod
    def fd_gradient(f, x, rel=1e-5):
        return central_gradient(f, x, rel)

    def hessian(self, params, nagq: int, rel=1e-4):
        """Hessian of the deviance over (theta, beta) by central differences of the
        exact gradient: the matrix lme4's ``calc.derivs`` approximates by finite
        differences of the deviance."""
        fun = self.objective(nagq)
        n = params.size
        H = np.empty((n, n))
        for i in range(n):
            h = rel * max(1.0, abs(params[i]))
            xp_, xm = params.copy(), params.copy()
            xp_[i] += h
            xm[i] -= h
            H[:, i] = (fun(xp_)[1] - fun(xm)[1]) / (2 * h)
        return 0.5 * (H + H.T)

    def _approx_hessian(self, params, g, st, fun):
        """Newton matrix: theta columns by central differences of the gradient, the
        beta block from twice the Schur complement (the curvature at fixed theta,
        less the third-derivative terms of the log-determinant)."""
        nt = self.n_theta
        H = np.empty((params.size, params.size))
        for m in range(nt):
            h = 1e-5 * max(1.0, abs(params[m]))
            xp_, xm = params.copy(), params.copy()
            xp_[m] += h
            xm[m] -= h
            H[:, m] = (fun(xp_)[1] - fun(xm)[1]) / (2 * h)
        H[:nt, nt:] = H[nt:, :nt].T
        H[:nt, :nt] = 0.5 * (H[:nt, :nt] + H[:nt, :nt].T)
        H[nt:, nt:] = 2.0 * self.schur(st)
        return H

    def reflect(self, params):
        """The equivalent parameters with every diagonal entry of theta non-negative.

        Flipping the sign of a column of a term's Cholesky factor (``u_c -> -u_c``)
        changes neither the likelihood nor its Laplace or quadrature approximation, so
        a step that crosses a diagonal bound is reflected rather than projected onto
        it: projection would stop at ``theta = 0``, a stationary point of every
        deviance (by this symmetry) even where the variance is positive."""
        out = np.array(params, dtype=float)
        idx = self.design.theta_index
        for m, (j, r, c) in enumerate(idx):
            if r == c and out[m] < 0:
                for k, (j2, _, c2) in enumerate(idx):
                    if j2 == j and c2 == c:
                        out[k] = -out[k]
        return out

    def optimise(self, params0, nagq: int = 1, *, max_iter: int = 500):
        """Minimise the deviance over (theta, beta) by Newton steps with backtracking
        (|eigenvalues| where the Newton matrix is indefinite), theta's diagonal kept
        non-negative by reflection (see :meth:`reflect`).

        A diagonal entry of theta at 0 stays there if the deviance curves upwards
        along it; where it curves downwards, 0 is a saddle (the gradient vanishes there
        by symmetry) and the step leaves it.

        Returns (params, deviance, n_iter, converged, message).
        """
        fun = self.objective(nagq)
        lower = np.array([b[0] if b[0] is not None else -np.inf for b in self.bounds()])
        diag = np.isfinite(lower)
        nt = self.n_theta
        params = self.reflect(np.asarray(params0, dtype=float))
        f, g = fun(params)
        converged, message, it = False, "", 0
        for it in range(1, max_iter + 1):
            st = self.state(params)
            H = self._approx_hessian(params, g, st, fun)
            at_zero = diag & (params <= 1e-12)
            escape = at_zero & (np.diag(H) < 0)
            free = ~(at_zero & (g >= 0) & ~escape)
            Hf = H[np.ix_(free, free)]
            step = np.zeros_like(params)
            try:
                step[free] = -scipy.linalg.cho_solve((np.linalg.cholesky(Hf), True), g[free])
            except np.linalg.LinAlgError:
                # indefinite (theta's curvature is negative away from the optimum): the
                # step of the matrix with |eigenvalues|, which goes down negative curvature
                step[free] = abs_eigen_step(Hf[None], g[free][None])[0]
            step[escape] = 0.1  # down the negative curvature; the line search sizes it
            decrement = -float(g @ step)
            if decrement < 1e-15 * max(1.0, abs(f)) and not escape.any():
                converged = True
                break
            # theta moves at most by 1 + its size at first (a reflected overshoot could
            # otherwise land anywhere); the line search does the rest
            big = np.max(np.abs(step[:nt]), initial=0.0) / (1.0 + np.max(np.abs(params[:nt]), initial=0.0))
            t, accepted = min(1.0, 1.0 / big) if big > 0 else 1.0, False
            for _ in range(60):
                trial = self.reflect(params + t * step)
                try:
                    with np.errstate(over="ignore", invalid="ignore"):
                        f_new, g_new = fun(trial)
                except np.linalg.LinAlgError:  # M not numerically positive definite: too far
                    t *= 0.5
                    continue
                if np.isfinite(f_new) and f_new <= f + 1e-4 * t * float(g @ (trial - params)) + 1e-13 * abs(f):
                    accepted = True
                    break
                t *= 0.5
            if not accepted:
                # no descent along the Newton direction: we are at round-off level
                converged = decrement < 1e-6 * max(1.0, abs(f))
                if not converged:
                    message = f"line search failed with Newton decrement {decrement:.3g}"
                break
            params, f, g = trial, f_new, g_new
        else:
            message = f"no convergence in {max_iter} Newton iterations"
        free = ~(diag & (params <= 1e-12) & (g >= 0))
        gnorm = float(np.max(np.abs(g[free]))) if np.any(free) else 0.0
        if converged and gnorm > 1e-2:
            converged, message = False, f"gradient at the optimum is {gnorm:.3g}"
        return params, f, it, converged, message


def abs_eigen_step(H, g):
    """``-|H|^-1 g`` for a stack of symmetric matrices ``H`` (..., P, P): the Newton step
    with every eigenvalue replaced by its absolute value (floored at 1e-8 of the
    largest), a descent direction that follows negative curvature downhill."""
    xp = get_namespace(H)
    lam, V = xp.linalg.eigh(H)
    lam = xp.maximum(xp.abs(lam), 1e-8 * xp.maximum(1.0, xp.max(xp.abs(lam), axis=-1, keepdims=True)))
    return -(V @ ((xp.swapaxes(V, -1, -2) @ g[..., None]) / lam[..., None]))[..., 0]


def warn_not_converged(message: str):
    warnings.warn(f"PoissonGLMM did not converge: {message}", ConvergenceWarning, stacklevel=3)
