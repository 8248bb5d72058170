"""Recovery of known truth by simulation."""

import numpy as np
import pytest
import scipy.stats

from skmixed import PoissonGLMM
from skmixed.datasets import load_zeb2_like, load_zeb2_truth, make_poisson_glmm


def test_interval_coverage_near_95_percent():
    """Over 120 simulated data sets, the 95% Wald intervals of the three fixed effects
    cover the truth about 95% of the time, and the random-intercept SD is recovered."""
    beta = np.array([0.5, 0.3, -0.2])
    hits, sds = [], []
    for seed in range(120):
        d, truth = make_poisson_glmm(25, 20, beta=beta, sd_intercept=0.5, random_state=seed)
        m = PoissonGLMM().fit(d[["x1", "x2"]], d.y, groups=d.g, offset=d.offset)
        s = m.summary().fixed
        hits.append((s["ci_2.5%"] <= beta) & (beta <= s["ci_97.5%"]))
        sds.append(m.variance_components_.sdcor.iloc[0])
    coverage = np.mean(hits)
    # 360 intervals: a binomial(360, 0.95) count lies in [0.92, 0.975] with probability > 0.99
    assert 0.92 <= coverage <= 0.975, coverage
    # ML variance estimates are biased down by O(1/groups); the mean SD is within 8% of the truth
    assert np.mean(sds) == pytest.approx(0.5, rel=0.08)


def test_zeb2_like_recovers_the_simulation_truth():
    data = load_zeb2_like()
    truth = load_zeb2_truth()
    fixed = truth[truth.kind == "fixed"].set_index("name").value
    m = PoissonGLMM.from_formula(
        "ZEB2 ~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)", data
    )
    est = m.fixed_effects_.rename(lambda s: s.removeprefix("cell_group"))
    se = np.sqrt(np.diag(m.coef_cov_))
    z = (est - fixed.loc[est.index]).to_numpy() / se
    # 20 intervals, each covering with probability 0.95 (correlated through the patients):
    # at least 16 must cover (P(fewer) < 0.02 under independence)
    assert np.sum(np.abs(z) < 1.96) >= 16
    # the patient SD: 16 patients give a wide interval; the truth 0.2 is well inside [0.1, 0.35]
    assert 0.1 < m.variance_components_.sdcor.iloc[0] < 0.35
    # conditional modes track the true patient effects
    b_true = truth[truth.kind == "patient"].set_index("name").value
    b_hat = m.random_effects_.set_index("level").condval
    assert scipy.stats.pearsonr(b_true.loc[b_hat.index], b_hat).statistic > 0.9
