"""Numerical kernels: family log-likelihoods against scipy, derivatives against finite
differences, the exact data reduction, the GLM solver."""

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from skmixed._backend import logsumexp, segment_sum
from skmixed._families import Poisson
from skmixed.datasets import make_poisson_glmm
from skmixed.glm._newton import fit_glm
from skmixed.mixed._design import RandomEffectsDesign, RandomTerm
from skmixed.mixed._laplace import LaplaceProblem

counts = arrays(np.float64, st.integers(1, 30), elements=st.integers(0, 500).map(float))
etas = st.floats(-20, 8)


@given(counts, etas)
def test_poisson_loglik_matches_scipy(y, eta):
    eta = np.full_like(y, eta)
    np.testing.assert_allclose(Poisson.loglik(y, eta), scipy.stats.poisson.logpmf(y, np.exp(eta)), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        Poisson.loglik_kernel(y, eta) + Poisson.log_normaliser(y), Poisson.loglik(y, eta), rtol=1e-12, atol=1e-9
    )
    # deviance = -2 (loglik - saturated)
    mu = Poisson.mean(eta)
    np.testing.assert_allclose(
        Poisson.unit_deviance(y, mu), -2 * (Poisson.loglik(y, eta) - Poisson.saturated_loglik(y)), rtol=1e-8, atol=1e-7
    )


@given(counts, etas)
def test_poisson_derivatives_finite_differences(y, eta):
    h = 1e-6
    e = np.full_like(y, eta)
    num = (Poisson.loglik(y, e + h) - Poisson.loglik(y, e - h)) / (2 * h)
    np.testing.assert_allclose(Poisson.score(y, Poisson.mean(e)), num, rtol=1e-5, atol=1e-5 * (1 + np.max(y)))
    num2 = -(Poisson.score(y, Poisson.mean(e + h)) - Poisson.score(y, Poisson.mean(e - h))) / (2 * h)
    # the difference of scores y - mu cancels y: round-off of order eps * y / h
    np.testing.assert_allclose(Poisson.information(Poisson.mean(e)), num2, rtol=1e-5, atol=1e-9 * (1 + np.max(y)))


@given(arrays(np.float64, st.integers(1, 40), elements=st.floats(-50, 50)), st.integers(1, 5))
def test_segment_sum_and_logsumexp(values, n_seg):
    codes = np.arange(values.size) % n_seg
    expected = np.array([values[codes == k].sum() for k in range(n_seg)])
    np.testing.assert_allclose(segment_sum(values, codes, n_seg), expected, atol=1e-9)
    np.testing.assert_allclose(logsumexp(values), scipy.special.logsumexp(values), rtol=1e-12)


@given(
    arrays(np.float64, 12, elements=st.integers(0, 40).map(float)),
    arrays(np.float64, 12, elements=st.floats(-3, 3)),
    arrays(np.float64, 12, elements=st.floats(0.1, 3)),
)
def test_collapse_is_exact(y, offset, w):
    """Rows sharing a linear predictor reduce to sufficient statistics exactly."""
    keys = np.arange(12) % 3
    y_c, off_c, const = Poisson.collapse(y, offset, w, keys, 3)
    for lp in (np.array([0.3, -1.0, 2.0]), np.array([-2.0, 0.0, 0.5])):
        full = np.sum(Poisson.loglik(y, lp[keys] + offset, w))
        collapsed = np.sum(Poisson.loglik(y_c, lp + off_c)) + const
        assert collapsed == pytest.approx(full, rel=1e-11, abs=1e-8)


def test_glm_newton_matches_scipy_optimum():
    rng = np.random.default_rng(0)
    X = np.column_stack([np.ones(400), rng.standard_normal((400, 2))])
    off = rng.normal(0, 0.2, 400)
    Y = rng.poisson(np.exp(X @ np.array([[0.5, 0.2, -0.3], [1.0, -0.5, 0.1]]).T + off[:, None]))
    res = fit_glm(X, Y.astype(float), Poisson, offset=off)
    assert res.converged.all()
    for g in range(2):
        # the score vanishes at the MLE
        mu = np.exp(X @ res.coef[g] + off)
        np.testing.assert_allclose(X.T @ (Y[:, g] - mu), 0, atol=1e-9)


def _problem(seed=0, slopes=True, crossed=True):
    data, _ = make_poisson_glmm(15, 20, sd_slope=0.3 if slopes else 0.0, corr=0.3,
                                n_crossed=6 if crossed else 0, random_state=seed)
    n = len(data)
    g, glev = pd.factorize(data.g, sort=True)
    terms = [RandomTerm("g", g, list(glev), np.column_stack([np.ones(n), data.x1]) if slopes else np.ones((n, 1)))]
    if crossed:
        h, hlev = pd.factorize(data.h, sort=True)
        terms.append(RandomTerm("h", h, list(hlev), np.ones((n, 1))))
    X = np.column_stack([np.ones(n), data.x1, data.x2])
    w = np.random.default_rng(seed).uniform(0.5, 2.0, n)
    return LaplaceProblem(X, data.y.to_numpy(float), RandomEffectsDesign(terms), Poisson, offset=data.offset.to_numpy(), weights=w)


@pytest.mark.parametrize("slopes,crossed", [(True, True), (False, False), (True, False)])
def test_laplace_gradient_matches_finite_differences(slopes, crossed):
    prob = _problem(slopes=slopes, crossed=crossed)
    params = np.concatenate([prob.design.theta0 * 0.6 + 0.05, [0.4, 0.2, -0.1]])
    f, g = prob.deviance_and_gradient(params)
    num = prob.fd_gradient(lambda x: prob.deviance_and_gradient(x)[0], params, rel=1e-5)
    np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-5)


def test_laplace_equals_agq_with_one_node():
    """AGQ with one node is the Laplace approximation (lme4's nAGQ = 1)."""
    prob = _problem(slopes=False, crossed=False)
    params = np.array([0.5, 0.4, 0.2, -0.1])
    f_lap, _ = prob.deviance_and_gradient(params)
    assert prob.agq_deviance(params, 1) == pytest.approx(f_lap, rel=1e-12)
    # more nodes converge: 25 and 40 agree closely
    assert prob.agq_deviance(params, 25) == pytest.approx(prob.agq_deviance(params, 40), abs=1e-8)


@pytest.mark.parametrize("nagq", [3, 25])
def test_agq_gradient_matches_finite_differences(nagq):
    prob = _problem(slopes=False, crossed=False)
    params = np.array([0.5, 0.4, 0.2, -0.1])
    f, g = prob.agq_deviance_and_gradient(params, nagq)
    num = prob.fd_gradient(lambda x: prob.agq_deviance(x, nagq), params, rel=1e-5)
    np.testing.assert_allclose(g, num, rtol=1e-7, atol=1e-6)


@given(arrays(np.float64, st.integers(1, 30), elements=st.sampled_from([0.0, 1.0])), st.floats(-30, 30))
def test_bernoulli_family_matches_scipy(y, eta):
    from skmixed._families import Bernoulli

    e = np.full_like(y, eta)
    p = scipy.special.expit(eta)
    # scipy's logpmf loses digits to log(1 - p) near p = 1; log_expit is exact on both sides
    exact = y * scipy.special.log_expit(e) + (1 - y) * scipy.special.log_expit(-e)
    np.testing.assert_allclose(Bernoulli.loglik(y, e), exact, rtol=1e-12, atol=1e-14)
    if abs(eta) <= 10:  # where scipy's log(1 - p) keeps its digits
        np.testing.assert_allclose(Bernoulli.loglik(y, e), scipy.stats.bernoulli.logpmf(y, p), rtol=1e-9)
    np.testing.assert_allclose(Bernoulli.score(y, Bernoulli.mean(e)), y - p, atol=1e-15)
    np.testing.assert_allclose(Bernoulli.information(Bernoulli.mean(e)), p * (1 - p), rtol=1e-12, atol=1e-300)
