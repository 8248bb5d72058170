"""EM and MacKay solvers of LinearMixedModel; the law of total variance; Neyman-Scott."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.exceptions import ConvergenceWarning

from skmixed.datasets import load_sleepstudy
from skmixed.mixed import LinearMixedModel

from test_lmm_lme4 import CASES as _LME4_CASES  # the lme4 reference fits (one list of models)

REF = Path(__file__).parent / "reference" / "lmm"
CASES = {k: v for k, v in _LME4_CASES.items() if k != "insteval"}  # EM converges linearly: small data


@pytest.mark.parametrize("method", ["ml", "reml"])
@pytest.mark.parametrize("case", list(CASES))
def test_em_reaches_lmer(case, method):
    formula, loader = CASES[case]
    model = LinearMixedModel.from_formula(formula, loader(), reml=method == "reml", solver="em",
                                          max_iter=100_000, tol=1e-12)
    assert model.converged_ and model.n_iter_ > 1
    vc = pd.read_csv(REF / f"{case}_{method}_varcorr.csv")
    fx = pd.read_csv(REF / f"{case}_{method}_fixef.csv")
    ll = pd.read_csv(REF / f"{case}_{method}_summary.csv").loglik.iloc[0]
    np.testing.assert_allclose(model.variance_components_.vcov, vc.vcov, rtol=1e-4)
    np.testing.assert_allclose(model.fixed_effects_, fx.estimate, rtol=1e-6)
    np.testing.assert_allclose(model.loglik_, ll, rtol=1e-9)


def _mackay_fixed_point(data, diagonal=True, n_iter=400):
    """The recipe written out densely: joint penalised least squares for (beta, b), then
    residual variance = mean squared residual, random-effect covariance = mean outer
    product of the predicted effects (diagonal)."""
    y = data.Reaction.to_numpy()
    days = data.Days.to_numpy(float)
    g = np.unique(data.Subject.to_numpy(), return_inverse=True)[1]
    n, L = y.size, g.max() + 1
    X = np.column_stack([np.ones(n), days])
    Z = np.zeros((n, 2 * L))
    Z[np.arange(n), 2 * g] = 1.0
    Z[np.arange(n), 2 * g + 1] = days
    A = np.hstack([X, Z])
    V, s2 = np.diag([410.0, 22.0]), 0.25 * np.var(y)
    for _ in range(n_iter):
        P = np.zeros((A.shape[1], A.shape[1]))
        P[2:, 2:] = np.kron(np.eye(L), np.linalg.inv(V))
        coef = np.linalg.solve(A.T @ A / s2 + P, A.T @ y / s2)
        beta, b = coef[:2], coef[2:].reshape(L, 2)
        s2 = np.mean((y - A @ coef) ** 2)
        V = b.T @ b / L
        if diagonal:
            V = np.diag(np.diag(V))
    return V, s2, beta


def test_mackay_lands_on_the_recipe_fixed_point():
    data = load_sleepstudy()
    model = LinearMixedModel.from_formula(CASES["sleep_corr"][0], data, reml=False, solver="mackay",
                                          max_iter=10_000, tol=1e-13)
    V, s2, beta = _mackay_fixed_point(data)
    vc = model.variance_components_[lambda d: d.var2.isna()].set_index(["grp", "var1"]).vcov
    np.testing.assert_allclose(vc[("Subject", "(Intercept)")], V[0, 0], rtol=1e-6)
    np.testing.assert_allclose(vc[("Subject", "Days")], V[1, 1], rtol=1e-6)
    np.testing.assert_allclose(model.sigma_**2, s2, rtol=1e-6)
    np.testing.assert_allclose(model.fixed_effects_, beta, rtol=1e-8)
    assert not model.collapsed_ and model.converged_
    # biased low against the ML estimates, as the law of total variance predicts
    ml = LinearMixedModel.from_formula(CASES["sleep_corr"][0], data, reml=False)
    ml_vc = ml.variance_components_[lambda d: d.var2.isna()].set_index(["grp", "var1"]).vcov
    assert vc[("Subject", "(Intercept)")] < ml_vc[("Subject", "(Intercept)")]
    assert vc[("Subject", "Days")] < ml_vc[("Subject", "Days")]


def test_mackay_full_covariance_collapse_is_reported():
    data = load_sleepstudy()
    with pytest.warns(ConvergenceWarning, match="collapsed"):
        model = LinearMixedModel.from_formula(CASES["sleep_corr"][0], data, reml=False,
                                              solver="mackay", covariance="full")
    assert model.collapsed_ and not model.converged_
    corr = model.variance_components_.dropna(subset=["var2"]).sdcor.iloc[0]
    assert abs(corr) > 0.999


@pytest.mark.parametrize("case", ["sleep_indep", "penicillin", "pastes"])
def test_law_of_total_variance_at_the_ml_optimum(case):
    """At the ML estimate, Var(b) = Var(E[b | y]) + E[Var(b | y)] term by term (the EM
    fixed point); MacKay keeps only the first part."""
    formula, loader = CASES[case]
    model = LinearMixedModel.from_formula(formula, loader(), reml=False)
    re = model.random_effects_
    vc = model.variance_components_
    for grp, var1, vcov in zip(vc.grp, vc.var1, vc.vcov):
        if grp == "Residual":
            continue
        # ranef names the factor (a second || term of Subject is "Subject.1" in VarCorr)
        rows = re[(re.grp == grp.split(".")[0]) & (re.term == var1)]
        total = np.mean(rows.condval**2) + np.mean(rows.condsd**2)
        np.testing.assert_allclose(total, vcov, rtol=1e-4)


def test_em_records_iterations_and_time():
    data = load_sleepstudy()
    em = LinearMixedModel.from_formula(CASES["sleep_indep"][0], data, solver="em", max_iter=10_000)
    assert em.converged_ and 1 < em.n_iter_ < 10_000 and em.fit_time_ > 0
    with pytest.warns(ConvergenceWarning, match="EM did not converge"):
        short = LinearMixedModel.from_formula(CASES["sleep_indep"][0], data, solver="em", max_iter=3)
    assert short.n_iter_ == 3 and not short.converged_


def _neyman_scott(N, theta, rng):
    z = rng.normal(0.0, 3.0, N)
    y = z[:, None] + rng.normal(0.0, np.sqrt(theta), (N, 2))
    return pd.DataFrame({"y": y.ravel(), "pair": np.repeat(np.arange(N), 2).astype(str)})


@pytest.mark.parametrize("reml", [False, True])
def test_neyman_scott_marginal_mle_is_consistent(reml):
    """Pairs y_na, y_nb ~ N(z_n, theta): the joint MLE over (z, theta) tends to theta / 2;
    the marginal (random-effects) MLE and REML tend to theta."""
    rng = np.random.default_rng(4)
    theta = 2.0
    data = _neyman_scott(4000, theta, rng)
    model = LinearMixedModel.from_formula("y ~ 1 + (1 | pair)", data, reml=reml)
    y = data.y.to_numpy().reshape(-1, 2)
    joint = np.mean((y[:, 0] - y[:, 1]) ** 2) / 4  # z_n = pair mean, theta = RSS / 2N
    assert abs(model.sigma_**2 - theta) < 0.1  # sd of the estimate ~ 0.045
    assert abs(joint - theta / 2) < 0.05
    np.testing.assert_allclose(model.sigma_**2, 2 * joint, rtol=1e-6)  # within-pair information only
