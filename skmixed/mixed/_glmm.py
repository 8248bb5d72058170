"""PoissonGLMM: lme4's ``glmer(family = poisson)`` as a scikit-learn regressor."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.stats
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import (
    check_is_fitted,
    validate_data,
)

from .._backend import is_cupy_array, to_host
from .._families import Poisson, check_counts
from .._progress import check_verbose
from .._threads import one_blas_thread
from ..glm._newton import fit_glm
from ._contrast import FixedEffectsTests, GLMMSummary, _format_pvalues  # noqa: F401  (re-exported)
from ._design import RandomEffectsDesign, RandomTerm, distinct_rows
from ._glmm_checks import (  # noqa: F401 (re-exported)
    _as_2d_groups,
    _check_vector,
    _check_weights,
    _factor_codes,
    _is_count_matrix,
)
from ._glmm_formula import FormulaMixin
from ._glmm_many import ManyGenesMixin
from ._inference import BetweenWithin
from ._laplace import LaplaceProblem, warn_not_converged
from ._multigene import fit_many, poisson_d2_by_column

_SINGULAR_TOL = 1e-4  # lme4's isSingular() tolerance on the diagonal of theta


class PoissonGLMM(FormulaMixin, ManyGenesMixin, FixedEffectsTests, RegressorMixin, BaseEstimator):
    """Poisson generalised linear mixed model fitted by maximum marginal likelihood.

    ``y_i ~ Poisson(exp(x_i' beta + z_i' b + offset_i))`` with ``b ~ N(0, Sigma(theta))``,
    the model of lme4's ``glmer(family = poisson)``. The marginal likelihood is
    approximated by Laplace's method (``nagq=1``, lme4's default) or by adaptive
    Gauss-Hermite quadrature (``nagq > 1``, single scalar random-effect term only),
    and maximised jointly over ``(theta, beta)`` exactly as ``glmer`` does, so the
    estimates agree with lme4's. The fit is deterministic.

    Parameters
    ----------
    fit_intercept : bool, default=True
        Add an intercept column to ``X``.
    random_slopes : None, list or dict, default=None
        Columns of ``X`` (indices or, for DataFrames, names) whose coefficients vary by
        group, in addition to the random intercept. A list applies to every grouping
        factor; a dict maps grouping-factor position (or name) to its list.
    random_correlated : bool, default=True
        Correlated intercept and slopes, lme4's ``(1 + x | g)``; ``False`` gives
        ``(1 + x || g)``.
    nagq : int, default=1
        Quadrature points: 1 is the Laplace approximation, more is adaptive
        Gauss-Hermite quadrature (lme4's ``nAGQ``; needs ``reml=False``).
    reml : bool, default=True
        Estimate the variance components by the restricted (REML) Laplace criterion
        of glmmTMB's ``REML = TRUE``: the fixed effects are integrated out with the
        random effects, which removes the downward bias of the maximum-likelihood
        variance with few groups (16 patients: about 12% for one patient-level
        factor). ``False`` is maximum likelihood, the fit of lme4's ``glmer``.
    vcov : {"hessian", "conditional"}, default="hessian"
        ``"hessian"``: covariance of the fixed effects from the Hessian of the deviance
        over ``(theta, beta)`` (lme4's default ``vcov``); ``"conditional"``: from the
        fixed-effects block at the estimated ``theta`` (lme4 ``use.hessian = FALSE``).
        Under ``reml=True``: ``"hessian"`` adds to the conditional covariance the
        uncertainty of ``theta`` propagated through the fixed effects, as glmmTMB's
        ``vcov`` does for a REML fit.
    collapse : bool, default=True
        Fit on the sufficient statistics of rows sharing their design (exact for the
        Poisson likelihood; large speed-up for categorical designs).
    max_iter : int, default=500
        Iterations of the outer optimiser.
    layer : str or None, default=None
        For AnnData input (``y`` of :meth:`fit`, ``data`` of :meth:`from_formula`):
        the layer holding the raw counts. None
        reads ``layers["counts"]`` when present, else ``.X``; non-integer values read
        from AnnData (e.g. log-normalised ``.X``) are an error naming the layer.
    verbose : int, default=0
        With many genes, ``verbose >= 1`` shows a progress bar of the genes fitted
        (tqdm, with an ETA); 0 is silent.

    Attributes
    ----------
    coef_ : ndarray of shape (n_features,)
        Fixed effects (NaN for columns dropped as aliased).
    intercept_ : float
        Intercept (0.0 when ``fit_intercept=False``).
    coef_cov_ : ndarray of shape (n_fixed, n_fixed)
        Covariance of the fixed effects ``[intercept_, *coef_]`` (intercept only if fitted).
    coef_se_ : ndarray of shape (n_features,)
        Standard errors of ``coef_``; ``intercept_se_`` that of the intercept.
    fixed_names_ : list of str
        Names of the fixed effects in the order of ``coef_cov_``.
    theta_ : ndarray
        Relative covariance factor parameters (lme4's ``getME(fit, "theta")``).
    variance_components_ : DataFrame
        lme4's ``as.data.frame(VarCorr(fit))``: grp, var1, var2, vcov, sdcor.
    random_effects_ : DataFrame
        Conditional modes and conditional standard deviations of the random effects
        (lme4's ``as.data.frame(ranef(fit, condVar = TRUE))``): grp, level, term,
        condval, condsd.
    loglik_, aic_, bic_ : float
        Log-likelihood (Laplace or AGQ approximation, including every constant) and
        information criteria.
    n_iter_ : int
    converged_ : bool
    singular_ : bool
        A variance component on its boundary (lme4's ``isSingular``).

    Notes
    -----
    Under ``nagq > 1`` lme4 reports a log-likelihood that omits the saturated Poisson
    log-likelihood ``sum(dpois(y, y, log = TRUE))``; ``loglik_`` keeps it, so that it is
    on the scale of the Laplace one: ``loglik_ = logLik(lme4) + loglik_saturated_``.

    Examples
    --------
    >>> from skmixed import PoissonGLMM
    >>> from skmixed.datasets import make_poisson_glmm
    >>> data, truth = make_poisson_glmm(20, 30, random_state=0)
    >>> model = PoissonGLMM().fit(data[["x1", "x2"]], data["y"], groups=data["g"],
    ...                           offset=data["offset"])
    >>> model.coef_.round(2)
    array([ 0.34, -0.22])
    """

    def __init__(
        self,
        *,
        fit_intercept=True,
        random_slopes=None,
        random_correlated=True,
        nagq=1,
        reml=True,
        vcov="hessian",
        collapse=True,
        max_iter=500,
        layer=None,
        verbose=0,
    ):
        self.fit_intercept = fit_intercept
        self.random_slopes = random_slopes
        self.random_correlated = random_correlated
        self.nagq = nagq
        self.reml = reml
        self.vcov = vcov
        self.collapse = collapse
        self.max_iter = max_iter
        self.layer = layer
        self.verbose = verbose

    # subclass hooks (NegativeBinomialGLMM): whether rows sharing a design may be summed
    # (exact for Poisson only), the single-response likelihood, the many-gene engine
    _collapsible = True

    def _laplace_problem(self, X, y, design, offset, weights):
        return LaplaceProblem(X, y, design, Poisson, offset=offset, weights=weights)

    def _fit_many_core(self, *args, **kwargs):
        return fit_many(*args, **kwargs)

    # ------------------------------------------------------------------ params
    def _validate_params(self):
        if not isinstance(self.nagq, numbers.Integral) or isinstance(self.nagq, bool) or self.nagq < 1:
            raise ValueError(f"nagq must be a positive integer, got {self.nagq!r}.")
        if not isinstance(self.reml, (bool, np.bool_)):
            raise ValueError(f"reml must be True or False, got {self.reml!r}.")
        if self.vcov not in ("hessian", "conditional"):
            raise ValueError(f"vcov must be 'hessian' or 'conditional', got {self.vcov!r}.")
        if not isinstance(self.max_iter, numbers.Integral) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}.")
        if self.random_slopes is not None and not isinstance(self.random_slopes, (list, tuple, dict)):
            raise ValueError(f"random_slopes must be None, a list or a dict, got {self.random_slopes!r}.")
        if self.layer is not None and not isinstance(self.layer, str):
            raise ValueError(f"layer must be None or the name of an AnnData layer, got {self.layer!r}.")
        check_verbose(self.verbose)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.positive_only = True
        return tags

    # -------------------------------------------------------------- fit helpers
    def _slope_columns(self, factor_pos, factor_name):
        spec = self.random_slopes
        if spec is None:
            return []
        if isinstance(spec, dict):
            spec = spec.get(factor_pos, spec.get(factor_name, []))
        cols = []
        names = getattr(self, "feature_names_in_", None)
        for c in spec:
            if isinstance(c, str):
                if names is None or c not in names:
                    raise ValueError(f"random_slopes names column {c!r}, which is not a column of X.")
                cols.append(int(np.flatnonzero(names == c)[0]))
            elif isinstance(c, numbers.Integral) and 0 <= c < self.n_features_in_:
                cols.append(int(c))
            else:
                raise ValueError(f"random_slopes entry {c!r} is not a column of X.")
        return cols

    def _feature_names(self):
        names = getattr(self, "feature_names_in_", None)
        if names is None:
            return [f"x{j}" for j in range(self.n_features_in_)]
        return [str(c) for c in names]

    def _build_terms(self, X, groups):
        n = X.shape[0]
        terms, self.group_levels_ = [], {}
        self.group_names_ = []
        feat = self._feature_names()
        for pos, (name, values) in enumerate(_as_2d_groups(groups, n)):
            codes, levels = _factor_codes(name, values, n)
            self.group_names_.append(name)
            self.group_levels_[name] = levels
            slope_cols = self._slope_columns(pos, name)
            Zs = [np.ones(n)] + [X[:, c] for c in slope_cols]
            znames = ["(Intercept)"] + [feat[c] for c in slope_cols]
            if self.random_correlated or not slope_cols:
                terms.append(RandomTerm(name, codes, levels, np.column_stack(Zs), znames))
            else:
                for zc, zn in zip(Zs, znames):
                    terms.append(RandomTerm(name, codes, levels, zc[:, None], [zn]))
        self.formula_ = None
        self._term_slopes = [
            [feat.index(nm) for nm in t.names if nm != "(Intercept)"] for t in terms
        ]
        self._term_has_intercept = [t.names[0] == "(Intercept)" for t in terms]
        return terms

    # --------------------------------------------------------------------- fit
    def fit(self, X, y, *, groups=None, offset=None, sample_weight=None):
        """Fit the model.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Fixed-effects design (without intercept when ``fit_intercept``).
        y : array-like of shape (n_samples,), or count matrix (n_samples, n_genes)
            Non-negative counts. A 2-D array with several columns, a
            ``scipy.sparse`` matrix, a DataFrame of genes or an AnnData object
            (cells x genes) fits one model per gene, vectorised across genes (one
            grouping factor, random intercept, Laplace): ``coef_`` then has one row
            per gene and ``results_`` is the tidy table; see :meth:`contrast`.
        groups : array-like of shape (n_samples,) or (n_samples, n_factors)
            Grouping factor(s), one column per factor (crossed or nested; for nesting
            pass the inner factor as the interaction, e.g. ``"loc:brood"`` labels).
            ``None`` fits a Poisson GLM without random effects, with a warning.
        offset : array-like of shape (n_samples,), default=None
            Known term added to the linear predictor (e.g. log library size).
        sample_weight : array-like of shape (n_samples,), default=None
            Prior weights multiplying each observation's log-likelihood.

        Returns
        -------
        self : PoissonGLMM
        """
        self._validate_params()
        if _is_count_matrix(y):
            return self._fit_many(X, y, groups, offset, sample_weight)
        self.n_genes_ = None
        X, y = (to_host(a) if is_cupy_array(a) else a for a in (X, y))  # one gene: fitted on the host
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=True)
        terms = None
        self.formula_ = None
        if groups is not None:
            terms = self._build_terms(X, groups)
        return self._fit(X, y, terms, offset, sample_weight, self._feature_names())

    def _fit(self, X, y, terms, offset, sample_weight, feature_names):
        n = X.shape[0]
        self.integer_response_ = check_counts(y, "y", stacklevel=4)
        offset = _check_vector(offset, n, "offset")
        sample_weight = _check_weights(sample_weight, X)
        fixed = np.hstack([np.ones((n, 1)), X]) if self.fit_intercept else np.asarray(X, dtype=float)
        names = (["(Intercept)"] if self.fit_intercept else []) + list(feature_names)
        if fixed.shape[1] == 0:
            raise ValueError("the model has no fixed effects: X has no columns and fit_intercept=False.")
        off = np.zeros(n) if offset is None else offset
        w = np.ones(n) if sample_weight is None else sample_weight
        keep = w > 0
        if not np.all(keep):
            fixed, y, off, w = fixed[keep], y[keep], off[keep], w[keep]
            terms = None if terms is None else [t.subset(keep) for t in terms]
        nobs = n = int(np.sum(keep))
        saturated = float(np.sum(Poisson.saturated_loglik(y, w)))
        if terms is None:
            warnings.warn(
                "groups is None: fitting a Poisson GLM without random effects.", UserWarning, stacklevel=3
            )

        # exact reduction to the distinct rows of (X, Z, group codes)
        const = 0.0
        key_cols = [fixed] + ([] if terms is None else [b for t in terms for b in (t.Z, t.codes[:, None])])
        collapse = self.collapse and self._collapsible
        keys, first = distinct_rows(key_cols) if collapse else (None, np.arange(n))
        n_keys = first.size
        if collapse and n_keys < 0.7 * n:
            y, off_c, const = Poisson.collapse(y, off, w, keys, n_keys)
            fixed, off, w = fixed[first], off_c, np.ones(n_keys)
            terms = None if terms is None else [t.subset(first) for t in terms]

        self._ddf = None if terms is None else BetweenWithin(fixed, [(t.codes, t.Z) for t in terms], nobs)
        # aliased fixed-effect columns are dropped, as lme4 does
        _, R, piv = scipy.linalg.qr(fixed, mode="economic", pivoting=True)
        diag = np.abs(np.diag(R))
        rank = int(np.sum(diag > diag[0] * max(fixed.shape) * np.finfo(float).eps * 1e2)) if diag.size else 0
        used = np.sort(piv[:rank])
        if rank < fixed.shape[1]:
            dropped = [names[j] for j in sorted(set(range(fixed.shape[1])) - set(used))]
            warnings.warn(
                f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} column(s): "
                f"{dropped}",
                UserWarning,
                stacklevel=3,
            )
        Xu = fixed[:, used]

        glm = fit_glm(Xu, y, Poisson, offset=off, weights=w)
        beta0 = glm.coef[0]
        p_full = fixed.shape[1]
        with one_blas_thread():
            if terms is None:
                result = self._fit_glm_only(glm, Xu, y, off, w)
            else:
                result = self._fit_glmm(terms, Xu, y, off, w, beta0)
        beta_u, cov_u, theta, f, n_iter, converged, message = result

        beta = np.full(p_full, np.nan)
        beta[used] = beta_u
        cov = np.full((p_full, p_full), np.nan)
        cov[np.ix_(used, used)] = cov_u
        self.fixed_names_ = names
        self.fixed_effects_ = pd.Series(beta, index=names, name="estimate")
        self.coef_cov_ = cov
        se = np.sqrt(np.diag(cov))
        if self.fit_intercept:
            self.intercept_, self.coef_ = float(beta[0]), beta[1:]
            self.intercept_se_, self.coef_se_ = float(se[0]), se[1:]
        else:
            self.intercept_, self.coef_, self.intercept_se_, self.coef_se_ = 0.0, beta, 0.0, se
        self.theta_ = theta
        self.n_iter_ = n_iter
        self.converged_ = bool(converged)
        self.nobs_ = nobs
        # REML: glmmTMB's restricted log-likelihood, with the flat prior's 2 pi terms
        reml_const = 0.5 * rank * np.log(2 * np.pi) if (self.reml and terms is not None) else 0.0
        self.loglik_ = float(-0.5 * f + const + reml_const)
        self.loglik_saturated_ = saturated
        k = rank + theta.size
        self.n_params_ = k
        self.aic_ = -2 * self.loglik_ + 2 * k
        self.bic_ = -2 * self.loglik_ + np.log(nobs) * k
        if not converged:
            warn_not_converged(message)
        return self

    def _fit_glm_only(self, glm, Xu, y, off, w):
        self.variance_components_ = pd.DataFrame(columns=["grp", "var1", "var2", "vcov", "sdcor"])
        self.random_effects_ = pd.DataFrame(columns=["grp", "level", "term", "condval", "condsd"])
        self.singular_ = False
        self._b = []
        self._terms_meta = []
        cov = np.linalg.inv(glm.hessian[0])
        f = -2.0 * float(glm.loglik[0])
        msg = "" if glm.converged[0] else "Newton iterations for the GLM did not converge"
        return glm.coef[0], cov, np.zeros(0), f, glm.n_iter, bool(glm.converged[0]), msg

    def _fit_glmm(self, terms, Xu, y, off, w, beta0):
        design = RandomEffectsDesign(terms)
        nagq = int(self.nagq)
        if nagq > 1 and (len(terms) != 1 or terms[0].k != 1):
            raise ValueError(
                "nagq > 1 is only available for a single scalar random-effects term "
                f"(got {len(terms)} term(s) with {[t.k for t in terms]} columns), as in lme4."
            )
        if nagq > 1 and self.reml:
            raise ValueError(
                f"reml=True is a Laplace criterion; nagq={nagq} (adaptive quadrature) needs reml=False "
                "(maximum likelihood, as lme4's glmer)."
            )
        prob = self._laplace_problem(Xu, y, design, off, w)
        params0 = np.concatenate([design.theta0, beta0])
        params, f, n_iter, converged, message = prob.optimise(params0, 1, max_iter=self.max_iter)
        if nagq > 1:
            params, f, it2, converged, message = prob.optimise(params, nagq, max_iter=self.max_iter)
            n_iter += it2
        theta, beta = prob.split(params)
        st = prob.state(params)
        if self.reml:
            # the ML fit is the start: REML moves theta up by a few percent
            theta, beta, f, it2, ok, msg = prob.optimise_reml(theta, beta, max_iter=self.max_iter)
            n_iter, converged, message = n_iter + it2, converged and ok, msg or message
            beta, st, _ = prob.joint_mode(theta, beta)
            cov = prob.reml_cov(theta, beta, hessian=self.vcov == "hessian")
        elif self.vcov == "hessian":
            H = prob.hessian(params, nagq)
            cov = None
            try:
                full = 2.0 * np.linalg.inv(H)
                cov = full[design.n_theta :, design.n_theta :]
                if not np.all(np.diag(cov) > 0):
                    cov = None
            except np.linalg.LinAlgError:
                cov = None
            if cov is None:
                warnings.warn(
                    "the Hessian of the deviance is not positive definite; the covariance of the "
                    "fixed effects falls back to vcov='conditional' (as lme4 does).",
                    UserWarning,
                    stacklevel=4,
                )
                cov = prob.conditional_cov(st)
        else:
            cov = prob.conditional_cov(st)
        cov = 0.5 * (cov + cov.T)

        # random effects: conditional modes and variances, b = Lambda u,
        # Var(b_l | y) = T M^-1[block l] T'
        Ts = design.T_blocks(theta)
        b_list = design.b_from_u(theta, st.u)
        re_parts, vc_rows = [], []
        counts = {}
        self._b, self._terms_meta = b_list, []
        for j, (t, T, b) in enumerate(zip(terms, Ts, b_list)):
            counts[t.group] = counts.get(t.group, -1) + 1
            grp = t.group if counts[t.group] == 0 else f"{t.group}.{counts[t.group]}"
            self._terms_meta.append((t.group, t.levels, t.names))
            L = len(t.levels)
            idx = design.col_start[j] + np.arange(L)[:, None] * t.k + np.arange(t.k)[None, :]
            cv = np.einsum("ab,lbc,dc->lad", T, st.factor.inv_gather(idx), T)
            condsd = np.sqrt(np.maximum(np.diagonal(cv, axis1=1, axis2=2), 0.0))
            re_parts.append(
                pd.DataFrame(
                    {
                        "grp": t.group,  # ranef() names the factor; VarCorr numbers split terms
                        "level": np.repeat(np.asarray(t.levels, dtype=object), t.k),
                        "term": np.tile(np.asarray(t.names, dtype=object), L),
                        "condval": b.reshape(-1),
                        "condsd": condsd.reshape(-1),
                    }
                )
            )
            Sigma = T @ T.T
            sd = np.sqrt(np.diag(Sigma))
            for c, nm in enumerate(t.names):
                vc_rows.append((grp, nm, np.nan, Sigma[c, c], sd[c]))
            for c in range(t.k):
                for r in range(c + 1, t.k):
                    corr = Sigma[r, c] / (sd[r] * sd[c]) if sd[r] > 0 and sd[c] > 0 else np.nan
                    vc_rows.append((grp, t.names[c], t.names[r], Sigma[r, c], corr))
        self.random_effects_ = pd.concat(re_parts, ignore_index=True)
        self.variance_components_ = pd.DataFrame(vc_rows, columns=["grp", "var1", "var2", "vcov", "sdcor"])
        diag_theta = np.array([theta[m] for m, (_, r, c) in enumerate(design.theta_index) if r == c])
        self.singular_ = bool(np.any(np.abs(diag_theta) < _SINGULAR_TOL))
        if self.singular_:
            warnings.warn("boundary (singular) fit: a variance component is estimated as zero.", UserWarning, stacklevel=4)
        if prob.n_pirls_fail:
            message = (message + "; " if message else "") + "PIRLS did not converge at some evaluations"
        return beta, cov, theta, f, n_iter, converged, message

    # ----------------------------------------------------------------- predict
    def _new_terms(self, X, groups):
        """Random terms of new data, coded against the training levels (-1 if unseen)."""
        n = X.shape[0]
        cols = dict(_as_2d_groups(groups, n))
        if len(cols) != len(self.group_names_):
            raise ValueError(
                f"groups has {len(cols)} column(s); the model was fitted with {len(self.group_names_)}."
            )
        by_name = dict(zip(self.group_names_, cols.values()))
        terms = []
        for (grp, levels, names), slopes, has_int in zip(
            self._terms_meta, self._term_slopes, self._term_has_intercept
        ):
            values = by_name[grp]
            if values.shape[0] != n:
                raise ValueError(f"groups has {values.shape[0]} rows but X has {n}.")
            labels = pd.Series(values)
            codes = pd.Index(levels).get_indexer(labels.astype(str))
            codes[labels.isna().to_numpy()] = -1  # missing level: population level
            Z = np.column_stack(([np.ones(n)] if has_int else []) + [X[:, c] for c in slopes])
            terms.append(RandomTerm(grp, codes, levels, Z, names))
        return terms

    def _random_part(self, terms, n):
        """``sum_j Z_j b_j[level]`` over terms; levels coded -1 (unseen, missing) add 0."""
        out = np.zeros(n)
        for t, b in zip(terms, self._b):
            known = t.codes >= 0
            out[known] += np.sum(t.Z[known] * b[t.codes[known]], axis=1)
        return out

    def _fixed_part(self, X, offset):
        eta = X @ np.nan_to_num(self.coef_) + self.intercept_
        if offset is not None:
            eta = eta + _check_vector(offset, X.shape[0], "offset")
        return eta

    def predict(self, X, *, groups=None, offset=None):
        """Expected counts ``exp(eta)``.

        For a model fitted with :meth:`from_formula`, ``X`` is a data frame (the
        formula builds the design, the groups and the offset): ``predict(data)`` is
        :meth:`predict_frame`.

        Conditional on the random effects of levels seen in training; population-level
        (random effect 0) for unseen or missing levels and when ``groups`` is None
        (lme4's ``predict(..., allow.new.levels = TRUE)``).
        """
        check_is_fitted(self)
        if getattr(self, "formula_", None) is not None:
            return self._predict_formula_frame(X, groups, offset)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        if getattr(self, "n_genes_", None) is not None:
            eta = X @ self.coef_.T + self.intercept_[None, :]
            if offset is not None:
                eta = eta + _check_vector(offset, X.shape[0], "offset")[:, None]
            if groups is not None:
                (t,) = self._new_terms_many(X, groups)
                known = t >= 0
                eta[known] += self._b_genes[:, t[known]].T
            return Poisson.mean(eta)
        eta = self._fixed_part(X, offset)
        if groups is not None and self._b:
            eta += self._random_part(self._new_terms(X, groups), X.shape[0])
        return Poisson.mean(eta)

    def score(self, X, y=None, *, groups=None, offset=None, sample_weight=None):
        """Poisson D^2: the fraction of Poisson deviance explained.

        For a model fitted with :meth:`from_formula`, ``X`` is a data frame and ``y``
        may be omitted (the formula's response column is used).

        With many genes (``y`` a count matrix: array, sparse, DataFrame or AnnData, its
        genes matched by name when named), the mean over genes of each gene's D^2
        (constant genes, all-zero ones included, have none and are left out); per gene:
        :meth:`score_genes`. A constant ``y`` has no deviance to explain: NaN.
        """
        if getattr(self, "n_genes_", None) is not None:
            d2 = self.score_genes(X, y, groups=groups, offset=offset, sample_weight=sample_weight).to_numpy()
            return float(np.mean(d2[np.isfinite(d2)])) if np.isfinite(d2).any() else float("nan")
        y = self._formula_response(X, y)
        y_pred = self.predict(X, groups=groups, offset=offset)
        y = np.asarray(to_host(y))
        Poisson.check_response(y, "y")
        y = y.astype(float).reshape(-1)
        if y.shape != y_pred.shape:
            raise ValueError(f"y has {y.shape[0]} values but X has {y_pred.shape[0]} rows.")
        w = _check_weights(sample_weight, y_pred[:, None])
        return float(poisson_d2_by_column(y[:, None], y_pred[:, None], w)[0])
