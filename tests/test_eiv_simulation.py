"""Known truth: GLMEIV recovers the simulated parameters and its 95% intervals cover, where
the thresholding estimator (gRNA count >= c, then a GLM) is attenuated.

400 pairs of 3,000 cells (pi = 0.08, the paper's coefficients otherwise), all in one call. The
NB fits use the true size: with the size of the covariates-only fit (glmeiv's choice) the
standard errors of m_perturbation are conservative when pi x effect is large (measured on
1,000 pairs of 5,000 cells, pi = 0.05, true size 10: estimated size 6.4, coverage 97.3%, mean
SE 17% above the spread; with the true size 94.5%), see the user guide.
"""

import numpy as np
import pytest

from skmixed.eiv import GLMEIV, make_glmeiv_data, thresholding_estimator

TRUTH = {"m_perturbation": np.log(0.25), "m_intercept": np.log(0.01), "m_batch": np.log(0.9),
         "g_intercept": np.log(0.005), "g_batch": np.log(1.1)}
N_PAIRS = 400


@pytest.fixture(scope="module", params=[("poisson", np.log(2.0)), ("negative_binomial", np.log(4.0))],
                ids=["poisson-g2", "nb-g4"])
def sim(request):
    family, g_pert = request.param
    size = None if family == "poisson" else 10.0
    X, m, g, off, p = make_glmeiv_data(3000, N_PAIRS, pi=0.08, g_perturbation=g_pert, mrna_size=size,
                                       random_state=12)
    model = GLMEIV(mrna_family=family, mrna_size=size, random_state=0).fit(
        X, m, grna=g, offset=off["mrna"], grna_offset=off["grna"], pairs=[(j, j) for j in range(N_PAIRS)])
    return family, g_pert, X, m, g, off, p, model


def test_intervals_cover(sim):
    family, g_pert, *_, model = sim
    assert model.converged_ and not model.pairs_["flagged"].any()
    res = model.results_
    truth = dict(TRUTH, g_perturbation=g_pert, pi=0.08)
    # the acceptance band for m_perturbation; a wider one (+-4 Monte Carlo SDs) for the others
    for name, band in (("m_perturbation", (0.93, 0.97)), ("g_perturbation", (0.91, 0.99)),
                       ("m_intercept", (0.91, 0.99)), ("pi", (0.91, 0.99))):
        r = res[res["parameter"] == name]
        cover = np.mean((r["confint_lower"] < truth[name]) & (truth[name] < r["confint_upper"]))
        assert band[0] <= cover <= band[1], (name, cover)


def test_estimates_are_unbiased_and_se_matches_spread(sim):
    family, g_pert, *_, model = sim
    r = model.results_[model.results_["parameter"] == "m_perturbation"]
    se_mean = r["std_error"].mean()
    # bias within 3 Monte Carlo standard errors; SEs agree with the spread of the estimates
    assert abs(r["estimate"].mean() - TRUTH["m_perturbation"]) < 3 * se_mean / np.sqrt(N_PAIRS)
    assert r["estimate"].std() == pytest.approx(se_mean, rel=0.15)


def test_thresholding_is_attenuated_where_glmeiv_is_not(sim):
    family, g_pert, X, m, g, off, p, model = sim
    if family != "poisson":
        pytest.skip("the weak-gRNA setting is the Poisson one")
    c = np.exp(np.log(0.005) + np.log(5000) + g_pert / 2)  # halfway (log scale) between the two means
    thr = thresholding_estimator(X, m, g, threshold=c, offset=off["mrna"])
    eiv = model.results_.query("parameter == 'm_perturbation'")["estimate"].to_numpy()
    bias_thr = np.nanmean(thr) - TRUTH["m_perturbation"]
    bias_eiv = eiv.mean() - TRUTH["m_perturbation"]
    # misclassified cells pull the thresholded effect towards 0
    assert bias_thr > 0.3
    assert abs(bias_eiv) < 0.02


def test_posterior_assignment_beats_thresholding(sim):
    family, g_pert, X, m, g, off, p, model = sim
    P = model.predict_proba(X, m, grna=g, offset=off["mrna"], grna_offset=off["grna"])
    acc_eiv = np.mean((P[..., 1] > 0.5) == p)
    c = np.exp(np.log(0.005) + np.log(5000) + g_pert / 2)
    acc_thr = np.mean((g >= c) == p)
    assert acc_eiv > acc_thr
