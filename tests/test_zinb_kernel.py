"""ZINB family and ZINBWaVE's block algebra: exact formulas, gradients, invariances."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import nbinom

from skmixed._families import ZINB
from skmixed.datasets import make_zinb_counts
from skmixed.zinb._data import Counts
from skmixed.zinb._init import initialize
from skmixed.zinb._model import Design, Penalty
from skmixed.zinb._optimize import Optimizer

finite = dict(allow_nan=False, allow_infinity=False)
counts_st = st.integers(0, 200)
a_st = st.floats(-8.0, 8.0, **finite)
b_st = st.floats(-12.0, 12.0, **finite)
z_st = st.floats(-3.0, 6.0, **finite)


def direct_logpmf(y, a, b, z):
    mu, theta, pi = np.exp(a), np.exp(z), 1.0 / (1.0 + np.exp(-b))
    nb = nbinom.logpmf(y, theta, theta / (theta + mu))
    if y == 0:
        return np.log(pi + (1.0 - pi) * np.exp(nb))
    return np.log1p(-pi) + nb


@given(counts_st, a_st, b_st, z_st)
def test_logpmf_matches_scipy(y, a, b, z):
    ours = ZINB.loglik(np.array([float(y)]), np.array([a]), np.array([b]), z)[0]
    assert ours == pytest.approx(direct_logpmf(y, a, b, z), rel=1e-9, abs=1e-10)


@given(counts_st, a_st, b_st, z_st)
def test_derivatives_match_finite_differences(y, a, b, z):
    yy = np.array([float(y)])
    f = lambda a_, b_, z_: ZINB.loglik(yy, np.array([a_]), np.array([b_]), z_)[0]  # noqa: E731
    d = [v[0] for v in ZINB.derivatives(yy, np.array([a]), np.array([b]), np.array([z]), zeta=True)]
    h = 1e-5
    num = [(f(a + h, b, z) - f(a - h, b, z)) / (2 * h), (f(a, b + h, z) - f(a, b - h, z)) / (2 * h),
           (f(a, b, z + h) - f(a, b, z - h)) / (2 * h)]
    for got, want in zip((d[1], d[2], d[6]), num):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    g = lambda a_, b_, z_: ZINB.derivatives(yy, np.array([a_]), np.array([b_]), np.array([z_]), zeta=True)  # noqa: E731
    iaa = -(g(a + h, b, z)[1][0] - g(a - h, b, z)[1][0]) / (2 * h)
    iab = -(g(a, b + h, z)[1][0] - g(a, b - h, z)[1][0]) / (2 * h)
    ibb = -(g(a, b + h, z)[2][0] - g(a, b - h, z)[2][0]) / (2 * h)
    izz = -(g(a, b, z + h)[6][0] - g(a, b, z - h)[6][0]) / (2 * h)
    for got, want in zip((d[3], d[4], d[5], d[7]), (iaa, iab, ibb, izz)):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_probabilities_sum_to_one_and_mean():
    a, b, z = np.log(3.0), -1.0, np.log(2.0)
    y = np.arange(0, 400, dtype=float)
    p = np.exp(ZINB.loglik(y, np.full_like(y, a), np.full_like(y, b), z))
    assert p.sum() == pytest.approx(1.0, rel=1e-12)
    assert (p * y).sum() == pytest.approx(float(ZINB.mean(np.array(a), np.array(b))), rel=1e-10)


def test_count_tables_equal_special_functions():
    theta = 1.7
    ln, dpsi, dtri = ZINB.count_tables(theta, 500)
    y = np.arange(1, 501, dtype=float)
    a, b = np.full(500, 1.2), np.full(500, -0.5)
    direct = ZINB.derivatives_positive(y, a, b, np.log(theta), zeta=True)
    tab = ZINB.derivatives_positive(y, a, b, np.log(theta), zeta=True, lognorm=ln[1:], dpsi=dpsi[1:], dtri=dtri[1:])
    for u, v in zip(direct, tab):
        np.testing.assert_allclose(u, v, rtol=1e-11, atol=1e-11)


def test_poisson_plateau_is_finite_and_poisson():
    """zinbwave's fits end at theta ~ e^45: the log-pmf must be the Poisson one there."""
    from scipy.stats import poisson

    y = np.array([0.0, 1.0, 7.0, 60.0])
    a = np.log(np.array([0.5, 2.0, 6.0, 55.0]))
    b = np.full(4, -30.0)
    ll = ZINB.loglik(y, a, b, 45.49)
    np.testing.assert_allclose(ll, poisson.logpmf(y, np.exp(a)), rtol=1e-10)


@pytest.fixture(scope="module")
def small_problem():
    sim = make_zinb_counts(60, 25, n_clusters=2, random_state=1)
    Y = sp.csr_matrix(sim.counts)
    n, J = Y.shape
    X, V = sim.batch_design, np.ones((J, 1))
    design = Design(X, V, np.log(np.asarray(Y.sum(1)).ravel() / 10), None, Penalty.zinbwave(X, V, n, J), 2)
    counts = Counts(Y, np, batch_size=17)
    P = initialize(counts, design, 2, np.random.default_rng(0))
    P.zeta[:] = np.linspace(-0.2, 0.4, J)
    return counts, design, P


def test_block_gradients_and_information_match_finite_differences(small_problem):
    """The cell and gene blocks' Newton quantities are those of the penalised objective."""
    counts, design, P = small_problem
    opt = Optimizer(counts, design, common_dispersion=False)
    acc = opt.cell_pass(P.copy(), update_cells=False)
    G0 = P.gene_block()
    g_gene = acc["grad"] - design.pen_gene * G0
    H_gene = acc["H"] + np.diag(design.pen_gene)

    def f_gene(j, G):
        Q = P.copy()
        Q.set_gene_block(G[j:j + 1], np.array([j]))
        return float(opt.loglik_by_gene(Q, np.array([j]))[0]) - float(design.gene_penalty(G[j:j + 1])[0])

    h = 1e-5
    for j in (0, 7):
        for k in range(G0.shape[1]):
            Gp, Gm = G0.copy(), G0.copy()
            Gp[j, k] += h
            Gm[j, k] -= h
            assert g_gene[j, k] == pytest.approx((f_gene(j, Gp) - f_gene(j, Gm)) / (2 * h), rel=1e-5, abs=1e-5)
        # information column 0 by differencing the gradient
        Gp = G0.copy()
        Gp[j, 0] += h
        Q = P.copy()
        Q.set_gene_block(Gp)
        acc2 = opt.cell_pass(Q, update_cells=False)
        g2 = acc2["grad"] - design.pen_gene * Gp
        np.testing.assert_allclose(-(g2[j] - g_gene[j]) / h, H_gene[j, :, 0], rtol=1e-3, atol=1e-3)
    # dispersion gradient
    zp = P.copy()
    zp.zeta[3] += h
    zm = P.copy()
    zm.zeta[3] -= h
    num = (opt.loglik_by_gene(zp)[3] - opt.loglik_by_gene(zm)[3]) / (2 * h)
    assert acc["gz"][3] == pytest.approx(float(num), rel=1e-5)


def test_orthogonalize_keeps_product_and_lowers_penalty(small_problem):
    counts, design, P = small_problem
    Q = P.copy()
    rng = np.random.default_rng(3)
    T = rng.normal(size=(2, 2)) + 2 * np.eye(2)
    Q.W = Q.W @ T
    Q.alpha_mu = np.linalg.solve(T, Q.alpha_mu)
    Q.alpha_pi = np.linalg.solve(T, Q.alpha_pi)
    opt = Optimizer(counts, design, common_dispersion=True)
    before = (Q.W @ Q.alpha_mu, Q.W @ Q.alpha_pi, design.total_penalty(Q, True))
    opt.orthogonalize(Q)
    np.testing.assert_allclose(Q.W @ Q.alpha_mu, before[0], atol=1e-10)
    np.testing.assert_allclose(Q.W @ Q.alpha_pi, before[1], atol=1e-10)
    assert design.total_penalty(Q, True) <= before[2]
    # balanced: eps_W W'W = eps_alpha A A' (diagonal)
    A = np.concatenate([Q.alpha_mu, Q.alpha_pi], axis=1)
    np.testing.assert_allclose(design.penalty.W * Q.W.T @ Q.W, design.penalty.alpha * A @ A.T, atol=1e-8)


def test_monotone_and_chunking_invariant(small_problem):
    counts, design, P = small_problem
    results = []
    for bs in (60, 7):
        c = Counts(counts.Y, np, batch_size=bs)
        Q = P.copy()
        hist, _ = Optimizer(c, design, common_dispersion=False).run(Q, max_iter=6, tol=0.0)
        assert np.all(np.diff(hist) >= -1e-9 * abs(hist[0]))
        results.append(hist[-1])
    assert results[0] == pytest.approx(results[1], rel=1e-10)


def test_subsample_problem_scales_gene_penalties(small_problem):
    """A subsample problem's objective is the subsample cells' log-likelihood minus their
    cell penalties minus m/n times the gene penalties; all cells give the full objective."""
    from skmixed.zinb._schedule import subsample_problem

    counts, design, P = small_problem
    n = counts.n
    full = Optimizer(counts, design, common_dispersion=False)
    ll_full, pen_full = full.objective(P)
    c, d, Q = subsample_problem(counts, design, P, np.arange(n))
    assert Optimizer(c, d, common_dispersion=False).objective(Q) == pytest.approx((ll_full, pen_full), rel=1e-12)
    idx = np.sort(np.random.default_rng(0).choice(n, 20, replace=False))
    c, d, Q = subsample_problem(counts, design, P, idx)
    ll_sub, pen_ll_sub = Optimizer(c, d, common_dispersion=False).objective(Q)
    from skmixed.zinb._evaluate import evaluate

    (ll_entries,) = evaluate(design, counts, P, idx, derivs=False)
    assert ll_sub == pytest.approx(float(ll_entries.sum()), rel=1e-12)
    expected_pen = (
        float(design.cell_penalty(P.cell_block(idx)).sum())
        + 20 / n * float(design.gene_penalty(P.gene_block()).sum())
        + 20 / n * design.zeta_penalty(P.zeta, False)
    )
    assert ll_sub - pen_ll_sub == pytest.approx(expected_pen, rel=1e-12)


def test_dispersion_prefit_on_a_subsample_is_close_to_the_full_one():
    from skmixed.zinb._schedule import prefit_dispersion

    sim = make_zinb_counts(3000, 40, n_clusters=2, dispersion=0.5, random_state=2)
    Y = sp.csr_matrix(sim.counts)
    Y = Y[np.asarray(Y.sum(1)).ravel() > 0]
    n, J = Y.shape
    X, V = np.ones((n, 1)), np.ones((J, 1))
    design = Design(X, V, None, None, Penalty.zinbwave(X, V, n, J), 2)
    counts = Counts(Y, np)
    P = initialize(counts, design, 2, np.random.default_rng(0))
    full, sub = P.copy(), P.copy()
    prefit_dispersion(counts, design, full, common=True, rng=np.random.default_rng(1), size=n)
    prefit_dispersion(counts, design, sub, common=True, rng=np.random.default_rng(1), size=600)
    # common log-dispersion from 600 of 3,000 cells: within a few percent of theta
    assert abs(sub.zeta[0] - full.zeta[0]) < 0.05
    assert np.all(sub.zeta == sub.zeta[0])


def test_threaded_positive_part_equals_serial(small_problem):
    from skmixed.zinb import _evaluate

    counts, design, P = small_problem
    serial = _evaluate.evaluate(design, counts, P, slice(None), derivs=True, zeta=True)
    c2 = Counts(counts.Y, np, batch_size=counts.batch_size)
    c2.n_threads = 2
    old = _evaluate.BLOCK_ENTRIES
    _evaluate.BLOCK_ENTRIES = 16  # pieces even on this small matrix
    try:
        threaded = _evaluate.evaluate(design, c2, P, slice(None), derivs=True, zeta=True)
    finally:
        _evaluate.BLOCK_ENTRIES = old
    for s, t in zip(serial, threaded):
        np.testing.assert_array_equal(s, t)
