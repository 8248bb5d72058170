"""Tests of the fixed effects of a GLMM, shared by every GLMM estimator: ``contrast()``
and ``summary()`` with the t reference and between-within df of
:mod:`skmixed.mixed._inference` (or the Wald z), and lme4-style summary tables."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.utils.validation import check_is_fitted

from ._inference import check_test, critical_values, inference_columns, reference_df
from ._multigene import bh_columns, wald_contrasts


@dataclass
class GLMMSummary:
    """What ``summary(glmer_fit)`` prints, as DataFrames."""

    fixed: pd.DataFrame
    random: pd.DataFrame
    fit: pd.Series | pd.DataFrame  # one fit; or, for many genes, one row per gene

    def __repr__(self) -> str:
        rows = 40  # many-gene tables: head and tail only
        with pd.option_context("display.width", 120, "display.max_columns", 20):
            return (
                f"{self.fit.to_string(max_rows=rows)}\n\nRandom effects:\n"
                f"{self.random.to_string(index=False, max_rows=rows)}"
                f"\n\nFixed effects:\n{_format_pvalues(self.fixed).to_string(max_rows=rows)}"
            )


def _format_pvalues(table: pd.DataFrame) -> pd.DataFrame:
    """p- and q-values as lme4 prints them: below machine epsilon, ``< 2e-16``."""
    out = table.copy()
    for col in ("p_value", "q_value"):
        if col in out:
            p = out[col].to_numpy(dtype=float)
            out[col] = np.where(
                p < np.finfo(float).eps, "< 2e-16",
                np.array([f"{v:.4g}" for v in p], dtype=object),
            )
    return out


class FixedEffectsTests:
    """``contrast()`` and ``summary()`` for a fitted GLMM (mixed into :class:`PoissonGLMM`).

    What a subclass must provide after its fit: ``fixed_names_``, ``coef_cov_``, the
    estimates (``fixed_effects_`` for one response; ``intercept_``, ``coef_``,
    ``fit_intercept``, ``gene_names_``, ``n_genes_`` and the ``results_`` /
    ``genes_`` / ``variance_components_`` tables for many genes), the fit statistics
    of ``summary().fit`` and ``_ddf``, a :class:`~skmixed.mixed._inference.BetweenWithin`
    of the fixed design and the grouping factors (``PoissonGLMM._fit`` and
    ``_fit_many`` build it).
    """

    def contrast(self, contrasts, *, names=None, test="t", ddf="between-within"):
        """Tests of linear combinations of the fixed effects, per gene.

        Parameters
        ----------
        contrasts : array-like of shape (n_contrasts, n_fixed) or (n_fixed,)
            Rows of weights on the fixed effects in the order of ``fixed_names_``,
            or a dict ``{name: {term: weight}}``.
        names : list of str, optional
            Contrast names (taken from the dict keys when a dict is given).
        test : {"t", "z"}, default="t"
            ``"t"``: the Wald statistic against a t distribution with ``ddf`` degrees
            of freedom, the small-sample test that holds its level when a contrast
            compares few groups (patients); ``"z"``: against the standard normal
            (the Wald z of lme4's ``summary``; anticonservative with few groups).
        ddf : "between-within" or float, default="between-within"
            Denominator degrees of freedom of the t test: the between-within rule
            (a contrast that compares levels of the grouping factor gets the number
            of levels less the between-level fixed parameters, one estimable within
            levels the residual df; see :class:`~skmixed.mixed._inference.BetweenWithin`),
            or a number.

        Returns
        -------
        DataFrame
            gene, contrast, estimate, std_error, statistic, df, p_value, q_value
            (Benjamini-Hochberg over genes, within each contrast) and distribution
            (``"t"``, or ``"normal"`` for the z test).

        Notes
        -----
        Subclasses inherit this method (and :meth:`summary`) by providing, after the
        fit, ``fixed_names_``, ``coef_cov_``, the estimates (``fixed_effects_`` for
        one response; ``intercept_`` and ``coef_`` per gene with ``gene_names_`` and
        ``n_genes_`` for many) and ``_ddf``, a
        :class:`~skmixed.mixed._inference.BetweenWithin` of the fixed design and the
        grouping factors (``PoissonGLMM._fit`` and ``_fit_many`` set it).

        Examples
        --------
        >>> from skmixed import PoissonGLMM
        >>> from skmixed.datasets import make_poisson_glmm
        >>> data, _ = make_poisson_glmm(12, 30, random_state=0)
        >>> model = PoissonGLMM().fit(data[["x1", "x2"]], data["y"], groups=data["g"])
        >>> model.contrast({"x1 - x2": {"x1": 1.0, "x2": -1.0}})[["statistic", "df", "distribution"]].round(2)
           statistic     df distribution
        0      11.12  346.0            t
        """
        check_test(test, ddf)
        check_is_fitted(self)
        if isinstance(contrasts, dict):
            names = list(contrasts)
            C = np.zeros((len(names), len(self.fixed_names_)))
            for i, weights in enumerate(contrasts.values()):
                for term, value in weights.items():
                    if term not in self.fixed_names_:
                        raise ValueError(f"contrast term {term!r} is not a fixed effect: {self.fixed_names_}.")
                    C[i, self.fixed_names_.index(term)] = value
        else:
            C = np.atleast_2d(np.asarray(contrasts, dtype=float))
            if C.shape[1] != len(self.fixed_names_):
                raise ValueError(
                    f"contrasts must have {len(self.fixed_names_)} columns (one per fixed effect), got {C.shape[1]}."
                )
        df = reference_df(getattr(self, "_ddf", None), C, test, ddf)
        many = getattr(self, "n_genes_", None) is not None
        if many:
            beta = np.column_stack([self.intercept_, self.coef_]) if self.fit_intercept else self.coef_
            return wald_contrasts(beta, self.coef_cov_, C, self.gene_names_, contrast_names=names, df=df)
        beta = self.fixed_effects_.to_numpy()[None, :]
        return wald_contrasts(beta, self.coef_cov_[None], C, ["y"], contrast_names=names, df=df)

    # ----------------------------------------------------------------- summary
    def summary(self, alpha: float = 0.05, *, test="t", ddf="between-within") -> GLMMSummary:
        """Fixed-effects table (estimate, SE, statistic, df, p, CI, reference
        distribution), random-effects table and fit statistics.

        ``test`` and ``ddf`` as in :meth:`contrast`: by default t tests and intervals
        with the between-within degrees of freedom; ``test="z"`` gives lme4's Wald z.
        For a many-gene fit the tables are tidy, one row per gene (and term):
        ``fixed`` is ``results_`` (recomputed for ``test``/``ddf``) with the
        confidence limits, ``random`` the ``variance_components_`` and ``fit`` the
        per-gene ``genes_`` table.
        """
        check_is_fitted(self)
        check_test(test, ddf)
        lo, hi = f"ci_{100 * alpha / 2:g}%", f"ci_{100 * (1 - alpha / 2):g}%"
        df = reference_df(getattr(self, "_ddf", None), np.eye(len(self.fixed_names_)), test, ddf)
        crit = critical_values(df, alpha)
        if getattr(self, "n_genes_", None) is not None:
            t = self.results_
            G = self.n_genes_
            est, se = t.estimate.to_numpy(), t.std_error.to_numpy()
            cols = inference_columns(est, se, np.tile(df, G))
            q = bh_columns(cols["p_value"].reshape(G, -1)).ravel()
            c = np.tile(crit, G)
            fixed = t.assign(**{k: v for k, v in cols.items()}, q_value=q, **{lo: est - c * se, hi: est + c * se})
            return GLMMSummary(fixed=fixed, random=self.variance_components_.copy(), fit=self.genes_.copy())
        est = self.fixed_effects_.to_numpy()
        se = np.sqrt(np.diag(self.coef_cov_))
        cols = inference_columns(est, se, df)
        fixed = pd.DataFrame(
            {"estimate": est, "std_error": se, **{k: v for k, v in cols.items() if k != "distribution"},
             lo: est - crit * se, hi: est + crit * se, "distribution": cols["distribution"]},
            index=pd.Index(self.fixed_names_, name="term"),
        )
        method = "Laplace" if self.nagq == 1 else f"adaptive Gauss-Hermite, nAGQ = {self.nagq}"
        fit = pd.Series(
            {"method": method + (", REML" if self.reml and self._b else ""),
             "logLik": self.loglik_, "AIC": self.aic_, "BIC": self.bic_, "nobs": self.nobs_,
             "converged": self.converged_, "singular": self.singular_},
            name="fit",
        )
        return GLMMSummary(fixed=fixed, random=self.variance_components_.copy(), fit=fit)
