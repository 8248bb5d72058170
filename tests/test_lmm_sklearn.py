"""LinearMixedModel inside scikit-learn: estimator checks, model selection, routing."""

import warnings

import numpy as np
import pytest
import sklearn
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, GroupKFold, cross_val_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from skmixed.datasets import load_sleepstudy
from skmixed.mixed import LinearMixedModel


@parametrize_with_checks([LinearMixedModel()])
def test_sklearn_compatible(estimator, check):
    # Without groups the model is a linear model (warned about: the documented behaviour).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check(estimator)


def test_grid_search_group_kfold_with_routing():
    data = load_sleepstudy()
    X, y, groups = data[["Days"]], data.Reaction, data.Subject
    with sklearn.config_context(enable_metadata_routing=True):
        est = (
            LinearMixedModel()
            .set_fit_request(groups=True, offset=False, sample_weight=False)
            .set_score_request(groups=True, offset=False, sample_weight=False)
        )
        search = GridSearchCV(est, {"random_slopes": [None, ["Days"]]}, cv=GroupKFold(n_splits=3))
        search.fit(X, y, groups=groups)
        scores = cross_val_score(est, X, y, cv=GroupKFold(n_splits=3), params={"groups": groups})
    assert search.best_params_ in ({"random_slopes": None}, {"random_slopes": ["Days"]})
    expected = []
    for train, test in GroupKFold(n_splits=3).split(X, y, groups):
        m = LinearMixedModel().fit(X.iloc[train], y.iloc[train], groups=groups.iloc[train])
        # unseen subjects: population level, with or without their labels
        expected.append(m.score(X.iloc[test], y.iloc[test], groups=groups.iloc[test]))
    np.testing.assert_allclose(scores, expected, rtol=1e-12)


def test_arrays_equal_formula():
    data = load_sleepstudy()
    a = LinearMixedModel(random_slopes=["Days"]).fit(data[["Days"]], data.Reaction, groups=data.Subject)
    b = LinearMixedModel.from_formula("Reaction ~ Days + (Days | Subject)", data)
    np.testing.assert_allclose(a.theta_, b.theta_, rtol=1e-10)
    np.testing.assert_allclose(a.coef_, b.coef_[1:], rtol=1e-10)
    pd_a = a.variance_components_.drop(columns="var1")
    np.testing.assert_allclose(pd_a.vcov, b.variance_components_.vcov, rtol=1e-10)
    c = LinearMixedModel(random_slopes=["Days"], random_correlated=False).fit(
        data[["Days"]], data.Reaction, groups=data.Subject)
    d = LinearMixedModel.from_formula("Reaction ~ Days + (Days || Subject)", data)
    np.testing.assert_allclose(c.loglik_, d.loglik_, rtol=1e-12)


def test_clone_and_refit_identical():
    data = load_sleepstudy()
    a = LinearMixedModel(reml=False).fit(data[["Days"]], data.Reaction, groups=data.Subject)
    b = clone(a).fit(data[["Days"]], data.Reaction, groups=data.Subject)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    np.testing.assert_array_equal(a.theta_, b.theta_)


def test_predict_conditional_and_new_levels():
    data = load_sleepstudy()
    X = data[["Days"]]
    m = LinearMixedModel(random_slopes=["Days"]).fit(X, data.Reaction, groups=data.Subject)
    fixed = m.predict(X)
    np.testing.assert_allclose(fixed, m.intercept_ + m.coef_[0] * data.Days, rtol=1e-12)
    cond = m.predict(X, groups=data.Subject)
    re = m.random_effects_.pivot(index="level", columns="term", values="condval")
    expected = fixed + re.loc[data.Subject, "(Intercept)"].to_numpy() + re.loc[data.Subject, "Days"].to_numpy() * data.Days
    np.testing.assert_allclose(cond, expected, rtol=1e-12)
    unseen = m.predict(X, groups=np.full(len(X), "never-seen"))
    np.testing.assert_allclose(unseen, fixed, rtol=1e-12)
    f = LinearMixedModel.from_formula("Reaction ~ Days + (Days | Subject)", data)
    np.testing.assert_allclose(f.predict_frame(data), cond, rtol=1e-8)
    np.testing.assert_allclose(f.predict_frame(data, re_form=False), fixed, rtol=1e-8)
    with pytest.raises(ValueError, match="unknown column 'Subject'"):
        f.predict(X)  # a data frame goes through the formula, which needs the grouping column
    with pytest.raises(ValueError, match="predict_frame"):
        f.predict(X.to_numpy())


def test_formula_model_predicts_and_scores_a_data_frame():
    from sklearn.metrics import r2_score

    data = load_sleepstudy()
    m = LinearMixedModel.from_formula("Reaction ~ Days + (Days | Subject)", data)
    np.testing.assert_allclose(m.predict(data), m.predict_frame(data))
    assert m.score(data) == pytest.approx(r2_score(data.Reaction, m.predict_frame(data)))
    with pytest.raises(ValueError, match="pass the data frame itself"):
        m.predict(data[["Days"]].to_numpy())
