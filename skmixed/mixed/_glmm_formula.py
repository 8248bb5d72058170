"""PoissonGLMM's formula interface (lme4's formulas, data frames and AnnData)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.utils.validation import check_is_fitted

from .._families import Poisson
from .._inputs import count_source, is_anndata, require_counts


def _parse_obs(parse_formula, formula, obs):
    """``parse_formula`` on an AnnData's ``obs``: an unknown column is named with the
    columns there are."""
    try:
        return parse_formula(formula, obs)
    except ValueError as exc:
        if str(exc).startswith("unknown column"):
            cols = [str(c) for c in obs.columns]
            raise ValueError(f"{exc}: the formula's variables are columns of data.obs, which has {cols}.") from exc
        raise


class FormulaMixin:
    """``from_formula``, ``predict_frame`` and the formula-fitted model's predictions
    and scores, for :class:`~skmixed.PoissonGLMM` and its subclasses."""

    def _predict_formula_frame(self, X, groups, offset):
        """``predict`` of a formula-fitted model: the data frame goes through the formula."""
        if isinstance(X, pd.DataFrame) and groups is None and offset is None:
            return self.predict_frame(X)
        raise ValueError(
            "this model was fitted from a formula: pass the data frame itself, predict(data) "
            "(or predict_frame(data, re_form=False) for population-level predictions); the "
            "formula builds X, the groups and the offset from it."
        )

    def _formula_response(self, X, y):
        """``y``, or for a formula-fitted model scored on a data frame without ``y``, the
        formula's response column."""
        if y is not None or getattr(self, "formula_", None) is None or not isinstance(X, pd.DataFrame):
            return y
        y = self._parsed.transform(X).y
        if y is None:
            raise ValueError(f"the data frame has no response column for the formula {self.formula_!r}.")
        return y

    def predict_frame(self, data: pd.DataFrame, *, re_form: bool = True):
        """Expected counts for a data frame, for a model fitted with :meth:`from_formula`.

        Levels unseen in training get random effect 0 (lme4's ``allow.new.levels``);
        ``re_form=False`` gives population-level predictions (lme4's ``re.form = NA``).
        """
        check_is_fitted(self)
        if getattr(self, "formula_", None) is None:
            raise ValueError("predict_frame needs a model fitted with PoissonGLMM.from_formula.")
        new = self._parsed.transform(data)
        eta = new.X @ np.nan_to_num(self.coef_)
        if new.offset is not None:
            eta = eta + new.offset
        if re_form and self._b:
            eta += self._random_part(new.terms, new.X.shape[0])
        return Poisson.mean(eta)

    @classmethod
    def from_formula(cls, formula: str, data, *, sample_weight=None, **params):
        """Fit a model given by an lme4 formula, e.g.
        ``"ZEB2 ~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)"``.

        Supports ``(1 | g)``, ``(1 + x | g)``, ``(1 + x || g)``, nesting ``(1 | a/b)``,
        several (crossed) terms and ``offset()``; the fixed part goes through
        formulaic. Coefficients are named as lme4 names them.

        With an AnnData ``data`` (cells x genes) the formula's variables are columns
        of ``data.obs`` and the counts come from the ``layer`` parameter's layer
        (``layers["counts"]`` when present, else ``.X``; raw counts required):

        - a formula without response, ``"~ 0 + cell_group + offset(log(total_count))
          + (1 | patient)"``, fits every gene of ``data``, vectorised across genes as
          :meth:`fit` does with a count matrix (one grouping factor with a random
          intercept, Laplace); ``results_``, ``genes_`` and :meth:`contrast` are then
          per gene, with the formula's coefficient names;
        - a response that is a gene (a name in ``data.var_names``; else an ``obs``
          column) fits that one gene, with everything the single-response fit gives.

        Parameters
        ----------
        formula : str
        data : DataFrame or AnnData
        sample_weight : array-like, optional
            Prior weights (lme4's ``weights``).
        **params
            Other estimator parameters (``nagq``, ``vcov``, ``layer``, ``verbose``, ...).

        Returns
        -------
        model : PoissonGLMM
            Fitted; for a single response ``formula_`` holds the formula (use
            :meth:`predict_frame` to predict); for every gene of an AnnData,
            ``gene_names_`` are its ``var_names``.

        Examples
        --------
        >>> import anndata
        >>> from skmixed import PoissonGLMM
        >>> from skmixed.datasets import make_boland_like_counts
        >>> cells, counts, truth = make_boland_like_counts(5, 2000, random_state=0)
        >>> adata = anndata.AnnData(counts.tocsr(), obs=cells.astype({"total_count": float}))
        >>> adata.obs_names = adata.obs_names.astype(str)
        >>> adata.var_names = truth.gene.to_numpy()
        >>> model = PoissonGLMM.from_formula(
        ...     "~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)", adata)
        >>> model.coef_.shape
        (5, 20)
        """
        from ..formula import parse_formula, split_formula  # noqa: PLC0415

        if is_anndata(data):
            response = split_formula(formula)[0] if "~" in formula else None
            obs = getattr(data, "obs", None)
            if not isinstance(obs, pd.DataFrame):
                raise ValueError("data is AnnData-like but has no .obs data frame for the formula's variables.")
            if response is None:
                return cls._from_formula_genes(formula, data, obs, sample_weight, params)
            data = cls._anndata_frame(data, obs, response, params.get("layer"))
            parsed = _parse_obs(parse_formula, formula, data)
        elif params.get("layer") is not None:
            raise ValueError(f"layer={params['layer']!r} applies to AnnData data only; data is a {type(data).__name__}.")
        else:
            parsed = parse_formula(formula, data)
        if parsed.y is None:
            raise ValueError(f"formula {formula!r} has no response.")
        if not parsed.terms:
            raise ValueError(f"formula {formula!r} has no random-effects term such as (1 | group).")
        est = cls(**{"fit_intercept": False, **params})
        est._validate_params()
        est.formula_ = formula
        est._parsed = parsed
        est.n_features_in_ = parsed.X.shape[1]
        est.group_names_ = list(dict.fromkeys(t.group for t in parsed.terms))
        est.group_levels_ = {t.group: list(t.levels) for t in parsed.terms}
        for t in parsed.terms:
            if len(t.levels) < 2:
                raise ValueError(f"grouping factor {t.group!r} has a single level; a variance cannot be estimated.")
        return est._fit(parsed.X, parsed.y, parsed.terms, parsed.offset, sample_weight, parsed.fixed_names)

    @staticmethod
    def _anndata_frame(adata, obs, response, layer):
        """``adata.obs`` with the response gene's counts as a column (a var name
        first, else an existing obs column)."""
        names = pd.Index(np.asarray(adata.var_names, dtype=object).astype(str))
        if response not in names:
            if response in obs.columns:
                return obs
            raise ValueError(
                f"the formula's response {response!r} is neither a gene of data.var_names nor a column of "
                "data.obs; leave the response out (\"~ ...\") to fit every gene."
            )
        src = count_source(adata, layer=layer, arg="data")
        col = src.values[:, [int(names.get_loc(response))]]
        y = np.asarray(col.toarray() if sp.issparse(col) else col, dtype=float).reshape(-1)
        require_counts(src, bool(np.all(y == np.round(y))))
        return obs.assign(**{response: y})

    @classmethod
    def _from_formula_genes(cls, formula, adata, obs, sample_weight, params):
        """Every gene of an AnnData through the vectorised many-gene fit."""
        from ..formula import parse_formula  # noqa: PLC0415

        parsed = _parse_obs(parse_formula, formula, obs)
        est = cls(**{"fit_intercept": False, **params})
        est._validate_params()
        terms = parsed.terms
        if len(terms) != 1 or terms[0].names != ["(Intercept)"] or est.nagq != 1:
            found = [f"({' + '.join('1' if v == '(Intercept)' else v for v in t.names)} | {t.group})" for t in terms]
            found = found or ["none"]
            raise ValueError(
                f"formula {formula!r}: fitting every gene at once supports exactly one random intercept "
                f"(1 | group) and nagq=1 (found random terms: {', '.join(found)}; nagq={est.nagq}). "
                "Fit other models gene by gene with a response, e.g. \"GENE ~ ...\"."
            )
        (t,) = terms
        groups = pd.Series(np.asarray(t.levels, dtype=object)[t.codes], name=t.group)
        X = pd.DataFrame(parsed.X, columns=parsed.fixed_names)
        return est._fit_many(X, adata, groups, parsed.offset, sample_weight, arg="data")
