"""PoissonGLMM: bad input, flagged results, metamorphic relations."""


import numpy as np
import pandas as pd
import pytest
import scipy.stats
from sklearn.exceptions import ConvergenceWarning

from skmixed import PoissonGLMM
from skmixed.datasets import make_poisson_glmm


@pytest.fixture(scope="module")
def data():
    d, _ = make_poisson_glmm(12, 25, random_state=7)
    return d


def _fit(d, **kw):
    params = {k: kw.pop(k) for k in list(kw) if k in PoissonGLMM().get_params()}
    args = dict(groups=d.g, offset=d.offset)
    args.update(kw)
    return PoissonGLMM(**params).fit(d[["x1", "x2"]], d.y, **args)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda d: d.assign(y=d.y.astype(float).where(d.index != 3, np.nan)), "Input y contains NaN"),
        (lambda d: d.assign(y=d.y.where(d.index != 3, -1)), "y must be non-negative"),
        (lambda d: d.assign(x1=d.x1.where(d.index != 5, np.inf)), "Input X contains infinity"),
    ],
)
def test_bad_values(data, bad, match):
    with pytest.raises(ValueError, match=match):
        _fit(bad(data))


def test_length_mismatches(data):
    with pytest.raises(ValueError, match="groups has 299 rows"):
        _fit(data, groups=data.g[:-1])
    with pytest.raises(ValueError, match="offset has 10 entries"):
        _fit(data, offset=np.zeros(10))
    with pytest.raises(ValueError, match="offset must be finite"):
        _fit(data, offset=np.where(data.index == 0, np.nan, data.offset))
    with pytest.raises(ValueError, match="offset must be numeric values"):
        _fit(data, offset=data.lt)  # a DataFrame method, not a column
    with pytest.raises(ValueError, match="offset must be numeric values"):
        _fit(data, offset=["a"] * len(data))
    with pytest.raises(ValueError, match="sample_weight"):
        _fit(data, sample_weight=-np.ones(len(data)))


def test_single_level_and_missing_groups(data):
    with pytest.raises(ValueError, match="single level"):
        _fit(data, groups=np.repeat("a", len(data)))
    with pytest.raises(ValueError, match="missing values"):
        _fit(data, groups=data.g.where(data.index != 0, None))


def test_bad_parameters(data):
    for params, match in [({"nagq": 0}, "nagq"), ({"vcov": "sandwich"}, "vcov"), ({"max_iter": 0}, "max_iter")]:
        with pytest.raises(ValueError, match=match):
            _fit(data, **params)
    with pytest.raises(ValueError, match="single scalar random-effects term"):
        _fit(data, nagq=5, groups=data[["g", "h"]] if "h" in data else np.column_stack([data.g, data.g]))
    with pytest.raises(ValueError, match="not a column of X"):
        _fit(data, random_slopes=["x9"])


def test_non_integer_counts_warn_and_flag(data):
    with pytest.warns(UserWarning, match="non-integer"):
        m = _fit(data.assign(y=data.y + 0.5))
    assert m.integer_response_ is False
    assert _fit(data).integer_response_ is True


def test_rank_deficient_X_drops_aliased_columns(data):
    d = data.assign(x3=2 * data.x1 - data.x2)
    with pytest.warns(UserWarning, match="rank deficient so dropping 1"):
        m = PoissonGLMM().fit(d[["x1", "x2", "x3"]], d.y, groups=d.g, offset=d.offset)
    ref = _fit(data)
    assert np.isnan(m.coef_).sum() == 1
    # the fitted model is the same: predictions agree
    np.testing.assert_allclose(
        m.predict(d[["x1", "x2", "x3"]], groups=d.g, offset=d.offset),
        ref.predict(data[["x1", "x2"]], groups=data.g, offset=data.offset),
        rtol=1e-6,
    )


def test_singular_fit_is_flagged():
    d, _ = make_poisson_glmm(8, 40, sd_intercept=0.0, random_state=11)
    with pytest.warns(UserWarning, match="singular"):
        m = _fit(d)
    assert m.singular_ and m.theta_[0] < 1e-4
    assert m.variance_components_.vcov.iloc[0] < 1e-8


def test_non_convergence_is_reported(data):
    with pytest.warns(ConvergenceWarning):
        m = _fit(data, max_iter=1)
    assert m.converged_ is False


def test_all_zero_level_is_fine(data):
    d = data.assign(y=data.y.where(data.g != "g0", 0))
    m = _fit(d)
    assert m.converged_
    b = m.random_effects_.set_index("level").condval
    assert b["g0"] < b.drop("g0").min()


# ---------------------------------------------------------------- metamorphic
def test_collapse_equals_full_data(data):
    a, b = _fit(data), _fit(data, collapse=False)
    np.testing.assert_allclose(a.coef_, b.coef_, atol=1e-9)
    np.testing.assert_allclose(a.coef_se_, b.coef_se_, rtol=1e-6)
    assert a.loglik_ == pytest.approx(b.loglik_, abs=1e-8)


def test_duplicated_rows_equal_weight_two(data):
    doubled = pd.concat([data, data], ignore_index=True)
    a = _fit(doubled)
    b = _fit(data, sample_weight=np.full(len(data), 2.0))
    np.testing.assert_allclose(a.coef_, b.coef_, atol=1e-8)
    np.testing.assert_allclose(a.theta_, b.theta_, atol=1e-7)
    assert a.loglik_ == pytest.approx(b.loglik_, abs=1e-6)


def test_offset_shift_moves_intercept(data):
    a = _fit(data)
    b = _fit(data, offset=data.offset + 1.5)
    assert b.intercept_ == pytest.approx(a.intercept_ - 1.5, abs=1e-8)
    np.testing.assert_allclose(b.coef_, a.coef_, atol=1e-8)


def test_relabelling_groups_changes_nothing(data):
    a = _fit(data)
    relabel = {g: f"patient_{i:03d}" for i, g in enumerate(np.random.default_rng(0).permutation(data.g.unique()))}
    b = _fit(data, groups=data.g.map(relabel))
    np.testing.assert_allclose(a.coef_, b.coef_, atol=1e-9)
    np.testing.assert_allclose(a.theta_, b.theta_, atol=1e-9)
    ra = a.random_effects_.set_index("level").condval
    rb = b.random_effects_.assign(level=b.random_effects_.level.map({v: k for k, v in relabel.items()})).set_index("level").condval
    np.testing.assert_allclose(ra.sort_index(), rb.sort_index(), atol=1e-9)


def test_row_order_changes_nothing(data):
    a = _fit(data)
    perm = np.random.default_rng(1).permutation(len(data))
    b = _fit(data.iloc[perm].reset_index(drop=True))
    np.testing.assert_allclose(a.coef_, b.coef_, atol=1e-9)


def test_summary_tables(data):
    m = _fit(data)
    s = m.summary(test="z")
    assert list(s.fixed.columns) == ["estimate", "std_error", "statistic", "df", "p_value", "ci_2.5%", "ci_97.5%",
                                     "distribution"]
    np.testing.assert_allclose(s.fixed["ci_97.5%"] - s.fixed.estimate, 1.959963984540054 * s.fixed.std_error)
    assert set(s.fixed.distribution) == {"normal"} and np.all(np.isinf(s.fixed.df))
    # the default: t intervals with the between-within df
    t = m.summary().fixed
    crit = scipy.stats.t.ppf(0.975, t.df.to_numpy())
    np.testing.assert_allclose(t["ci_97.5%"] - t.estimate, crit * t.std_error)
    assert set(t.distribution) == {"t"}
    assert "Random effects" in repr(s)


def test_unused_categories_are_dropped_and_missing_levels_predict_population(data):
    """lme4 drops unused factor levels; missing levels at predict time get b = 0."""
    cat = pd.Categorical(data.g, categories=sorted(data.g.unique()) + ["never_used"])
    m = _fit(data, groups=pd.Series(cat, name="g"))
    assert "never_used" not in set(m.random_effects_.level)
    ref = _fit(data)
    np.testing.assert_allclose(m.coef_, ref.coef_, atol=1e-10)
    X = data[["x1", "x2"]]
    missing = m.predict(X, groups=pd.Series([None] * len(X)), offset=data.offset)
    np.testing.assert_allclose(missing, m.predict(X, offset=data.offset), rtol=1e-12)


def test_all_zero_counts_raise(data):
    with pytest.raises(ValueError, match="y is zero everywhere"):
        _fit(data.assign(y=0))


# ----------------------------------------------------- consistency (issue 10, point 9)
def test_string_response_is_a_clear_error():
    X = np.random.default_rng(0).normal(size=(20, 2))
    g = np.repeat([0, 1], 10)
    for y in (np.array(["1"] * 20), np.array(["a"] * 20)):
        with pytest.raises(ValueError, match="y must hold numeric counts"):
            PoissonGLMM().fit(X, y, groups=g)


def test_formula_model_predicts_and_scores_a_data_frame():
    from sklearn.metrics import d2_tweedie_score

    from skmixed.datasets import make_zeb2_like

    data = make_zeb2_like(4000, random_state=3)
    m = PoissonGLMM.from_formula(
        "ZEB2 ~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)", data
    )
    np.testing.assert_allclose(m.predict(data), m.predict_frame(data))
    expected = d2_tweedie_score(data.ZEB2, m.predict_frame(data), power=1)
    assert m.score(data) == pytest.approx(expected)
    assert m.score(data, data.ZEB2) == pytest.approx(expected)
    with pytest.raises(ValueError, match="pass the data frame itself"):
        m.predict(data[["total_count"]].to_numpy())
    with pytest.raises(ValueError, match="no response column"):
        m.score(data.drop(columns="ZEB2"))


def test_score_of_a_constant_response_is_nan(data):
    m = _fit(data)
    X = data[["x1", "x2"]]
    for value in (0.0, 2.0):
        assert np.isnan(m.score(X, np.full(len(X), value), groups=data["g"], offset=data["offset"]))
