"""NegBinOffsetMean: the mean-plus-offset model ``y_i ~ NB_r(exp(beta + o_i))`` as a
scikit-learn regressor, vectorised over many responses and many weight vectors."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import scipy.sparse
import scipy.special
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted, validate_data

from .._backend import get_namespace, is_device_sparse, ndtr, nonzero_entries, safe_exp, to_host
from .._families import NegativeBinomial, Poisson, check_counts
from . import _fused
from ._kernels import DeviceWeightColumns, WeightColumns, fit_offset_mean

_FAMILIES = ("poisson", "negative_binomial")
# dense weight matrices at least this large are scanned by the compiled pass
_SCAN_MIN = 1 << 16
_METHODS = ("closed_form", "mle")


def _check_weight_values(data):
    """One min/max pass over the weights: NaN, infinities and values outside [0, 1]
    all fail ``0 <= min`` or ``max <= 1``; only then is the offending value looked for.
    Returns the minimum (0 means explicit zeros in a sparse matrix)."""
    if data.size == 0:
        return 1.0
    lo, hi = float(data.min()), float(data.max())
    if 0.0 <= lo and hi <= 1.0:
        return lo
    bad = ~np.isfinite(data)
    if np.any(bad):
        raise ValueError(f"sample_weight must be finite; found {data[bad][0]!r}.")
    bad = (data < 0) | (data > 1)
    raise ValueError(
        f"sample_weight must lie in [0, 1] (treatment indicators or membership "
        f"probabilities); found {data[bad][0]!r}."
    )


def check_weights(sample_weight, n):
    """Weights as WeightColumns, and whether they were one vector.

    Raises ValueError for a wrong number of rows, non-finite values, values outside
    [0, 1] and columns without a positive weight. Sparse weights keep their format
    (CSC: column by column; CSR: cell by cell), dense ones are read once for the check.
    """
    if sample_weight is None:
        return WeightColumns.ones(n), True
    if scipy.sparse.issparse(sample_weight):
        W = sample_weight
        if W.format not in ("csr", "csc"):
            W = W.tocsr()
        if W.dtype != np.float64:
            W = W.astype(np.float64)
        one = False
    else:
        W = np.asarray(sample_weight, dtype=np.float64)
        if W.ndim not in (1, 2):
            raise ValueError(f"sample_weight must be 1-D or 2-D, got {W.ndim} dimensions.")
        one = W.ndim == 1
        W = W.reshape(W.shape[0], -1)
    if W.shape[0] != n:
        raise ValueError(f"sample_weight has {W.shape[0]} rows but X has {n}.")
    if not scipy.sparse.issparse(W) and W.shape[1] > 1 and _fused.AVAILABLE and W.size >= _SCAN_MIN:
        # one compiled pass checks the values and collects the non-zeros (C or Fortran order:
        # the latter scanned as its transpose, whose CSR matrix is W's CSC matrix)
        fortran = W.flags.f_contiguous and not W.flags.c_contiguous
        csr = _fused.dense_to_csr(W.T if fortran else np.ascontiguousarray(W))
        if csr is not None:
            W = csr.T if fortran else csr
            cols = WeightColumns.from_sparse(W)
            empty = np.flatnonzero(cols.count == 0)
            if empty.size:
                raise ValueError(f"sample_weight column {int(empty[0])} is all zero: no observation to fit.")
            return cols, one
    lo = _check_weight_values(W.data if scipy.sparse.issparse(W) else W)
    if scipy.sparse.issparse(W):
        if lo == 0.0:  # explicit zeros: drop them from a copy (the caller's matrix is left as it was)
            W = W.copy()
            W.eliminate_zeros()
        cols = WeightColumns.from_sparse(W)
    elif W.shape[1] == 1:
        cols = WeightColumns.from_vector(W[:, 0])
    else:
        cols = WeightColumns.from_dense(W)
    empty = np.flatnonzero(cols.count == 0)
    if empty.size:
        raise ValueError(f"sample_weight column {int(empty[0])} is all zero: no observation to fit.")
    return cols, one


class NegBinOffsetMean(RegressorMixin, BaseEstimator):
    """Mean-plus-offset model: ``y_i ~ NB_r(exp(beta + o_i))`` or ``Poisson(exp(beta + o_i))``.

    The offset ``o`` is the only input (``X`` of shape (n, 1), coefficient fixed to 1;
    several columns are several offsets, summed) and ``beta`` the only parameter, so every fit is a handful of sums over the
    observations. Many fits run at once: ``y`` may hold G responses and ``sample_weight``
    B weight vectors (e.g. resampled treatment indicators, sparse), giving G x B
    estimates at a cost proportional to the number of non-zero weights.

    Estimation. The closed form ``beta = log(sum T y / sum T e^o)`` is the exact
    (weighted) Poisson MLE and an asymptotically exact NB estimate; ``method="mle"``
    refines it to the exact NB MLE by safeguarded Newton steps. With ``size=None`` the
    NB size is estimated by maximum likelihood (jointly with ``beta`` under
    ``method="mle"``, at the closed-form mean otherwise), as ``MASS::glm.nb`` does.

    Inference. Fisher information ``I = sum T r mu / (r + mu)`` (``sum T mu`` for
    Poisson), standard error ``1 / sqrt(I)``, Wald ``z`` and two-sided p-value; and the
    score statistic for ``beta = 0``, ``U(0) / sqrt(I(0))``.

    Parameters
    ----------
    family : {"negative_binomial", "poisson"}, default="negative_binomial"
    size : float, array-like of shape (n_targets,) or None, default=None
        NB size ``r`` (variance ``mu + mu^2 / r``), one per response if an array; None
        estimates it for every fit. Ignored for Poisson.
    method : {"closed_form", "mle"}, default="closed_form"
        NB estimate of ``beta``. Poisson is always exact.
    max_iter : int, default=50
        Newton iterations (for ``beta`` and for the size).
    tol : float, default=1e-10
        Newton step tolerance on ``beta``.

    Attributes
    ----------
    coef_ : float or ndarray of shape (G,), (B,) or (G, B)
        Estimates of ``beta``. The G axis is present when ``y`` is 2-D, the B axis when
        ``sample_weight`` is 2-D or sparse; with 1-D ``y`` and 1-D (or no) weights every
        attribute below is a scalar.
    coef_se_, z_, pvalue_ : like ``coef_``
        Standard error from the Fisher information at ``coef_``, Wald z, two-sided p.
    score_z_, score_pvalue_ : like ``coef_``
        Score statistic for ``beta = 0`` and its two-sided p-value.
    size_ : like ``coef_``
        The size used: the fixed one, the estimate, ``inf`` for Poisson or when the data
        show no overdispersion (NB likelihood maximal in the Poisson limit), NaN where the
        weighted counts are all zero.
    boundary_ : bool, like ``coef_``
        ``sum T y = 0``: the MLE is ``-inf``; ``coef_ = -inf``, ``coef_se_ = inf``,
        ``z_ = pvalue_ = NaN`` (``score_z_`` remains defined). Warned about.
    converged_ : bool, like ``coef_``
        Newton (and the size search) converged; a ConvergenceWarning names the others.
    size_fallback_ : bool, like ``coef_``
        The size search failed and the method-of-moments size was used (warned).
    n_iter_ : int
        Passes of the solver: 1 (the closed form) plus the largest number of Newton
        iterations used.
    integer_response_ : bool
        Whether ``y`` holds integers (non-integer counts are fitted, with a warning).

    Notes
    -----
    Bad input: NaN/infinite values, negative counts, offsets of the wrong length,
    weights outside [0, 1] or a weight column without a positive entry, and a response
    that is zero everywhere raise ``ValueError``. A response column (or a weight
    column's share of it) that is all zero is a flagged result (``boundary_``), so that
    one empty gene does not stop a fit of thousands.

    The closed-form NB estimate ignores the size, so it is less efficient than the MLE
    when the offsets vary; its Fisher standard error is that of the MLE. See
    ``tests/test_offset_reference.py::test_closed_form_distance_to_mle`` for the measured
    distance to the MLE as ``n`` grows.

    Examples
    --------
    >>> import numpy as np
    >>> from skmixed.offset import NegBinOffsetMean
    >>> rng = np.random.default_rng(0)
    >>> o = rng.normal(0.0, 0.5, 2000)
    >>> mu = np.exp(0.3 + o)
    >>> y = rng.negative_binomial(2.0, 2.0 / (2.0 + mu))
    >>> model = NegBinOffsetMean(size=2.0, method="mle").fit(o[:, None], y)
    >>> round(float(model.coef_), 2), round(float(model.coef_se_), 3)
    (0.31, 0.025)
    """

    def __init__(self, *, family="negative_binomial", size=None, method="closed_form", max_iter=50, tol=1e-10):
        self.family = family
        self.size = size
        self.method = method
        self.max_iter = max_iter
        self.tol = tol

    def _validate_params(self):
        if self.family not in _FAMILIES:
            raise ValueError(f"family must be one of {_FAMILIES}, got {self.family!r}.")
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {self.method!r}.")
        if self.size is not None:
            try:
                r = np.asarray(self.size, dtype=float)
            except (TypeError, ValueError):
                raise ValueError(f"size must be None, a positive number or an array of them, got {self.size!r}.") from None
            if r.ndim > 1 or r.size == 0 or not np.all(np.isfinite(r)) or np.any(r <= 0):
                raise ValueError(f"size must be None, a positive number or an array of them, got {self.size!r}.")
        if not isinstance(self.max_iter, numbers.Integral) or isinstance(self.max_iter, bool) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}.")
        if not isinstance(self.tol, numbers.Real) or not self.tol > 0:
            raise ValueError(f"tol must be a positive number, got {self.tol!r}.")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.positive_only = True
        tags.target_tags.multi_output = True
        tags.regressor_tags.poor_score = True  # one parameter, no features
        return tags

    def fit(self, X, y, sample_weight=None):
        """Fit ``beta`` for every response column and weight column.

        Parameters
        ----------
        X : array-like of shape (n_samples, 1)
            The offsets ``o_i`` (e.g. log library size, or log fitted means of a
            "distillation" GLM). Several columns are summed: each is a known term of
            the linear predictor with coefficient 1.
        y : array-like of shape (n_samples,) or (n_samples, G)
            Non-negative counts (sparse is densified).
        sample_weight : array-like or sparse matrix of shape (n_samples,) or (n_samples, B), default=None
            Weights ``T_i`` in [0, 1] multiplying each log-likelihood term.

        Returns
        -------
        self : NegBinOffsetMean
        """
        self._validate_params()
        device_w = is_device_sparse(sample_weight)
        xp = get_namespace(X, y, *(() if sample_weight is None or device_w else (sample_weight,)))
        if xp is not np or device_w:
            return self._fit_device(X, y, sample_weight)
        return self._fit_columns(*self._validate(X, y, sample_weight))

    def _validate(self, X, y, sample_weight):
        if scipy.sparse.issparse(y):
            y = y.toarray()
        X, y = validate_data(self, X, y, dtype=np.float64, multi_output=True, y_numeric=True)
        n = X.shape[0]
        self.integer_response_ = check_counts(y, "y", stacklevel=4)
        Y = y.reshape(n, -1)
        if self.size is not None and np.ndim(self.size) == 1 and np.size(self.size) != Y.shape[1]:
            raise ValueError(f"size has {np.size(self.size)} entries but y has {Y.shape[1]} columns.")
        cols, one_weight = check_weights(sample_weight, n)
        return X, y, Y, cols, one_weight

    def _fit_device(self, X, y, sample_weight):
        """CuPy inputs: validated on host copies, fitted on the device (the sums as cupyx
        sparse products); the fitted attributes are CuPy arrays."""
        import cupy as xp  # noqa: PLC0415  (only reached with CuPy inputs)

        Wh = sample_weight
        if is_device_sparse(sample_weight):
            Wh = sample_weight.get()
        elif sample_weight is not None:
            Wh = to_host(sample_weight)
        self._validate(to_host(X), to_host(y), Wh)  # the checks, on host copies
        Xd = xp.asarray(X, dtype=xp.float64).reshape(X.shape[0], -1)
        yd = xp.asarray(y, dtype=xp.float64)
        n = Xd.shape[0]
        Y = yd.reshape(n, -1)
        one_weight = sample_weight is None or (not is_device_sparse(sample_weight) and sample_weight.ndim == 1)
        if sample_weight is None:
            rows, cols_, vals = xp.arange(n), xp.zeros(n, xp.int64), xp.ones(n)
            B = 1
        else:
            W = sample_weight
            if not is_device_sparse(W):
                W = xp.asarray(W, dtype=xp.float64).reshape(n, -1)
            rows, cols_, vals = nonzero_entries(W)
            B = W.shape[1]
        cols = DeviceWeightColumns(rows, cols_, vals, n, B)
        return self._fit_columns(Xd, yd, Y, cols, one_weight)

    def _fit_columns(self, X, y, Y, cols, one_weight):
        res = fit_offset_mean(
            Y, X.sum(axis=1), cols, family=self.family, size=self.size, method=self.method,
            max_iter=self.max_iter, tol=self.tol,
        )
        squeeze = (0,) if y.ndim == 1 else ()
        squeeze += (1,) if one_weight else ()

        def out(a):
            a = np.squeeze(a, axis=squeeze)
            return a[()] if a.ndim == 0 else a

        self.coef_ = out(res.coef)
        self.coef_se_ = out(res.se)
        self.z_ = out(res.z)
        self.pvalue_ = out(2.0 * ndtr(-abs(res.z)))
        self.score_z_ = out(res.score_z)
        self.score_pvalue_ = out(2.0 * ndtr(-abs(res.score_z)))
        self.size_ = out(res.size)
        self.converged_ = out(res.converged)
        self.boundary_ = out(res.boundary)
        self.size_fallback_ = out(res.size_fallback)
        self.n_iter_ = 1 + int(res.n_iter)
        if res.boundary.any():
            warnings.warn(
                f"the weighted counts sum to zero in {int(res.boundary.sum())} fit(s): coef_ = -inf, "
                "z_ and pvalue_ are NaN there (boundary_ marks them; score_z_ is defined).",
                UserWarning,
                stacklevel=3,
            )
        if res.size_fallback.any():
            warnings.warn(
                f"the size search failed in {int(res.size_fallback.sum())} fit(s); they use the "
                "method-of-moments size (size_fallback_ marks them).",
                UserWarning,
                stacklevel=3,
            )
        if not res.converged.all():
            warnings.warn(
                f"{int((~res.converged).sum())} fit(s) did not converge in {self.max_iter} Newton "
                "iterations (converged_ marks them); increase max_iter.",
                ConvergenceWarning,
                stacklevel=3,
            )
        return self

    def score(self, X, y, sample_weight=None):
        """D^2: the fraction of the family's deviance explained, as scikit-learn's
        Poisson regressors score (Poisson deviance for ``family="poisson"`` or an
        infinite ``size_``, else the NB deviance at ``size_``), against the constant
        (weighted) mean of ``y``. Defined for a single fit (1-D ``y`` and weights); a
        constant ``y`` has no deviance to explain: NaN.
        """
        check_is_fitted(self)
        if np.ndim(to_host(self.coef_)) != 0:
            raise ValueError("score is defined for a single fit (1-D y and sample_weight); this model holds several.")
        mu = to_host(self.predict(X))
        y = np.asarray(to_host(y))
        Poisson.check_response(y, "y")
        y = y.astype(np.float64).reshape(-1)
        if y.shape != mu.shape:
            raise ValueError(f"y has {y.shape[0]} values but X has {mu.shape[0]} rows.")
        w = np.ones_like(y) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).reshape(-1)
        if w.shape != y.shape or not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"sample_weight must be {y.shape[0]} finite non-negative weights.")
        size = float(to_host(self.size_))
        family = Poisson if self.family == "poisson" or not np.isfinite(size) else NegativeBinomial(size)
        ybar = np.average(y, weights=w)
        if np.all(y == ybar):
            return float("nan")
        dev = float(np.sum(w * family.unit_deviance(y, mu)))
        dev0 = float(np.sum(w * family.unit_deviance(y, np.full_like(y, ybar))))
        return 1.0 - dev / dev0

    def predict(self, X):
        """Expected counts ``exp(coef_ + o)``, of shape ``(n_samples,) + coef_.shape``."""
        check_is_fitted(self)
        xp = get_namespace(self.coef_)
        Xh = validate_data(self, to_host(X), dtype=np.float64, reset=False)
        X = Xh if xp is np else xp.asarray(Xh)
        coef = xp.asarray(self.coef_)
        eta = X.sum(axis=1).reshape((-1,) + (1,) * coef.ndim) + coef
        with np.errstate(invalid="ignore"):
            return safe_exp(eta)
