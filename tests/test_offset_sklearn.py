"""NegBinOffsetMean inside scikit-learn: estimator checks, clone, pipelines, routing."""

import warnings

import numpy as np
import pytest
import sklearn
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from skmixed.offset import NegBinOffsetMean

_UNIT_WEIGHTS = (
    "sample_weight must lie in [0, 1] (treatment indicators, membership probabilities: "
    "issue 4); the check passes weights above 1."
)
EXPECTED_FAILED_CHECKS = {
    "check_sample_weights_list": _UNIT_WEIGHTS,
    "check_sample_weights_not_overwritten": _UNIT_WEIGHTS,
    "check_sample_weight_equivalence_on_dense_data": _UNIT_WEIGHTS + " (frequency weights up to 3)",
    "check_sample_weights_shape": (
        "a 2-D sample_weight of shape (n, B) is a feature: B weight vectors (e.g. resampled "
        "treatment indicators) fitted at once; the check expects it to be refused."
    ),
    "check_regressor_multioutput": (
        "the check's multi-output targets are negative although the estimator declares "
        "positive_only; counts must be non-negative (ValueError naming y)."
    ),
}


@parametrize_with_checks(
    [NegBinOffsetMean(), NegBinOffsetMean(family="poisson"), NegBinOffsetMean(size=2.0, method="mle")],
    expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS,
)
def test_sklearn_compatible(estimator, check):
    # the checks feed non-integer targets: warned about (documented), not a failure
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check(estimator)


def test_weights_routed_through_cross_validation():
    rng = np.random.default_rng(0)
    o = rng.normal(0, 0.5, 400)
    y = rng.negative_binomial(2.0, 2.0 / (2.0 + np.exp(0.2 + o)))
    w = (rng.uniform(size=400) < 0.7).astype(float)
    X = o[:, None]
    with sklearn.config_context(enable_metadata_routing=True):
        est = NegBinOffsetMean(size=2.0).set_fit_request(sample_weight=True).set_score_request(sample_weight=False)
        scores = cross_val_score(est, X, y, cv=KFold(4), params={"sample_weight": w})
        search = GridSearchCV(est, {"method": ["closed_form", "mle"]}, cv=KFold(4)).fit(X, y, sample_weight=w)
    expected = []
    for train, test in KFold(4).split(X):
        m = NegBinOffsetMean(size=2.0).fit(X[train], y[train], sample_weight=w[train])
        expected.append(m.score(X[test], y[test]))
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    refit = clone(search.best_estimator_).fit(X, y, sample_weight=w)
    assert search.best_estimator_.coef_ == pytest.approx(refit.coef_, abs=1e-12)
