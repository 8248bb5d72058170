"""The NegativeBinomial family: log-pmf against scipy, derivatives against finite
differences, the Poisson limit, validation, and the GLM engine running on it."""

import numpy as np
import pytest
import scipy.stats
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from skmixed._families import FAMILIES, NegativeBinomial, Poisson
from skmixed.glm._newton import fit_glm

counts = arrays(np.float64, st.integers(1, 30), elements=st.integers(0, 500).map(float))
etas = st.floats(-15, 8)
sizes = st.floats(0.05, 1e4)


@given(counts, etas, sizes)
def test_loglik_matches_scipy_nbinom(y, eta, r):
    fam = NegativeBinomial(r)
    e = np.full_like(y, eta)
    mu = np.exp(e)
    expected = scipy.stats.nbinom.logpmf(y, r, r / (r + mu))
    # gammaln(y + r) - gammaln(r) cancels for large r: absolute error ~ eps * gammaln(r);
    # scipy's log(1 - p) loses ~ eps / (1 - p) when mu << r (ours is log-space: checked
    # against mpmath in test_loglik_small_mean_is_log_space)
    atol = 1e-9 * (1.0 + abs(scipy.special.gammaln(r)) + np.max(y)) + 8e-16 * np.max(y) * (r + mu[0]) / mu[0]
    np.testing.assert_allclose(fam.loglik(y, e), expected, rtol=1e-10, atol=atol)
    np.testing.assert_allclose(fam.loglik_kernel(y, e) + fam.log_normaliser(y), fam.loglik(y, e), rtol=1e-13, atol=1e-9)
    w = np.linspace(0.0, 1.0, y.size)
    np.testing.assert_allclose(fam.loglik(y, e, w), w * fam.loglik(y, e), rtol=1e-13, atol=1e-12)


def test_loglik_small_mean_is_log_space():
    # mpmath: loggamma(23) - loggamma(16) - loggamma(8) + 16 log(16/(16+mu)) + 7 log(mu/(16+mu)), mu = e^-15
    val = NegativeBinomial(16.0).loglik(np.array([7.0]), np.array([-15.0]))[0]
    assert val == pytest.approx(-112.36137288848413217, rel=1e-14)


@given(counts, etas, sizes)
def test_deviance_is_twice_the_loglik_gap(y, eta, r):
    fam = NegativeBinomial(r)
    e = np.full_like(y, eta)
    mu = fam.mean(e)
    dev = fam.unit_deviance(y, mu)
    gap = -2.0 * (fam.loglik(y, e) - fam.saturated_loglik(y))
    np.testing.assert_allclose(dev, gap, rtol=1e-7, atol=1e-7 * (1 + np.max(y) + np.max(mu)))
    assert np.all(dev >= -1e-9)
    # zero at y = mu
    np.testing.assert_allclose(fam.unit_deviance(y + 0.5, y + 0.5), 0.0, atol=1e-10)


@given(counts, etas, st.floats(0.05, 1e3))
def test_eta_derivatives_finite_differences(y, eta, r):
    fam = NegativeBinomial(r)
    h = 1e-6
    e = np.full_like(y, eta)
    mu = fam.mean(e)
    num = (fam.loglik(y, e + h) - fam.loglik(y, e - h)) / (2 * h)
    scale = 1 + np.max(y) + np.max(mu)
    np.testing.assert_allclose(fam.score(y, mu), num, rtol=1e-5, atol=1e-6 * scale)
    num2 = -(fam.score(y, fam.mean(e + h)) - fam.score(y, fam.mean(e - h))) / (2 * h)
    np.testing.assert_allclose(fam.observed_information(y, mu), num2, rtol=1e-5, atol=1e-8 * scale)
    num3 = (fam.information(fam.mean(e + h)) - fam.information(fam.mean(e - h))) / (2 * h)
    np.testing.assert_allclose(fam.information_deriv(mu), num3, rtol=1e-5, atol=1e-9 * scale)
    # the observed information is linear in y, so its mean is its value at y = mu
    np.testing.assert_allclose(fam.observed_information(mu, mu), fam.information(mu), rtol=1e-12)
    np.testing.assert_allclose(fam.information(mu), mu / (1 + mu / r) , rtol=1e-12)
    np.testing.assert_allclose(fam.variance(mu), mu + mu**2 / r, rtol=1e-12)


@given(counts, st.floats(-5, 5), st.floats(0.05, 1e3))
def test_size_derivatives_finite_differences(y, eta, r):
    mu = np.full_like(y, np.exp(eta))
    h = 1e-5

    def ll(logr):
        return NegativeBinomial(np.exp(logr)).loglik(y, np.log(mu))

    fam = NegativeBinomial(r)
    lr = np.log(r)
    num = (ll(lr + h) - ll(lr - h)) / (2 * h)
    scale = 1 + np.max(y) + r
    np.testing.assert_allclose(fam.size_score(y, mu), num, rtol=1e-5, atol=1e-6 * scale)
    num2 = (NegativeBinomial(np.exp(lr + h)).size_score(y, mu) - NegativeBinomial(np.exp(lr - h)).size_score(y, mu)) / (2 * h)
    np.testing.assert_allclose(fam.size_hessian(y, mu), num2, rtol=1e-4, atol=1e-5 * scale)


def test_poisson_limit():
    y = np.arange(0.0, 40.0)
    eta = np.full_like(y, np.log(7.0))
    np.testing.assert_allclose(NegativeBinomial(1e9).loglik(y, eta), Poisson.loglik(y, eta), rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(
        NegativeBinomial(1e9).unit_deviance(y, np.exp(eta)), Poisson.unit_deviance(y, np.exp(eta)), rtol=1e-6, atol=1e-7
    )


def test_per_column_sizes_broadcast():
    y = np.array([[0.0, 3.0], [5.0, 1.0], [2.0, 2.0]])
    eta = np.log(np.array([[1.0, 2.0], [4.0, 0.5], [2.0, 2.0]]))
    fam = NegativeBinomial(np.array([0.7, 30.0]))
    for j, r in enumerate([0.7, 30.0]):
        np.testing.assert_allclose(fam.loglik(y, eta)[:, j], NegativeBinomial(r).loglik(y[:, j], eta[:, j]), rtol=1e-14)


@pytest.mark.parametrize("size", [0.0, -1.0, np.inf, np.nan, [1.0, -2.0], [[1.0, 0.0]], []])
def test_bad_size(size):
    with pytest.raises(ValueError, match="size"):
        NegativeBinomial(size)


def test_registered_and_response_check():
    assert FAMILIES["negative_binomial"] is NegativeBinomial
    assert FAMILIES["poisson"] is Poisson
    fam = NegativeBinomial(2.0)
    assert fam.check_response(np.array([0.0, 2.0]), "y")
    assert not fam.check_response(np.array([0.5, 2.0]), "y")
    with pytest.raises(ValueError, match="counts"):
        fam.check_response(np.array([-1.0, 2.0]), "counts")
    with pytest.raises(ValueError, match="finite"):
        fam.check_response(np.array([np.nan, 2.0]), "y")


def test_glm_engine_runs_the_nb_family():
    """fit_glm with the NB family reaches the NB score equations (what MASS::glm.nb's
    inner glm solves at fixed theta)."""
    rng = np.random.default_rng(1)
    n = 3000
    X = np.column_stack([np.ones(n), rng.standard_normal(n)])
    off = rng.normal(0, 0.3, n)
    r = np.array([1.5, 8.0])
    mu = np.exp(X @ np.array([[0.4, -0.3], [1.0, 0.2]]).T + off[:, None])
    Y = rng.negative_binomial(r, r / (r + mu)).astype(float)
    fam = NegativeBinomial(r)
    res = fit_glm(X, Y, fam, offset=off)
    assert res.converged.all()
    mu_hat = fam.mean(X @ res.coef.T + off[:, None])
    np.testing.assert_allclose(fam.score(Y, mu_hat).T @ X, 0.0, atol=1e-7)



@pytest.mark.parametrize("family", [Poisson, NegativeBinomial(np.array([1.5, 8.0]))])
def test_unchecked_full_steps_reach_the_same_fit(family):
    """``full_step_below`` (the distillation's setting) skips the log-likelihood passes in
    the quadratic region and reaches the line-searched fit; fewer passes are made."""
    rng = np.random.default_rng(4)
    n = 4000
    X = np.column_stack([np.ones(n), rng.standard_normal(n), rng.uniform(size=n) < 0.4])
    off = rng.normal(0, 0.3, n)
    mu = np.exp(X @ np.array([[0.4, -0.3, 0.2], [1.0, 0.2, -0.1]]).T + off[:, None])
    Y = rng.negative_binomial(2.0, 2.0 / (2.0 + mu)).astype(float)
    calls = []

    class Counted:  # the family, counting its log-likelihood passes
        def __getattr__(self, name):
            return getattr(family, name)

        def loglik(self, *a, **k):
            calls.append(1)
            return family.loglik(*a, **k)

    ref = fit_glm(X, Y, Counted(), offset=off)
    n_ref = len(calls)
    calls.clear()
    fast = fit_glm(X, Y, Counted(), offset=off, full_step_below=1e-3)
    assert fast.converged.all() and ref.converged.all()
    np.testing.assert_allclose(fast.coef, ref.coef, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fast.loglik, ref.loglik, rtol=1e-13)
    assert len(calls) < n_ref
    calls.clear()
    bare = fit_glm(X, Y, Counted(), offset=off, full_step_below=1e-3, summary=False)
    np.testing.assert_array_equal(bare.coef, fast.coef)
    assert bare.loglik is None and bare.hessian is None and len(calls) < n_ref

@given(st.floats(1e-8, 1e8))
def test_trigamma_matches_scipy(x):
    from skmixed._families import _trigamma

    assert _trigamma(np.array([x]), np)[0] == pytest.approx(scipy.special.polygamma(1, x), rel=1e-13)


def test_glm_engine_takes_one_offset_column_per_response():
    """An (n, G) offset is one offset per response: the fit of each column alone."""
    rng = np.random.default_rng(6)
    n = 2000
    X = np.column_stack([np.ones(n), rng.standard_normal(n)])
    O = rng.normal(0, 0.4, (n, 3))
    Y = rng.poisson(np.exp(0.3 + 0.2 * X[:, 1:2] + O)).astype(float)
    both = fit_glm(X, Y, Poisson, offset=O)
    for g in range(3):
        one = fit_glm(X, Y[:, g], Poisson, offset=O[:, g])
        np.testing.assert_allclose(both.coef[g], one.coef[0], rtol=1e-10)
        np.testing.assert_allclose(both.loglik[g], one.loglik[0], rtol=1e-12)
