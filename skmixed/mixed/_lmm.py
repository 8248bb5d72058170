"""LinearMixedModel: lme4's ``lmer`` as a scikit-learn regressor."""

from __future__ import annotations

import numbers
import time
import warnings

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.stats
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted, validate_data

from .._threads import one_blas_thread
from . import _lmm_core as core
from ._design import RandomEffectsDesign
from ._glmm import _SINGULAR_TOL, GLMMSummary, PoissonGLMM, _check_vector, _check_weights
from ._lmm_em import fit_em

_SOLVERS = ("profiled", "em", "mackay")


def _drop_aliased(fixed, names):
    """Columns kept: as R's ``qr`` (dqrdc2, tol 1e-7) used by lme4, later columns aliased with
    earlier ones are dropped, with a warning."""
    if fixed.shape[1] == 0:
        return np.zeros(0, dtype=int)
    R = scipy.linalg.qr(fixed, mode="r")[0]
    norms = np.linalg.norm(fixed, axis=0)
    diag = np.abs(np.diag(R))
    used = np.flatnonzero(diag[: fixed.shape[1]] > 1e-7 * np.maximum(norms[: diag.size], 1e-300))
    if used.size < fixed.shape[1]:
        dropped = [names[j] for j in sorted(set(range(fixed.shape[1])) - set(used))]
        warnings.warn(
            f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} column(s): {dropped}",
            UserWarning,
            stacklevel=4,
        )
    return used


class LinearMixedModel(RegressorMixin, BaseEstimator):
    """Linear mixed model fitted by REML or maximum likelihood, as lme4's ``lmer``.

    ``y = X beta + Z b + e`` with ``b ~ N(0, Sigma(theta))`` and ``e ~ N(0, sigma^2 / w)``.
    The default solver minimises lme4's profiled (REML) deviance in the relative
    covariance factor ``theta`` (Bates et al. 2015), evaluated from sufficient
    statistics computed once, with a blocked sparse Cholesky factor and exact
    gradients for scalar random-effects terms; estimates, standard errors,
    variance components and the log-likelihood are lmer's.

    Parameters
    ----------
    reml : bool, default=True
        REML (lmer's default) or maximum likelihood.
    solver : {"profiled", "em", "mackay"}, default="profiled"
        ``"profiled"``: lme4's profiled deviance, L-BFGS-B over ``theta``.
        ``"em"``: the EM algorithm for the variance components (ML, or REML with
        ``reml=True``); converges to the same optimum, slowly.
        ``"mackay"``: MacKay's "quick and dirty" empirical Bayes recipe (residual
        variance = mean squared residual, random-effect covariance = covariance of the
        predicted effects); a different fixed point, biased low (see Notes).
    covariance : {"diagonal", "full"}, default="diagonal"
        ``solver="mackay"`` only: keep only the diagonal of the predicted-effects
        covariance (the recipe) or the full matrix, which collapses (a warning and
        ``collapsed_ = True``).
    fit_intercept : bool, default=True
        Add an intercept column to ``X``.
    random_slopes : None, list or dict, default=None
        Columns of ``X`` whose coefficients vary by group (as :class:`PoissonGLMM`).
    random_correlated : bool, default=True
        ``(1 + x | g)`` (True) or ``(1 + x || g)`` (False).
    max_iter : int, default=1000
        Iterations of the optimiser (EM/MacKay iterations for those solvers).
    tol : float, default=1e-12
        Relative tolerance on the deviance (profiled) or on the parameters (EM, MacKay).

    Attributes
    ----------
    coef_, coef_se_ : ndarray of shape (n_features,) or (n_responses, n_features)
        Fixed effects and standard errors (NaN for columns dropped as aliased).
    intercept_, intercept_se_ : float or ndarray
    coef_cov_ : ndarray
        ``vcov(fit)``: ``sigma^2 (RX'RX)^-1`` over ``fixed_names_``.
    fixed_effects_ : Series
    theta_ : ndarray
        lme4's ``getME(fit, "theta")``.
    sigma_ : float
        Residual standard deviation (lme4's ``sigma(fit)``).
    variance_components_ : DataFrame
        ``as.data.frame(VarCorr(fit))``: grp, var1, var2, vcov, sdcor, with the
        ``Residual`` row.
    random_effects_ : DataFrame
        ``as.data.frame(ranef(fit, condVar = TRUE))``: grp, level, term, condval, condsd.
    loglik_ : float
        lme4's ``logLik``: the log-likelihood (ML) or minus half the REML criterion.
    deviance_ : float
        lme4's objective: ``-2 logLik``.
    aic_, bic_ : float
    singular_ : bool
        A random-effect variance on its boundary (lme4's ``isSingular``).
    converged_ : bool
    n_iter_, n_eval_ : int
    fit_time_ : float
        Seconds spent in the solver.
    n_responses_ : int or None
        Number of responses when ``y`` has several columns (None for one); then
        ``coef_``, ``theta_``, ``sigma_``, ``loglik_`` ... have a leading response axis,
        ``fixed_effects_`` is a DataFrame indexed by ``response_names_`` (the columns of
        a DataFrame ``y``, else 0, 1, ...), and the tables have a ``response`` column.

    Notes
    -----
    The law of total variance, ``Var(b) = E[Var(b | y)] + Var(E[b | y])``, is the
    difference between EM (whose M-step adds the conditional variance) and MacKay's
    recipe (which uses only the variance of the predictions and so shrinks the
    variance components towards zero).

    Examples
    --------
    >>> from skmixed.mixed import LinearMixedModel
    >>> from skmixed.datasets import load_sleepstudy
    >>> fit = LinearMixedModel.from_formula("Reaction ~ Days + (Days | Subject)",
    ...                                     load_sleepstudy())
    >>> fit.fixed_effects_.round(2).to_dict()
    {'(Intercept)': 251.41, 'Days': 10.47}
    >>> round(fit.loglik_, 2)
    -871.81
    """

    _build_terms = PoissonGLMM._build_terms
    _slope_columns = PoissonGLMM._slope_columns
    _feature_names = PoissonGLMM._feature_names
    _new_terms = PoissonGLMM._new_terms
    _random_part = PoissonGLMM._random_part
    _predict_formula_frame = PoissonGLMM._predict_formula_frame
    _formula_response = PoissonGLMM._formula_response

    def __init__(
        self,
        *,
        reml=True,
        solver="profiled",
        covariance="diagonal",
        fit_intercept=True,
        random_slopes=None,
        random_correlated=True,
        max_iter=1000,
        tol=1e-12,
    ):
        self.reml = reml
        self.solver = solver
        self.covariance = covariance
        self.fit_intercept = fit_intercept
        self.random_slopes = random_slopes
        self.random_correlated = random_correlated
        self.max_iter = max_iter
        self.tol = tol

    def _validate_params(self):
        if self.solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {_SOLVERS}, got {self.solver!r}.")
        if self.covariance not in ("diagonal", "full"):
            raise ValueError(f"covariance must be 'diagonal' or 'full', got {self.covariance!r}.")
        if not isinstance(self.reml, (bool, np.bool_)):
            raise ValueError(f"reml must be True or False, got {self.reml!r}.")
        if not isinstance(self.max_iter, numbers.Integral) or isinstance(self.max_iter, bool) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}.")
        if not isinstance(self.tol, numbers.Real) or not self.tol > 0:
            raise ValueError(f"tol must be a positive number, got {self.tol!r}.")
        if self.random_slopes is not None and not isinstance(self.random_slopes, (list, tuple, dict)):
            raise ValueError(f"random_slopes must be None, a list or a dict, got {self.random_slopes!r}.")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    # --------------------------------------------------------------------- fit
    def fit(self, X, y, *, groups=None, sample_weight=None, offset=None):
        """Fit the model.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Fixed-effects design (without intercept when ``fit_intercept``).
        y : array-like of shape (n_samples,) or (n_samples, n_responses)
            Response(s). Several columns (e.g. log-normalised expression of many genes
            with the same design) are fitted in one call, each with its own variance
            components; the cross-products of the design are shared.
        groups : array-like of shape (n_samples,) or (n_samples, n_factors)
            Grouping factor(s), required.
        sample_weight : array-like of shape (n_samples,), default=None
            Precision weights (lme4's ``weights``): ``Var(e_i) = sigma^2 / w_i``.
        offset : array-like of shape (n_samples,), default=None
            Known term added to the linear predictor.

        Returns
        -------
        self : LinearMixedModel
        """
        self._validate_params()
        columns = getattr(y, "columns", None)
        self._response_names = None if columns is None else [str(c) for c in columns]
        try:
            X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=True, multi_output=True,
                                 ensure_all_finite=True)
        except ValueError as exc:
            if "could not convert" in str(exc) or "numeric" in str(exc):
                raise ValueError(f"X and y must be numeric ({exc}); encode categorical columns first, "
                                 "or use LinearMixedModel.from_formula.") from exc
            raise
        self.formula_ = None
        if groups is None:
            warnings.warn("groups is None: fitting a linear model without random effects.", UserWarning,
                          stacklevel=2)
            self.group_names_, self.group_levels_ = [], {}
            self._term_slopes, self._term_has_intercept = [], []
            return self._fit(X, y, None, offset, sample_weight, self._feature_names())
        terms = self._build_terms(X, groups)
        return self._fit(X, y, terms, offset, sample_weight, self._feature_names())

    @classmethod
    def from_formula(cls, formula: str, data: pd.DataFrame, *, sample_weight=None, **params):
        """Fit a model given by an lme4 formula, e.g. ``"Reaction ~ Days + (Days | Subject)"``.

        Supports ``(1 | g)``, ``(1 + x | g)``, ``(x || g)``, nesting ``(1 | a/b)``,
        crossed terms and ``offset()``, with lme4's coefficient names.

        Parameters
        ----------
        formula : str
        data : DataFrame
        sample_weight : array-like, optional
            Precision weights (lme4's ``weights``).
        **params
            Estimator parameters (``reml``, ``solver``, ...).

        Returns
        -------
        model : LinearMixedModel
            Fitted; predict with :meth:`predict_frame`.
        """
        # the formula front end is PoissonGLMM's (parse, check levels, then cls._fit)
        return PoissonGLMM.from_formula.__func__(cls, formula, data, sample_weight=sample_weight, **params)

    def _fit(self, X, y, terms, offset, sample_weight, feature_names):
        n = X.shape[0]
        Y = np.asarray(y, dtype=float)
        many = Y.ndim == 2
        if not many:
            Y = Y[:, None]
        if not np.all(np.isfinite(Y)):
            raise ValueError("y must be finite: it contains NaN or infinite values.")
        offset = _check_vector(offset, n, "offset")
        sample_weight = _check_weights(sample_weight, X)
        fixed = np.hstack([np.ones((n, 1)), X]) if self.fit_intercept else np.asarray(X, dtype=float)
        names = (["(Intercept)"] if self.fit_intercept else []) + list(feature_names)
        if fixed.shape[1] == 0:
            raise ValueError("the model has no fixed effects: X has no columns and fit_intercept=False.")
        if offset is not None:
            Y = Y - offset[:, None]
        w = np.ones(n) if sample_weight is None else sample_weight
        keep = w > 0
        if not np.all(keep):
            fixed, Y, w = fixed[keep], Y[keep], w[keep]
            terms = None if terms is None else [t.subset(keep) for t in terms]
        nobs = int(keep.sum())
        used = _drop_aliased(fixed, names)
        Xu = fixed[:, used]
        self.fixed_names_, self.nobs_, self._used = names, nobs, used
        if terms is None:
            return self._fit_lm(Xu, Y, w, used, names, many)
        if np.any(np.ptp(Y, axis=0) == 0):
            bad = int(np.flatnonzero(np.ptp(Y, axis=0) == 0)[0])
            raise ValueError(f"y is constant (response column {bad}): the variance components are not identifiable.")
        design = RandomEffectsDesign(terms)
        for t in terms:
            if len(t.levels) >= nobs:
                raise ValueError(
                    f"number of levels of grouping factor {t.group!r} ({len(t.levels)}) must be "
                    f"< number of observations ({nobs}) (lme4's check.nlev.gtr.1 / nobs check)."
                )
        if design.q >= nobs:
            raise ValueError(
                f"number of observations ({nobs}) <= number of random effects ({design.q}): the "
                "random-effects parameters and the residual variance are probably unidentifiable "
                "(lme4's check.nobs.vs.nRE)."
            )
        if self.reml and nobs <= Xu.shape[1]:
            raise ValueError(f"REML needs more observations ({nobs}) than fixed effects ({Xu.shape[1]}).")
        t0 = time.perf_counter()
        with one_blas_thread():
            stats = core.SufficientStats(Xu, Y, design, w)
            results = [self._fit_one(stats, g) for g in range(Y.shape[1])]
        self.fit_time_ = time.perf_counter() - t0
        self._stats, self._design, self._used = stats, design, used
        self.fixed_names_ = names
        self.nobs_ = nobs
        self._terms_meta = [(t.group, t.levels, t.names) for t in terms]
        if self.formula_ is not None:  # from_formula: prediction goes through predict_frame
            self._term_slopes = [[] for _ in terms]
            self._term_has_intercept = [t.names[0] == "(Intercept)" for t in terms]
        # one BLAS thread: on a shared machine OpenBLAS threads contend badly for 1,000-column
        # factorisations (seen: 0.6 s instead of 0.02 s per Cholesky)
        with one_blas_thread():
            self._set_attributes(results, stats, design, terms, used, names, many)
        return self

    def _fit_lm(self, Xu, Y, w, used, names, many):
        """No grouping factor: weighted least squares (R's ``lm``), logLik as lme4 would."""
        n, p = Xu.shape
        sw = np.sqrt(w)[:, None]
        Q, R = np.linalg.qr(Xu * sw)
        beta_u = scipy.linalg.solve_triangular(R, Q.T @ (Y * sw))
        rss = np.sum((Y * sw - (Xu * sw) @ beta_u) ** 2, axis=0)
        reml = bool(self.reml)
        nn = n - p if reml else n
        Ri = scipy.linalg.solve_triangular(R, np.eye(p))
        with np.errstate(divide="ignore", invalid="ignore"):  # saturated fits: sigma 0 or undefined
            sigma2 = np.where(nn > 0, rss / max(nn, 1), np.nan)
            dev = nn * (1 + np.log(2 * np.pi * sigma2)) - np.sum(np.log(w))
        if reml:
            dev = dev + 2 * np.sum(np.log(np.abs(np.diag(R))))
        pick = (lambda a: a) if many else (lambda a: a[0])
        betas = np.full((Y.shape[1], len(names)), np.nan)
        betas[:, used] = beta_u.T
        covs = np.full((Y.shape[1], len(names), len(names)), np.nan)
        covs[np.ix_(range(Y.shape[1]), used, used)] = sigma2[:, None, None] * (Ri @ Ri.T)[None]
        ses = np.sqrt(np.diagonal(covs, axis1=1, axis2=2))
        self.fixed_effects_ = (
            pd.DataFrame(betas, columns=names) if many else pd.Series(betas[0], index=names, name="estimate")
        )
        self.coef_cov_ = pick(covs)
        j0 = 1 if self.fit_intercept else 0
        self.intercept_ = pick(betas[:, 0]) if self.fit_intercept else pick(np.zeros(Y.shape[1]))
        self.intercept_se_ = pick(ses[:, 0]) if self.fit_intercept else pick(np.zeros(Y.shape[1]))
        self.coef_, self.coef_se_ = pick(betas[:, j0:]), pick(ses[:, j0:])
        if not many:
            self.intercept_, self.intercept_se_ = float(self.intercept_), float(self.intercept_se_)
        self.theta_ = pick(np.zeros((Y.shape[1], 0)))
        self.sigma_ = pick(np.sqrt(sigma2))
        self.loglik_ = pick(-0.5 * dev)
        self.deviance_ = pick(dev)
        self.n_params_ = len(used) + 1
        self.aic_ = -2 * self.loglik_ + 2 * self.n_params_
        self.bic_ = -2 * self.loglik_ + np.log(n) * self.n_params_
        self.converged_, self.singular_ = pick(np.ones(Y.shape[1], bool)), pick(np.zeros(Y.shape[1], bool))
        self.n_iter_ = self.n_eval_ = pick(np.ones(Y.shape[1], int))  # one least-squares solve
        self.fit_time_ = 0.0
        self.n_responses_ = Y.shape[1] if many else None
        self.variance_components_ = pd.DataFrame(
            {"grp": "Residual", "var1": np.nan, "var2": np.nan, "vcov": sigma2, "sdcor": np.sqrt(sigma2)}
        )
        self.random_effects_ = pd.DataFrame(columns=["grp", "level", "term", "condval", "condsd"])
        self._b, self._b_many, self._terms_meta, self._stats = [], [[] for _ in range(Y.shape[1])], [], None
        return self

    # ---------------------------------------------------------------- solvers
    def _fit_one(self, stats, g):
        reml = bool(self.reml)
        if self.solver == "profiled":
            theta, dev, nit, nev, converged, message = core.optimize_theta(
                stats, reml, col=g, max_iter=self.max_iter, tol=self.tol
            )
            extra = {}
        else:
            out = fit_em(stats, g, reml=reml, mackay=self.solver == "mackay",
                         covariance=self.covariance, max_iter=self.max_iter, tol=max(self.tol, 1e-10))
            theta, nit, converged, message = out["theta"], out["n_iter"], out["converged"], out["message"]
            nev = nit
            extra = out
        sol, sinv = core.solution_at(stats, theta, g)
        if self.solver == "mackay":
            sigma2 = extra["sigma2"]
        else:
            sigma2 = float(core.sigma2_from(stats, sol, reml)[0])
        dev = float(core.deviance_from(stats, sol, reml)[0])
        return dict(theta=theta, sol=sol, sinv=sinv, sigma2=sigma2, dev=dev, n_iter=nit, n_eval=nev,
                    converged=converged, message=message, extra=extra)

    def _set_attributes(self, results, stats, design, terms, used, names, many):
        p_full = len(names)
        betas, covs, ses, vcs, res, thetas, sig = [], [], [], [], [], [], []
        logliks, devs, conv, singular = [], [], [], []
        k_params = len(used) + design.n_theta + 1
        b_store = []
        for r in results:
            sol, s2 = r["sol"], r["sigma2"]
            beta = np.full(p_full, np.nan)
            beta[used] = sol.beta[:, 0]
            RXi = scipy.linalg.solve_triangular(sol.RX, np.eye(sol.RX.shape[0]))
            cov = np.full((p_full, p_full), np.nan)
            cov[np.ix_(used, used)] = s2 * (RXi @ RXi.T)
            betas.append(beta)
            covs.append(cov)
            ses.append(np.sqrt(np.diag(cov)))
            vc, re, b_terms = self._components(stats, design, terms, r)
            vcs.append(vc)
            res.append(re)
            b_store.append(b_terms)
            thetas.append(r["theta"])
            sig.append(np.sqrt(s2))
            logliks.append(-0.5 * r["dev"])
            devs.append(r["dev"])
            conv.append(r["converged"])
            diag_theta = np.array([r["theta"][m] for m, (_, a, c) in enumerate(design.theta_index) if a == c])
            singular.append(bool(np.any(np.abs(diag_theta) < _SINGULAR_TOL)))
        betas, covs, ses = np.array(betas), np.array(covs), np.array(ses)
        pick = (lambda a: a) if many else (lambda a: a[0])
        self.fixed_effects_ = (
            pd.DataFrame(betas, columns=names) if many else pd.Series(betas[0], index=names, name="estimate")
        )
        self.coef_cov_ = pick(covs)
        if self.fit_intercept:
            self.intercept_, self.coef_ = pick(betas[:, 0]), pick(betas[:, 1:])
            self.intercept_se_, self.coef_se_ = pick(ses[:, 0]), pick(ses[:, 1:])
        else:
            self.intercept_, self.coef_ = pick(np.zeros(len(betas))), pick(betas)
            self.intercept_se_, self.coef_se_ = pick(np.zeros(len(betas))), pick(ses)
        if not many:
            self.intercept_, self.intercept_se_ = float(self.intercept_), float(self.intercept_se_)
        self.theta_ = pick(np.array(thetas))
        self.sigma_ = pick(np.array(sig))
        self.loglik_ = pick(np.array(logliks))
        self.deviance_ = pick(np.array(devs))
        self.n_params_ = k_params
        self.aic_ = -2 * self.loglik_ + 2 * k_params
        self.bic_ = -2 * self.loglik_ + np.log(self.nobs_) * k_params
        self.converged_ = pick(np.array(conv))
        self.singular_ = pick(np.array(singular))
        self.n_iter_ = pick(np.array([r["n_iter"] for r in results]))
        self.n_eval_ = pick(np.array([r["n_eval"] for r in results]))
        if not many:  # one response: Python scalars, as lme4 prints them
            self.sigma_, self.loglik_, self.deviance_ = float(self.sigma_), float(self.loglik_), float(self.deviance_)
            self.aic_, self.bic_ = float(self.aic_), float(self.bic_)
            self.converged_, self.singular_ = bool(self.converged_), bool(self.singular_)
            self.n_iter_, self.n_eval_ = int(self.n_iter_), int(self.n_eval_)
        self._b = b_store[0] if not many else None
        self._b_many = b_store
        self._results = results
        if many:
            self.n_responses_ = len(results)
            names = getattr(self, "_response_names", None)
            self.response_names_ = np.asarray(names if names is not None else range(len(results)), dtype=object)
            self.variance_components_ = pd.concat(
                [v.assign(response=nm) for nm, v in zip(self.response_names_, vcs)], ignore_index=True
            )
            self.random_effects_ = pd.concat(
                [v.assign(response=nm) for nm, v in zip(self.response_names_, res)], ignore_index=True
            )
            self.fixed_effects_.index = pd.Index(self.response_names_, name="response")
        else:
            self.n_responses_ = None
            self.variance_components_, self.random_effects_ = vcs[0], res[0]
        if self.solver == "mackay":
            self.collapsed_ = pick(np.array([r["extra"].get("collapsed", False) for r in results]))
        if np.any(np.atleast_1d(self.singular_)) and self.solver == "profiled":
            warnings.warn("boundary (singular) fit: a variance component is estimated as zero.",
                          UserWarning, stacklevel=4)
        bad = [r["message"] for r in results if not r["converged"]]
        if bad:
            warnings.warn(f"LinearMixedModel did not converge: {bad[0]}"
                          + (f" ({len(bad)} of {len(results)} responses)" if many else ""),
                          ConvergenceWarning, stacklevel=4)

    def _components(self, stats, design, terms, r):
        """VarCorr and ranef tables of one response."""
        sol, s2, theta = r["sol"], r["sigma2"], r["theta"]
        u, b = core.spherical_modes(stats, sol)
        blocks = core.cond_var_blocks(stats, sol.factor, r.pop("sinv", None))
        Ts = design.T_blocks(theta)
        sigma = np.sqrt(s2)
        counts, vc_rows, re_parts, b_terms = {}, [], [], []
        for j, (t, T) in enumerate(zip(terms, Ts)):
            pos = stats.order.index(j)
            s, e = stats.col_start[pos], stats.col_start[pos + 1]
            L = len(t.levels)
            bj = b[s:e, 0].reshape(L, t.k)
            b_terms.append(bj)
            cv = s2 * np.einsum("ab,lbc,dc->lad", T, blocks[pos], T)
            condsd = np.sqrt(np.maximum(np.diagonal(cv, axis1=1, axis2=2), 0.0))
            counts[t.group] = counts.get(t.group, -1) + 1
            grp = t.group if counts[t.group] == 0 else f"{t.group}.{counts[t.group]}"
            re_parts.append(pd.DataFrame({
                "grp": t.group,
                "level": np.repeat(np.asarray(t.levels, dtype=object), t.k),
                "term": np.tile(np.asarray(t.names, dtype=object), L),
                "condval": bj.reshape(-1),
                "condsd": condsd.reshape(-1),
            }))
            Sigma = s2 * (T @ T.T)
            sd = np.sqrt(np.diag(Sigma))
            for c, nm in enumerate(t.names):
                vc_rows.append((grp, nm, np.nan, Sigma[c, c], sd[c]))
            for c in range(t.k):
                for rr in range(c + 1, t.k):
                    corr = Sigma[rr, c] / (sd[rr] * sd[c]) if sd[rr] > 0 and sd[c] > 0 else np.nan
                    vc_rows.append((grp, t.names[c], t.names[rr], Sigma[rr, c], corr))
        vc_rows.append(("Residual", np.nan, np.nan, s2, sigma))
        vc = pd.DataFrame(vc_rows, columns=["grp", "var1", "var2", "vcov", "sdcor"])
        return vc, pd.concat(re_parts, ignore_index=True), b_terms

    # ----------------------------------------------------------------- predict
    def predict(self, X, *, groups=None, offset=None):
        """Predicted means ``X beta + Z b`` (+ offset).

        Conditional on the predicted random effects of levels seen in training;
        population level (random effect 0) for unseen or missing levels and when
        ``groups`` is None (lme4's ``allow.new.levels = TRUE``).
        """
        check_is_fitted(self)
        if getattr(self, "formula_", None) is not None:
            return self._predict_formula_frame(X, groups, offset)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        n = X.shape[0]
        off = np.zeros(n) if offset is None else _check_vector(offset, n, "offset")
        coef = np.nan_to_num(self.coef_)
        if self.n_responses_ is not None:
            out = X @ coef.T + np.asarray(self.intercept_)[None, :] + off[:, None]
            if groups is not None and self._terms_meta:
                terms = self._new_terms(X, groups)
                for g, bs in enumerate(self._b_many):
                    self._b = bs
                    out[:, g] += self._random_part(terms, n)
                self._b = None
            return out
        out = X @ coef + self.intercept_ + off
        if groups is not None and self._terms_meta:
            out += self._random_part(self._new_terms(X, groups), n)
        return out

    def score(self, X, y=None, *, groups=None, offset=None, sample_weight=None):
        """R^2 of the conditional predictions (the Gaussian deviance's D^2), as
        scikit-learn's regressors score.

        For a model fitted with :meth:`from_formula`, ``X`` is a data frame and ``y``
        may be omitted (the formula's response is used). With several responses, the
        mean over responses (scikit-learn's ``multioutput="uniform_average"``).
        """
        from sklearn.metrics import r2_score  # noqa: PLC0415

        y = self._formula_response(X, y)
        return r2_score(y, self.predict(X, groups=groups, offset=offset), sample_weight=sample_weight)

    def predict_frame(self, data: pd.DataFrame, *, re_form: bool = True):
        """Predictions for a data frame, for a model fitted with :meth:`from_formula`.

        Unseen levels get random effect 0; ``re_form=False`` gives population-level
        predictions (lme4's ``re.form = NA``).
        """
        check_is_fitted(self)
        if getattr(self, "formula_", None) is None:
            raise ValueError("predict_frame needs a model fitted with LinearMixedModel.from_formula.")
        new = self._parsed.transform(data)
        beta = np.nan_to_num(np.asarray(self.fixed_effects_, dtype=float))
        eta = new.X @ beta.T
        if new.offset is not None:
            eta = eta + (new.offset if eta.ndim == 1 else new.offset[:, None])
        if re_form:
            if self.n_responses_ is None:
                eta = eta + self._random_part(new.terms, new.X.shape[0])
            else:
                for g, bs in enumerate(self._b_many):
                    self._b = bs
                    eta[:, g] += self._random_part(new.terms, new.X.shape[0])
                self._b = None
        return eta

    # ---------------------------------------------------------------- summary
    def summary(self, alpha: float = 0.05, ddf: str = "Satterthwaite") -> GLMMSummary:
        """lmerTest's ``summary``: estimate, SE, Satterthwaite df, t, p, confidence interval.

        ``ddf="Satterthwaite"`` (lmerTest's default) or ``"asymptotic"`` (normal, z tests).
        """
        from ._lmm_inference import satterthwaite  # noqa: PLC0415

        check_is_fitted(self)
        if self.n_responses_ is not None:
            raise ValueError("summary() describes one response; fit responses one at a time.")
        est = self.fixed_effects_.to_numpy()
        se = np.sqrt(np.diag(self.coef_cov_))
        t = est / se
        if ddf == "Satterthwaite":
            df = np.full(est.size, np.nan)
            df[self._used] = satterthwaite(self, np.eye(len(self._used)))
            p = 2 * scipy.stats.t.sf(np.abs(t), df)
            crit = scipy.stats.t.ppf(1 - alpha / 2, df)
        elif ddf == "asymptotic":
            df = np.full(est.size, np.inf)
            p = 2 * scipy.stats.norm.sf(np.abs(t))
            crit = scipy.stats.norm.ppf(1 - alpha / 2)
        else:
            raise ValueError(f"ddf must be 'Satterthwaite' or 'asymptotic', got {ddf!r}.")
        lo, hi = f"ci_{100 * alpha / 2:g}%", f"ci_{100 * (1 - alpha / 2):g}%"
        fixed = pd.DataFrame(
            {"estimate": est, "std_error": se, "df": df, "t": t, "p_value": p,
             lo: est - crit * se, hi: est + crit * se},
            index=pd.Index(self.fixed_names_, name="term"),
        )
        fit = pd.Series(
            {"method": "REML" if self.reml else "ML", "solver": self.solver, "logLik": self.loglik_,
             "AIC": self.aic_, "BIC": self.bic_, "sigma": self.sigma_, "nobs": self.nobs_,
             "converged": self.converged_, "singular": self.singular_},
            name="fit",
        )
        return GLMMSummary(fixed=fixed, random=self.variance_components_.copy(), fit=fit)
