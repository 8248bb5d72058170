"""Invariances and kernels of GLMEIV (hypothesis where the check is cheap).

GLMEIV takes no sample weights, so the duplicated-rows-vs-weight-2 property does not apply.
"""

import numpy as np
import pytest
import scipy.stats as st
from hypothesis import given, settings
from hypothesis import strategies as hs

from skmixed.eiv import GLMEIV, make_glmeiv_data
from skmixed.eiv._inference import louis_information
from skmixed.eiv._model import Design, base_eta, component_logliks, e_step, make_family, normaliser

SMALL = settings(max_examples=6, deadline=None)


def _data(seed, n=1500, pairs=1, **kw):
    kw.setdefault("pi", 0.1)
    return make_glmeiv_data(n, pairs, random_state=seed, **kw)


@given(seed=hs.integers(0, 2**16), size=hs.floats(0.5, 50.0), b=hs.floats(-2.0, 2.0), pi=hs.floats(0.01, 0.5))
@settings(max_examples=30, deadline=None)
def test_marginal_loglik_matches_scipy(seed, size, b, pi):
    rng = np.random.default_rng(seed)
    n = 50
    Z = np.column_stack([np.ones(n), rng.normal(size=n)])
    m = rng.poisson(5.0, (n, 1)).astype(float)
    g = rng.poisson(3.0, (n, 1)).astype(float)
    cm, cg = np.array([[1.0, b, 0.2]]), np.array([[0.5, 1.0, -0.3]])
    eta_m, eta_g = base_eta(Z, cm, np.zeros((n, 1))), base_eta(Z, cg, np.zeros((n, 1)))
    fm, fg = make_family("negative_binomial", np.array([size])), make_family("poisson")
    k0, k1 = component_logliks(fm, fg, m, g, eta_m, cm[:, 1], eta_g, cg[:, 1])
    T, ll = e_step(k0, k1, np.array([pi]), normaliser(fm, m) + normaliser(fg, g))

    def nb(y, eta):
        mu = np.exp(eta)
        return st.nbinom.logpmf(y, size, size / (size + mu))

    l0 = np.log1p(-pi) + nb(m[:, 0], eta_m[:, 0]) + st.poisson.logpmf(g[:, 0], np.exp(eta_g[:, 0]))
    l1 = np.log(pi) + nb(m[:, 0], eta_m[:, 0] + b) + st.poisson.logpmf(g[:, 0], np.exp(eta_g[:, 0] + 1.0))
    assert ll[0] == pytest.approx(np.logaddexp(l0, l1).sum(), rel=1e-10)
    np.testing.assert_allclose(T[:, 0], np.exp(l1 - np.logaddexp(l0, l1)), rtol=1e-9, atol=1e-300)


@given(seed=hs.integers(0, 2**16))
@settings(max_examples=20, deadline=None)
def test_stacked_gram_is_the_gram_of_the_stacked_design(seed):
    rng = np.random.default_rng(seed)
    n = 30
    Z = np.column_stack([np.ones(n), rng.normal(size=(n, 2))])
    w0, w1 = rng.uniform(size=(n, 2)), rng.uniform(size=(n, 2))
    X0 = np.column_stack([Z[:, :1], np.zeros(n), Z[:, 1:]])
    X1 = np.column_stack([Z[:, :1], np.ones(n), Z[:, 1:]])
    Xs = np.vstack([X0, X1])
    got = Design(Z).stacked_gram(w0, w1)
    for b in range(2):
        w = np.concatenate([w0[:, b], w1[:, b]])
        want = Xs.T @ (Xs * w[:, None])
        # entries are sums of signed products that can cancel: round-off relative to the
        # matrix's scale, not to each (possibly tiny) entry
        np.testing.assert_allclose(got[b], want, rtol=1e-12, atol=1e-13 * np.abs(want).max())
    a0, a1 = rng.normal(size=(n, 2)), rng.normal(size=(n, 2))
    want = (Xs.T @ np.vstack([a0, a1])).T
    np.testing.assert_allclose(Design(Z).stacked_grad(a0, a1), want, rtol=1e-12, atol=1e-13 * np.abs(want).max())


def _marginal(family, seed):
    """A data set and its marginal log-likelihood ``ll(theta)`` -> (T, loglik) at glmeiv's
    parameter vector ``[pi, m_int, m_pert, m_batch, g_int, g_pert, g_batch]``."""
    X, m, g, off, _ = _data(seed, 800, pi=0.2, g_perturbation=np.log(2.0))
    Z = np.column_stack([np.ones(len(X)), X.to_numpy()])
    om, og = off[["mrna"]].to_numpy(), off[["grna"]].to_numpy()
    fm, fg = make_family(family, np.array([7.0])), make_family("poisson")
    M, G = m.astype(float), g.astype(float)
    const = normaliser(fm, M) + normaliser(fg, G)

    def ll(th):
        cm, cg = th[None, 1:4], th[None, 4:]
        k0, k1 = component_logliks(fm, fg, M, G, base_eta(Z, cm, om), cm[:, 1], base_eta(Z, cg, og), cg[:, 1])
        return e_step(k0, k1, th[:1], const)

    return Design(Z), fm, fg, M, G, om, og, ll


@pytest.mark.parametrize("family", ["poisson", "negative_binomial"])
def test_louis_information_is_the_hessian_of_the_marginal_loglik(family):
    """Louis's formula against central differences of the marginal log-likelihood, at and
    away from the MLE (the formula is exact anywhere, not only at the optimum)."""
    theta = np.array([0.22, np.log(0.01), np.log(0.3), -0.1, np.log(0.005), np.log(2.2), 0.1])
    design, fm, fg, M, G, om, og, ll = _marginal(family, 11)
    T, _ = ll(theta)
    info = louis_information(design, fm, fg, M, G, om, og, theta[:1], theta[None, 1:4], theta[None, 4:], T)[0]
    h = 1e-4
    k = len(theta)
    H = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            e_i, e_j = np.eye(k)[i] * h, np.eye(k)[j] * h
            H[i, j] = (ll(theta + e_i + e_j)[1][0] - ll(theta + e_i - e_j)[1][0]
                       - ll(theta - e_i + e_j)[1][0] + ll(theta - e_i - e_j)[1][0]) / (4 * h * h)
    np.testing.assert_allclose(info, -H, rtol=2e-4, atol=1e-3 * np.abs(H).max() * 1e-3)


def _fit(model, X, m, g, off, **kw):
    return model.fit(X, m, grna=g, offset=off["mrna"], grna_offset=off["grna"], **kw)


@given(seed=hs.integers(0, 2**16))
@SMALL
def test_row_order_does_not_matter(seed):
    X, m, g, off, _ = _data(seed % 7)
    perm = np.random.default_rng(seed).permutation(len(X))
    a = _fit(GLMEIV(mrna_family="poisson", random_state=0), X, m, g, off)
    b = _fit(GLMEIV(mrna_family="poisson", random_state=0), X.iloc[perm], m[perm], g[perm], off.iloc[perm])
    se = a.results_["std_error"].to_numpy()
    assert np.max(np.abs(a.coef_[0] - b.coef_[0]) / se) < 1e-5
    np.testing.assert_allclose(b.results_["std_error"], se, rtol=1e-5)


@given(shift=hs.floats(-3.0, 3.0), gshift=hs.floats(-3.0, 3.0))
@SMALL
def test_offset_shift_moves_the_intercepts(shift, gshift):
    X, m, g, off, _ = _data(1)
    a = _fit(GLMEIV(random_state=0), X, m, g, off)
    off2 = off.assign(mrna=off["mrna"] + shift, grna=off["grna"] + gshift)
    b = _fit(GLMEIV(random_state=0), X, m, g, off2)
    expected = a.coef_[0].copy()
    expected[1] -= shift
    expected[4] -= gshift
    se = a.results_["std_error"].to_numpy()
    assert np.max(np.abs(b.coef_[0] - expected) / se) < 1e-5
    np.testing.assert_allclose(b.results_["std_error"], se, rtol=1e-5)
    assert b.loglik_ == pytest.approx(a.loglik_, rel=1e-10)


@pytest.mark.parametrize("family", ["poisson", "negative_binomial"])
@pytest.mark.parametrize("init", ["accelerated", "random"])
def test_pair_batch_equals_one_pair_at_a_time_and_n_jobs(family, init, monkeypatch):
    import skmixed.eiv._estimator as est

    monkeypatch.setattr(est, "_BLOCK_ELEMENTS", 2 * 1200)  # blocks of two pairs: threads have work
    X, m, g, off, _ = _data(4, 1200, 4, g_perturbation=np.log([2.0, 3.0, 5.0, 8.0]))
    kw = dict(mrna_family=family, init=init, n_restarts=6, random_state=2)
    pairs = [(j, j) for j in range(4)]
    together = _fit(GLMEIV(**kw), X, m, g, off, pairs=pairs)
    threads = _fit(GLMEIV(n_jobs=2, **kw), X, m, g, off, pairs=pairs)
    np.testing.assert_array_equal(threads.coef_, together.coef_)
    for j in range(4):
        alone = _fit(GLMEIV(**kw), X, m[:, j], g[:, j], off)
        se = alone.results_["std_error"].to_numpy()
        assert np.max(np.abs(together.coef_[j] - alone.coef_[0]) / se) < 1e-6
        assert together.loglik_[j] == pytest.approx(alone.loglik_, rel=1e-12)


@pytest.mark.parametrize("family", ["poisson", "negative_binomial"])
def test_newton_check_is_newton_on_the_marginal_loglik(family):
    """The EM's convergence check: Louis's information from the E-step's pieces equals the
    one computed afresh, the score is the gradient of the marginal log-likelihood (central
    differences), and the decrement is ``S' I^{-1} S / 2`` for the returned step."""
    from skmixed.eiv._em import newton_check
    from skmixed.eiv._model import modality_estep

    theta = np.array([0.21, np.log(0.01), np.log(0.3), -0.1, np.log(0.005), np.log(2.1), 0.1])
    design, fm, fg, M, G, om, og, ll = _marginal(family, 12)
    Z = design.Z
    cm, cg = theta[None, 1:4], theta[None, 4:]
    T, _ = ll(theta)
    stats = tuple(modality_estep(f, y, base_eta(Z, c, o), c[:, 1])[2] for f, y, c, o in ((fm, M, cm, om), (fg, G, cg, og)))
    info, step, dec = newton_check(design, fm, fg, M, G, om, og, theta[:1], cm, cg, T, stats)
    fresh = louis_information(design, fm, fg, M, G, om, og, theta[:1], cm, cg, T)
    np.testing.assert_allclose(info, fresh, rtol=1e-10, atol=1e-10 * np.abs(fresh).max())
    S = info[0] @ step[0]
    h = 1e-6
    grad = np.array([(ll(theta + e)[1][0] - ll(theta - e)[1][0]) / (2 * h) for e in np.eye(len(theta)) * h])
    np.testing.assert_allclose(S, grad, rtol=1e-5, atol=1e-5 * np.abs(grad).max())
    assert dec[0] == pytest.approx(0.5 * S @ step[0], rel=1e-12)
    assert dec[0] > 0
