"""PoissonGLMM over count matrices: the estimator's side of the many-gene fit
(:func:`~skmixed.mixed._multigene.fit_many` does the fitting)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.utils.validation import check_is_fitted, validate_data

from .._backend import get_namespace, is_cupy_array, to_host
from .._inputs import align_names, is_anndata
from .._threads import one_blas_thread
from ._design import distinct_rows
from ._glmm_checks import _as_2d_groups, _check_vector, _check_weights, _factor_codes
from ._inference import BetweenWithin
from ._laplace import warn_not_converged
from ._multigene import as_count_matrix, poisson_d2_by_column


class ManyGenesMixin:
    """Fitting, predicting and scoring one model per gene of a count matrix, for
    :class:`~skmixed.PoissonGLMM` and its subclasses."""

    # ------------------------------------------------------------- many genes
    def _fit_many(self, X, Y, groups, offset, sample_weight, arg="y"):
        # CuPy input: the batched fits run on the GPU (the reduction runs on the host)
        xp = get_namespace(Y.data if hasattr(Y, "tocsr") else Y, X)
        Y, names, integer = as_count_matrix(Y, self.layer, arg)
        X = to_host(X) if is_cupy_array(X) else X
        X = validate_data(self, X, dtype=np.float64)
        n = X.shape[0]
        if Y.shape[0] != n:
            raise ValueError(f"y has {Y.shape[0]} rows but X has {n}.")
        if groups is None:
            raise ValueError("groups is required when y holds several genes.")
        factors = _as_2d_groups(groups, n)
        if len(factors) != 1 or self.random_slopes or self.nagq != 1:
            raise NotImplementedError(
                "fitting many genes at once supports one grouping factor with a random "
                "intercept and nagq=1; fit other models gene by gene."
            )
        if not integer:
            warnings.warn("y contains non-integer values (see the single-gene fit).", UserWarning, stacklevel=3)
        name, values = factors[0]
        codes, levels = _factor_codes(name, values, n)
        offset = _check_vector(offset, n, "offset")
        sample_weight = _check_weights(sample_weight, X)
        fixed = np.hstack([np.ones((n, 1)), X]) if self.fit_intercept else X
        fixed_names = (["(Intercept)"] if self.fit_intercept else []) + self._feature_names()
        _, first = distinct_rows([fixed])  # the rank of X is that of its distinct rows (160, not 68,627)
        if np.linalg.matrix_rank(fixed[first]) < fixed.shape[1]:
            raise ValueError("X (with the intercept) is rank deficient; drop aliased columns first.")
        nobs = n if sample_weight is None else int(np.sum(sample_weight > 0))
        _, cells = distinct_rows([fixed, codes[:, None].astype(float)])  # distinct (X row, level) pairs
        self._ddf = BetweenWithin(fixed[cells], [(codes[cells], np.ones((cells.size, 1)))], nobs)
        with one_blas_thread():
            out = self._fit_many_core(
                fixed, Y, codes, levels, offset, sample_weight,
                names=names, fixed_names=fixed_names, group_name=name, vcov=self.vcov, xp=xp, integer=integer,
                verbose=self.verbose, reml=bool(self.reml), term_df=self._ddf.df(np.eye(fixed.shape[1])),
            )
        self.formula_ = None
        self.n_genes_ = len(names)
        self.gene_names_ = np.asarray(names, dtype=object)
        self.group_names_, self.group_levels_ = [name], {name: levels}
        self.fixed_names_ = fixed_names
        beta, cov = out["beta"], out["cov"]
        se = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
        if self.fit_intercept:
            self.intercept_, self.coef_ = beta[:, 0], beta[:, 1:]
            self.intercept_se_, self.coef_se_ = se[:, 0], se[:, 1:]
        else:
            self.intercept_, self.coef_ = np.zeros(len(names)), beta
            self.intercept_se_, self.coef_se_ = np.zeros(len(names)), se
        self.coef_cov_ = cov
        self.theta_ = out["theta"][:, None]
        self.loglik_ = out["loglik"]
        self.loglik_saturated_ = out["saturated"]
        self.converged_ = out["converged"]
        self.flags_ = out["flag"]
        self.n_iter_ = None
        self.results_ = out["table"]
        self.genes_ = out["genes"]
        self.variance_components_ = out["genes"][["gene", "grp", "vcov", "sdcor"]].assign(var1="(Intercept)", var2=np.nan)[
            ["gene", "grp", "var1", "var2", "vcov", "sdcor"]
        ]
        G, L = out["b"].shape
        self.random_effects_ = pd.DataFrame(
            {
                "gene": np.repeat(self.gene_names_, L),
                "grp": name,
                "level": np.tile(np.asarray(levels, dtype=object), G),
                "term": "(Intercept)",
                "condval": out["b"].ravel(),
                "condsd": out["condsd"].ravel(),
            }
        )
        self._b_genes = out["b"]
        n_bad = int(np.sum(out["flag"] == "not_converged"))
        if n_bad:
            warn_not_converged(f"{n_bad} of {G} genes (flag 'not_converged' in genes_)")
        return self

    def _new_terms_many(self, X, groups):
        cols = _as_2d_groups(groups, X.shape[0])
        if len(cols) != 1:
            raise ValueError(f"groups has {len(cols)} columns; the model was fitted with one.")
        labels = pd.Series(cols[0][1])
        codes = pd.Index(self.group_levels_[self.group_names_[0]]).get_indexer(labels.astype(str))
        codes[labels.isna().to_numpy()] = -1
        return (codes,)

    def score_genes(self, X, y, *, groups=None, offset=None, sample_weight=None):
        """Per-gene Poisson D^2 of a many-gene fit: a Series indexed by gene (NaN for
        genes whose counts are all zero in ``y``)."""
        check_is_fitted(self)
        if getattr(self, "n_genes_", None) is None:
            raise ValueError("score_genes needs a many-gene fit (y a count matrix); use score.")
        named = is_anndata(y) or isinstance(y, pd.DataFrame)
        Y, names, _ = as_count_matrix(y, self.layer)
        order = align_names(names, self.gene_names_, arg="y") if named else None
        if order is not None:
            Y = Y[:, order]
        if Y.shape[1] != self.n_genes_:
            raise ValueError(f"y has {Y.shape[1]} genes; the model was fitted with {self.n_genes_}.")
        mu = self.predict(X, groups=groups, offset=offset)
        if Y.shape[0] != mu.shape[0]:
            raise ValueError(f"y has {Y.shape[0]} rows but X has {mu.shape[0]}.")
        w = _check_weights(sample_weight, mu)
        return pd.Series(poisson_d2_by_column(Y, mu, w), index=pd.Index(self.gene_names_, name="gene"), name="d2")
