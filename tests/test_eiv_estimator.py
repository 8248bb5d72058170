"""GLMEIV as a scikit-learn estimator: parameters, pickling, pipelines, bad input, flags,
predictions, convergence reporting and the EM's monotone log-likelihood."""

import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import ConvergenceWarning
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from skmixed.eiv import GLMEIV, make_glmeiv_data


@pytest.fixture(scope="module")
def screen():
    X, m, g, off, p = make_glmeiv_data(4000, 3, pi=0.08, g_perturbation=np.log([3.0, 4.0, 6.0]), random_state=3)
    return X, m, g, off, p


def _fit(model, screen, j=0, **kw):
    X, m, g, off, _ = screen
    return model.fit(X, m[:, j], grna=g[:, j], offset=off["mrna"], grna_offset=off["grna"], **kw)


def test_results_layout_and_flags(screen):
    model = _fit(GLMEIV(mrna_family="poisson", random_state=0), screen)
    res = model.results_
    assert list(res["parameter"]) == ["pi", "m_intercept", "m_perturbation", "m_batch",
                                      "g_intercept", "g_perturbation", "g_batch"]
    assert list(res.columns[:7]) == ["parameter", "estimate", "std_error", "z", "p_value",
                                     "confint_lower", "confint_upper"]
    np.testing.assert_allclose(res["z"], res["estimate"] / res["std_error"])
    np.testing.assert_allclose(res["confint_upper"] - res["confint_lower"], 2 * 1.959964 * res["std_error"], rtol=1e-6)
    assert model.converged_ and isinstance(model.loglik_, float) and model.n_iter_ >= 1
    assert not model.pairs_["flagged"].iloc[0]
    fc = res.set_index("parameter").loc["m_perturbation"]
    assert fc["fc_estimate"] == pytest.approx(np.exp(fc["estimate"]))
    assert fc["fc_confint_lower"] < fc["fc_estimate"] < fc["fc_confint_upper"]


def test_loglik_path_is_monotone(screen):
    model = _fit(GLMEIV(random_state=0), screen, 1)
    path = model.loglik_path_
    assert len(path) == model.n_iter_ + 1
    assert np.all(np.diff(path) >= -1e-12 * np.abs(path[1:]))
    assert path[-1] == pytest.approx(model.loglik_)


def test_random_init_reaches_the_same_mle(screen):
    a = _fit(GLMEIV(mrna_family="poisson", random_state=0), screen, 2)
    b = _fit(GLMEIV(mrna_family="poisson", init="random", random_state=0), screen, 2)
    se = a.results_["std_error"].to_numpy()
    assert np.max(np.abs(a.coef_[0] - b.coef_[0]) / se) < 1e-3
    assert b.loglik_ == pytest.approx(a.loglik_, rel=1e-10)


def test_clone_params_and_pickle(screen):
    model = GLMEIV(mrna_family="poisson", n_restarts=5, random_state=0)
    assert clone(model).get_params() == model.get_params()
    model.set_params(tol=1e-8)
    assert model.get_params()["tol"] == 1e-8
    _fit(model, screen)
    again = pickle.loads(pickle.dumps(model))
    pd.testing.assert_frame_equal(again.results_, model.results_)
    X, m, g, off, _ = screen
    np.testing.assert_allclose(
        again.predict_proba(X, m[:, 0], grna=g[:, 0], offset=off["mrna"], grna_offset=off["grna"]),
        model.predict_proba(X, m[:, 0], grna=g[:, 0], offset=off["mrna"], grna_offset=off["grna"]),
    )


def test_pipeline_with_column_transformer(screen):
    X, m, g, off, _ = screen
    rng = np.random.default_rng(0)
    Xd = pd.DataFrame({"batch": np.where(X["batch"] > 0, "b", "a"), "pmito": rng.uniform(0, 5, len(X))})
    pre = ColumnTransformer([("cat", OneHotEncoder(drop="first", sparse_output=False), ["batch"]),
                             ("num", StandardScaler(), ["pmito"])]).set_output(transform="pandas")
    pipe = Pipeline([("pre", pre), ("eiv", GLMEIV(mrna_family="poisson", random_state=0))])
    pipe.fit(Xd, m[:, 0], eiv__grna=g[:, 0], eiv__offset=off["mrna"], eiv__grna_offset=off["grna"])
    params = list(pipe[-1].results_["parameter"])
    assert params == ["pi", "m_intercept", "m_perturbation", "m_cat__batch_b", "m_num__pmito",
                      "g_intercept", "g_perturbation", "g_cat__batch_b", "g_num__pmito"]
    direct = GLMEIV(mrna_family="poisson", random_state=0).fit(
        pre.fit_transform(Xd), m[:, 0], grna=g[:, 0], offset=off["mrna"], grna_offset=off["grna"])
    np.testing.assert_allclose(pipe[-1].coef_, direct.coef_)


def test_predict_assigns_cells(screen):
    X, m, g, off, p = screen
    model = _fit(GLMEIV(mrna_family="poisson", random_state=0), screen, 2)
    P = model.predict_proba(X, m[:, 2], grna=g[:, 2], offset=off["mrna"], grna_offset=off["grna"])
    assert P.shape == (len(X), 2)
    np.testing.assert_allclose(P.sum(axis=1), 1.0)
    labels = model.predict(X, m[:, 2], grna=g[:, 2], offset=off["mrna"], grna_offset=off["grna"])
    assert np.mean(labels == p[:, 2]) > 0.99
    # the posterior mean is the fitted pi at the MLE (the M-step's fixed point)
    assert P[:, 1].mean() == pytest.approx(model.coef_[0, 0], rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mrna_family": "gaussian"}, "mrna_family"),
        ({"grna_family": "binomial"}, "grna_family"),
        ({"init": "kmeans"}, "init"),
        ({"n_restarts": 0}, "n_restarts"),
        ({"tol": -1.0}, "tol"),
        ({"max_iter": 0}, "max_iter"),
        ({"mrna_size": -2.0}, "mrna_size"),
        ({"device": "tpu"}, "device"),
        ({"n_jobs": 0}, "n_jobs"),
    ],
)
def test_bad_parameters(screen, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _fit(GLMEIV(**kwargs), screen)


def test_bad_input(screen):
    X, m, g, off, _ = screen
    model = GLMEIV(mrna_family="poisson")
    y = m[:, 0].astype(float)
    with pytest.raises(ValueError, match="y"):
        model.fit(X, np.where(np.arange(len(y)) == 3, np.nan, y), grna=g[:, 0])
    with pytest.raises(ValueError, match="y"):
        model.fit(X, -y, grna=g[:, 0])
    with pytest.raises(ValueError, match="grna"):
        model.fit(X, y, grna=-g[:, 0])
    with pytest.raises(ValueError, match="grna"):
        model.fit(X, y, grna=g[:-1, 0])
    with pytest.raises(ValueError, match="X"):
        model.fit(X.iloc[:-1], y, grna=g[:, 0])
    with pytest.raises(ValueError, match="offset"):
        model.fit(X, y, grna=g[:, 0], offset=off["mrna"][:-1])
    with pytest.raises(ValueError, match="grna"):
        model.fit(X, y, grna=np.zeros(len(y)))
    with pytest.raises(ValueError, match="grna"):
        model.fit(X, y, grna=None)
    with pytest.raises(ValueError, match="perturbation"):
        model.fit(X.rename(columns={"batch": "perturbation"}), y, grna=g[:, 0])
    with pytest.raises(ValueError, match="pairs"):
        model.fit(X, m, grna=g, pairs=[("nope", 0)])
    with pytest.raises(ValueError, match="rank deficient"):
        model.fit(X.assign(twice=2 * X["batch"]), y, grna=g[:, 0])
    with pytest.raises(ValueError, match="X must be finite"):
        model.fit(X.assign(batch=np.where(np.arange(len(y)) == 0, np.nan, X["batch"])), y, grna=g[:, 0])


def test_batch_flags_bad_pairs_and_goes_on(screen):
    X, m, g, off, _ = screen
    g2 = np.column_stack([g[:, 0], np.zeros(len(X)), np.ones(len(X))])
    with pytest.warns(UserWarning, match="all-zero"):
        model = GLMEIV(mrna_family="poisson", random_state=0).fit(
            X, m[:, 0], grna=g2, offset=off["mrna"], grna_offset=off["grna"])
    flags = model.pairs_.set_index("perturbation")
    assert not flags.loc["0", "flagged"]
    assert flags.loc["1", "grna_zero"] and flags.loc["1", "flagged"]
    assert flags.loc["2", "flagged"]  # one gRNA per cell everywhere: no perturbed component
    assert model.results_.query("perturbation == '1'")["estimate"].isna().all()
    assert model.results_.query("perturbation == '0'")["estimate"].notna().all()


def test_batch_of_only_bad_pairs_and_predict_with_a_flagged_pair(screen):
    X, m, g, off, _ = screen
    with pytest.warns(UserWarning, match="all-zero"):
        model = GLMEIV(random_state=0).fit(X, m[:, 0], grna=np.zeros((len(X), 2)))
    assert model.pairs_["grna_zero"].all() and np.isnan(model.coef_).all()
    g2 = np.column_stack([g[:, 0], np.zeros(len(X))])
    with pytest.warns(UserWarning, match="all-zero"):
        model = GLMEIV(random_state=0).fit(X, m[:, 0], grna=g2, offset=off["mrna"], grna_offset=off["grna"])
    P = model.predict_proba(X, m[:, 0], grna=g2, offset=off["mrna"], grna_offset=off["grna"])
    assert np.isfinite(P[:, 0]).all() and np.isnan(P[:, 1]).all()


def test_no_grna_signal_is_flagged():
    X, m, g, off, _ = make_glmeiv_data(3000, 1, pi=0.05, g_perturbation=0.0, m_perturbation=0.0, random_state=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GLMEIV(mrna_family="poisson", random_state=0).fit(
            X, m, grna=g, offset=off["mrna"], grna_offset=off["grna"])
    row = model.pairs_.iloc[0]
    assert row["flagged"]
    assert row["no_grna_signal"] or row["too_few_cells"] or row["pi_at_bound"] or not row["converged"]


@pytest.mark.parametrize("pi, flag", [(0.5, "pi_at_bound"), (0.002, "too_few_cells")])
def test_pi_at_the_bound_and_too_few_cells_are_flagged(pi, flag):
    X, m, g, off, p = make_glmeiv_data(3000, 1, pi=pi, g_perturbation=np.log(4.0), random_state=1)
    model = GLMEIV(mrna_family="poisson", random_state=0).fit(X, m, grna=g, offset=off["mrna"], grna_offset=off["grna"])
    row = model.pairs_.iloc[0]
    assert row[flag] and row["flagged"]
    assert model.coef_[0, 0] <= 0.5  # the bound holds
    others = {"pi_at_bound", "too_few_cells"} - {flag}
    assert not any(row[o] for o in others)


def test_non_convergence_warns(screen):
    with pytest.warns(ConvergenceWarning, match="max_iter=1"):
        model = _fit(GLMEIV(mrna_family="negative_binomial", max_iter=1, tol=1e-14, random_state=0), screen, 0)
    assert model.converged_ is False
    assert not model.pairs_["converged"].iloc[0] and model.pairs_["flagged"].iloc[0]


def test_pairs_by_name(screen):
    X, m, g, off, _ = screen
    Y = pd.DataFrame(m, columns=["A", "B", "C"])
    Gd = pd.DataFrame(g, columns=["gA", "gB", "gC"])
    model = GLMEIV(mrna_family="poisson", random_state=0).fit(
        X, Y, grna=Gd, offset=off["mrna"], grna_offset=off["grna"], pairs=[("A", "gA"), ("C", "gC")])
    assert list(model.pairs_["gene"]) == ["A", "C"]
    assert list(model.results_.columns[:3]) == ["gene", "perturbation", "parameter"]
    assert len(model.results_) == 14
    P = model.predict_proba(X, Y, grna=Gd, offset=off["mrna"], grna_offset=off["grna"])
    assert P.shape == (len(X), 2, 2)


def test_predict_before_fit_raises(screen):
    from sklearn.exceptions import NotFittedError

    X, m, g, _, _ = screen
    with pytest.raises(NotFittedError):
        GLMEIV().predict_proba(X, m[:, 0], grna=g[:, 0])


@pytest.mark.parametrize("check", ["check_parameters_default_constructible", "check_no_attributes_set_in_init",
                                   "check_get_params_invariance", "check_set_params"])
def test_the_sklearn_checks_that_apply(check):
    """The common checks that do not call fit(X, y) (fit needs grna=, see the user guide)."""
    from sklearn.utils import estimator_checks

    getattr(estimator_checks, check)("GLMEIV", GLMEIV())


def test_stopping_rule_bounds_the_distance_to_the_mle(screen):
    """tol bounds the log-likelihood still to gain, hence the distance to the MLE in standard
    errors (sqrt(2 tol |loglik|)); a tighter tol lands on the same MLE."""
    for j, fam in ((0, "negative_binomial"), (1, "poisson")):
        a = _fit(GLMEIV(mrna_family=fam, random_state=0), screen, j)
        b = _fit(GLMEIV(mrna_family=fam, tol=1e-15, random_state=0), screen, j)
        se = b.results_["std_error"].to_numpy()
        bound = np.sqrt(2 * 1e-10 * abs(b.loglik_))
        assert np.max(np.abs(a.coef_[0] - b.coef_[0]) / se) <= bound
        assert 0 <= b.loglik_ - a.loglik_ <= 1e-10 * abs(b.loglik_)
        assert a.n_iter_ <= b.n_iter_


def test_rejected_newton_steps_fall_back_to_the_m_step(screen, monkeypatch):
    """A Newton step that loses log-likelihood is replaced by the M-step from the same point:
    with every proposed step reversed (each one rejected) the path stays monotone and the
    plain EM reaches the same MLE."""
    import skmixed.eiv._em as em

    good = _fit(GLMEIV(random_state=0), screen, 1)
    check = em.newton_check

    def reversed_steps(*args):
        info, step, dec = check(*args)
        return info, -step, dec

    monkeypatch.setattr(em, "newton_check", reversed_steps)
    model = _fit(GLMEIV(random_state=0), screen, 1)
    path = model.loglik_path_
    assert model.converged_ and np.all(np.diff(path) >= -1e-12 * np.abs(path[1:]))
    se = good.results_["std_error"].to_numpy()
    assert np.max(np.abs(model.coef_[0] - good.coef_[0]) / se) < 2 * np.sqrt(2 * 1e-10 * abs(good.loglik_))
    np.testing.assert_allclose(model.results_["std_error"], se, rtol=1e-3)
