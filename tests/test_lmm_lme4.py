"""LinearMixedModel against lme4::lmer and lmerTest.

Reference values were written by ``tests/reference/lmm/make_reference.R`` (R 4.2.2,
lme4 1.1-31, lmerTest 3.1-3) from *tightly converged* lmer fits (bobyqa with
``rhoend = 1e-12``): lme4's default stopping rule leaves theta a few 1e-6 (InstEval:
3e-5) relative away from the optimum, more than the differences measured here.

Tolerances (the issue asks for 1e-3; the achieved agreement is far tighter and the
tests hold it): fixed effects within 1e-5 of their standard error, standard errors,
vcov, variance components, conditional SDs 1e-4 relative, logLik 1e-8 relative,
conditional modes 1e-5 of their largest magnitude, Satterthwaite df and p-values 1e-4
relative (lmerTest: numDeriv Hessian; skmixed: the same Richardson scheme).
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skmixed.datasets._lme4_data import load_insteval, load_pastes, load_penicillin, load_sleepstudy
from skmixed.mixed import LinearMixedModel, anova

REF = Path(__file__).parent / "reference" / "lmm"

CASES = {
    "sleep_corr": ("Reaction ~ Days + (Days | Subject)", load_sleepstudy),
    "sleep_indep": ("Reaction ~ Days + (Days || Subject)", load_sleepstudy),
    "penicillin": ("diameter ~ 1 + (1 | plate) + (1 | sample)", load_penicillin),
    "pastes": ("strength ~ 1 + (1 | batch/cask)", load_pastes),
    "insteval": ("y ~ service + (1 | s) + (1 | d) + (1 | dept)", load_insteval),
}
IDS = [f"{c}_{m}" for c in CASES for m in ("reml", "ml")]


@pytest.fixture(scope="module")
def fits():
    cache, data = {}, {}

    def get(case_id):
        if case_id not in cache:
            case, method = case_id.rsplit("_", 1)
            formula, loader = CASES[case]
            if loader not in data:
                data[loader] = loader()
            cache[case_id] = LinearMixedModel.from_formula(formula, data[loader], reml=method == "reml")
        return cache[case_id]

    return get


def _ref(case_id, what, **kw):
    return pd.read_csv(REF / f"{case_id}_{what}.csv", **kw)


@pytest.mark.parametrize("case_id", IDS)
def test_fixed_effects_and_vcov(fits, case_id):
    model, ref = fits(case_id), _ref(case_id, "fixef")
    assert list(model.fixed_names_) == list(ref.term)
    assert model.converged_
    np.testing.assert_allclose((model.fixed_effects_.to_numpy() - ref.estimate) / ref.se, 0, atol=1e-5)
    np.testing.assert_allclose(np.sqrt(np.diag(model.coef_cov_)), ref.se, rtol=1e-4)
    V = _ref(case_id, "vcov").set_index("term").to_numpy()
    np.testing.assert_allclose(model.coef_cov_, V, rtol=1e-4, atol=1e-4 * np.max(np.abs(V)))


@pytest.mark.parametrize("case_id", IDS)
def test_variance_components(fits, case_id):
    model, ref = fits(case_id), _ref(case_id, "varcorr")
    vc = model.variance_components_
    assert list(vc.grp) == list(ref.grp)
    assert list(vc.var1.fillna("")) == list(ref.var1.fillna(""))
    np.testing.assert_allclose(vc.vcov, ref.vcov, rtol=1e-4)
    np.testing.assert_allclose(vc.sdcor, ref.sdcor, rtol=1e-4)
    assert vc.grp.iloc[-1] == "Residual"
    np.testing.assert_allclose(model.sigma_, ref.sdcor.iloc[-1], rtol=1e-4)


@pytest.mark.parametrize("case_id", IDS)
def test_loglik_and_information_criteria(fits, case_id):
    model, ref = fits(case_id), _ref(case_id, "summary").iloc[0]
    np.testing.assert_allclose(model.loglik_, ref.loglik, rtol=1e-8)
    np.testing.assert_allclose(model.deviance_, ref.objective, rtol=1e-8)
    np.testing.assert_allclose([model.aic_, model.bic_], [ref.AIC, ref.BIC], rtol=1e-8)
    assert model.n_params_ == ref.df
    theta = np.array([float(v) for v in ref.theta.split(";")])
    np.testing.assert_allclose(model.theta_, theta, rtol=1e-4, atol=1e-6)
    assert model.nobs_ == ref.nobs


@pytest.mark.parametrize("case_id", IDS)
def test_conditional_modes_and_variances(fits, case_id):
    model = fits(case_id)
    ref = _ref(case_id, "ranef", dtype={"level": str})
    got = model.random_effects_.merge(ref, on=["grp", "level", "term"], suffixes=("", "_r"))
    assert len(got) == len(ref) == len(model.random_effects_)
    scale = np.max(np.abs(ref.condval))
    np.testing.assert_allclose(got.condval, got.condval_r, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(got.condsd, got.condsd_r, rtol=1e-4)


@pytest.mark.parametrize("case_id", IDS)
def test_satterthwaite_matches_lmertest(fits, case_id):
    model, ref = fits(case_id), _ref(case_id, "fixef")
    table = model.summary().fixed
    np.testing.assert_allclose(table.df, ref.df, rtol=1e-4)
    np.testing.assert_allclose(table.t, ref.t, rtol=1e-5)
    # p-values as tiny as InstEval's 1e-24 move by 1e-3 relative per 1e-5 of df: compare log(p)
    np.testing.assert_allclose(np.log(table.p_value), np.log(ref.p), rtol=1e-4)


def test_likelihood_ratio_test_matches_anova(fits):
    ref = pd.read_csv(REF / "anova_sleep.csv")
    data = load_sleepstudy()
    m0 = LinearMixedModel.from_formula(CASES["sleep_indep"][0], data, reml=False)
    m1 = LinearMixedModel.from_formula(CASES["sleep_corr"][0], data, reml=False)
    table = anova(m1, m0)
    np.testing.assert_allclose(table.npar, ref.npar)
    np.testing.assert_allclose(table.logLik, ref.logLik, rtol=1e-9)
    np.testing.assert_allclose(table.Chisq.iloc[1], ref.Chisq.iloc[1], rtol=1e-4)
    np.testing.assert_allclose(table.p_value.iloc[1], ref.p.iloc[1], rtol=1e-4)
    with pytest.raises(ValueError, match="reml=False"):
        anova(fits("sleep_corr_reml"), m0)
