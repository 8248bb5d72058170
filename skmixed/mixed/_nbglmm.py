"""NegativeBinomialGLMM: glmmTMB's ``family = nbinom2`` GLMM as a scikit-learn regressor.

The model is that of :class:`~skmixed.PoissonGLMM` with NB2 noise,
``Var(y | b) = mu + phi mu^2`` (``phi = 1 / size``). The size is estimated jointly with
theta, by the restricted (REML) Laplace criterion (the default) or with ``(theta, beta)``
by maximising the Laplace approximation of the marginal likelihood.

Two choices make the numbers glmmTMB's:

* the Laplace log-determinant uses the *observed* information of the NB2
  log-likelihood in ``eta``, ``mu (1 + phi y) / (1 + phi mu)^2`` (TMB's Laplace
  approximation is built on the Hessian of the joint likelihood), not the expected
  one ``mu / (1 + phi mu)`` that PIRLS weights would give (for the Poisson log link
  the two coincide, which is why lme4 and glmmTMB agree there);
* the size is a parameter of the same optimisation, not alternated with the GLMM as
  lme4's ``glmer.nb`` does.

The optimiser works on ``phi = 1 / size >= 0``: the Poisson limit is then the
boundary ``phi = 0``, where the likelihood is smooth, and is reached and flagged
(``size_ = inf``) instead of sending ``log size`` to infinity.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.optimize

from .._families import NegativeBinomial, Poisson
from ..glm._newton import fit_glm
from ._glmm import PoissonGLMM
from ._laplace import LaplaceProblem, central_gradient
from ._nb_multigene import fit_many_nb

PHI_FLOOR = 1e-12  # phi below this is evaluated as size 1e12: Poisson to round-off
POISSON_LIMIT = 1e-8  # phi at or below this at the optimum: the Poisson boundary


def nb_size(phi):
    """The NB2 size for an overdispersion ``phi`` (floored: ``phi = 0`` is Poisson)."""
    return 1.0 / np.maximum(phi, PHI_FLOOR)


class ObservedNB(NegativeBinomial):
    """NB2 family bound to its responses, with the observed information as weights.

    ``information`` (the Hessian weight of PIRLS and of the Laplace determinant) is
    ``-d^2 loglik / d eta^2`` at the data, and ``information_deriv`` its derivative in
    ``eta``; :class:`~skmixed.mixed._laplace.LaplaceProblem` then computes TMB's
    Laplace approximation and its exact gradient unchanged.
    """

    def __init__(self, phi, y):
        super().__init__(nb_size(phi))
        self.phi = max(float(phi), 0.0)
        self._y = y

    def information(self, mu, weights=None):
        return self.observed_information(self._y, mu, weights)

    def information_deriv(self, mu, weights=None):
        """``mu (1 + phi y)(1 - phi mu) / (1 + phi mu)^3``."""
        f = self.phi
        q = 1.0 + f * mu
        h = mu * (1.0 + f * self._y) * (1.0 - f * mu) / (q * q * q)
        return h if weights is None else weights * h

    def phi_derivatives(self, mu, weights=None):
        """Derivatives in ``phi`` at fixed ``eta``: of the log-likelihood, of the score
        ``d loglik / d eta`` and of the observed information."""
        f, y = self.phi, self._y
        q = 1.0 + f * mu
        # d loglik / d phi = -size^2 d loglik / d size = -size * (d loglik / d log size)
        dl = -self.size * self.size_score(y, mu)
        ds = -(y - mu) * mu / (q * q)
        dw = mu * (y - 2.0 * mu - f * mu * y) / (q * q * q)
        if weights is not None:
            dl, ds, dw = weights * dl, weights * ds, weights * dw
        return dl, ds, dw


def _fd_column(fun, params, m, g0, rel):
    """Central difference of the gradient along parameter ``m``; one-sided (second
    order) where a central step would make ``phi`` (the last parameter) negative."""
    h = rel * max(1.0, abs(params[m]))
    step = np.zeros_like(params)
    step[m] = h
    if m == params.size - 1 and params[m] < h:
        g1, g2 = fun(params + step)[1], fun(params + 2 * step)[1]
        return (-3.0 * g0 + 4.0 * g1 - g2) / (2.0 * h)
    return (fun(params + step)[1] - fun(params - step)[1]) / (2.0 * h)


class NBLaplaceProblem(LaplaceProblem):
    """The Laplace (or AGQ) marginal likelihood of an NB2 GLMM over ``(theta, beta, phi)``.

    ``phi = 1 / size`` is the last parameter; parameter vectors without it (as the
    inherited AGQ code passes) are evaluated at the current ``phi``.
    """

    def __init__(self, X, y, design, *, offset=None, weights=None, phi0=1.0):
        super().__init__(X, y, design, ObservedNB(phi0, np.asarray(y, dtype=float)), offset=offset, weights=weights)
        self.phi0 = float(phi0)
        self.phi = self.phi0
        self.opt_params = None
        self.full_hessian = None

    def set_phi(self, phi):
        phi = max(float(phi), 0.0)
        if phi != self.family.phi:
            self.family = ObservedNB(phi, self.y)
            self._log_norm = float(np.sum(self.family.log_normaliser(self.y, self.w)))
        self.phi = phi

    def split(self, params):
        return params[: self.n_theta], params[self.n_theta : self.n_theta + self.p]

    def state(self, params):
        if params.size == self.n_theta + self.p + 1:
            self.set_phi(params[-1])
        return super().state(params)

    def bounds(self):
        return super().bounds() + [(0.0, None)]

    def reflect(self, params):
        out = super().reflect(params)
        if out.size == self.n_theta + self.p + 1:
            # phi < 0 is no distribution: projected; below 1e-10 it is the Poisson boundary
            # itself (the deviance differs from there by less than round-off)
            out[-1] = out[-1] if out[-1] >= 1e-10 else 0.0
        return out

    # -- deviance and gradient over (theta, beta, phi) -----------------------------------
    def phi_gradient(self, st):
        """``df / dphi``: the direct effect on the log-likelihood, and on ``log det M``
        through the observed weights, directly and through the mode
        (``M du = A' dscore/dphi``)."""
        dl, ds, dw = self.family.phi_derivatives(st.mu, self.w)
        B = self._leverage_blocks(st)
        h = np.sum(B * st.Adata, axis=1)
        du = st.factor.solve(st.A.T @ ds)
        deta = st.A @ du
        dv = self.family.information_deriv(st.mu, self.w)
        return -2.0 * float(np.sum(dl)) + float(h @ (dw + dv * deta))

    def deviance_and_gradient(self, params):
        st = self.state(params)
        g = self.gradient(params, st)
        return self.laplace_deviance(st), np.append(g, self.phi_gradient(st))

    def _agq_full(self, params, nagq):
        """AGQ deviance and gradient; the ``phi`` component by central differences."""
        phi = max(float(params[-1]), 0.0)
        short = params[:-1]
        self.set_phi(phi)
        f, g = self.agq_deviance_and_gradient(short, nagq)
        h = 1e-6 * max(1.0, phi)
        lo = max(phi - h, 0.0)
        vals = []
        for x in (phi + h, lo):
            self.set_phi(x)
            vals.append(self.agq_deviance(short, nagq))
        self.set_phi(phi)
        self.state(params)  # the mode at the parameters themselves, for the caller
        return f, np.append(g, (vals[0] - vals[1]) / (phi + h - lo))

    def objective(self, nagq: int):
        if nagq <= 1:
            return self.deviance_and_gradient
        return lambda params: self._agq_full(params, nagq)

    def _approx_hessian(self, params, g, st, fun):
        """Newton matrix: columns of theta and phi by differences of the exact gradient,
        the beta block from the Schur complement (see the parent)."""
        nt, P = self.n_theta, params.size
        fd = list(range(nt)) + [P - 1]
        cols = np.column_stack([_fd_column(fun, params, m, g, 1e-5) for m in fd])
        self.set_phi(params[-1])  # conditional_cov below reads the family at params
        H = np.empty((P, P))
        H[:, fd] = cols
        H[fd, :] = cols.T
        H[np.ix_(fd, fd)] = 0.5 * (cols[fd] + cols[fd].T)
        b = slice(nt, nt + self.p)
        H[b, b] = 2.0 * np.linalg.inv(self.conditional_cov(st))
        if params[-1] <= 1e-12:
            # phi = 0 is a true boundary (no symmetry makes it a saddle, unlike theta = 0):
            # the optimiser's escape along negative curvature must not apply to it
            H[-1, -1] = max(H[-1, -1], 1e-8)
        return H

    def hessian(self, params, nagq: int, rel=1e-4):
        """The Hessian over ``(theta, beta)`` with ``phi`` profiled out (its inverse is
        the ``(theta, beta)`` block of the inverse of the full Hessian, kept as
        ``full_hessian``); at the Poisson boundary ``phi`` is held at 0."""
        fun = self.objective(nagq)
        g0 = fun(params)[1]
        n = params.size
        H = np.column_stack([_fd_column(fun, params, m, g0, rel) for m in range(n)])
        H = 0.5 * (H + H.T)
        self.full_hessian = H
        self.state(params)
        if params[-1] <= POISSON_LIMIT or H[-1, -1] <= 0:
            return H[:-1, :-1]
        return H[:-1, :-1] - np.outer(H[:-1, -1], H[-1, :-1]) / H[-1, -1]

    def optimise_reml(self, theta0, beta0, *, max_iter=500):
        """The REML criterion (glmmTMB's ``REML = TRUE``: beta integrated out with u)
        minimised over ``(theta, phi)``; the Hessian there in ``reml_hessian`` (for the
        size's standard error). Returns as the parent's."""
        beta_box = [np.asarray(beta0, dtype=float)]

        def fun(x):
            self.set_phi(x[-1])
            f, (beta, _, _) = self.reml_deviance(x[:-1], beta_box[0])
            beta_box[0] = beta
            return f

        diag = np.isfinite(self.design.theta_lower)
        # theta = 0 is a stationary point of the criterion (by the sign symmetry): start off it
        x0 = np.append(np.where(diag, np.maximum(np.abs(theta0), 0.05), theta0), self.phi)
        bounds = [(0.0, None) if d else (None, None) for d in diag] + [(0.0, None)]
        res = scipy.optimize.minimize(
            lambda x: (fun(x), central_gradient(fun, x, rel=1e-6)), x0, jac=True, method="L-BFGS-B",
            bounds=bounds, options={"maxiter": max_iter, "ftol": 1e-15, "gtol": 1e-7},
        )
        x = res.x.copy()
        x[-1] = x[-1] if x[-1] >= 1e-10 else 0.0  # the Poisson boundary, as in reflect
        g = central_gradient(fun, x, rel=1e-6)
        self.reml_hessian = _fd_hessian(fun, x)
        self.set_phi(x[-1])
        f, (beta, _, _) = self.reml_deviance(x[:-1], beta_box[0])
        free = ~(np.append(diag, True) & (x <= 1e-8) & (g >= 0))
        gnorm = float(np.max(np.abs(g[free]))) if free.any() else 0.0
        converged = gnorm < 1e-2
        message = "" if converged else f"REML gradient at the optimum is {gnorm:.3g} ({res.message})"
        return x[:-1], beta, f, int(res.nit), converged, message

    def optimise(self, params0, nagq: int = 1, *, max_iter: int = 500):
        params0 = np.asarray(params0, dtype=float)
        if params0.size == self.n_theta + self.p:
            params0 = np.append(params0, self.phi0)
        res = super().optimise(params0, nagq, max_iter=max_iter)
        self.opt_params = res[0]
        self.state(res[0])
        return res


def _fd_hessian(fun, x, rel=1e-4):
    """Hessian of a scalar ``fun`` by central differences (forward along a last
    coordinate ``phi`` too close to 0 for a central step)."""
    n = x.size
    h = rel * np.maximum(1.0, np.abs(x))
    if x[-1] < 2 * h[-1]:
        x = x.copy()
        x[-1] = 2 * h[-1]  # the curvature just inside the boundary
    H = np.empty((n, n))
    f0 = fun(x)
    for i in range(n):
        ei = np.zeros(n)
        ei[i] = h[i]
        H[i, i] = (fun(x + ei) - 2 * f0 + fun(x - ei)) / h[i] ** 2
        for j in range(i):
            ej = np.zeros(n)
            ej[j] = h[j]
            H[i, j] = H[j, i] = (
                fun(x + ei + ej) - fun(x + ei - ej) - fun(x - ei + ej) + fun(x - ei - ej)
            ) / (4 * h[i] * h[j])
    return H


def moment_phi(X, y, offset, weights):
    """A start for ``phi``: the method-of-moments overdispersion of a Poisson GLM fit
    (it also absorbs the between-group variance, so it errs high; Newton corrects)."""
    glm = fit_glm(X, y, Poisson, offset=offset, weights=weights, tol=1e-8, max_iter=50)
    mu = np.exp(np.clip(X @ glm.coef[0] + offset, -700, 700))
    w = np.ones_like(y) if weights is None else weights
    num = float(np.sum(w * ((y - mu) ** 2 - y)))
    return float(np.clip(num / max(float(np.sum(w * mu * mu)), 1e-300), 0.05, 20.0))


def nb_glm(X, y, offset, weights, beta0):
    """NB2 GLM over ``(beta, phi)`` by L-BFGS-B with the exact gradient; the covariance
    from differences of the gradient. Returns ``(beta, phi, cov_full, loglik, converged)``."""
    w = np.ones_like(y) if weights is None else weights

    def fun(par):
        beta, phi = par[:-1], max(par[-1], 0.0)
        fam = ObservedNB(phi, y)
        eta = X @ beta + offset
        mu = fam.mean(eta)
        ll = float(np.sum(fam.loglik(y, eta, w)))
        dl = fam.phi_derivatives(mu, w)[0]
        return -ll, -np.append(X.T @ fam.score(y, mu, w), np.sum(dl))

    x0 = np.append(beta0, moment_phi(X, y, offset, weights))
    bounds = [(None, None)] * X.shape[1] + [(0.0, None)]
    res = scipy.optimize.minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                                  options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-9})
    g0 = fun(res.x)[1]
    H = np.column_stack([_fd_column(fun, res.x, m, g0, 1e-5) for m in range(res.x.size)])
    return res.x[:-1], max(res.x[-1], 0.0), 0.5 * (H + H.T), -float(res.fun), bool(res.success)


class NegativeBinomialGLMM(PoissonGLMM):
    """Negative binomial (NB2) generalised linear mixed model, glmmTMB's ``nbinom2``.

    ``y_i | b ~ NB(mean = exp(x_i' beta + z_i' b + offset_i), size)``, variance
    ``mu + mu^2 / size``, ``b ~ N(0, Sigma(theta))``. The size is estimated with
    theta by the restricted Laplace criterion (``reml=True``, the default:
    ``glmmTMB(family = nbinom2, REML = TRUE)``), or with ``(theta, beta)`` by
    maximising the Laplace approximation (``reml=False``, glmmTMB's default; adaptive
    Gauss-Hermite quadrature for ``nagq > 1`` and a single scalar term); either fit
    agrees with glmmTMB's. Everything else (parameters, formulas,
    random-effects structures, many genes, :meth:`contrast`, :meth:`summary`) is that
    of :class:`~skmixed.PoissonGLMM`.

    Parameters
    ----------
    fit_intercept, random_slopes, random_correlated, nagq, vcov, max_iter, layer, verbose
        As for :class:`~skmixed.PoissonGLMM`. ``vcov="hessian"`` (the default) is
        glmmTMB's: the fixed-effects block of the inverse Hessian over every parameter.
    reml : bool, default=True
        glmmTMB's ``REML = TRUE`` (True, as :class:`~skmixed.PoissonGLMM`): theta and
        the size by the restricted Laplace criterion, the fixed effects integrated out
        with the random effects, for one response and for many genes; or maximum
        likelihood (False, glmmTMB's and ``glmer.nb``'s default). With few groups ML's
        variance of the group effects is biased low and the t tests of between-group
        contrasts reject too often (16 patients, NB noise, 2,500 null genes: 5.9% at
        the 5% level, against 4.6% under REML; see the user guide).
    collapse : bool, default=True
        Ignored: the NB likelihood does not reduce to sums over rows sharing a design.

    Attributes
    ----------
    size_ : float, or ndarray of shape (n_genes,)
        The NB2 size (glmmTMB's ``sigma(fit)``, lme4's ``theta``); ``inf`` at the
        Poisson limit.
    size_se_ : float or ndarray
        Its standard error (delta method, as glmmTMB's ``exp(betadisp)``); NaN at the
        Poisson limit.
    poisson_limit_ : bool or ndarray of bool
        The maximum is at ``size = inf`` (no overdispersion left): the fit is then the
        Poisson GLMM's, flagged rather than failed.
    coef_, intercept_, coef_cov_, theta_, variance_components_, random_effects_, loglik_, aic_, bic_
        As for :class:`~skmixed.PoissonGLMM` (the parameter count includes the size).

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from skmixed import NegativeBinomialGLMM
    >>> rng = np.random.default_rng(0)
    >>> g = np.repeat(np.arange(20), 30)
    >>> x = rng.normal(size=g.size)
    >>> mu = np.exp(0.5 + 0.3 * x + rng.normal(0, 0.5, 20)[g])
    >>> y = rng.poisson(rng.gamma(2.0, mu / 2.0))
    >>> model = NegativeBinomialGLMM().fit(x[:, None], y, groups=g)
    >>> round(float(model.size_), 1), model.coef_.round(2)
    (2.3, array([0.27]))
    """

    _collapsible = False

    def _laplace_problem(self, X, y, design, offset, weights):
        self._prob = NBLaplaceProblem(
            X, y, design, offset=offset, weights=weights, phi0=moment_phi(X, y, offset, weights)
        )
        return self._prob

    def _fit(self, X, y, terms, offset, sample_weight, feature_names):
        super()._fit(X, y, terms, offset, sample_weight, feature_names)
        self.n_params_ += 0 if self.poisson_limit_ else 1
        k, n = self.n_params_, self.nobs_
        self.aic_ = -2 * self.loglik_ + 2 * k
        self.bic_ = -2 * self.loglik_ + np.log(n) * k
        yy = np.asarray(y, dtype=float)
        w = np.ones_like(yy) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        fam = Poisson if self.poisson_limit_ else NegativeBinomial(self.size_)
        self.loglik_saturated_ = float(np.sum(fam.saturated_loglik(yy, w)))
        return self

    def _set_size(self, phi, var_phi):
        self.poisson_limit_ = bool(phi <= POISSON_LIMIT)
        if self.poisson_limit_:
            self.size_, self.size_se_ = np.inf, np.nan
            warnings.warn(
                "the size is at its Poisson limit (size = inf): no overdispersion beyond the "
                "random effects; the fit is the Poisson GLMM's.",
                UserWarning,
                stacklevel=5,
            )
            return
        self.size_ = 1.0 / phi
        # delta method: d size / d phi = -1 / phi^2
        self.size_se_ = float(np.sqrt(var_phi) / phi**2) if var_phi > 0 else np.nan

    def _fit_glmm(self, terms, Xu, y, off, w, beta0):
        out = super()._fit_glmm(terms, Xu, y, off, w, beta0)
        prob = self._prob
        if self.reml:
            phi, H = prob.phi, prob.reml_hessian
        else:
            phi, H = float(prob.opt_params[-1]), prob.full_hessian
            if H is None:  # vcov="conditional": the size's variance still needs the Hessian
                prob.hessian(prob.opt_params, int(self.nagq))
                H = prob.full_hessian
        try:
            var_phi = float(2.0 * np.linalg.inv(H)[-1, -1])
        except np.linalg.LinAlgError:
            var_phi = np.nan
        self._set_size(phi, var_phi)
        del self._prob
        return out

    def _fit_glm_only(self, glm, Xu, y, off, w):
        result = super()._fit_glm_only(glm, Xu, y, off, w)
        beta, phi, H, loglik, ok = nb_glm(Xu, y, off, w, glm.coef[0])
        cov = np.linalg.inv(H)
        self._set_size(phi, float(cov[-1, -1]))
        msg = "" if ok else "L-BFGS-B did not converge for the NB GLM"
        return (beta, cov[:-1, :-1], result[2], -2.0 * loglik, result[4], ok, msg)

    def summary(self, alpha: float = 0.05):
        out = super().summary(alpha)
        if isinstance(out.fit, pd.Series):
            out.fit["size"] = self.size_
            out.fit["size_se"] = self.size_se_
        return out

    # -- many genes: the engine of _nb_multigene; the rest is PoissonGLMM's ----------------
    def _fit_many_core(self, *args, **kwargs):
        self._nb_many = fit_many_nb(*args, **kwargs)
        return self._nb_many

    def _fit_many(self, *args, **kwargs):
        super()._fit_many(*args, **kwargs)
        out = self._nb_many
        del self._nb_many
        self.size_, self.size_se_ = out["size"], out["size_se"]
        self.poisson_limit_ = np.isinf(out["size"])  # also where another flag ("singular") won
        return self
